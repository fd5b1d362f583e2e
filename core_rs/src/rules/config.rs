//! Rule sets: the rules of one challenge phase, validated once when registered.

use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{RuleError, RuleResult};

/// The level a day's loss is measured from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DailyReference {
    /// The day snapshot's equity.
    DayStartEquity,
    /// The day snapshot's balance.
    DayStartBalance,
    /// The larger of the two.
    DayStartMax,
}

/// What `max_daily_loss` multiplies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DailyLossBase {
    /// The phase's initial balance.
    InitialBalance,
    /// The day's reference level.
    DayStart,
}

/// What a daily-loss breach does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DailyLossAction {
    /// Fail the phase.
    Fail,
    /// Lock the rest of the day; the phase stays active.
    Pause,
}

/// How the overall floor moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TotalLossMode {
    /// Fixed at `initial_balance − L_m`.
    Static,
    /// Follows every tick's equity up.
    Trailing,
    /// Follows each day's closing equity up.
    TrailingEod,
}

/// What counts as a trading day (`rules.md`, deal rules).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TradingDayBasis {
    /// A local day on which some tick shows activity.
    Activity,
    /// A local day on which at least one `in` deal was executed.
    Deals,
}

/// What a deal-rule violation does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DealViolationAction {
    /// A critical breach that fails the phase.
    Fail,
    /// A warning; the phase goes on.
    Flag,
}

/// A weekly instant `"DDD HH:MM"`, local to the phase's time zone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeekendClose {
    /// Day of the week, 0 = Monday … 6 = Sunday.
    pub weekday: u8,
    /// Minutes after local midnight.
    pub minutes: u16,
}

/// Day names of `weekend_close`, Monday first.
pub const WEEKDAYS: [&str; 7] = ["MON", "TUE", "WED", "THU", "FRI", "SAT", "SUN"];

impl WeekendClose {
    fn parse(value: &RuleValue) -> RuleResult<Self> {
        let err = || {
            RuleError::invalid(
                "weekend_close",
                format!(
                    "must be \"DDD HH:MM\" (DDD one of MON…SUN) or null, got {}",
                    describe(value)
                ),
            )
        };
        let RuleValue::Str(s) = value else {
            return Err(err());
        };
        if s.len() != 9 || !s.is_ascii() || s.as_bytes()[3] != b' ' {
            return Err(err());
        }
        let weekday = WEEKDAYS
            .iter()
            .position(|d| *d == &s[..3])
            .ok_or_else(err)?;
        let minutes = parse_hh_mm(&s[4..]).ok_or_else(err)?;
        Ok(Self {
            weekday: u8::try_from(weekday).unwrap_or(0),
            minutes,
        })
    }

    /// The `"DDD HH:MM"` text.
    #[must_use]
    pub fn text(&self) -> String {
        format!(
            "{} {:02}:{:02}",
            WEEKDAYS[usize::from(self.weekday) % 7],
            self.minutes / 60,
            self.minutes % 60
        )
    }
}

/// A deal's volume (or `max_open_lots`) in whole hundredths of a lot:
/// `round_half_even(x × 100)` in binary64 (`rules.md`, deal events).
#[must_use]
#[allow(clippy::cast_possible_truncation)]
pub fn hundredths(lots: f64) -> i64 {
    // Finite lots below 2^53 / 100 convert exactly; larger ones saturate, which
    // no real volume reaches.
    (lots * 100.0).round_ties_even() as i64
}

/// A rule value as it arrives from Python or JSON, before validation.
#[derive(Clone, Debug, PartialEq)]
pub enum RuleValue {
    /// `null` / `None`.
    Null,
    /// A boolean (never a valid rule value, kept to name the error).
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A string.
    Str(String),
}

/// The validated rules of one phase (`rules.md`, table of rules).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RuleSet {
    /// The phase account's starting balance.
    pub initial_balance: f64,
    /// Target as a ratio of `initial_balance`; `None` for a funded phase.
    pub profit_target: Option<f64>,
    /// Daily loss limit as a share of the base.
    pub max_daily_loss: Option<f64>,
    /// The level a day's loss is measured from.
    pub daily_reference: DailyReference,
    /// What `max_daily_loss` multiplies.
    pub daily_loss_base: DailyLossBase,
    /// What a daily-loss breach does.
    pub daily_loss_action: DailyLossAction,
    /// Overall loss limit as a share of `initial_balance`.
    pub max_total_loss: Option<f64>,
    /// How the overall floor moves.
    pub total_loss_mode: TotalLossMode,
    /// Trading days needed before the phase can pass.
    pub min_trading_days: u32,
    /// Time limit in days from the phase start.
    pub max_days: Option<u32>,
    /// Consistency: best day's profit ≤ this share of total profit.
    pub max_best_day_share: Option<f64>,
    /// Share of a loss limit that raises a warning.
    pub warning_level: Option<f64>,
    /// IANA zone of the local trading day.
    pub timezone: String,
    /// Local time (minutes after midnight) at which a trading day starts.
    pub day_rollover_minutes: u16,
    /// What counts as a trading day.
    pub trading_day_basis: TradingDayBasis,
    /// Open lots must stay ≤ this.
    pub max_open_lots: Option<f64>,
    /// A position closed sooner than this many seconds after it opened violates.
    pub min_hold_seconds: Option<i64>,
    /// Positions may not be held across this weekly instant.
    pub weekend_close: Option<WeekendClose>,
    /// What a deal-rule violation does.
    pub deal_violation_action: DealViolationAction,
}

/// Every rule name, in the order of `rules.md`.
pub const RULE_NAMES: [&str; 19] = [
    "initial_balance",
    "profit_target",
    "max_daily_loss",
    "daily_reference",
    "daily_loss_base",
    "daily_loss_action",
    "max_total_loss",
    "total_loss_mode",
    "min_trading_days",
    "max_days",
    "max_best_day_share",
    "warning_level",
    "timezone",
    "day_rollover",
    "trading_day_basis",
    "max_open_lots",
    "min_hold_seconds",
    "weekend_close",
    "deal_violation_action",
];

impl Default for RuleSet {
    /// The defaults of `rules.md`, with an `initial_balance` of 0 that `validate`
    /// refuses: a rule set always needs one.
    fn default() -> Self {
        Self {
            initial_balance: 0.0,
            profit_target: None,
            max_daily_loss: None,
            daily_reference: DailyReference::DayStartEquity,
            daily_loss_base: DailyLossBase::InitialBalance,
            daily_loss_action: DailyLossAction::Fail,
            max_total_loss: None,
            total_loss_mode: TotalLossMode::Static,
            min_trading_days: 0,
            max_days: None,
            max_best_day_share: None,
            warning_level: None,
            timezone: "UTC".to_owned(),
            day_rollover_minutes: 0,
            trading_day_basis: TradingDayBasis::Activity,
            max_open_lots: None,
            min_hold_seconds: None,
            weekend_close: None,
            deal_violation_action: DealViolationAction::Fail,
        }
    }
}

fn describe(value: &RuleValue) -> String {
    match value {
        RuleValue::Null => "null".to_owned(),
        RuleValue::Bool(b) => b.to_string(),
        RuleValue::Int(i) => i.to_string(),
        RuleValue::Float(f) => f.to_string(),
        RuleValue::Str(s) => format!("{s:?}"),
    }
}

fn number(field: &str, value: &RuleValue) -> RuleResult<f64> {
    let x = match value {
        RuleValue::Int(i) => *i as f64,
        RuleValue::Float(f) => *f,
        other => {
            return Err(RuleError::invalid(
                field,
                format!("must be a number, got {}", describe(other)),
            ))
        }
    };
    if x.is_finite() {
        Ok(x)
    } else {
        Err(RuleError::invalid(
            field,
            format!("must be finite, got {x}"),
        ))
    }
}

fn ratio(field: &str, value: &RuleValue) -> RuleResult<Option<f64>> {
    if *value == RuleValue::Null {
        return Ok(None);
    }
    let x = number(field, value)?;
    if x > 0.0 && x < 1.0 {
        Ok(Some(x))
    } else {
        Err(RuleError::invalid(
            field,
            format!("must be a ratio in (0, 1), got {}", describe(value)),
        ))
    }
}

fn integer(field: &str, value: &RuleValue) -> RuleResult<i64> {
    match value {
        RuleValue::Int(i) => Ok(*i),
        RuleValue::Float(f) if f.fract() == 0.0 && f.abs() < 1e15 => Ok(*f as i64),
        other => Err(RuleError::invalid(
            field,
            format!("must be an integer, got {}", describe(other)),
        )),
    }
}

fn choice<T: Copy>(field: &str, value: &RuleValue, options: &[(&str, T)]) -> RuleResult<T> {
    if let RuleValue::Str(s) = value {
        if let Some((_, v)) = options.iter().find(|(name, _)| name == s) {
            return Ok(*v);
        }
    }
    let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
    Err(RuleError::invalid(
        field,
        format!(
            "must be one of {}, got {}",
            names.join(" | "),
            describe(value)
        ),
    ))
}

/// Parse `HH:MM` into minutes after midnight.
fn parse_rollover(value: &RuleValue) -> RuleResult<u16> {
    let err = || {
        RuleError::invalid(
            "day_rollover",
            format!("must be a local time HH:MM, got {}", describe(value)),
        )
    };
    let RuleValue::Str(s) = value else {
        return Err(err());
    };
    parse_hh_mm(s).ok_or_else(err)
}

/// `HH:MM` (two digits each, `HH < 24`, `MM < 60`) as minutes after midnight.
fn parse_hh_mm(s: &str) -> Option<u16> {
    let b = s.as_bytes();
    if b.len() != 5
        || b[2] != b':'
        || !b
            .iter()
            .enumerate()
            .all(|(i, c)| i == 2 || c.is_ascii_digit())
    {
        return None;
    }
    let hours = u16::from(b[0] - b'0') * 10 + u16::from(b[1] - b'0');
    let minutes = u16::from(b[3] - b'0') * 10 + u16::from(b[4] - b'0');
    if hours > 23 || minutes > 59 {
        return None;
    }
    Some(hours * 60 + minutes)
}

impl RuleSet {
    /// Build and validate a rule set from `(name, value)` pairs; omitted rules take
    /// their defaults.
    ///
    /// # Errors
    /// [`RuleError::InvalidRule`] naming the first bad field: an unknown rule, a
    /// missing `initial_balance`, a wrong type or a value out of range.
    pub fn from_pairs<I, S>(pairs: I) -> RuleResult<Self>
    where
        I: IntoIterator<Item = (S, RuleValue)>,
        S: AsRef<str>,
    {
        let mut rules = Self::default();
        let mut has_balance = false;
        for (name, value) in pairs {
            let field = name.as_ref();
            match field {
                "initial_balance" => {
                    let x = number(field, &value)?;
                    if x <= 0.0 {
                        return Err(RuleError::invalid(field, format!("must be > 0, got {x}")));
                    }
                    rules.initial_balance = x;
                    has_balance = true;
                }
                "profit_target" => rules.profit_target = ratio(field, &value)?,
                "max_daily_loss" => rules.max_daily_loss = ratio(field, &value)?,
                "max_total_loss" => rules.max_total_loss = ratio(field, &value)?,
                "max_best_day_share" => rules.max_best_day_share = ratio(field, &value)?,
                "warning_level" => rules.warning_level = ratio(field, &value)?,
                "daily_reference" => {
                    rules.daily_reference = choice(
                        field,
                        &value,
                        &[
                            ("day_start_equity", DailyReference::DayStartEquity),
                            ("day_start_balance", DailyReference::DayStartBalance),
                            ("day_start_max", DailyReference::DayStartMax),
                        ],
                    )?;
                }
                "daily_loss_base" => {
                    rules.daily_loss_base = choice(
                        field,
                        &value,
                        &[
                            ("initial_balance", DailyLossBase::InitialBalance),
                            ("day_start", DailyLossBase::DayStart),
                        ],
                    )?;
                }
                "daily_loss_action" => {
                    rules.daily_loss_action = choice(
                        field,
                        &value,
                        &[
                            ("fail", DailyLossAction::Fail),
                            ("pause", DailyLossAction::Pause),
                        ],
                    )?;
                }
                "total_loss_mode" => {
                    rules.total_loss_mode = choice(
                        field,
                        &value,
                        &[
                            ("static", TotalLossMode::Static),
                            ("trailing", TotalLossMode::Trailing),
                            ("trailing_eod", TotalLossMode::TrailingEod),
                        ],
                    )?;
                }
                "min_trading_days" => {
                    let n = integer(field, &value)?;
                    rules.min_trading_days = u32::try_from(n).map_err(|_| {
                        RuleError::invalid(field, format!("must be an integer ≥ 0, got {n}"))
                    })?;
                }
                "max_days" => {
                    rules.max_days = if value == RuleValue::Null {
                        None
                    } else {
                        let n = integer(field, &value)?;
                        match u32::try_from(n) {
                            Ok(days) if days > 0 && days <= 100_000 => Some(days),
                            _ => {
                                return Err(RuleError::invalid(
                                    field,
                                    format!("must be an integer > 0, got {n}"),
                                ))
                            }
                        }
                    };
                }
                "timezone" => {
                    let RuleValue::Str(s) = &value else {
                        return Err(RuleError::invalid(
                            field,
                            format!("must be an IANA time zone name, got {}", describe(&value)),
                        ));
                    };
                    if chrono_tz::Tz::from_str(s).is_err() {
                        return Err(RuleError::invalid(
                            field,
                            format!("unknown time zone {s:?}"),
                        ));
                    }
                    rules.timezone.clone_from(s);
                }
                "day_rollover" => rules.day_rollover_minutes = parse_rollover(&value)?,
                "trading_day_basis" => {
                    rules.trading_day_basis = choice(
                        field,
                        &value,
                        &[
                            ("activity", TradingDayBasis::Activity),
                            ("deals", TradingDayBasis::Deals),
                        ],
                    )?;
                }
                "max_open_lots" => {
                    rules.max_open_lots = if value == RuleValue::Null {
                        None
                    } else {
                        let x = number(field, &value)?;
                        if x <= 0.0 {
                            return Err(RuleError::invalid(
                                field,
                                format!("must be a number > 0 or null, got {}", describe(&value)),
                            ));
                        }
                        // A limit that rounds to 0 hundredths is refused, like a volume.
                        if hundredths(x) < 1 {
                            return Err(RuleError::invalid(
                                field,
                                format!("must be at least 0.01 lots, got {}", describe(&value)),
                            ));
                        }
                        Some(x)
                    };
                }
                "min_hold_seconds" => {
                    rules.min_hold_seconds = if value == RuleValue::Null {
                        None
                    } else {
                        let n = integer(field, &value)?;
                        // Bounded so that `n × 1 000 000` µs never overflows.
                        if n <= 0 || n > 1_000_000_000_000 {
                            return Err(RuleError::invalid(
                                field,
                                format!("must be an integer > 0 or null, got {n}"),
                            ));
                        }
                        Some(n)
                    };
                }
                "weekend_close" => {
                    rules.weekend_close = if value == RuleValue::Null {
                        None
                    } else {
                        Some(WeekendClose::parse(&value)?)
                    };
                }
                "deal_violation_action" => {
                    rules.deal_violation_action = choice(
                        field,
                        &value,
                        &[
                            ("fail", DealViolationAction::Fail),
                            ("flag", DealViolationAction::Flag),
                        ],
                    )?;
                }
                other => {
                    return Err(RuleError::invalid(
                        other,
                        format!("unknown rule (known rules: {})", RULE_NAMES.join(", ")),
                    ))
                }
            }
        }
        if !has_balance {
            return Err(RuleError::invalid("initial_balance", "is required"));
        }
        Ok(rules)
    }

    /// The rule set as `(name, value)` pairs, every rule present.
    #[must_use]
    pub fn to_pairs(&self) -> Vec<(&'static str, RuleValue)> {
        let opt = |x: Option<f64>| x.map_or(RuleValue::Null, RuleValue::Float);
        let s = |x: &str| RuleValue::Str(x.to_owned());
        vec![
            ("initial_balance", RuleValue::Float(self.initial_balance)),
            ("profit_target", opt(self.profit_target)),
            ("max_daily_loss", opt(self.max_daily_loss)),
            (
                "daily_reference",
                s(match self.daily_reference {
                    DailyReference::DayStartEquity => "day_start_equity",
                    DailyReference::DayStartBalance => "day_start_balance",
                    DailyReference::DayStartMax => "day_start_max",
                }),
            ),
            (
                "daily_loss_base",
                s(match self.daily_loss_base {
                    DailyLossBase::InitialBalance => "initial_balance",
                    DailyLossBase::DayStart => "day_start",
                }),
            ),
            (
                "daily_loss_action",
                s(match self.daily_loss_action {
                    DailyLossAction::Fail => "fail",
                    DailyLossAction::Pause => "pause",
                }),
            ),
            ("max_total_loss", opt(self.max_total_loss)),
            (
                "total_loss_mode",
                s(match self.total_loss_mode {
                    TotalLossMode::Static => "static",
                    TotalLossMode::Trailing => "trailing",
                    TotalLossMode::TrailingEod => "trailing_eod",
                }),
            ),
            (
                "min_trading_days",
                RuleValue::Int(i64::from(self.min_trading_days)),
            ),
            (
                "max_days",
                self.max_days
                    .map_or(RuleValue::Null, |d| RuleValue::Int(i64::from(d))),
            ),
            ("max_best_day_share", opt(self.max_best_day_share)),
            ("warning_level", opt(self.warning_level)),
            ("timezone", s(&self.timezone)),
            (
                "day_rollover",
                RuleValue::Str(format!(
                    "{:02}:{:02}",
                    self.day_rollover_minutes / 60,
                    self.day_rollover_minutes % 60
                )),
            ),
            (
                "trading_day_basis",
                s(match self.trading_day_basis {
                    TradingDayBasis::Activity => "activity",
                    TradingDayBasis::Deals => "deals",
                }),
            ),
            ("max_open_lots", opt(self.max_open_lots)),
            (
                "min_hold_seconds",
                self.min_hold_seconds
                    .map_or(RuleValue::Null, RuleValue::Int),
            ),
            (
                "weekend_close",
                self.weekend_close
                    .map_or(RuleValue::Null, |w| RuleValue::Str(w.text())),
            ),
            (
                "deal_violation_action",
                s(match self.deal_violation_action {
                    DealViolationAction::Fail => "fail",
                    DealViolationAction::Flag => "flag",
                }),
            ),
        ]
    }

    /// `max_open_lots` in hundredths, converted like a deal's volume.
    #[must_use]
    pub fn max_open_hundredths(&self) -> Option<i64> {
        self.max_open_lots.map(hundredths)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(extra: &[(&str, RuleValue)]) -> Vec<(String, RuleValue)> {
        let mut v = vec![("initial_balance".to_owned(), RuleValue::Int(100_000))];
        v.extend(extra.iter().map(|(k, x)| ((*k).to_owned(), x.clone())));
        v
    }

    fn field_of(err: RuleError) -> String {
        match err {
            RuleError::InvalidRule { field, .. } => field,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn defaults_follow_rules_md() {
        let r = RuleSet::from_pairs(pairs(&[])).unwrap();
        assert_eq!(r.total_loss_mode, TotalLossMode::Static);
        assert_eq!(r.daily_reference, DailyReference::DayStartEquity);
        assert_eq!(r.timezone, "UTC");
        assert_eq!(r.day_rollover_minutes, 0);
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            ("profit_target", RuleValue::Float(1.5)),
            ("max_daily_loss", RuleValue::Float(0.0)),
            ("warning_level", RuleValue::Bool(true)),
            ("timezone", RuleValue::Str("Mars/Olympus".into())),
            ("day_rollover", RuleValue::Str("24:00".into())),
            ("day_rollover", RuleValue::Str("7:00".into())),
            ("max_days", RuleValue::Int(0)),
            ("min_trading_days", RuleValue::Int(-1)),
            ("total_loss_mode", RuleValue::Str("sometimes".into())),
            ("bogus_rule", RuleValue::Int(1)),
            ("trading_day_basis", RuleValue::Str("ticks".into())),
            ("max_open_lots", RuleValue::Float(0.004)),
            ("max_open_lots", RuleValue::Int(0)),
            ("max_open_lots", RuleValue::Float(f64::NAN)),
            ("min_hold_seconds", RuleValue::Int(0)),
            ("min_hold_seconds", RuleValue::Float(1.5)),
            ("min_hold_seconds", RuleValue::Bool(true)),
            ("weekend_close", RuleValue::Str("fri 22:00".into())),
            ("weekend_close", RuleValue::Str("FRI 24:00".into())),
            ("weekend_close", RuleValue::Str("FRI 22:00 ".into())),
            ("weekend_close", RuleValue::Str("FRI22:00".into())),
            ("weekend_close", RuleValue::Int(5)),
            ("deal_violation_action", RuleValue::Str("pause".into())),
        ];
        for (field, value) in cases {
            let err = RuleSet::from_pairs(pairs(&[(field, value)])).unwrap_err();
            assert_eq!(field_of(err), field);
        }
        let err = RuleSet::from_pairs(Vec::<(String, RuleValue)>::new()).unwrap_err();
        assert_eq!(field_of(err), "initial_balance");
    }

    #[test]
    fn pairs_round_trip() {
        let r = RuleSet::from_pairs(pairs(&[
            ("day_rollover", RuleValue::Str("17:05".into())),
            ("max_days", RuleValue::Int(30)),
            ("total_loss_mode", RuleValue::Str("trailing_eod".into())),
            ("trading_day_basis", RuleValue::Str("deals".into())),
            ("max_open_lots", RuleValue::Float(2.5)),
            ("min_hold_seconds", RuleValue::Int(60)),
            ("weekend_close", RuleValue::Str("FRI 22:00".into())),
            ("deal_violation_action", RuleValue::Str("flag".into())),
        ]))
        .unwrap();
        assert_eq!(RuleSet::from_pairs(r.to_pairs()).unwrap(), r);
        assert_eq!(
            r.weekend_close,
            Some(WeekendClose {
                weekday: 4,
                minutes: 22 * 60
            })
        );
        assert_eq!(r.max_open_hundredths(), Some(250));
    }

    #[test]
    fn hundredths_round_half_even_in_binary64() {
        assert_eq!(hundredths(1.005), 100); // 100.49999… in binary64
        assert_eq!(hundredths(0.125), 12);
        assert_eq!(hundredths(0.135), 14);
        assert_eq!(hundredths(0.004), 0);
        assert_eq!(hundredths(0.005), 0); // 0.5 ties to even
        assert_eq!(hundredths(0.015), 2); // 1.5 ties to even
    }
}

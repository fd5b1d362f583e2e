//! The evaluator: per-phase state in a dense `Vec`, ticks judged in batches.

use hashbrown::HashMap;
use serde::{Deserialize, Serialize};

use crate::error::{RuleError, RuleResult};
use crate::rules::calendar::{DayClock, WeeklyClock};
use crate::rules::config::{
    DailyLossAction, DailyLossBase, DailyReference, DealViolationAction, RuleSet, TotalLossMode,
    TradingDayBasis,
};
use crate::rules::deals::{Deal, DealInput, DealState, Entry, Update};
use crate::rules::output::{BatchOutput, BreachRow, DailyRow, DealOpen, TransitionRow};

/// Round to the cent, half to even, in binary64 (`rules.md`, definitions).
#[inline]
#[must_use]
pub fn cent(x: f64) -> f64 {
    round_ties_even(x * 100.0) / 100.0
}

/// `f64::round_ties_even` without the libm call it becomes on baseline x86-64: for
/// `|y| < 2^52`, adding and subtracting `2^52` (with `y`'s sign) rounds to the nearest
/// integer, ties to even, in IEEE default rounding; larger values are integers
/// already. Unlike `rint`, a negative value that rounds to zero gives `+0.0`, as
/// Python's `round` does.
#[inline]
fn round_ties_even(y: f64) -> f64 {
    const TWO_52: f64 = 4_503_599_627_370_496.0;
    if y.abs() < TWO_52 {
        let c = TWO_52.copysign(y);
        (y + c) - c
    } else {
        y
    }
}

#[cfg(test)]
mod round_tests {
    use super::{cent, round_ties_even};

    #[test]
    fn round_ties_even_matches_std() {
        let cases = [
            0.5,
            1.5,
            2.5,
            -0.5,
            -1.5,
            -2.5,
            0.499_999_999_999_999_94,
            1e15 + 0.5,
            4.5e15,
            -7.5,
            123_456.5,
        ];
        for y in cases {
            assert_eq!(round_ties_even(y), y.round_ties_even(), "{y}");
        }
        assert_eq!(cent(100_000.0 * 1.1), 110_000.0);
        assert_eq!(cent(0.125), 0.12);
        assert_eq!(cent(0.135), 0.14);
    }
}

/// A phase's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    /// Being judged.
    Active,
    /// Reached its target with every condition met.
    Passed,
    /// Broke a critical rule.
    Failed,
}

impl Status {
    /// The status name used in every output.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Passed => "passed",
            Self::Failed => "failed",
        }
    }
}

/// The rules a breach can be of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rule {
    /// `max_days` exceeded.
    TimeLimit,
    /// Equity below the overall floor.
    MaxLoss,
    /// Equity below the daily floor.
    DailyLoss,
    /// Overall loss at or past the warning level.
    MaxLossWarning,
    /// Daily loss at or past the warning level.
    DailyLossWarning,
    /// Open lots above `max_open_lots` after an `in` deal.
    MaxPositionSize,
    /// A position closed sooner than `min_hold_seconds` after it opened.
    ShortHold,
    /// A position held across the weekly `weekend_close`.
    WeekendHold,
}

impl Rule {
    /// The rule name used in every output.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TimeLimit => "time_limit",
            Self::MaxLoss => "max_loss",
            Self::DailyLoss => "daily_loss",
            Self::MaxLossWarning => "max_loss_warning",
            Self::DailyLossWarning => "daily_loss_warning",
            Self::MaxPositionSize => "max_position_size",
            Self::ShortHold => "short_hold",
            Self::WeekendHold => "weekend_hold",
        }
    }

    /// `critical` or `warning`: a deal rule's depends on `deal_violation_action`,
    /// which its breach's action shows (`notify` under `flag`).
    #[must_use]
    pub fn severity(self, action: Action) -> &'static str {
        match (self, action) {
            (Self::MaxLossWarning | Self::DailyLossWarning, _)
            | (Self::MaxPositionSize | Self::ShortHold | Self::WeekendHold, Action::Notify) => {
                "warning"
            }
            _ => "critical",
        }
    }
}

/// What a breach did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// The phase failed.
    PhaseFailed,
    /// The day is locked; the phase goes on.
    TradingPaused,
    /// Only a notification.
    Notify,
}

impl Action {
    /// The action name used in every output.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PhaseFailed => "phase_failed",
            Self::TradingPaused => "trading_paused",
            Self::Notify => "notify",
        }
    }
}

/// Identity of a registered phase.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PhaseSpec {
    /// Trading account login.
    pub account_id: i64,
    /// The challenge the phase belongs to.
    pub challenge_id: String,
    /// Position of the phase in its program.
    pub phase_index: i32,
    /// Phase start, UTC microseconds; earlier ticks are late.
    pub started_at_us: i64,
    /// The phase's rules.
    pub rules: RuleSet,
}

/// A warning that has fired and is not yet resolved.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct OpenWarning {
    seq: u32,
    threshold: f64,
    actual: f64,
    ts: i64,
}

/// Mutable per-phase state: everything a restart needs to continue exactly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PhaseState {
    /// Current status.
    pub status: Status,
    /// When the phase passed or failed.
    pub status_ts: Option<i64>,
    /// Ticks evaluated.
    pub ticks: u64,
    /// Late ticks and ticks before the phase start.
    pub late_ticks: u64,
    last_ts: i64,
    /// Last evaluated equity.
    pub equity: f64,
    /// Last evaluated balance.
    pub balance: f64,
    /// Current local day (days since 1970-01-01).
    pub day: i32,
    next_boundary: i64,
    /// The current day's snapshot equity.
    pub daily_start_equity: f64,
    /// The current day's snapshot balance.
    pub daily_start_balance: f64,
    day_min_equity: f64,
    day_counted: bool,
    day_paused: bool,
    daily_warning_fired: bool,
    day_dirty: bool,
    /// High-water mark.
    pub hwm: f64,
    /// Trading days so far.
    pub trading_days: u32,
    best_closed_day: f64,
    breach_seq: u32,
    max_warning: Option<OpenWarning>,
    daily_warning: Option<OpenWarning>,
    /// The `ts` of the last processed event, tick or deal (lateness is judged
    /// against it; `last_ts` stays the last evaluated tick's, for the metrics).
    last_event_ts: i64,
    /// The first weekly `weekend_close` instant after `last_event_ts` while
    /// positions are open, else `i64::MAX`: the one number a tick compares to
    /// know whether `weekend_hold` has anything to judge.
    next_weekend: i64,
    /// Whether a deal was processed since the last evaluated tick (then the same
    /// tick again is a new observation, not a duplicate).
    deal_since_tick: bool,
}

impl OpenWarning {
    pub(crate) fn parts(&self) -> (u32, f64, f64, i64) {
        (self.seq, self.threshold, self.actual, self.ts)
    }
}

impl PhaseState {
    /// Lowest evaluated equity of the current day.
    #[must_use]
    pub fn day_min_equity(&self) -> f64 {
        self.day_min_equity
    }

    /// Timestamp of the last evaluated tick.
    #[must_use]
    pub fn last_ts(&self) -> i64 {
        self.last_ts
    }

    /// Whether the daily rule rests for the rest of the current day.
    #[must_use]
    pub fn day_paused(&self) -> bool {
        self.day_paused
    }

    fn new(initial_balance: f64) -> Self {
        Self {
            status: Status::Active,
            status_ts: None,
            ticks: 0,
            late_ticks: 0,
            last_ts: i64::MIN,
            equity: f64::NAN,
            balance: f64::NAN,
            day: 0,
            next_boundary: i64::MIN,
            daily_start_equity: f64::NAN,
            daily_start_balance: f64::NAN,
            day_min_equity: f64::NAN,
            day_counted: false,
            day_paused: false,
            daily_warning_fired: false,
            day_dirty: false,
            hwm: initial_balance,
            trading_days: 0,
            best_closed_day: f64::NEG_INFINITY,
            breach_seq: 0,
            max_warning: None,
            daily_warning: None,
            last_event_ts: i64::MIN,
            next_weekend: i64::MAX,
            deal_since_tick: false,
        }
    }

    /// Whether any tick has been evaluated.
    #[must_use]
    pub fn has_ticks(&self) -> bool {
        self.ticks > 0
    }
}

/// Values derived once from the rules at registration.
#[derive(Clone, Debug)]
struct Derived {
    clock: DayClock,
    target: Option<f64>,
    overall_limit: Option<f64>,
    deadline: Option<i64>,
}

impl Derived {
    fn new(spec: &PhaseSpec) -> Self {
        let r = &spec.rules;
        Self {
            clock: DayClock::new(&r.timezone, r.day_rollover_minutes),
            target: r.profit_target.map(|p| cent(r.initial_balance * (1.0 + p))),
            overall_limit: r.max_total_loss.map(|m| m * r.initial_balance),
            deadline: r.max_days.map(|d| {
                spec.started_at_us
                    .saturating_add(i64::from(d) * 86_400_000_000)
            }),
        }
    }
}

/// One registered phase.
#[derive(Clone, Debug)]
pub struct Phase {
    /// Who and what is judged.
    pub spec: PhaseSpec,
    /// Where the judging stands.
    pub state: PhaseState,
    derived: Derived,
    /// Deal state (cold: deals and the rare weekend check only); `None` until the
    /// first deal reaches the phase.
    deals: Option<Box<DealState>>,
}

/// The flag bits of [`Hot::flags`].
mod bits {
    /// The phase is being judged (status `active`).
    pub(super) const ACTIVE: u32 = 1;
    /// The current day counts as a trading day already.
    pub(super) const DAY_COUNTED: u32 = 1 << 1;
    /// The current day changed since its last daily row.
    pub(super) const DAY_DIRTY: u32 = 1 << 2;
    /// A deal was processed since the last evaluated tick.
    pub(super) const DEAL_SINCE_TICK: u32 = 1 << 3;
    /// `total_loss_mode = trailing`: a new high moves the overall floor.
    pub(super) const TRAILING: u32 = 1 << 4;
    /// Tests only: every tick takes the cold path (the full rules on
    /// `PhaseState`), the yardstick the hot path is held equal to.
    pub(super) const FORCE_SLOW: u32 = 1 << 5;
}

/// What a tick reads and writes, for one phase: two cache lines, in a `Vec`
/// beside the phases (`Engine::hot`, same slot). Everything else — the spec and
/// rules, the day clock, `PhaseState` with the open warnings and counters, the
/// deal state — is touched only on the cold path (see [`Phase::accept`]), which
/// copies the moving fields into `PhaseState` (`Phase::load`), judges there and
/// refreshes this copy and its cached bounds (`Phase::store`). Between calls the
/// engine leaves the two equal (`Engine::finish`), so `PhaseState`, the
/// snapshots and the outputs read as before.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(64))]
pub(crate) struct Hot {
    // Line 1: the checks every tick makes.
    /// `max(started_at_us, last_event_ts)`: earlier ticks are late.
    late_before: i64,
    /// The earliest instant with something time-based to judge: the next day
    /// boundary, the next weekly close with positions open, just past the
    /// `max_days` deadline; `i64::MIN` before the first tick.
    next_due: i64,
    last_ts: i64,
    equity: f64,
    balance: f64,
    /// The highest of the daily and overall floors and warning levels that
    /// apply (cents), `+inf` while a warning is open: equity above it breaks,
    /// fires and resolves nothing.
    alert: f64,
    /// The target `T`, `+inf` without one.
    target: f64,
    hwm: f64,
    // Line 2: what a judged tick moves.
    day_min_equity: f64,
    ticks: u64,
    last_event_ts: i64,
    touched_epoch: u64,
    /// Under `trailing`, what a new high needs to move the overall floor and
    /// warning level in the hot path: the cap of the reference
    /// (`initial_balance + L`), `L` and `warning_level × L` (NaN when absent).
    trail_cap: f64,
    trail_limit: f64,
    trail_warning: f64,
    flags: u32,
}

impl Hot {
    /// A copy of `phase`'s state with its cached bounds.
    fn of(phase: &Phase) -> Self {
        let mut hot = Self {
            late_before: i64::MIN,
            next_due: i64::MIN,
            last_ts: i64::MIN,
            equity: f64::NAN,
            balance: f64::NAN,
            alert: f64::INFINITY,
            target: f64::INFINITY,
            hwm: f64::NAN,
            day_min_equity: f64::NAN,
            ticks: 0,
            last_event_ts: i64::MIN,
            touched_epoch: 0,
            trail_cap: f64::NAN,
            trail_limit: f64::NAN,
            trail_warning: f64::NAN,
            flags: 0,
        };
        phase.store(&mut hot);
        hot
    }

    #[inline]
    fn touch(&mut self, slot: u32, epoch: u64, out: &mut BatchOutput) {
        if self.touched_epoch != epoch {
            self.touched_epoch = epoch;
            out.touched.push(slot);
        }
    }
}

/// Levels of the current tick, shared by the rules and the metrics.
pub struct Levels {
    /// Daily reference `D`.
    pub daily_reference: f64,
    /// Daily limit `L_d`, when the daily rule is set.
    pub daily_limit: Option<f64>,
    /// Overall reference `R_m`.
    pub overall_reference: f64,
    /// Overall limit `L_m`, when the overall rule is set.
    pub overall_limit: Option<f64>,
}

impl Phase {
    fn new(spec: PhaseSpec, state: PhaseState, deals: Option<DealState>) -> Self {
        let derived = Derived::new(&spec);
        Self {
            spec,
            state,
            derived,
            deals: deals.map(Box::new),
        }
    }

    /// The account's deal state, if a deal ever reached the phase.
    #[must_use]
    pub fn deals(&self) -> Option<&DealState> {
        self.deals.as_deref()
    }

    /// Open lots in hundredths and open positions.
    #[must_use]
    pub fn open_positions(&self) -> (i64, usize) {
        self.deals
            .as_deref()
            .map_or((0, 0), |d| (d.open_hundredths(), d.positions.len()))
    }

    /// The weekly `weekend_close` clock, built when needed: only deals and the
    /// rare tick that crosses a close use it, so `Derived` (read by every tick)
    /// does not carry it.
    fn weekly(&self) -> Option<WeeklyClock> {
        let r = &self.spec.rules;
        r.weekend_close
            .map(|w| WeeklyClock::new(&r.timezone, w.weekday, w.minutes))
    }

    /// The target level `T`, rounded to the cent.
    #[must_use]
    pub fn target(&self) -> Option<f64> {
        self.derived.target
    }

    /// The levels of the current state.
    #[must_use]
    pub fn levels(&self) -> Levels {
        let r = &self.spec.rules;
        let s = &self.state;
        let d = match r.daily_reference {
            DailyReference::DayStartEquity => s.daily_start_equity,
            DailyReference::DayStartBalance => s.daily_start_balance,
            DailyReference::DayStartMax => s.daily_start_equity.max(s.daily_start_balance),
        };
        let daily_limit = r.max_daily_loss.map(|m| {
            m * match r.daily_loss_base {
                DailyLossBase::InitialBalance => r.initial_balance,
                DailyLossBase::DayStart => d,
            }
        });
        let overall_limit = self.derived.overall_limit;
        let overall_reference = match (r.total_loss_mode, overall_limit) {
            (TotalLossMode::Static, _) | (_, None) => r.initial_balance,
            (_, Some(lm)) => s.hwm.min(r.initial_balance + lm),
        };
        Levels {
            daily_reference: d,
            daily_limit,
            overall_reference,
            overall_limit,
        }
    }

    /// The skip checks of `rules.md` step 1, then [`Phase::evaluate`]: the hot
    /// path. It reads and writes `hot` only, and takes the cold path (the whole
    /// of steps 1 to 5 on `PhaseState`, [`Phase::accept_slow`] and
    /// [`Phase::evaluate_slow`]) whenever the tick could do more than move the
    /// state: something time-based is due (`next_due`), equity is at or below
    /// the highest floor or warning level (`alert`), the target is reached, or
    /// the day's first trading tick. A new high under `trailing` raises the
    /// cached overall levels here.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    fn accept(
        &mut self,
        hot: &mut Hot,
        slot: u32,
        epoch: u64,
        t: i64,
        equity: f64,
        balance: f64,
        out: &mut BatchOutput,
    ) {
        if hot.flags & bits::ACTIVE == 0 {
            out.counts.inactive += 1;
            return;
        }
        if t < hot.late_before {
            // Rare: the counter lives in the cold state.
            self.state.late_ticks += 1;
            out.counts.late += 1;
            return;
        }
        if t >= hot.next_due {
            self.accept_slow(hot, slot, epoch, t, equity, balance, out);
            return;
        }
        hot.touch(slot, epoch, out);
        out.counts.evaluated += 1;
        if t == hot.last_ts
            && equity == hot.equity
            && balance == hot.balance
            && hot.flags & bits::DEAL_SINCE_TICK == 0
        {
            // An exact duplicate changes nothing (rules.md step 1). Judging it again
            // could: a tick that paused the day skipped the warnings, its twin
            // would not. After a deal the same values are a new observation.
            hot.ticks += 1;
            return;
        }
        // `balance` is the previous balance here: `next_due` sends a phase's
        // first tick to the cold path.
        let counts_day =
            hot.flags & bits::DAY_COUNTED == 0 && (balance != hot.balance || equity != balance);
        if counts_day || equity <= hot.alert || (equity >= hot.target && balance >= hot.target) {
            self.evaluate_slow(hot, slot, t, equity, balance, out);
            return;
        }
        if hot.flags & bits::TRAILING != 0 && equity > hot.hwm {
            // A new high under `trailing` raises the overall reference
            // (`min(hwm, cap)`, `Phase::levels`), so the overall floor and
            // warning level; the daily ones stay. Each only rises, so the new
            // `alert` is the old one or a raised overall level (the maximum
            // `store` takes over the same values).
            let reference = equity.min(hot.trail_cap);
            let alert = hot
                .alert
                .max(cent(reference - hot.trail_limit))
                .max(cent(reference - hot.trail_warning));
            if equity <= alert {
                // At a level already (a limit under a cent): judge it fully.
                self.evaluate_slow(hot, slot, t, equity, balance, out);
                return;
            }
            hot.alert = alert;
            hot.hwm = equity;
        }
        // Steps 2 to 5 with nothing due: no boundary, the floors and levels as
        // cached, no breach, no warning to fire or resolve, no pass.
        hot.ticks += 1;
        hot.last_ts = t;
        hot.last_event_ts = t;
        // `t >= late_before >= started_at_us`: the new bound is `t` itself.
        hot.late_before = t;
        hot.equity = equity;
        hot.balance = balance;
        hot.day_min_equity = hot.day_min_equity.min(equity);
        hot.flags = (hot.flags & !bits::DEAL_SINCE_TICK) | bits::DAY_DIRTY;
    }

    /// The cold path of [`Phase::accept`] after the inactive and late checks:
    /// `rules.md` step 1 to 5 on the full state, then the hot copy refreshed.
    #[cold]
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    fn accept_slow(
        &mut self,
        hot: &mut Hot,
        slot: u32,
        epoch: u64,
        t: i64,
        equity: f64,
        balance: f64,
        out: &mut BatchOutput,
    ) {
        self.load(hot);
        if t >= self.state.next_weekend && self.weekend_hold(slot, t, self.open_positions().0, out)
        {
            // The phase failed at the weekly close: this tick came after its end.
            hot.touch(slot, epoch, out);
            out.counts.inactive += 1;
            self.store(hot);
            return;
        }
        hot.touch(slot, epoch, out);
        out.counts.evaluated += 1;
        let st = &mut self.state;
        if t == st.last_ts && equity == st.equity && balance == st.balance && !st.deal_since_tick {
            st.ticks += 1;
        } else {
            self.evaluate(slot, t, equity, balance, out);
        }
        self.store(hot);
    }

    /// [`Phase::evaluate`] on the full state, for a tick the hot path found
    /// something to do for.
    #[cold]
    #[inline(never)]
    fn evaluate_slow(
        &mut self,
        hot: &mut Hot,
        slot: u32,
        t: i64,
        equity: f64,
        balance: f64,
        out: &mut BatchOutput,
    ) {
        self.load(hot);
        self.evaluate(slot, t, equity, balance, out);
        self.store(hot);
    }

    /// Copy the fields the hot path moves from `hot` into `state`.
    #[inline]
    fn load(&mut self, hot: &Hot) {
        let s = &mut self.state;
        s.last_ts = hot.last_ts;
        s.last_event_ts = hot.last_event_ts;
        s.equity = hot.equity;
        s.balance = hot.balance;
        s.hwm = hot.hwm;
        s.day_min_equity = hot.day_min_equity;
        s.ticks = hot.ticks;
        s.day_counted = hot.flags & bits::DAY_COUNTED != 0;
        s.day_dirty = hot.flags & bits::DAY_DIRTY != 0;
        s.deal_since_tick = hot.flags & bits::DEAL_SINCE_TICK != 0;
    }

    /// Refresh `hot` from `state`: the moving fields, and the cached bounds
    /// recomputed from the rules (`rules.md` steps 3 to 5, the same formulas).
    fn store(&self, hot: &mut Hot) {
        let s = &self.state;
        let r = &self.spec.rules;
        hot.last_ts = s.last_ts;
        hot.last_event_ts = s.last_event_ts;
        hot.equity = s.equity;
        hot.balance = s.balance;
        hot.hwm = s.hwm;
        hot.day_min_equity = s.day_min_equity;
        hot.ticks = s.ticks;
        hot.late_before = self.spec.started_at_us.max(s.last_event_ts);
        let force_slow = hot.flags & bits::FORCE_SLOW != 0;
        let mut flags = hot.flags & bits::FORCE_SLOW;
        for (on, bit) in [
            (s.status == Status::Active, bits::ACTIVE),
            (s.day_counted, bits::DAY_COUNTED),
            (s.day_dirty, bits::DAY_DIRTY),
            (s.deal_since_tick, bits::DEAL_SINCE_TICK),
            (r.total_loss_mode == TotalLossMode::Trailing, bits::TRAILING),
        ] {
            if on {
                flags |= bit;
            }
        }
        hot.flags = flags;
        // Anything time-based: the next day, the weekly close with positions
        // open, the `max_days` deadline (broken by `ts > deadline`). Before the
        // first tick the day is unknown: the cold path locates it.
        hot.next_due = if s.ticks == 0 || force_slow {
            i64::MIN
        } else {
            let deadline = self
                .derived
                .deadline
                .map_or(i64::MAX, |d| d.saturating_add(1));
            s.next_boundary.min(s.next_weekend).min(deadline)
        };
        hot.target = self.derived.target.unwrap_or(f64::INFINITY);
        let limit = self.derived.overall_limit.unwrap_or(f64::NAN);
        hot.trail_cap = r.initial_balance + limit;
        hot.trail_limit = limit;
        hot.trail_warning = r.warning_level.map_or(f64::NAN, |wl| wl * limit);
        hot.alert = if s.max_warning.is_some() || s.daily_warning.is_some() || s.ticks == 0 {
            // An open warning is judged on every tick (resolved above its level).
            f64::INFINITY
        } else {
            let lv = self.levels();
            let mut alert = f64::NEG_INFINITY;
            if let Some(lm) = lv.overall_limit {
                alert = alert.max(cent(lv.overall_reference - lm));
                if let Some(wl) = r.warning_level {
                    alert = alert.max(cent(lv.overall_reference - wl * lm));
                }
            }
            if let (Some(ld), false) = (lv.daily_limit, s.day_paused) {
                alert = alert.max(cent(lv.daily_reference - ld));
                if let Some(wl) = r.warning_level {
                    alert = alert.max(cent(lv.daily_reference - wl * ld));
                }
            }
            // NaN (no reference yet) would skip every check: judge instead.
            if alert.is_nan() {
                f64::INFINITY
            } else {
                alert
            }
        };
    }

    /// One warning of `rules.md` step 4: resolve the open one if equity is back above
    /// `level`, then fire a new one if none is open, `may_fire` allows it and equity
    /// is at or below `level`. Returns whether one fired.
    fn warning(
        &mut self,
        slot: u32,
        rule: Rule,
        level: f64,
        threshold: f64,
        actual: f64,
        may_fire: bool,
        equity: f64,
        ts: i64,
        out: &mut BatchOutput,
    ) -> bool {
        let st = &mut self.state;
        let open = if rule == Rule::DailyLossWarning {
            &mut st.daily_warning
        } else {
            &mut st.max_warning
        };
        if let Some(w) = *open {
            if equity > level {
                out.breaches.push(BreachRow::resolved(slot, rule, &w, ts));
                *open = None;
            }
        }
        if open.is_some() || !may_fire || equity > level {
            return false;
        }
        st.breach_seq += 1;
        let w = OpenWarning {
            seq: st.breach_seq,
            threshold,
            actual,
            ts,
        };
        out.breaches.push(BreachRow::new(
            slot,
            w.seq,
            rule,
            threshold,
            actual,
            Action::Notify,
            ts,
        ));
        *open = Some(w);
        true
    }

    fn next_seq(&mut self) -> u32 {
        self.state.breach_seq += 1;
        self.state.breach_seq
    }

    /// Judge one tick that passed the skip checks (`rules.md` steps 2 to 5).
    fn evaluate(&mut self, slot: u32, ts: i64, equity: f64, balance: f64, out: &mut BatchOutput) {
        let rules = &self.spec.rules;
        let initial_balance = rules.initial_balance;
        let st = &mut self.state;
        let previous_balance = if st.ticks == 0 {
            initial_balance
        } else {
            st.balance
        };

        // Step 2: day boundary.
        if st.ticks == 0 || ts >= st.next_boundary {
            let (day, end) = self.derived.clock.locate(ts);
            if st.ticks > 0 {
                if st.day_dirty {
                    out.daily.push(DailyRow::of(slot, st.day, st));
                }
                st.best_closed_day = st.best_closed_day.max(st.equity - st.daily_start_equity);
                if rules.total_loss_mode == TotalLossMode::TrailingEod {
                    st.hwm = st.hwm.max(st.equity);
                }
            }
            st.day = day;
            st.next_boundary = end;
            st.daily_start_equity = equity;
            st.daily_start_balance = balance;
            st.day_min_equity = equity;
            // Under the deals basis ticks never count a trading day: the day
            // starts as counted for them (deals count theirs apart).
            st.day_counted = rules.trading_day_basis == TradingDayBasis::Deals;
            st.day_paused = false;
            st.daily_warning_fired = false;
        }
        if rules.total_loss_mode == TotalLossMode::Trailing {
            st.hwm = st.hwm.max(equity);
        }
        if !st.day_counted && (balance != previous_balance || equity != balance) {
            st.day_counted = true;
            st.trading_days += 1;
        }
        st.ticks += 1;
        st.last_ts = ts;
        st.last_event_ts = ts;
        st.deal_since_tick = false;
        st.equity = equity;
        st.balance = balance;
        st.day_min_equity = st.day_min_equity.min(equity);
        st.day_dirty = true;

        // Step 3: critical rules.
        let lv = self.levels();
        let rules = &self.spec.rules;
        let mut critical: [(Rule, f64, f64); 3] = [(Rule::TimeLimit, 0.0, 0.0); 3];
        let mut n = 0;
        if let Some(deadline) = self.derived.deadline {
            if ts > deadline {
                let days = (ts - self.spec.started_at_us) as f64 / 86_400_000_000.0;
                critical[n] = (
                    Rule::TimeLimit,
                    f64::from(rules.max_days.unwrap_or(0)),
                    days,
                );
                n += 1;
            }
        }
        if let Some(lm) = lv.overall_limit {
            if equity < cent(lv.overall_reference - lm) {
                critical[n] = (Rule::MaxLoss, lm, lv.overall_reference - equity);
                n += 1;
            }
        }
        if let Some(ld) = lv.daily_limit {
            if !self.state.day_paused && equity < cent(lv.daily_reference - ld) {
                critical[n] = (Rule::DailyLoss, ld, lv.daily_reference - equity);
                n += 1;
            }
        }
        let mut paused_now = false;
        if n > 0 {
            if n == 1
                && critical[0].0 == Rule::DailyLoss
                && rules.daily_loss_action == DailyLossAction::Pause
            {
                let (rule, threshold, actual) = critical[0];
                let seq = self.next_seq();
                out.breaches.push(BreachRow::new(
                    slot,
                    seq,
                    rule,
                    threshold,
                    actual,
                    Action::TradingPaused,
                    ts,
                ));
                self.state.day_paused = true;
                paused_now = true;
            } else {
                for &(rule, threshold, actual) in &critical[..n] {
                    let seq = self.next_seq();
                    out.breaches.push(BreachRow::new(
                        slot,
                        seq,
                        rule,
                        threshold,
                        actual,
                        Action::PhaseFailed,
                        ts,
                    ));
                }
                self.state.status = Status::Failed;
                self.state.status_ts = Some(ts);
                out.transitions.push(TransitionRow {
                    slot,
                    status: Status::Failed,
                    ts,
                });
                return;
            }
        }

        // Step 4: warnings.
        if let (Some(wl), false) = (self.spec.rules.warning_level, paused_now) {
            if let Some(lm) = lv.overall_limit {
                let level = cent(lv.overall_reference - wl * lm);
                let actual = lv.overall_reference - equity;
                self.warning(
                    slot,
                    Rule::MaxLossWarning,
                    level,
                    wl * lm,
                    actual,
                    true,
                    equity,
                    ts,
                    out,
                );
            }
            if let (Some(ld), false) = (lv.daily_limit, self.state.day_paused) {
                let level = cent(lv.daily_reference - wl * ld);
                let actual = lv.daily_reference - equity;
                let may_fire = !self.state.daily_warning_fired;
                if self.warning(
                    slot,
                    Rule::DailyLossWarning,
                    level,
                    wl * ld,
                    actual,
                    may_fire,
                    equity,
                    ts,
                    out,
                ) {
                    self.state.daily_warning_fired = true;
                }
            }
        }

        // Step 5: pass.
        if let Some(target) = self.derived.target {
            let rules = &self.spec.rules;
            let st = &mut self.state;
            if balance >= target && equity >= target && st.trading_days >= rules.min_trading_days {
                let consistent = rules.max_best_day_share.is_none_or(|share| {
                    let best = st.best_closed_day.max(equity - st.daily_start_equity);
                    cent(best) <= cent(share * (equity - rules.initial_balance))
                });
                if consistent {
                    st.status = Status::Passed;
                    st.status_ts = Some(ts);
                    out.transitions.push(TransitionRow {
                        slot,
                        status: Status::Passed,
                        ts,
                    });
                }
            }
        }
    }

    /// `weekend_hold` for an event at `ts ≥ next_weekend` (`rules.md`): positions
    /// are open and a weekly close W with `last event < W ≤ ts` passed, so they
    /// were held at W. Records the violation at W; returns whether the phase
    /// failed (then the event is not processed).
    #[cold]
    #[inline(never)]
    fn weekend_hold(&mut self, slot: u32, ts: i64, open: i64, out: &mut BatchOutput) -> bool {
        let Some(weekly) = self.weekly() else {
            self.state.next_weekend = i64::MAX;
            return false;
        };
        let w = weekly.latest_at_or_before(ts);
        #[allow(clippy::cast_precision_loss)]
        let lots = open as f64 / 100.0;
        let failed = self.deal_violation(slot, Rule::WeekendHold, 0.0, lots, w, out);
        // The event is processed under `flag` (it becomes the last event): the
        // next close to watch is the first after it.
        self.state.next_weekend = if failed {
            i64::MAX
        } else {
            weekly.first_after(ts)
        };
        failed
    }

    /// Record a deal-rule violation; returns whether it failed the phase. Under
    /// `deal_violation_action = fail` a critical breach fails the phase at `ts`;
    /// under `flag` a warning with action `notify`. Never resolved.
    fn deal_violation(
        &mut self,
        slot: u32,
        rule: Rule,
        threshold: f64,
        actual: f64,
        ts: i64,
        out: &mut BatchOutput,
    ) -> bool {
        let seq = self.next_seq();
        let fail = self.spec.rules.deal_violation_action == DealViolationAction::Fail;
        let action = if fail {
            Action::PhaseFailed
        } else {
            Action::Notify
        };
        out.breaches.push(BreachRow::new(
            slot, seq, rule, threshold, actual, action, ts,
        ));
        if fail {
            self.state.status = Status::Failed;
            self.state.status_ts = Some(ts);
            self.state.next_weekend = i64::MAX;
            out.transitions.push(TransitionRow {
                slot,
                status: Status::Failed,
                ts,
            });
        }
        fail
    }

    /// Judge one valid deal of this phase's account (`rules.md`, "Deal rules";
    /// the order of the checks is docs/rules.md's).
    fn deal(&mut self, hot: &mut Hot, slot: u32, epoch: u64, d: &Deal<'_>, out: &mut BatchOutput) {
        if hot.flags & bits::ACTIVE == 0 {
            out.deal_counts.inactive += 1;
            return;
        }
        let mut ds = self
            .deals
            .take()
            .unwrap_or_else(|| Box::new(DealState::new()));
        self.load(hot);
        self.judge_deal(hot, slot, epoch, &mut ds, d, out);
        self.store(hot);
        self.deals = Some(ds);
    }

    fn judge_deal(
        &mut self,
        hot: &mut Hot,
        slot: u32,
        epoch: u64,
        ds: &mut DealState,
        d: &Deal<'_>,
        out: &mut BatchOutput,
    ) {
        // A repeated deal_id is a duplicate, never late, and changes nothing else.
        if ds.is_duplicate(d.deal_id) {
            ds.duplicate_deals += 1;
            out.deal_counts.duplicate += 1;
            return;
        }
        if d.ts < self.spec.started_at_us || d.ts < self.state.last_event_ts {
            ds.late_deals += 1;
            out.deal_counts.late += 1;
            return;
        }
        if d.ts >= self.state.next_weekend
            && self.weekend_hold(slot, d.ts, ds.open_hundredths(), out)
        {
            hot.touch(slot, epoch, out);
            out.deal_counts.inactive += 1;
            return;
        }

        // Processed: counted, its deal_id taken, the last event time moves.
        out.deal_counts.processed += 1;
        ds.deals += 1;
        ds.take_id(d.deal_id);
        self.state.last_event_ts = d.ts;
        self.state.deal_since_tick = true;
        hot.touch(slot, epoch, out);
        if d.entry == Entry::In {
            out.deal_opens.push(DealOpen {
                account_id: d.account_id,
                deal_id: d.deal_id,
                ts: d.ts,
                symbol: d.symbol.to_owned(),
                side: d.side,
                row: out.deal_row,
            });
            // 1. Under the deals basis an `in` deal marks its local day a trading
            // day. Processed deals come in `ts` order, so a day not yet counted
            // is one that starts after the last counted one ends.
            if self.spec.rules.trading_day_basis == TradingDayBasis::Deals
                && d.ts >= ds.deal_day_end
            {
                let (_, end) = self.derived.clock.locate(d.ts);
                ds.deal_day_end = end;
                self.state.trading_days += 1;
            }
        }

        // 2. The position update (weekend_hold was judged above).
        let update = ds.apply(d);
        if self.spec.rules.weekend_close.is_some() {
            if ds.positions.is_empty() {
                self.state.next_weekend = i64::MAX;
            } else if self.state.next_weekend == i64::MAX {
                // Positions open again. `d.ts` is before the next close already
                // known (the first after an earlier event) unless a close passed
                // since: then look it up. A finite `next_weekend` stays right: the
                // deal came before it.
                if d.ts >= ds.next_close {
                    if let Some(weekly) = self.weekly() {
                        ds.next_close = weekly.first_after(d.ts);
                    }
                }
                self.state.next_weekend = ds.next_close;
            }
        }
        match update {
            Update::Unmatched => {
                ds.unmatched_deals += 1;
                out.deal_counts.unmatched += 1;
            }
            Update::In(i) => {
                // 3. max_position_size, once per position (per opening).
                let open = ds.open_hundredths();
                if let Some(limit) = self.spec.rules.max_open_hundredths() {
                    if open > limit && !ds.positions[i].size_recorded {
                        ds.positions[i].size_recorded = true;
                        #[allow(clippy::cast_precision_loss)]
                        let (threshold, actual) = (limit as f64 / 100.0, open as f64 / 100.0);
                        self.deal_violation(
                            slot,
                            Rule::MaxPositionSize,
                            threshold,
                            actual,
                            d.ts,
                            out,
                        );
                    }
                }
            }
            Update::Closed { opened_at } => {
                // 4. short_hold, compared in microseconds exactly.
                if let Some(min) = self.spec.rules.min_hold_seconds {
                    let held = d.ts - opened_at;
                    if held < min * 1_000_000 {
                        #[allow(clippy::cast_precision_loss)]
                        let (threshold, actual) = (min as f64, held as f64 / 1_000_000.0);
                        self.deal_violation(slot, Rule::ShortHold, threshold, actual, d.ts, out);
                    }
                }
            }
            Update::Reduced => {}
        }
    }

    /// The best day's profit so far, the current day included.
    #[must_use]
    pub fn best_day_profit(&self) -> f64 {
        let s = &self.state;
        s.best_closed_day.max(s.equity - s.daily_start_equity)
    }
}

/// Borrowed tick columns of equal length.
#[derive(Clone, Copy, Debug)]
pub struct TickColumns<'a> {
    /// Trading account logins.
    pub account_id: &'a [i64],
    /// UTC microseconds.
    pub ts: &'a [i64],
    /// Equity.
    pub equity: &'a [f64],
    /// Balance.
    pub balance: &'a [f64],
}

impl TickColumns<'_> {
    /// Rows `start..end` (in bounds: checked by the caller).
    fn slice(&self, start: usize, end: usize) -> Self {
        Self {
            account_id: &self.account_id[start..end],
            ts: &self.ts[start..end],
            equity: &self.equity[start..end],
            balance: &self.balance[start..end],
        }
    }

    fn check_lengths(&self) -> RuleResult<usize> {
        let n = self.account_id.len();
        if self.ts.len() != n || self.equity.len() != n || self.balance.len() != n {
            return Err(RuleError::BadBatch("columns differ in length".to_owned()));
        }
        Ok(n)
    }
}

/// Deal counts of one `process` call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DealCounts {
    /// Deals processed (positions updated, rules judged), `unmatched` included.
    pub processed: u64,
    /// Deals older than their account's last processed event, or before its
    /// phase start.
    pub late: u64,
    /// Deals whose `deal_id` the account already processed.
    pub duplicate: u64,
    /// Processed `out` deals for a position that was not open.
    pub unmatched: u64,
    /// Deals of accounts without a registered phase.
    pub unknown: u64,
    /// Deals of phases that already ended (or that revealed a `weekend_hold`
    /// failure).
    pub inactive: u64,
    /// Deals with a null or invalid value.
    pub invalid: u64,
}

/// Tick counts of one `process` call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TickCounts {
    /// Ticks judged by a phase.
    pub evaluated: u64,
    /// Ticks older than their account's last tick, or before its phase start.
    pub late: u64,
    /// Ticks of accounts without a registered phase.
    pub unknown: u64,
    /// Ticks of phases that already passed or failed.
    pub inactive: u64,
    /// Ticks whose equity or balance is NaN or infinite.
    pub invalid: u64,
}

/// Whether `process` groups a chunk's ticks by phase before judging them. The
/// outputs are the same either way; only speed differs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Grouping {
    /// Group when the phases' state no longer fits in cache and the chunk touches
    /// enough of them to be worth a sort.
    #[default]
    Auto,
    /// Always group.
    Always,
    /// Never group: judge ticks in arrival order.
    Never,
}

impl Grouping {
    /// Above this many registered phases their state spills out of the L2 cache.
    const AUTO_MIN_PHASES: usize = 4096;

    fn applies(self, phases: usize, touched: usize) -> bool {
        match self {
            Self::Always => true,
            Self::Never => false,
            Self::Auto => phases >= Self::AUTO_MIN_PHASES && touched >= Self::AUTO_MIN_PHASES / 4,
        }
    }
}

/// The rules engine: every registered phase, judged tick by tick.
#[derive(Debug, Default)]
pub struct Engine {
    index: HashMap<i64, u32>,
    // `index` as a table over `dense_base..dense_base + dense.len()` when the
    // registered account ids are compact enough (most firms number accounts
    // sequentially): one array read per tick instead of a hash probe. Empty when
    // the ids are too spread out; rebuilt on the next batch after a change.
    dense: Vec<u32>,
    dense_base: i64,
    // Whether `dense[k] == k` for every `k` (accounts registered in id order,
    // without gaps): then the slot is the offset itself, and a tick's lookup
    // reads no table.
    dense_identity: bool,
    dense_stale: bool,
    phases: Vec<Phase>,
    // The per-tick state of `phases[i]` at `hot[i]` (see [`Hot`]).
    hot: Vec<Hot>,
    epoch: u64,
    grouping: Grouping,
    // Buffers reused across batches by `process`.
    scratch_slots: Vec<u32>,
    scratch_counts: Vec<u32>,
    // The grouped ticks with their rows, for chunks with deals.
    scratch_deal_ticks: Vec<(i64, f64, f64, u64)>,
    // How many threads `run_unordered` may judge on (`rules::order`).
    parallel: Parallel,
}

/// How many threads [`Engine::run_unordered`] judges on, and from what size.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Parallel {
    /// Most threads; 0: one per core.
    pub(crate) threads: usize,
    /// Fewest rows worth more than one thread.
    pub(crate) min_rows: usize,
    /// Fewest phases per thread.
    pub(crate) min_phases: usize,
}

impl Default for Parallel {
    fn default() -> Self {
        Self {
            threads: 0,
            min_rows: 1 << 16,
            min_phases: 1 << 10,
        }
    }
}

impl Parallel {
    /// The threads to judge `rows` rows of `phases` phases on (at least 1).
    pub(crate) fn threads_for(self, rows: usize, phases: usize) -> usize {
        let most = if self.threads == 0 {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        } else {
            self.threads
        };
        if rows < self.min_rows.max(1) {
            return 1;
        }
        most.min(phases / self.min_phases.max(1)).max(1)
    }
}

/// The phases of a range of slots, apart from the others: each part is judged
/// on a thread of its own (`rules::order`). Slots are the engine's.
pub(crate) struct PhasePart<'a> {
    base: u32,
    phases: &'a mut [Phase],
    hot: &'a mut [Hot],
}

impl PhasePart<'_> {
    /// The first slot of the part.
    pub(crate) fn base(&self) -> u32 {
        self.base
    }

    /// Number of phases in the part.
    pub(crate) fn len(&self) -> usize {
        self.phases.len()
    }

    /// Ask the CPU for a phase's hot state ahead of its use.
    #[inline]
    pub(crate) fn prefetch(&self, i: usize) {
        prefetch(&self.hot[i]);
    }

    /// As [`Engine::prefetch_cold_if_due`], by index in the part.
    #[inline]
    pub(crate) fn prefetch_cold_if_due(&self, i: usize, t: i64) {
        prefetch_cold_if_due(&self.hot[i], &self.phases[i], t);
    }

    /// Judge one tick of the part's phase `i`.
    #[inline]
    pub(crate) fn judge_tick(
        &mut self,
        i: usize,
        epoch: u64,
        t: i64,
        equity: f64,
        balance: f64,
        out: &mut BatchOutput,
    ) {
        let slot = self.base + u32::try_from(i).expect("fewer than 2^32 phases");
        self.phases[i].accept(&mut self.hot[i], slot, epoch, t, equity, balance, out);
    }
}

/// The serialized form of an [`Engine`] (format v2: with deal state).
#[derive(Serialize, Deserialize)]
struct Snapshot {
    phases: Vec<(PhaseSpec, PhaseState, Option<DealState>)>,
}

/// Snapshot format v1 (before deals), read to restore old checkpoints: the
/// same fields in the same order as the types of that time, so bincode reads
/// them; converted to today's types with the deal fields at their defaults.
mod v1 {
    use serde::Deserialize;

    use super::{OpenWarning, PhaseSpec, PhaseState, Status};
    use crate::rules::config::{
        DailyLossAction, DailyLossBase, DailyReference, RuleSet, TotalLossMode,
    };

    #[derive(Deserialize)]
    pub(super) struct Snapshot {
        pub(super) phases: Vec<(Spec, State)>,
    }

    #[derive(Deserialize)]
    pub(super) struct Rules {
        initial_balance: f64,
        profit_target: Option<f64>,
        max_daily_loss: Option<f64>,
        daily_reference: DailyReference,
        daily_loss_base: DailyLossBase,
        daily_loss_action: DailyLossAction,
        max_total_loss: Option<f64>,
        total_loss_mode: TotalLossMode,
        min_trading_days: u32,
        max_days: Option<u32>,
        max_best_day_share: Option<f64>,
        warning_level: Option<f64>,
        timezone: String,
        day_rollover_minutes: u16,
    }

    #[derive(Deserialize)]
    pub(super) struct Spec {
        account_id: i64,
        challenge_id: String,
        phase_index: i32,
        started_at_us: i64,
        rules: Rules,
    }

    #[derive(Deserialize)]
    #[allow(clippy::struct_excessive_bools)]
    pub(super) struct State {
        status: Status,
        status_ts: Option<i64>,
        ticks: u64,
        late_ticks: u64,
        last_ts: i64,
        equity: f64,
        balance: f64,
        day: i32,
        next_boundary: i64,
        daily_start_equity: f64,
        daily_start_balance: f64,
        day_min_equity: f64,
        day_counted: bool,
        day_paused: bool,
        daily_warning_fired: bool,
        day_dirty: bool,
        hwm: f64,
        trading_days: u32,
        best_closed_day: f64,
        breach_seq: u32,
        max_warning: Option<OpenWarning>,
        daily_warning: Option<OpenWarning>,
    }

    impl From<Spec> for PhaseSpec {
        fn from(s: Spec) -> Self {
            let r = s.rules;
            Self {
                account_id: s.account_id,
                challenge_id: s.challenge_id,
                phase_index: s.phase_index,
                started_at_us: s.started_at_us,
                rules: RuleSet {
                    initial_balance: r.initial_balance,
                    profit_target: r.profit_target,
                    max_daily_loss: r.max_daily_loss,
                    daily_reference: r.daily_reference,
                    daily_loss_base: r.daily_loss_base,
                    daily_loss_action: r.daily_loss_action,
                    max_total_loss: r.max_total_loss,
                    total_loss_mode: r.total_loss_mode,
                    min_trading_days: r.min_trading_days,
                    max_days: r.max_days,
                    max_best_day_share: r.max_best_day_share,
                    warning_level: r.warning_level,
                    timezone: r.timezone,
                    day_rollover_minutes: r.day_rollover_minutes,
                    ..RuleSet::default()
                },
            }
        }
    }

    impl From<State> for PhaseState {
        fn from(s: State) -> Self {
            Self {
                status: s.status,
                status_ts: s.status_ts,
                ticks: s.ticks,
                late_ticks: s.late_ticks,
                last_ts: s.last_ts,
                equity: s.equity,
                balance: s.balance,
                day: s.day,
                next_boundary: s.next_boundary,
                daily_start_equity: s.daily_start_equity,
                daily_start_balance: s.daily_start_balance,
                day_min_equity: s.day_min_equity,
                day_counted: s.day_counted,
                day_paused: s.day_paused,
                daily_warning_fired: s.daily_warning_fired,
                day_dirty: s.day_dirty,
                hwm: s.hwm,
                trading_days: s.trading_days,
                best_closed_day: s.best_closed_day,
                breach_seq: s.breach_seq,
                max_warning: s.max_warning,
                daily_warning: s.daily_warning,
                // Before deals the last event was the last tick; no positions.
                last_event_ts: s.last_ts,
                next_weekend: i64::MAX,
                deal_since_tick: false,
            }
        }
    }
}

/// How many rows ahead a phase's state is prefetched when rows are judged in
/// arrival order: enough to cover a memory access with a few ticks' work.
pub(crate) const PREFETCH_ROWS_AHEAD: usize = 16;

/// Stable-sort `rows` by `key` (a phase's rank), if not in that order already:
/// outputs judged in arrival order put in the order of judging each phase's
/// rows together.
pub(crate) fn group_order<T>(rows: &mut [T], key: impl Fn(&T) -> u32) {
    if !rows.windows(2).all(|w| key(&w[0]) <= key(&w[1])) {
        rows.sort_by_key(key);
    }
}

/// Ask the CPU to bring a value's cache lines in (a hint: no effect on results).
#[inline]
pub(crate) fn prefetch<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let base = std::ptr::from_ref(value).cast::<i8>();
        for offset in (0..std::mem::size_of::<T>()).step_by(64) {
            // SAFETY: a prefetch never faults and reads nothing the program sees;
            // the address is inside `value`, a live reference.
            #[allow(unsafe_code)]
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(offset));
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

/// Ask the CPU for `phase`'s cold state if `hot` says a tick at `t` will take
/// the cold path (a new day, the first tick). A hint only.
#[inline]
fn prefetch_cold_if_due(hot: &Hot, phase: &Phase, t: i64) {
    if t >= hot.next_due {
        prefetch(&phase.state);
        prefetch(&phase.spec.rules);
    }
}

/// Slot of a tick that no phase takes (unknown account or invalid values).
const NONE: u32 = u32::MAX;

/// The current snapshot format (v2: positions and deal state).
const SNAPSHOT_MAGIC: &[u8; 8] = b"PSENG\x00\x02\x00";
/// The format before deals; still restored.
const SNAPSHOT_MAGIC_V1: &[u8; 8] = b"PSENG\x00\x01\x00";

impl Engine {
    /// An engine with no phases.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Judge [`Engine::run_unordered`]'s tables on at most `threads` threads
    /// (0, the default: one per core). Large tables only: the outputs are the
    /// same on any number.
    pub fn set_threads(&mut self, threads: usize) {
        self.parallel.threads = threads;
    }

    /// Tests: judge on `threads` threads whatever the table's size.
    #[cfg(test)]
    pub(crate) fn force_threads(&mut self, threads: usize) {
        self.parallel = Parallel {
            threads,
            min_rows: 0,
            min_phases: 1,
        };
    }

    /// An engine with no phases and a fixed grouping policy (tests use it to prove
    /// both paths give the same outputs).
    #[must_use]
    pub fn with_grouping(grouping: Grouping) -> Self {
        Self {
            grouping,
            ..Self::default()
        }
    }

    /// Number of registered phases.
    #[must_use]
    pub fn len(&self) -> usize {
        self.phases.len()
    }

    /// Whether no phase is registered.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.phases.is_empty()
    }

    /// Whether `account_id` has a registered phase.
    #[must_use]
    pub fn contains(&self, account_id: i64) -> bool {
        self.index.contains_key(&account_id)
    }

    /// Every registered phase, in registration order (removals swap the last one in).
    #[must_use]
    pub fn phases(&self) -> &[Phase] {
        &self.phases
    }

    /// Start judging a phase.
    ///
    /// # Errors
    /// [`RuleError::DuplicateAccount`] if the account already has a phase.
    pub fn register(&mut self, spec: PhaseSpec) -> RuleResult<()> {
        if self.index.contains_key(&spec.account_id) {
            return Err(RuleError::DuplicateAccount(spec.account_id));
        }
        let state = PhaseState::new(spec.rules.initial_balance);
        self.insert(spec, state, None);
        Ok(())
    }

    fn insert(&mut self, spec: PhaseSpec, state: PhaseState, deals: Option<DealState>) {
        let slot = u32::try_from(self.phases.len()).expect("fewer than 2^32 phases");
        self.index.insert(spec.account_id, slot);
        self.dense_stale = true;
        let phase = Phase::new(spec, state, deals);
        self.hot.push(Hot::of(&phase));
        self.phases.push(phase);
    }

    /// Forget a phase; `false` if the account had none.
    pub fn remove(&mut self, account_id: i64) -> bool {
        let Some(slot) = self.index.remove(&account_id) else {
            return false;
        };
        self.dense_stale = true;
        self.phases.swap_remove(slot as usize);
        self.hot.swap_remove(slot as usize);
        if let Some(moved) = self.phases.get(slot as usize) {
            self.index.insert(moved.spec.account_id, slot);
        }
        true
    }

    /// Judge ticks given as columns of equal length, in order within an account.
    ///
    /// The ticks are first grouped by phase with a stable counting sort over the
    /// phases they touch, so each phase's state is loaded once per chunk instead of
    /// once per tick: with many accounts interleaved in time, the per-tick random
    /// access to phase state is what costs, not the rules.
    fn process(&mut self, c: &TickColumns<'_>, out: &mut BatchOutput) -> RuleResult<()> {
        let n = c.check_lengths()?;
        if u32::try_from(n).is_err() {
            return Err(RuleError::BadBatch(
                "more than 2^32 ticks in one chunk".to_owned(),
            ));
        }
        if self.dense_stale {
            self.rebuild_dense();
        }
        let mut slot_of = std::mem::take(&mut self.scratch_slots);
        slot_of.clear();
        slot_of.reserve(n);
        let mut counts = std::mem::take(&mut self.scratch_counts);
        counts.resize(self.phases.len(), 0);
        let mut groups: Vec<u32> = Vec::new();
        let mut last_account = None;
        let mut last_slot = NONE;
        for i in 0..n {
            let acc = c.account_id[i];
            if !(c.equity[i].is_finite() && c.balance[i].is_finite()) {
                out.counts.invalid += 1;
                slot_of.push(NONE);
                continue;
            }
            let slot = if last_account == Some(acc) {
                last_slot
            } else {
                last_account = Some(acc);
                last_slot = self.slot_of(acc);
                last_slot
            };
            if slot == NONE {
                out.counts.unknown += 1;
            } else {
                let k = &mut counts[slot as usize];
                if *k == 0 {
                    groups.push(slot);
                }
                *k += 1;
            }
            slot_of.push(slot);
        }
        let epoch = self.epoch;
        if self.grouping.applies(self.phases.len(), groups.len()) {
            // The outputs of judging each phase's ticks together, in the order
            // of the phases' first rows: judged row by row in arrival order with
            // the state of the row PREFETCH_ROWS_AHEAD on asked for (two cache
            // lines: no staging of the ticks pays off), then each output put
            // back in that order by its phase's rank (a stable sort keeps each
            // phase's own order).
            for (rank, &g) in groups.iter().enumerate() {
                #[allow(clippy::cast_possible_truncation)]
                let rank = rank as u32;
                counts[g as usize] = rank;
            }
            let marks = (
                out.breaches.len(),
                out.daily.len(),
                out.transitions.len(),
                out.touched.len(),
            );
            for (i, &slot) in slot_of.iter().enumerate() {
                if let Some(&ahead) = slot_of.get(i + PREFETCH_ROWS_AHEAD) {
                    if ahead != NONE {
                        prefetch(&self.hot[ahead as usize]);
                    }
                }
                if let Some(&ahead) = slot_of.get(i + PREFETCH_ROWS_AHEAD / 2) {
                    if ahead != NONE {
                        self.prefetch_cold_if_due(ahead, c.ts[i + PREFETCH_ROWS_AHEAD / 2]);
                    }
                }
                if slot != NONE {
                    let k = slot as usize;
                    self.phases[k].accept(
                        &mut self.hot[k],
                        slot,
                        epoch,
                        c.ts[i],
                        c.equity[i],
                        c.balance[i],
                        out,
                    );
                }
            }
            let rank = |slot: u32| counts[slot as usize];
            group_order(&mut out.breaches[marks.0..], |b| rank(b.slot));
            group_order(&mut out.daily[marks.1..], |d| rank(d.slot));
            group_order(&mut out.transitions[marks.2..], |t| rank(t.slot));
            group_order(&mut out.touched[marks.3..], |&s| rank(s));
            for &g in &groups {
                counts[g as usize] = 0;
            }
        } else {
            for &g in &groups {
                counts[g as usize] = 0;
            }
            for (i, &slot) in slot_of.iter().enumerate() {
                if slot != NONE {
                    self.phases[slot as usize].accept(
                        &mut self.hot[slot as usize],
                        slot,
                        epoch,
                        c.ts[i],
                        c.equity[i],
                        c.balance[i],
                        out,
                    );
                }
            }
        }
        self.scratch_slots = slot_of;
        self.scratch_counts = counts;
        Ok(())
    }

    /// The slot of an account's phase, or [`NONE`].
    #[inline]
    fn slot_of(&self, account_id: i64) -> u32 {
        if self.dense.is_empty() {
            return self.index.get(&account_id).copied().unwrap_or(NONE);
        }
        // Ids below the base wrap to huge offsets and miss like ids above the end.
        #[allow(clippy::cast_sign_loss)]
        let offset = account_id.wrapping_sub(self.dense_base) as u64;
        if self.dense_identity {
            #[allow(clippy::cast_possible_truncation)]
            return if offset < self.dense.len() as u64 {
                offset as u32
            } else {
                NONE
            };
        }
        usize::try_from(offset)
            .ok()
            .and_then(|k| self.dense.get(k).copied())
            .unwrap_or(NONE)
    }

    /// Rebuild the dense table from `index`, or drop it when the ids are spread
    /// over more than `DENSE_SPREAD` slots per phase.
    fn rebuild_dense(&mut self) {
        const DENSE_SPREAD: i128 = 8;
        const DENSE_SLACK: i128 = 4096;
        self.dense_stale = false;
        self.dense_identity = false;
        self.dense.clear();
        let (Some(&lo), Some(&hi)) = (self.index.keys().min(), self.index.keys().max()) else {
            return;
        };
        let span = i128::from(hi) - i128::from(lo) + 1;
        let phases = i128::try_from(self.index.len()).unwrap_or(i128::MAX);
        if span > phases * DENSE_SPREAD + DENSE_SLACK {
            return;
        }
        let Ok(span) = usize::try_from(span) else {
            return;
        };
        self.dense.resize(span, NONE);
        self.dense_base = lo;
        for (&account, &slot) in &self.index {
            #[allow(clippy::cast_sign_loss, clippy::cast_possible_truncation)]
            let k = account.wrapping_sub(lo) as u64 as usize;
            self.dense[k] = slot;
        }
        self.dense_identity = self
            .dense
            .iter()
            .enumerate()
            .all(|(k, &slot)| slot as usize == k);
    }

    /// Judge one batch given as chunks of columns (e.g. the record batches of one
    /// Arrow table): the chunks are one batch for the outputs.
    ///
    /// # Errors
    /// [`RuleError::BadBatch`] if a chunk's columns differ in length.
    pub fn run(&mut self, chunks: &[TickColumns<'_>]) -> RuleResult<BatchOutput> {
        self.run_with_deals(chunks, &[])
    }

    /// Judge one batch of ticks and deals in delivery order: deal `d` is judged
    /// right before tick row `d.before_tick` of the chunks taken as one sequence
    /// (after every tick when it equals the number of rows); deals with equal
    /// `before_tick` keep their order. Without deals this is [`Engine::run`].
    ///
    /// # Errors
    /// [`RuleError::BadBatch`] if a chunk's columns differ in length or the
    /// deals' `before_tick` decrease or point past the last tick row (checked
    /// before anything is judged).
    pub fn run_with_deals(
        &mut self,
        chunks: &[TickColumns<'_>],
        deals: &[DealInput<'_>],
    ) -> RuleResult<BatchOutput> {
        let mut rows = 0u64;
        for c in chunks {
            let n = c.check_lengths()?;
            // Checked here too (as `process` does), so that no chunk is refused
            // after another was judged: `finish` must see every judged phase.
            if u32::try_from(n).is_err() {
                return Err(RuleError::BadBatch(
                    "more than 2^32 ticks in one chunk".to_owned(),
                ));
            }
            rows += n as u64;
        }
        let mut previous = 0u64;
        for (i, d) in deals.iter().enumerate() {
            if d.before_tick < previous || d.before_tick > rows {
                return Err(RuleError::BadBatch(format!(
                    "column before_tick: row {i} is {}, expected a non-decreasing \
                     value in 0..={rows} (the number of tick rows)",
                    d.before_tick
                )));
            }
            previous = d.before_tick;
        }
        self.epoch += 1;
        let mut out = BatchOutput::default();
        if deals.is_empty() {
            for c in chunks {
                self.process(c, &mut out)?;
            }
        } else {
            if self.dense_stale {
                self.rebuild_dense();
            }
            let mut next = 0usize;
            let mut row = 0u64;
            for c in chunks {
                let n = c.account_id.len();
                // The deals placed before one of this chunk's rows.
                let end = next + deals[next..].partition_point(|d| d.before_tick < row + n as u64);
                if end > next
                    && self
                        .grouping
                        .applies(self.phases.len(), n.min(self.phases.len()))
                {
                    self.grouped_with_deals(c, deals, next..end, row, &mut out)?;
                    next = end;
                    row += n as u64;
                    continue;
                }
                let mut start = 0usize;
                // Ticks up to the next deal's place, then the deals placed there.
                while let Some(d) = deals.get(next) {
                    let Ok(at) = usize::try_from(d.before_tick - row) else {
                        break;
                    };
                    if at > n {
                        break;
                    }
                    if at > start {
                        self.process(&c.slice(start, at), &mut out)?;
                        start = at;
                    }
                    while deals
                        .get(next)
                        .is_some_and(|d| d.before_tick == row + at as u64)
                    {
                        out.deal_row = next;
                        self.deal(&deals[next], &mut out);
                        next += 1;
                    }
                }
                if start < n {
                    self.process(&c.slice(start, n), &mut out)?;
                }
                row += n as u64;
            }
            for (i, d) in deals.iter().enumerate().skip(next) {
                out.deal_row = i;
                self.deal(d, &mut out);
            }
            // The grouped path judges accounts in its own order.
            out.deal_opens.sort_by_key(|o| o.row);
        }
        self.finish(&mut out);
        Ok(out)
    }

    /// Judge one chunk of ticks and the deals placed among its rows (`before_tick`
    /// in `row..row + len`), grouped by phase as [`Engine::process`] groups ticks:
    /// each phase judges its ticks in row order with its own deals slotted in at
    /// their places. Only the order within an account matters, so this gives the
    /// outputs of judging the chunk row by row, and keeps the grouping's speed
    /// when deals cut the chunk into short runs.
    fn grouped_with_deals(
        &mut self,
        c: &TickColumns<'_>,
        deals: &[DealInput<'_>],
        these: std::ops::Range<usize>,
        row: u64,
        out: &mut BatchOutput,
    ) -> RuleResult<()> {
        let n = c.check_lengths()?;
        if u32::try_from(n).is_err() {
            return Err(RuleError::BadBatch(
                "more than 2^32 ticks in one chunk".to_owned(),
            ));
        }
        let mut counts = std::mem::take(&mut self.scratch_counts);
        counts.resize(self.phases.len(), 0);
        // Buffers kept across batches: fresh ones cost a zeroed page per 4 KiB.
        let mut slots = std::mem::take(&mut self.scratch_slots);
        slots.clear();
        slots.reserve(n);
        let mut groups: Vec<u32> = Vec::new();
        for i in 0..n {
            if !(c.equity[i].is_finite() && c.balance[i].is_finite()) {
                out.counts.invalid += 1;
                slots.push(NONE);
                continue;
            }
            let slot = self.slot_of(c.account_id[i]);
            if slot == NONE {
                out.counts.unknown += 1;
            } else {
                let k = &mut counts[slot as usize];
                if *k == 0 {
                    groups.push(slot);
                }
                *k += 1;
            }
            slots.push(slot);
        }
        // The deals by phase, each phase's in delivery order (a stable sort), and
        // whether the phase has ticks in the chunk (else its deals go after).
        let mut placed: Vec<(u32, u64, bool, Deal<'_>, usize)> = Vec::with_capacity(these.len());
        for index in these {
            let input = &deals[index];
            let Some(d) = input.checked() else {
                out.deal_counts.invalid += 1;
                continue;
            };
            let slot = self.slot_of(d.account_id);
            if slot == NONE {
                out.deal_counts.unknown += 1;
                continue;
            }
            let has_ticks = counts[slot as usize] > 0;
            placed.push((slot, input.before_tick - row, has_ticks, d, index));
        }
        placed.sort_by_key(|p| p.0);
        let mut total = 0u32;
        for &g in &groups {
            let k = counts[g as usize];
            counts[g as usize] = total;
            total += k;
        }
        // Every position below `total` is written by the scatter.
        let mut grouped = std::mem::take(&mut self.scratch_deal_ticks);
        if grouped.len() < total as usize {
            grouped.resize(total as usize, (0, 0.0, 0.0, 0));
        }
        for (i, &slot) in slots.iter().enumerate() {
            if slot != NONE {
                let pos = &mut counts[slot as usize];
                grouped[*pos as usize] = (c.ts[i], c.equity[i], c.balance[i], i as u64);
                *pos += 1;
            }
        }
        let epoch = self.epoch;
        let mut start = 0usize;
        for &slot in &groups {
            let end = counts[slot as usize] as usize;
            counts[slot as usize] = 0;
            let mut k = placed.partition_point(|p| p.0 < slot);
            let last = placed.partition_point(|p| p.0 <= slot);
            let phase = &mut self.phases[slot as usize];
            let hot = &mut self.hot[slot as usize];
            for &(t, eq, bal, r) in &grouped[start..end] {
                while k < last && placed[k].1 <= r {
                    out.deal_row = placed[k].4;
                    phase.deal(hot, slot, epoch, &placed[k].3, out);
                    k += 1;
                }
                phase.accept(hot, slot, epoch, t, eq, bal, out);
            }
            for p in &placed[k..last] {
                out.deal_row = p.4;
                phase.deal(hot, slot, epoch, &p.3, out);
            }
            start = end;
        }
        for &(slot, _, has_ticks, ref d, index) in &placed {
            if !has_ticks {
                out.deal_row = index;
                self.phases[slot as usize].deal(&mut self.hot[slot as usize], slot, epoch, d, out);
            }
        }
        self.scratch_counts = counts;
        self.scratch_slots = slots;
        self.scratch_deal_ticks = grouped;
        Ok(())
    }

    /// Judge one deal: invalid and unknown-account deals are counted here, the
    /// rest by the account's phase.
    fn deal(&mut self, input: &DealInput<'_>, out: &mut BatchOutput) {
        let Some(d) = input.checked() else {
            out.deal_counts.invalid += 1;
            return;
        };
        let slot = self.slot_of(d.account_id);
        if slot == NONE {
            out.deal_counts.unknown += 1;
            return;
        }
        let epoch = self.epoch;
        self.phases[slot as usize].deal(&mut self.hot[slot as usize], slot, epoch, &d, out);
    }

    /// Finish a batch: every touched phase's `PhaseState` catches up with its
    /// hot copy (the outputs, `phases()` and snapshots read it), and its open
    /// day goes into `daily`.
    fn finish(&mut self, out: &mut BatchOutput) {
        for &slot in &out.touched {
            let phase = &mut self.phases[slot as usize];
            let hot = &mut self.hot[slot as usize];
            phase.load(hot);
            let st = &mut phase.state;
            if st.day_dirty {
                out.daily.push(DailyRow::of(slot, st.day, st));
                st.day_dirty = false;
                hot.flags &= !bits::DAY_DIRTY;
            }
        }
    }

    /// Serialize every phase and its state.
    #[must_use]
    pub fn snapshot(&self) -> Vec<u8> {
        let snap = Snapshot {
            phases: self
                .phases
                .iter()
                .map(|p| (p.spec.clone(), p.state.clone(), p.deals.as_deref().cloned()))
                .collect(),
        };
        let mut bytes = SNAPSHOT_MAGIC.to_vec();
        bincode::serialize_into(&mut bytes, &snap).expect("in-memory serialization");
        bytes
    }

    /// Rebuild an engine from [`Engine::snapshot`] bytes.
    ///
    /// # Errors
    /// [`RuleError::BadSnapshot`] if the bytes are not a snapshot of this version.
    pub fn restore(bytes: &[u8], grouping: Grouping) -> RuleResult<Self> {
        let bad = |e: bincode::Error| RuleError::BadSnapshot(e.to_string());
        let phases = if let Some(body) = bytes.strip_prefix(SNAPSHOT_MAGIC.as_slice()) {
            bincode::deserialize::<Snapshot>(body).map_err(bad)?.phases
        } else if let Some(body) = bytes.strip_prefix(SNAPSHOT_MAGIC_V1.as_slice()) {
            bincode::deserialize::<v1::Snapshot>(body)
                .map_err(bad)?
                .phases
                .into_iter()
                .map(|(spec, state)| (spec.into(), state.into(), None))
                .collect()
        } else {
            return Err(RuleError::BadSnapshot(
                "not a prop-stream engine snapshot (v1 or v2)".to_owned(),
            ));
        };
        let mut engine = Self::with_grouping(grouping);
        for (spec, state, deals) in phases {
            // Rules were validated when first registered; validate again in case the
            // bytes were tampered with or written by another build.
            let rules = RuleSet::from_pairs(spec.rules.to_pairs())
                .map_err(|e| RuleError::BadSnapshot(e.to_string()))?;
            if engine.contains(spec.account_id) {
                return Err(RuleError::BadSnapshot(format!(
                    "account {} twice",
                    spec.account_id
                )));
            }
            engine.insert(PhaseSpec { rules, ..spec }, state, deals);
        }
        Ok(engine)
    }
}

#[cfg(test)]
mod deal_tests {
    use super::*;
    use crate::rules::config::RuleValue;
    use crate::rules::deals::{DealInput, Side};

    const HOUR: i64 = 3_600_000_000;
    /// 2026-03-02 00:00 UTC, a Monday.
    const MONDAY: i64 = 1_772_409_600_000_000;

    fn engine(extra: &[(&str, RuleValue)]) -> Engine {
        let mut pairs = vec![("initial_balance".to_owned(), RuleValue::Int(100_000))];
        pairs.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
        let mut e = Engine::new();
        e.register(PhaseSpec {
            account_id: 1,
            challenge_id: "c".to_owned(),
            phase_index: 0,
            started_at_us: MONDAY,
            rules: RuleSet::from_pairs(pairs).unwrap(),
        })
        .unwrap();
        e
    }

    fn deal(id: i64, ts: i64, entry: &str, before_tick: u64) -> DealInput<'static> {
        DealInput {
            account_id: Some(1),
            ts: Some(ts),
            deal_id: Some(id),
            position_id: Some(7),
            symbol: Some("EURUSD"),
            side: Some(Side::Buy),
            volume: Some(1.0),
            price: Some(1.1),
            entry: Entry::parse(entry),
            before_tick,
        }
    }

    struct Ticks {
        account_id: Vec<i64>,
        ts: Vec<i64>,
        equity: Vec<f64>,
    }

    impl Ticks {
        fn at(ts: &[i64]) -> Self {
            Self {
                account_id: vec![1; ts.len()],
                ts: ts.to_vec(),
                equity: vec![100_000.0; ts.len()],
            }
        }

        fn columns(&self) -> TickColumns<'_> {
            TickColumns {
                account_id: &self.account_id,
                ts: &self.ts,
                equity: &self.equity,
                balance: &self.equity,
            }
        }
    }

    #[test]
    fn a_tick_past_the_weekly_close_fails_the_phase_at_w() {
        let mut e = engine(&[("weekend_close", RuleValue::Str("FRI 22:00".into()))]);
        let friday_22 = MONDAY + (4 * 24 + 22) * HOUR;
        let ticks = Ticks::at(&[MONDAY + HOUR, friday_22 - 1, friday_22 + HOUR]);
        let out = e
            .run_with_deals(&[ticks.columns()], &[deal(1, MONDAY + HOUR, "in", 1)])
            .unwrap();
        assert_eq!(out.breaches.len(), 1);
        assert_eq!(out.breaches[0].rule, Rule::WeekendHold);
        assert_eq!(out.breaches[0].ts, friday_22);
        assert!((out.breaches[0].actual - 1.0).abs() < f64::EPSILON);
        assert_eq!(out.transitions[0].ts, friday_22);
        assert_eq!(out.counts.evaluated, 2);
        assert_eq!(out.counts.inactive, 1);
        assert_eq!(e.phases()[0].state.status_ts, Some(friday_22));
    }

    #[test]
    fn no_positions_no_weekend_check_and_a_close_at_w_was_held() {
        let mut e = engine(&[
            ("weekend_close", RuleValue::Str("FRI 22:00".into())),
            ("deal_violation_action", RuleValue::Str("flag".into())),
        ]);
        let friday_22 = MONDAY + (4 * 24 + 22) * HOUR;
        let ticks = Ticks::at(&[MONDAY + HOUR]);
        let deals = [
            deal(1, MONDAY + HOUR, "in", 1),
            deal(2, friday_22, "out", 1),
        ];
        let out = e.run_with_deals(&[ticks.columns()], &deals).unwrap();
        assert_eq!(out.breaches.len(), 1);
        assert_eq!(out.breaches[0].action, Action::Notify);
        assert_eq!(out.deal_counts.processed, 2);
        assert_eq!(e.phases()[0].state.next_weekend, i64::MAX);
        // The next weekend passes with nothing open: nothing to judge.
        let later = Ticks::at(&[friday_22 + 7 * 24 * HOUR + 1]);
        let out = e.run(&[later.columns()]).unwrap();
        assert!(out.breaches.is_empty());
    }

    #[test]
    fn before_tick_must_place_deals_in_order_within_the_ticks() {
        let mut e = engine(&[]);
        let ticks = Ticks::at(&[MONDAY + HOUR]);
        let past_the_end = [deal(1, MONDAY, "in", 2)];
        assert!(e.run_with_deals(&[ticks.columns()], &past_the_end).is_err());
        let decreasing = [deal(1, MONDAY, "in", 1), deal(2, MONDAY, "in", 0)];
        assert!(e.run_with_deals(&[ticks.columns()], &decreasing).is_err());
        // A refused batch judged nothing.
        assert_eq!(e.phases()[0].state.ticks, 0);
        // Deals before, between and after ticks of two chunks.
        let a = Ticks::at(&[MONDAY + HOUR, MONDAY + 2 * HOUR]);
        let b = Ticks::at(&[MONDAY + 3 * HOUR]);
        let deals = [
            deal(1, MONDAY + HOUR, "in", 0),
            deal(2, MONDAY + 2 * HOUR, "in", 1),
            deal(3, MONDAY + 3 * HOUR, "out", 2),
            deal(4, MONDAY + 3 * HOUR, "in", 3),
        ];
        let out = e
            .run_with_deals(&[a.columns(), b.columns()], &deals)
            .unwrap();
        assert_eq!(out.deal_counts.processed, 4);
        assert_eq!(out.deal_counts.late, 0);
        assert_eq!(out.counts.evaluated, 3);
        // 1 lot in, 1 added, 1 out, 1 in: two lots open on one position.
        assert_eq!(e.phases()[0].open_positions(), (200, 1));
    }

    #[test]
    fn snapshot_keeps_positions_and_deal_ids() {
        let mut e = engine(&[("min_hold_seconds", RuleValue::Int(3600))]);
        let ticks = Ticks::at(&[MONDAY + HOUR]);
        e.run_with_deals(&[ticks.columns()], &[deal(1, MONDAY + HOUR, "in", 1)])
            .unwrap();
        let mut r = Engine::restore(&e.snapshot(), Grouping::Auto).unwrap();
        assert_eq!(r.phases()[0].open_positions(), (100, 1));
        let none = Ticks::at(&[]);
        let deals = [
            deal(1, MONDAY + HOUR, "in", 0),
            deal(2, MONDAY + 2 * HOUR - 1, "out", 0),
        ];
        let out = r.run_with_deals(&[none.columns()], &deals).unwrap();
        assert_eq!(out.deal_counts.duplicate, 1);
        assert_eq!(out.breaches[0].rule, Rule::ShortHold);
        assert!((out.breaches[0].actual - 3_599.999_999).abs() < 1e-9);
        let mut bytes = e.snapshot();
        bytes[6] = 9;
        assert!(Engine::restore(&bytes, Grouping::Auto).is_err());
    }

    #[test]
    fn grouped_and_ungrouped_deals_give_the_same_outputs() {
        let run = |grouping: Grouping| {
            let mut e = Engine::with_grouping(grouping);
            for account in 1..=3 {
                let rules = RuleSet::from_pairs([
                    ("initial_balance", RuleValue::Int(100_000)),
                    ("max_open_lots", RuleValue::Float(1.5)),
                    ("min_hold_seconds", RuleValue::Int(60)),
                    ("deal_violation_action", RuleValue::Str("flag".into())),
                ])
                .unwrap();
                e.register(PhaseSpec {
                    account_id: account,
                    challenge_id: format!("c-{account}"),
                    phase_index: 0,
                    started_at_us: MONDAY,
                    rules,
                })
                .unwrap();
            }
            // Accounts 1, 2, 3 interleaved; account 3 has deals and no ticks.
            let ts: Vec<i64> = (0..12).map(|i| MONDAY + i * 1_000_000).collect();
            let ticks = Ticks {
                account_id: (0..12).map(|i| 1 + i % 2).collect(),
                ts: ts.clone(),
                equity: vec![100_000.0; 12],
            };
            let mut deals = Vec::new();
            for (k, (account, row)) in [(1, 0), (2, 1), (3, 2), (1, 3), (1, 3), (2, 8), (1, 11)]
                .into_iter()
                .enumerate()
            {
                let mut d = deal(
                    k as i64,
                    ts[row],
                    if k % 3 == 2 { "out" } else { "in" },
                    row as u64,
                );
                d.account_id = Some(account);
                deals.push(d);
            }
            let out = e.run_with_deals(&[ticks.columns()], &deals).unwrap();
            let breaches: Vec<_> = out
                .breaches
                .iter()
                .map(|b| {
                    (
                        e.phases()[b.slot as usize].spec.account_id,
                        b.seq,
                        b.rule,
                        b.ts,
                    )
                })
                .collect();
            let mut sorted = breaches.clone();
            sorted.sort_by_key(|b| (b.0, b.1));
            (sorted, out.deal_opens, out.deal_counts, out.counts)
        };
        let never = run(Grouping::Never);
        assert_eq!(run(Grouping::Always), never);
        assert!(!never.0.is_empty());
        assert_eq!(never.2.processed, 7);
    }

    #[test]
    #[allow(clippy::print_stdout)] // the sizes, for `-- --nocapture`
    fn phase_state_sizes() {
        // The deal state costs the hot path three fields and one pointer; the rest
        // lives behind the pointer. Sizes as built, for docs/engine-state.md.
        let (state, phase, deals) = (
            std::mem::size_of::<PhaseState>(),
            std::mem::size_of::<Phase>(),
            std::mem::size_of::<DealState>(),
        );
        println!("PhaseState {state} B, Phase {phase} B, DealState {deals} B");
        assert!(phase <= 528, "Phase grew to {phase} bytes");
    }
}

/// Hooks for `rules::order` (the backtest's whole-table path), kept together here
/// so that the grouping code lives in its own module.
impl Engine {
    /// Start a batch: refresh the id table if stale, and the batch's epoch.
    pub(crate) fn begin_unordered(&mut self) -> u64 {
        if self.dense_stale {
            self.rebuild_dense();
        }
        self.epoch += 1;
        self.epoch
    }

    /// The slot of an account's phase, or `u32::MAX`.
    #[inline]
    pub(crate) fn lookup_slot(&self, account_id: i64) -> u32 {
        self.slot_of(account_id)
    }

    /// Ask the CPU for a phase's state ahead of its use.
    #[inline]
    pub(crate) fn prefetch_slot(&self, slot: u32) {
        prefetch(&self.hot[slot as usize]);
    }

    /// The threads `run_unordered` judges on (see [`Parallel`]).
    pub(crate) fn parallel(&self) -> Parallel {
        self.parallel
    }

    /// The phases in `parts` contiguous ranges of slots of about equal size
    /// (fewer if there are fewer phases), each borrowed apart.
    pub(crate) fn phase_parts(&mut self, parts: usize) -> Vec<PhasePart<'_>> {
        let size = self.phases.len().div_ceil(parts.max(1)).max(1);
        let mut base = 0u32;
        self.phases
            .chunks_mut(size)
            .zip(self.hot.chunks_mut(size))
            .map(|(phases, hot)| {
                let part = PhasePart { base, phases, hot };
                base += u32::try_from(part.len()).expect("fewer than 2^32 phases");
                part
            })
            .collect()
    }

    /// Judge one phase's ticks, in the order given.
    #[inline]
    pub(crate) fn judge_run(
        &mut self,
        slot: u32,
        epoch: u64,
        ticks: impl Iterator<Item = (i64, f64, f64)>,
        out: &mut BatchOutput,
    ) {
        let phase = &mut self.phases[slot as usize];
        let hot = &mut self.hot[slot as usize];
        for (t, equity, balance) in ticks {
            phase.accept(hot, slot, epoch, t, equity, balance, out);
        }
    }

    /// Ask the CPU for a phase's cold state when its hot state (prefetched
    /// earlier) says a tick at `t` will take the cold path: a new day, the first
    /// tick. A hint only; reads the hot state, changes nothing.
    #[inline]
    pub(crate) fn prefetch_cold_if_due(&self, slot: u32, t: i64) {
        let i = slot as usize;
        prefetch_cold_if_due(&self.hot[i], &self.phases[i], t);
    }

    /// Finish a batch begun with [`Engine::begin_unordered`].
    pub(crate) fn finish_unordered(&mut self, out: &mut BatchOutput) {
        self.finish(out);
    }
}

#[cfg(test)]
mod hot_tests {
    use super::*;
    use crate::rules::config::RuleValue;
    use crate::rules::deals::{DealInput, Entry, Side};

    const DAY: i64 = 86_400_000_000;
    /// 2026-03-02 00:00 UTC, a Monday.
    const MONDAY: i64 = 1_772_409_600_000_000;

    #[test]
    #[allow(clippy::print_stdout)] // the size, for `-- --nocapture`
    fn hot_state_is_two_cache_lines() {
        let hot = std::mem::size_of::<Hot>();
        println!("Hot {hot} B, align {}", std::mem::align_of::<Hot>());
        assert!(hot <= 128, "Hot grew to {hot} bytes");
        assert_eq!(std::mem::align_of::<Hot>(), 64);
    }

    /// A small xorshift: deterministic test data without a dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Rule sets that between them use every branch of the hot path's bounds.
    fn rule_sets() -> Vec<Vec<(&'static str, RuleValue)>> {
        let s = |v: &str| RuleValue::Str(v.to_owned());
        let f = RuleValue::Float;
        vec![
            vec![
                ("max_daily_loss", f(0.02)),
                ("max_total_loss", f(0.04)),
                ("total_loss_mode", s("trailing")),
                ("warning_level", f(0.5)),
                ("profit_target", f(0.03)),
                ("min_trading_days", RuleValue::Int(2)),
            ],
            vec![
                ("max_daily_loss", f(0.02)),
                ("daily_loss_action", s("pause")),
                ("daily_reference", s("day_start_max")),
                ("daily_loss_base", s("day_start")),
                ("warning_level", f(0.7)),
                ("max_total_loss", f(0.05)),
                ("total_loss_mode", s("trailing_eod")),
                ("timezone", s("America/New_York")),
                ("day_rollover", s("17:00")),
            ],
            vec![
                ("profit_target", f(0.02)),
                ("max_best_day_share", f(0.5)),
                ("max_days", RuleValue::Int(3)),
                ("min_trading_days", RuleValue::Int(1)),
            ],
            vec![
                ("max_total_loss", f(0.03)),
                ("daily_reference", s("day_start_balance")),
                ("max_daily_loss", f(0.01)),
                ("daily_loss_action", s("pause")),
                ("weekend_close", s("FRI 22:00")),
                ("deal_violation_action", s("flag")),
                ("min_hold_seconds", RuleValue::Int(600)),
            ],
            vec![],
            // Trailing with a cap below the target: new highs past the cap
            // (the reference stops at `initial_balance + L`), with and
            // without a warning level.
            vec![
                ("max_total_loss", f(0.02)),
                ("total_loss_mode", s("trailing")),
                ("warning_level", f(0.6)),
                ("profit_target", f(0.08)),
                ("max_daily_loss", f(0.03)),
            ],
            vec![
                ("max_total_loss", f(0.015)),
                ("total_loss_mode", s("trailing")),
            ],
        ]
    }

    fn engine(rng_seed: u64, accounts: i64) -> Engine {
        let sets = rule_sets();
        let mut e = Engine::with_grouping(if rng_seed % 2 == 0 {
            Grouping::Always
        } else {
            Grouping::Never
        });
        for a in 0..accounts {
            let mut pairs = vec![("initial_balance", RuleValue::Int(100_000))];
            pairs.extend(sets[(a as usize) % sets.len()].iter().cloned());
            e.register(PhaseSpec {
                account_id: a,
                challenge_id: format!("c-{a}"),
                phase_index: 0,
                started_at_us: MONDAY + (a % 3) * 3_600_000_000,
                rules: RuleSet::from_pairs(pairs).unwrap(),
            })
            .unwrap();
        }
        e
    }

    struct Batch {
        account: Vec<i64>,
        ts: Vec<i64>,
        equity: Vec<f64>,
        balance: Vec<f64>,
    }

    /// Random ticks over 9 days: swings that break, warn, resolve and pass,
    /// duplicates, late ticks, balance moves.
    fn batches(seed: u64, accounts: i64) -> Vec<Batch> {
        let mut rng = Rng(seed);
        let mut eq: Vec<f64> = vec![100_000.0; accounts as usize];
        let mut bal: Vec<f64> = vec![100_000.0; accounts as usize];
        let mut t = MONDAY;
        let mut out = Vec::new();
        for _ in 0..6 {
            let mut b = Batch {
                account: vec![],
                ts: vec![],
                equity: vec![],
                balance: vec![],
            };
            for _ in 0..400 {
                let a = rng.below(accounts as u64) as usize;
                t += i64::try_from(rng.below(DAY as u64 / 70)).unwrap();
                match rng.below(10) {
                    0 => {}
                    1 => bal[a] = eq[a],
                    2 => eq[a] += (rng.below(6000) as f64) - 3000.0,
                    _ => eq[a] += ((rng.below(40_000) as f64) - 20_000.0) / 100.0,
                }
                let late = rng.below(25) == 0;
                b.account.push(a as i64);
                b.ts.push(if late { t - DAY / 3 } else { t });
                b.equity.push(eq[a]);
                b.balance.push(bal[a]);
                if rng.below(15) == 0 {
                    // An exact duplicate.
                    b.account.push(a as i64);
                    b.ts.push(t);
                    b.equity.push(eq[a]);
                    b.balance.push(bal[a]);
                }
            }
            out.push(b);
        }
        out
    }

    fn deals_for(b: &Batch, seed: u64) -> Vec<DealInput<'static>> {
        let mut rng = Rng(seed ^ 0x9e37);
        let mut deals = Vec::new();
        for (row, (&a, &ts)) in b.account.iter().zip(&b.ts).enumerate() {
            if rng.below(6) == 0 {
                let id = i64::try_from(rng.below(1 << 40)).unwrap();
                deals.push(DealInput {
                    account_id: Some(a),
                    ts: Some(ts),
                    deal_id: Some(id),
                    position_id: Some(i64::try_from(rng.below(3)).unwrap()),
                    symbol: Some("EURUSD"),
                    side: Some(Side::Buy),
                    volume: Some(1.0),
                    price: Some(1.1),
                    entry: Entry::parse(if rng.below(2) == 0 { "in" } else { "out" }),
                    before_tick: row as u64,
                });
            }
        }
        deals
    }

    type Seen = (
        Vec<BreachRow>,
        Vec<DailyRow>,
        Vec<TransitionRow>,
        Vec<u32>,
        TickCounts,
        DealCounts,
    );

    fn judge_all(seed: u64, slow: bool, with_deals: bool) -> (Vec<Seen>, Vec<u8>) {
        let accounts = 12;
        let mut e = engine(seed, accounts);
        if slow {
            for h in &mut e.hot {
                h.flags |= bits::FORCE_SLOW;
                h.next_due = i64::MIN;
            }
        }
        let mut outputs = Vec::new();
        for (k, b) in batches(seed, accounts).iter().enumerate() {
            let c = TickColumns {
                account_id: &b.account,
                ts: &b.ts,
                equity: &b.equity,
                balance: &b.balance,
            };
            let deals = if with_deals {
                deals_for(b, seed + k as u64)
            } else {
                vec![]
            };
            let out = e.run_with_deals(&[c], &deals).unwrap();
            outputs.push((
                out.breaches,
                out.daily,
                out.transitions,
                out.touched,
                out.counts,
                out.deal_counts,
            ));
        }
        (outputs, e.snapshot())
    }

    #[test]
    fn hot_path_equals_the_full_rules_on_every_tick() {
        let mut judged_something = 0;
        for seed in 1..=40u64 {
            for with_deals in [false, true] {
                let fast = judge_all(seed, false, with_deals);
                let slow = judge_all(seed, true, with_deals);
                assert_eq!(fast.0, slow.0, "seed {seed} deals {with_deals}");
                // The states, the open warnings and counters included.
                assert_eq!(fast.1, slow.1, "seed {seed} deals {with_deals}");
                judged_something += fast.0.iter().map(|s| s.0.len() + s.2.len()).sum::<usize>();
            }
        }
        // The data does break, warn and pass: the comparison has teeth.
        assert!(judged_something > 100, "{judged_something}");
    }

    #[test]
    fn account_lookup_with_ids_in_slot_order_and_after_a_removal() {
        let mut e = engine(1, 6);
        let tick = |e: &mut Engine, account: i64, t: i64| {
            let cols = TickColumns {
                account_id: &[account],
                ts: &[t],
                equity: &[100_000.0],
                balance: &[100_000.0],
            };
            e.run(&[cols]).unwrap().counts
        };
        // Ids 0..6 registered in order: slot = id - 0, no table read.
        assert_eq!(tick(&mut e, 6, MONDAY + DAY).unknown, 1);
        assert_eq!(tick(&mut e, -1, MONDAY + DAY).unknown, 1);
        assert_eq!(tick(&mut e, 5, MONDAY + DAY).evaluated, 1);
        assert!(e.dense_identity);
        // Removing id 2 moves id 5 into slot 2: the table is needed again.
        assert!(e.remove(2));
        assert_eq!(tick(&mut e, 2, MONDAY + DAY).unknown, 1);
        assert_eq!(tick(&mut e, 5, MONDAY + DAY + 1).evaluated, 1);
        assert!(!e.dense_identity);
        let five = e.phases().iter().find(|p| p.spec.account_id == 5).unwrap();
        assert_eq!(five.state.ticks, 2);
        assert_eq!(five.state.last_ts(), MONDAY + DAY + 1);
    }

    #[test]
    fn grouped_outputs_come_in_the_order_of_the_phases_first_rows() {
        // `Always` judges in arrival order and reorders; `Never` judges in
        // arrival order as is. Put `Never`'s rows in the order of each
        // account's first row in the batch (stable): the two must be equal.
        for seed in 1..=10u64 {
            let bs = batches(seed, 12);
            let mut grouped = engine(0, 12);
            let mut plain = engine(1, 12);
            for b in &bs {
                let c = TickColumns {
                    account_id: &b.account,
                    ts: &b.ts,
                    equity: &b.equity,
                    balance: &b.balance,
                };
                let x = grouped.run(&[c]).unwrap();
                let mut y = plain.run(&[c]).unwrap();
                let mut rank = [u32::MAX; 12];
                let mut next = 0;
                for &a in &b.account {
                    if rank[a as usize] == u32::MAX {
                        rank[a as usize] = next;
                        next += 1;
                    }
                }
                let r = |slot: u32| rank[slot as usize];
                y.breaches.sort_by_key(|b| r(b.slot));
                // The open days `finish` writes come after the ticks' rows, in
                // touched order (a day row of a tick is of an earlier day).
                let today = |d: &DailyRow| plain.phases()[d.slot as usize].state.day == d.day;
                let (mut ended, mut open): (Vec<DailyRow>, Vec<DailyRow>) =
                    y.daily.iter().partition(|d| !today(d));
                ended.sort_by_key(|d| r(d.slot));
                open.sort_by_key(|d| r(d.slot));
                y.daily = ended.into_iter().chain(open).collect();
                y.transitions.sort_by_key(|t| r(t.slot));
                y.touched.sort_by_key(|&s| r(s));
                assert_eq!(x.breaches, y.breaches, "seed {seed}");
                assert_eq!(x.daily, y.daily, "seed {seed}");
                assert_eq!(x.transitions, y.transitions, "seed {seed}");
                assert_eq!(x.touched, y.touched, "seed {seed}");
                assert_eq!(x.counts, y.counts, "seed {seed}");
            }
            assert_eq!(grouped.snapshot(), plain.snapshot());
        }
    }

    #[test]
    fn snapshot_after_the_hot_path_restores_and_goes_on_alike() {
        fn cols(b: &Batch) -> TickColumns<'_> {
            TickColumns {
                account_id: &b.account,
                ts: &b.ts,
                equity: &b.equity,
                balance: &b.balance,
            }
        }
        let accounts = 12;
        let bs = batches(5, accounts);
        let mut a = engine(5, accounts);
        for b in &bs[..3] {
            a.run(&[cols(b)]).unwrap();
        }
        // Seed 5 judges in arrival order (`Never`): the restored engine too.
        let mut r = Engine::restore(&a.snapshot(), Grouping::Never).unwrap();
        for b in &bs[3..] {
            let x = a.run(&[cols(b)]).unwrap();
            let y = r.run(&[cols(b)]).unwrap();
            assert_eq!(x.breaches, y.breaches);
            assert_eq!(x.daily, y.daily);
            assert_eq!(x.transitions, y.transitions);
            assert_eq!(x.counts, y.counts);
        }
        assert_eq!(a.snapshot(), r.snapshot());
    }
}

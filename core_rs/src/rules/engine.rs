//! The evaluator: per-phase state in a dense `Vec`, ticks judged in batches.

use hashbrown::HashMap;
use serde::{Deserialize, Serialize};

use crate::error::{RuleError, RuleResult};
use crate::rules::calendar::DayClock;
use crate::rules::config::{
    DailyLossAction, DailyLossBase, DailyReference, RuleSet, TotalLossMode,
};
use crate::rules::output::{BatchOutput, BreachRow, DailyRow, TransitionRow};

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
        }
    }

    /// `critical` or `warning`.
    #[must_use]
    pub fn severity(self) -> &'static str {
        match self {
            Self::MaxLossWarning | Self::DailyLossWarning => "warning",
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
    touched_epoch: u64,
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
    fn new(spec: PhaseSpec, state: PhaseState) -> Self {
        let derived = Derived::new(&spec);
        Self {
            spec,
            state,
            derived,
            touched_epoch: 0,
        }
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

    /// The skip checks of `rules.md` step 1, then [`Phase::evaluate`].
    #[inline]
    fn accept(
        &mut self,
        slot: u32,
        epoch: u64,
        t: i64,
        equity: f64,
        balance: f64,
        out: &mut BatchOutput,
    ) {
        if self.state.status != Status::Active {
            out.counts.inactive += 1;
            return;
        }
        if t < self.spec.started_at_us || t < self.state.last_ts {
            self.state.late_ticks += 1;
            out.counts.late += 1;
            return;
        }
        if self.touched_epoch != epoch {
            self.touched_epoch = epoch;
            out.touched.push(slot);
        }
        out.counts.evaluated += 1;
        let st = &mut self.state;
        if t == st.last_ts && equity == st.equity && balance == st.balance {
            // An exact duplicate changes nothing (rules.md step 1). Judging it again
            // could: a tick that paused the day skipped the warnings, its twin
            // would not.
            st.ticks += 1;
            return;
        }
        self.evaluate(slot, t, equity, balance, out);
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
            st.day_counted = false;
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
    dense_stale: bool,
    phases: Vec<Phase>,
    epoch: u64,
    grouping: Grouping,
    // Buffers reused across batches by `process`.
    scratch_slots: Vec<u32>,
    scratch_counts: Vec<u32>,
    scratch_ticks: Vec<(i64, f64, f64)>,
}

/// The serialized form of an [`Engine`].
#[derive(Serialize, Deserialize)]
struct Snapshot {
    phases: Vec<(PhaseSpec, PhaseState)>,
}

/// How many groups ahead [`Engine::process`] prefetches a phase's state.
const PREFETCH_GROUPS_AHEAD: usize = 2;

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

/// Slot of a tick that no phase takes (unknown account or invalid values).
const NONE: u32 = u32::MAX;

const SNAPSHOT_MAGIC: &[u8; 8] = b"PSENG\x00\x01\x00";

impl Engine {
    /// An engine with no phases.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
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
        self.insert(spec, state);
        Ok(())
    }

    fn insert(&mut self, spec: PhaseSpec, state: PhaseState) {
        let slot = u32::try_from(self.phases.len()).expect("fewer than 2^32 phases");
        self.index.insert(spec.account_id, slot);
        self.dense_stale = true;
        self.phases.push(Phase::new(spec, state));
    }

    /// Forget a phase; `false` if the account had none.
    pub fn remove(&mut self, account_id: i64) -> bool {
        let Some(slot) = self.index.remove(&account_id) else {
            return false;
        };
        self.dense_stale = true;
        self.phases.swap_remove(slot as usize);
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
        let n = c.account_id.len();
        if c.ts.len() != n || c.equity.len() != n || c.balance.len() != n {
            return Err(RuleError::BadBatch("columns differ in length".to_owned()));
        }
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
            // Exclusive prefix sums turn counts into each group's write position.
            let mut total = 0u32;
            for &g in &groups {
                let k = counts[g as usize];
                counts[g as usize] = total;
                total += k;
            }
            // Scatter the ticks themselves (not their indices) so that judging a
            // group reads one contiguous run.
            // Every position below `total` is written by the scatter, so the
            // buffer kept from the last batch is only grown, never cleared.
            let mut grouped = std::mem::take(&mut self.scratch_ticks);
            if grouped.len() < total as usize {
                grouped.resize(total as usize, (0, 0.0, 0.0));
            }
            for (i, &slot) in slot_of.iter().enumerate() {
                if slot != NONE {
                    let pos = &mut counts[slot as usize];
                    grouped[*pos as usize] = (c.ts[i], c.equity[i], c.balance[i]);
                    *pos += 1;
                }
            }
            let mut start = 0usize;
            for (g, &slot) in groups.iter().enumerate() {
                // Load the phase two groups ahead while this one is judged: with
                // more phases than the caches hold, each group's first touch of its
                // state would otherwise wait for memory.
                if let Some(&ahead) = groups.get(g + PREFETCH_GROUPS_AHEAD) {
                    prefetch(&self.phases[ahead as usize]);
                }
                let end = counts[slot as usize] as usize;
                counts[slot as usize] = 0;
                let phase = &mut self.phases[slot as usize];
                for &(t, eq, bal) in &grouped[start..end] {
                    phase.accept(slot, epoch, t, eq, bal, out);
                }
                start = end;
            }
            self.scratch_ticks = grouped;
        } else {
            for &g in &groups {
                counts[g as usize] = 0;
            }
            for (i, &slot) in slot_of.iter().enumerate() {
                if slot != NONE {
                    self.phases[slot as usize].accept(
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
    }

    /// Judge one batch given as chunks of columns (e.g. the record batches of one
    /// Arrow table): the chunks are one batch for the outputs.
    ///
    /// # Errors
    /// [`RuleError::BadBatch`] if a chunk's columns differ in length.
    pub fn run(&mut self, chunks: &[TickColumns<'_>]) -> RuleResult<BatchOutput> {
        self.epoch += 1;
        let mut out = BatchOutput::default();
        for c in chunks {
            self.process(c, &mut out)?;
        }
        self.finish(&mut out);
        Ok(out)
    }

    /// Finish a batch: the open day of every touched phase goes into `daily`.
    fn finish(&mut self, out: &mut BatchOutput) {
        for &slot in &out.touched {
            let st = &mut self.phases[slot as usize].state;
            if st.day_dirty {
                out.daily.push(DailyRow::of(slot, st.day, st));
                st.day_dirty = false;
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
                .map(|p| (p.spec.clone(), p.state.clone()))
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
        let body = bytes
            .strip_prefix(SNAPSHOT_MAGIC.as_slice())
            .ok_or_else(|| {
                RuleError::BadSnapshot("not a prop-stream engine snapshot (v1)".to_owned())
            })?;
        let snap: Snapshot =
            bincode::deserialize(body).map_err(|e| RuleError::BadSnapshot(e.to_string()))?;
        let mut engine = Self::with_grouping(grouping);
        for (spec, state) in snap.phases {
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
            engine.insert(PhaseSpec { rules, ..spec }, state);
        }
        Ok(engine)
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
        prefetch(&self.phases[slot as usize]);
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
        for (t, equity, balance) in ticks {
            phase.accept(slot, epoch, t, equity, balance, out);
        }
    }

    /// Finish a batch begun with [`Engine::begin_unordered`].
    pub(crate) fn finish_unordered(&mut self, out: &mut BatchOutput) {
        self.finish(out);
    }
}

//! What one batch produces, and its Arrow form.

use std::sync::Arc;

use arrow_array::builder::StringBuilder;
use arrow_array::{
    ArrayRef, BooleanArray, Date32Array, Float64Array, Int32Array, Int64Array, RecordBatch,
    StringArray, TimestampMicrosecondArray,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};

use crate::rules::deals::{DealState, Side};
use crate::rules::engine::{
    cent, prefetch, Action, DealCounts, Engine, OpenWarning, Phase, PhaseState, Rule, Status,
    TickCounts,
};

/// A breach, or a warning's resolution (the same `seq` again with `resolved`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BreachRow {
    /// The phase's slot in the engine.
    pub slot: u32,
    /// Per-phase breach number.
    pub seq: u32,
    /// Which rule.
    pub rule: Rule,
    /// The limit the rule compares with.
    pub threshold: f64,
    /// The measured loss.
    pub actual: f64,
    /// What the breach did.
    pub action: Action,
    /// When the breach happened.
    pub ts: i64,
    /// When a warning was resolved.
    pub resolved_ts: Option<i64>,
}

impl BreachRow {
    pub(crate) fn new(
        slot: u32,
        seq: u32,
        rule: Rule,
        threshold: f64,
        actual: f64,
        action: Action,
        ts: i64,
    ) -> Self {
        Self {
            slot,
            seq,
            rule,
            threshold,
            actual,
            action,
            ts,
            resolved_ts: None,
        }
    }

    pub(crate) fn resolved(slot: u32, rule: Rule, w: &OpenWarning, at: i64) -> Self {
        let (seq, threshold, actual, ts) = w.parts();
        Self {
            slot,
            seq,
            rule,
            threshold,
            actual,
            action: Action::Notify,
            ts,
            resolved_ts: Some(at),
        }
    }
}

/// A day snapshot as it stands.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DailyRow {
    /// The phase's slot in the engine.
    pub slot: u32,
    /// Days since 1970-01-01.
    pub day: i32,
    /// First evaluated equity of the day.
    pub daily_start_equity: f64,
    /// First evaluated balance of the day.
    pub daily_start_balance: f64,
    /// Lowest evaluated equity of the day.
    pub min_equity: f64,
    /// Last evaluated equity of the day.
    pub close_equity: f64,
}

impl DailyRow {
    pub(crate) fn of(slot: u32, day: i32, st: &PhaseState) -> Self {
        Self {
            slot,
            day,
            daily_start_equity: st.daily_start_equity,
            daily_start_balance: st.daily_start_balance,
            min_equity: st.day_min_equity(),
            close_equity: st.equity,
        }
    }
}

/// A phase that passed or failed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TransitionRow {
    /// The phase's slot in the engine.
    pub slot: u32,
    /// `Passed` or `Failed`.
    pub status: Status,
    /// The tick that decided it.
    pub ts: i64,
}

/// A processed `in` deal, for the hedge join outside the engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DealOpen {
    /// Trading account login.
    pub account_id: i64,
    /// The deal's id.
    pub deal_id: i64,
    /// Execution time, UTC microseconds.
    pub ts: i64,
    /// Instrument.
    pub symbol: String,
    /// Direction.
    pub side: Side,
    /// The deal's row in the call's deals: rows come out in delivery order
    /// whatever order the grouping judged accounts in.
    pub row: usize,
}

/// Everything one batch produced, before conversion to Arrow.
#[derive(Debug, Default)]
pub struct BatchOutput {
    /// New breaches and resolutions, in order.
    pub breaches: Vec<BreachRow>,
    /// Day snapshots touched by the batch.
    pub daily: Vec<DailyRow>,
    /// Phases that passed or failed.
    pub transitions: Vec<TransitionRow>,
    /// Slots of the phases whose state the batch changed (an evaluated tick, a
    /// processed deal, a `weekend_hold` failure), in first-touch order.
    pub touched: Vec<u32>,
    /// How the ticks were handled.
    pub counts: TickCounts,
    /// How the deals were handled.
    pub deal_counts: DealCounts,
    /// The processed `in` deals, in delivery order.
    pub deal_opens: Vec<DealOpen>,
    /// The row (in the call's deals) of the deal being judged.
    pub deal_row: usize,
}

fn utc_ts() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

fn f(name: &str, dt: DataType, nullable: bool) -> Field {
    Field::new(name, dt, nullable)
}

fn ts_array(values: Vec<i64>) -> ArrayRef {
    Arc::new(TimestampMicrosecondArray::from(values).with_timezone("UTC"))
}

fn ts_array_opt(values: Vec<Option<i64>>) -> ArrayRef {
    Arc::new(TimestampMicrosecondArray::from(values).with_timezone("UTC"))
}

fn batch(schema: SchemaRef, columns: Vec<ArrayRef>) -> RecordBatch {
    RecordBatch::try_new(schema, columns).expect("columns built to the schema")
}

/// Identity columns (`account_id`, `challenge_id`, `phase_index`) of some slots.
fn identity(engine: &Engine, slots: impl Iterator<Item = u32> + Clone) -> [ArrayRef; 3] {
    let phases = engine.phases();
    let spec = |s: u32| &phases[s as usize].spec;
    [
        Arc::new(Int64Array::from_iter_values(
            slots.clone().map(|s| spec(s).account_id),
        )),
        Arc::new(StringArray::from_iter_values(
            slots.clone().map(|s| spec(s).challenge_id.as_str()),
        )),
        Arc::new(Int32Array::from_iter_values(
            slots.map(|s| spec(s).phase_index),
        )),
    ]
}

fn identity_fields() -> Vec<Field> {
    vec![
        f("account_id", DataType::Int64, false),
        f("challenge_id", DataType::Utf8, false),
        f("phase_index", DataType::Int32, false),
    ]
}

/// The schema of the `breaches` output.
#[must_use]
pub fn breach_schema() -> SchemaRef {
    let mut fields = identity_fields();
    fields.extend([
        f("breach_seq", DataType::Int64, false),
        f("rule", DataType::Utf8, false),
        f("severity", DataType::Utf8, false),
        f("threshold", DataType::Float64, false),
        f("actual", DataType::Float64, false),
        f("action", DataType::Utf8, false),
        f("ts", utc_ts(), false),
        f("resolved", DataType::Boolean, false),
        f("resolved_ts", utc_ts(), true),
    ]);
    Arc::new(Schema::new(fields))
}

/// Breach rows as Arrow.
#[must_use]
pub fn breaches_batch(engine: &Engine, rows: &[BreachRow]) -> RecordBatch {
    let [a, c, p] = identity(engine, rows.iter().map(|r| r.slot));
    batch(
        breach_schema(),
        vec![
            a,
            c,
            p,
            Arc::new(Int64Array::from_iter_values(
                rows.iter().map(|r| i64::from(r.seq)),
            )),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.rule.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.rule.severity(r.action)),
            )),
            Arc::new(Float64Array::from_iter_values(
                rows.iter().map(|r| r.threshold),
            )),
            Arc::new(Float64Array::from_iter_values(
                rows.iter().map(|r| r.actual),
            )),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.action.as_str()),
            )),
            ts_array(rows.iter().map(|r| r.ts).collect()),
            Arc::new(BooleanArray::from(
                rows.iter()
                    .map(|r| r.resolved_ts.is_some())
                    .collect::<Vec<_>>(),
            )),
            ts_array_opt(rows.iter().map(|r| r.resolved_ts).collect()),
        ],
    )
}

/// The schema of the `daily` output.
#[must_use]
pub fn daily_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        f("account_id", DataType::Int64, false),
        f("day", DataType::Date32, false),
        f("daily_start_equity", DataType::Float64, false),
        f("daily_start_balance", DataType::Float64, false),
        f("min_equity", DataType::Float64, false),
        f("close_equity", DataType::Float64, false),
    ]))
}

/// Daily rows as Arrow.
#[must_use]
pub fn daily_batch(engine: &Engine, rows: &[DailyRow]) -> RecordBatch {
    let phases = engine.phases();
    batch(
        daily_schema(),
        vec![
            Arc::new(Int64Array::from_iter_values(
                rows.iter().map(|r| phases[r.slot as usize].spec.account_id),
            )),
            Arc::new(Date32Array::from_iter_values(rows.iter().map(|r| r.day))),
            Arc::new(Float64Array::from_iter_values(
                rows.iter().map(|r| r.daily_start_equity),
            )),
            Arc::new(Float64Array::from_iter_values(
                rows.iter().map(|r| r.daily_start_balance),
            )),
            Arc::new(Float64Array::from_iter_values(
                rows.iter().map(|r| r.min_equity),
            )),
            Arc::new(Float64Array::from_iter_values(
                rows.iter().map(|r| r.close_equity),
            )),
        ],
    )
}

/// The schema of the `transitions` output.
#[must_use]
pub fn transition_schema() -> SchemaRef {
    let mut fields = identity_fields();
    fields.extend([f("status", DataType::Utf8, false), f("ts", utc_ts(), false)]);
    Arc::new(Schema::new(fields))
}

/// Transition rows as Arrow.
#[must_use]
pub fn transitions_batch(engine: &Engine, rows: &[TransitionRow]) -> RecordBatch {
    let [a, c, p] = identity(engine, rows.iter().map(|r| r.slot));
    batch(
        transition_schema(),
        vec![
            a,
            c,
            p,
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.status.as_str()),
            )),
            ts_array(rows.iter().map(|r| r.ts).collect()),
        ],
    )
}

/// One phase's metric (`docs/rules.md`, outputs).
struct Metric {
    daily_limit: Option<f64>,
    daily_floor: Option<f64>,
    overall_limit: Option<f64>,
    overall_floor: Option<f64>,
    daily_reference: f64,
    profit_progress: Option<f64>,
    trading_days_progress: f64,
    days_elapsed: i64,
}

impl Metric {
    fn of(p: &Phase) -> Self {
        let lv = p.levels();
        let s = &p.state;
        let r = &p.spec.rules;
        let target = p.target();
        Self {
            daily_limit: lv.daily_limit,
            daily_floor: lv.daily_limit.map(|ld| cent(lv.daily_reference - ld)),
            overall_limit: lv.overall_limit,
            overall_floor: lv.overall_limit.map(|lm| cent(lv.overall_reference - lm)),
            daily_reference: lv.daily_reference,
            profit_progress: target.map(|t| {
                ((s.equity - r.initial_balance) / (t - r.initial_balance)).clamp(0.0, 1.0)
            }),
            trading_days_progress: if r.min_trading_days == 0 {
                1.0
            } else {
                (f64::from(s.trading_days) / f64::from(r.min_trading_days)).min(1.0)
            },
            days_elapsed: (s.last_ts() - p.spec.started_at_us).div_euclid(86_400_000_000),
        }
    }
}

/// The schema of the `metrics` output.
#[must_use]
pub fn metric_schema() -> SchemaRef {
    let mut fields = identity_fields();
    let float = |n: &str| f(n, DataType::Float64, false);
    let float_null = |n: &str| f(n, DataType::Float64, true);
    fields.extend([
        f("ts", utc_ts(), false),
        f("status", DataType::Utf8, false),
        f("day", DataType::Date32, false),
        float("equity"),
        float("balance"),
        float("profit"),
        float("daily_start_equity"),
        float("daily_start_balance"),
        float("daily_pnl"),
        float_null("daily_loss_limit"),
        float_null("daily_floor"),
        float_null("daily_room"),
        f("daily_paused", DataType::Boolean, false),
        float_null("max_loss_limit"),
        float_null("overall_floor"),
        float_null("overall_room"),
        float("hwm"),
        f("trading_days", DataType::Int32, false),
        f("days_elapsed", DataType::Int32, false),
        float("best_day_profit"),
        float_null("profit_target_level"),
        float_null("profit_progress"),
        float("trading_days_progress"),
        float("open_lots"),
        f("open_positions", DataType::Int32, false),
    ]);
    Arc::new(Schema::new(fields))
}

/// The metric columns, filled in one pass over the touched phases.
///
/// Phases are read in the batch's touch order, which is random in the engine's
/// phase array: one pass that pushes every column (with the next phases
/// prefetched) reads each phase's cache lines once, where a pass per column read
/// them 26 times.
struct MetricColumns {
    account_id: Vec<i64>,
    challenge_id: StringBuilder,
    phase_index: Vec<i32>,
    ts: Vec<i64>,
    status: StringBuilder,
    day: Vec<i32>,
    equity: Vec<f64>,
    balance: Vec<f64>,
    profit: Vec<f64>,
    daily_start_equity: Vec<f64>,
    daily_start_balance: Vec<f64>,
    daily_pnl: Vec<f64>,
    daily_loss_limit: Vec<Option<f64>>,
    daily_floor: Vec<Option<f64>>,
    daily_room: Vec<Option<f64>>,
    daily_paused: Vec<bool>,
    max_loss_limit: Vec<Option<f64>>,
    overall_floor: Vec<Option<f64>>,
    overall_room: Vec<Option<f64>>,
    hwm: Vec<f64>,
    trading_days: Vec<i32>,
    days_elapsed: Vec<i32>,
    best_day_profit: Vec<f64>,
    profit_target_level: Vec<Option<f64>>,
    profit_progress: Vec<Option<f64>>,
    trading_days_progress: Vec<f64>,
    open_lots: Vec<f64>,
    open_positions: Vec<i32>,
}

impl MetricColumns {
    fn with_capacity(n: usize) -> Self {
        Self {
            account_id: Vec::with_capacity(n),
            challenge_id: StringBuilder::with_capacity(n, n * 8),
            phase_index: Vec::with_capacity(n),
            ts: Vec::with_capacity(n),
            status: StringBuilder::with_capacity(n, n * 6),
            day: Vec::with_capacity(n),
            equity: Vec::with_capacity(n),
            balance: Vec::with_capacity(n),
            profit: Vec::with_capacity(n),
            daily_start_equity: Vec::with_capacity(n),
            daily_start_balance: Vec::with_capacity(n),
            daily_pnl: Vec::with_capacity(n),
            daily_loss_limit: Vec::with_capacity(n),
            daily_floor: Vec::with_capacity(n),
            daily_room: Vec::with_capacity(n),
            daily_paused: Vec::with_capacity(n),
            max_loss_limit: Vec::with_capacity(n),
            overall_floor: Vec::with_capacity(n),
            overall_room: Vec::with_capacity(n),
            hwm: Vec::with_capacity(n),
            trading_days: Vec::with_capacity(n),
            days_elapsed: Vec::with_capacity(n),
            best_day_profit: Vec::with_capacity(n),
            profit_target_level: Vec::with_capacity(n),
            profit_progress: Vec::with_capacity(n),
            trading_days_progress: Vec::with_capacity(n),
            open_lots: Vec::with_capacity(n),
            open_positions: Vec::with_capacity(n),
        }
    }

    #[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]
    fn push(&mut self, p: &Phase) {
        let m = Metric::of(p);
        let s = &p.state;
        self.account_id.push(p.spec.account_id);
        self.challenge_id.append_value(&p.spec.challenge_id);
        self.phase_index.push(p.spec.phase_index);
        self.ts.push(s.last_ts());
        self.status.append_value(s.status.as_str());
        self.day.push(s.day);
        self.equity.push(s.equity);
        self.balance.push(s.balance);
        self.profit.push(s.equity - p.spec.rules.initial_balance);
        self.daily_start_equity.push(s.daily_start_equity);
        self.daily_start_balance.push(s.daily_start_balance);
        self.daily_pnl.push(s.equity - m.daily_reference);
        self.daily_loss_limit.push(m.daily_limit);
        self.daily_floor.push(m.daily_floor);
        self.daily_room.push(m.daily_floor.map(|fl| s.equity - fl));
        self.daily_paused.push(s.day_paused());
        self.max_loss_limit.push(m.overall_limit);
        self.overall_floor.push(m.overall_floor);
        self.overall_room
            .push(m.overall_floor.map(|fl| s.equity - fl));
        self.hwm.push(s.hwm);
        self.trading_days.push(s.trading_days as i32);
        self.days_elapsed.push(m.days_elapsed as i32);
        self.best_day_profit.push(p.best_day_profit());
        self.profit_target_level.push(p.target());
        self.profit_progress.push(m.profit_progress);
        self.trading_days_progress.push(m.trading_days_progress);
        let (open, positions) = p.open_positions();
        self.open_lots.push(lots(open));
        self.open_positions
            .push(i32::try_from(positions).unwrap_or(i32::MAX));
    }

    fn finish(mut self) -> RecordBatch {
        let float = |v: Vec<f64>| -> ArrayRef { Arc::new(Float64Array::from(v)) };
        let float_null = |v: Vec<Option<f64>>| -> ArrayRef { Arc::new(Float64Array::from(v)) };
        batch(
            metric_schema(),
            vec![
                Arc::new(Int64Array::from(self.account_id)),
                Arc::new(self.challenge_id.finish()),
                Arc::new(Int32Array::from(self.phase_index)),
                ts_array(self.ts),
                Arc::new(self.status.finish()),
                Arc::new(Date32Array::from(self.day)),
                float(self.equity),
                float(self.balance),
                float(self.profit),
                float(self.daily_start_equity),
                float(self.daily_start_balance),
                float(self.daily_pnl),
                float_null(self.daily_loss_limit),
                float_null(self.daily_floor),
                float_null(self.daily_room),
                Arc::new(BooleanArray::from(self.daily_paused)),
                float_null(self.max_loss_limit),
                float_null(self.overall_floor),
                float_null(self.overall_room),
                float(self.hwm),
                Arc::new(Int32Array::from(self.trading_days)),
                Arc::new(Int32Array::from(self.days_elapsed)),
                float(self.best_day_profit),
                float_null(self.profit_target_level),
                float_null(self.profit_progress),
                float(self.trading_days_progress),
                float(self.open_lots),
                Arc::new(Int32Array::from(self.open_positions)),
            ],
        )
    }
}

/// The latest metric of each slot, as Arrow.
#[must_use]
pub fn metrics_batch(engine: &Engine, slots: &[u32]) -> RecordBatch {
    let phases = engine.phases();
    let mut columns = MetricColumns::with_capacity(slots.len());
    for (i, &slot) in slots.iter().enumerate() {
        if let Some(&ahead) = slots.get(i + METRIC_PREFETCH_AHEAD) {
            prefetch(&phases[ahead as usize]);
        }
        let p = &phases[slot as usize];
        // A metric needs equity: a phase only deals touched so far has none.
        if p.state.has_ticks() {
            columns.push(p);
        }
    }
    columns.finish()
}

/// How many rows ahead [`metrics_batch`] prefetches a phase.
const METRIC_PREFETCH_AHEAD: usize = 4;

/// The schema of the per-phase state table.
#[must_use]
pub fn phase_schema() -> SchemaRef {
    let mut fields = identity_fields();
    fields.extend([
        f("started_at", utc_ts(), false),
        f("status", DataType::Utf8, false),
        f("status_ts", utc_ts(), true),
        f("equity", DataType::Float64, true),
        f("balance", DataType::Float64, true),
        f("hwm", DataType::Float64, false),
        f("daily_start_equity", DataType::Float64, true),
        f("trading_days", DataType::Int32, false),
        f("ticks", DataType::Int64, false),
        f("late_ticks", DataType::Int64, false),
        f("open_lots", DataType::Float64, false),
        f("open_positions", DataType::Int32, false),
        f("deals", DataType::Int64, false),
        f("late_deals", DataType::Int64, false),
        f("duplicate_deals", DataType::Int64, false),
        f("unmatched_deals", DataType::Int64, false),
    ]);
    Arc::new(Schema::new(fields))
}

/// Lots of whole hundredths.
#[allow(clippy::cast_precision_loss)]
fn lots(hundredths: i64) -> f64 {
    hundredths as f64 / 100.0
}

/// Every registered phase's state, as Arrow.
#[must_use]
pub fn phases_batch(engine: &Engine) -> RecordBatch {
    let phases = engine.phases();
    let n = u32::try_from(phases.len()).expect("fewer than 2^32 phases");
    let [a, c, p] = identity(engine, 0..n);
    let seen = |p: &Phase, x: f64| p.state.has_ticks().then_some(x);
    batch(
        phase_schema(),
        vec![
            a,
            c,
            p,
            ts_array(phases.iter().map(|p| p.spec.started_at_us).collect()),
            Arc::new(StringArray::from_iter_values(
                phases.iter().map(|p| p.state.status.as_str()),
            )),
            ts_array_opt(phases.iter().map(|p| p.state.status_ts).collect()),
            Arc::new(Float64Array::from(
                phases
                    .iter()
                    .map(|p| seen(p, p.state.equity))
                    .collect::<Vec<_>>(),
            )),
            Arc::new(Float64Array::from(
                phases
                    .iter()
                    .map(|p| seen(p, p.state.balance))
                    .collect::<Vec<_>>(),
            )),
            Arc::new(Float64Array::from_iter_values(
                phases.iter().map(|p| p.state.hwm),
            )),
            Arc::new(Float64Array::from(
                phases
                    .iter()
                    .map(|p| seen(p, p.state.daily_start_equity))
                    .collect::<Vec<_>>(),
            )),
            Arc::new(Int32Array::from_iter_values(
                phases.iter().map(|p| p.state.trading_days as i32),
            )),
            Arc::new(Int64Array::from_iter_values(
                phases.iter().map(|p| p.state.ticks as i64),
            )),
            Arc::new(Int64Array::from_iter_values(
                phases.iter().map(|p| p.state.late_ticks as i64),
            )),
            Arc::new(Float64Array::from_iter_values(
                phases.iter().map(|p| lots(p.open_positions().0)),
            )),
            Arc::new(Int32Array::from_iter_values(phases.iter().map(|p| {
                i32::try_from(p.open_positions().1).unwrap_or(i32::MAX)
            }))),
            deal_counter(phases, |d| d.deals),
            deal_counter(phases, |d| d.late_deals),
            deal_counter(phases, |d| d.duplicate_deals),
            deal_counter(phases, |d| d.unmatched_deals),
        ],
    )
}

fn deal_counter(phases: &[Phase], get: impl Fn(&DealState) -> u64) -> ArrayRef {
    Arc::new(Int64Array::from_iter_values(phases.iter().map(|p| {
        p.deals()
            .map_or(0, |d| i64::try_from(get(d)).unwrap_or(i64::MAX))
    })))
}

/// The schema of the `deal_opens` output.
#[must_use]
pub fn deal_open_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        f("account_id", DataType::Int64, false),
        f("deal_id", DataType::Int64, false),
        f("ts", utc_ts(), false),
        f("symbol", DataType::Utf8, false),
        f("side", DataType::Utf8, false),
    ]))
}

/// The processed `in` deals of a batch, as Arrow.
#[must_use]
pub fn deal_opens_batch(rows: &[DealOpen]) -> RecordBatch {
    batch(
        deal_open_schema(),
        vec![
            Arc::new(Int64Array::from_iter_values(
                rows.iter().map(|r| r.account_id),
            )),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.deal_id))),
            ts_array(rows.iter().map(|r| r.ts).collect()),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.symbol.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.side.as_str()),
            )),
        ],
    )
}

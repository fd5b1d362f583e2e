//! What one batch produces, and its Arrow form.

use std::sync::Arc;

use arrow_array::{
    ArrayRef, BooleanArray, Date32Array, Float64Array, Int32Array, Int64Array, RecordBatch,
    StringArray, TimestampMicrosecondArray,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};

use crate::rules::engine::{
    cent, Action, Engine, OpenWarning, Phase, PhaseState, Rule, Status, TickCounts,
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

/// Everything one batch produced, before conversion to Arrow.
#[derive(Debug, Default)]
pub struct BatchOutput {
    /// New breaches and resolutions, in order.
    pub breaches: Vec<BreachRow>,
    /// Day snapshots touched by the batch.
    pub daily: Vec<DailyRow>,
    /// Phases that passed or failed.
    pub transitions: Vec<TransitionRow>,
    /// Slots of the phases that evaluated a tick, in first-touch order.
    pub touched: Vec<u32>,
    /// How the ticks were handled.
    pub counts: TickCounts,
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
                rows.iter().map(|r| r.rule.severity()),
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
    ]);
    Arc::new(Schema::new(fields))
}

/// The latest metric of each slot, as Arrow.
#[must_use]
pub fn metrics_batch(engine: &Engine, slots: &[u32]) -> RecordBatch {
    let phases: Vec<&Phase> = slots
        .iter()
        .map(|&s| &engine.phases()[s as usize])
        .collect();
    let metrics: Vec<Metric> = phases.iter().map(|p| Metric::of(p)).collect();
    let [a, c, p] = identity(engine, slots.iter().copied());
    let col = |g: &dyn Fn(&Phase, &Metric) -> f64| -> ArrayRef {
        Arc::new(Float64Array::from_iter_values(
            phases.iter().zip(&metrics).map(|(p, m)| g(p, m)),
        ))
    };
    let col_opt = |g: &dyn Fn(&Phase, &Metric) -> Option<f64>| -> ArrayRef {
        Arc::new(Float64Array::from(
            phases
                .iter()
                .zip(&metrics)
                .map(|(p, m)| g(p, m))
                .collect::<Vec<_>>(),
        ))
    };
    batch(
        metric_schema(),
        vec![
            a,
            c,
            p,
            ts_array(phases.iter().map(|p| p.state.last_ts()).collect()),
            Arc::new(StringArray::from_iter_values(
                phases.iter().map(|p| p.state.status.as_str()),
            )),
            Arc::new(Date32Array::from_iter_values(
                phases.iter().map(|p| p.state.day),
            )),
            col(&|p, _| p.state.equity),
            col(&|p, _| p.state.balance),
            col(&|p, _| p.state.equity - p.spec.rules.initial_balance),
            col(&|p, _| p.state.daily_start_equity),
            col(&|p, _| p.state.daily_start_balance),
            col(&|p, m| p.state.equity - m.daily_reference),
            col_opt(&|_, m| m.daily_limit),
            col_opt(&|_, m| m.daily_floor),
            col_opt(&|p, m| m.daily_floor.map(|fl| p.state.equity - fl)),
            Arc::new(BooleanArray::from(
                phases
                    .iter()
                    .map(|p| p.state.day_paused())
                    .collect::<Vec<_>>(),
            )),
            col_opt(&|_, m| m.overall_limit),
            col_opt(&|_, m| m.overall_floor),
            col_opt(&|p, m| m.overall_floor.map(|fl| p.state.equity - fl)),
            col(&|p, _| p.state.hwm),
            Arc::new(Int32Array::from_iter_values(
                phases.iter().map(|p| p.state.trading_days as i32),
            )),
            Arc::new(Int32Array::from_iter_values(
                metrics.iter().map(|m| m.days_elapsed as i32),
            )),
            col(&|p, _| p.best_day_profit()),
            col_opt(&|p, _| p.target()),
            col_opt(&|_, m| m.profit_progress),
            col(&|_, m| m.trading_days_progress),
        ],
    )
}

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
    ]);
    Arc::new(Schema::new(fields))
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
        ],
    )
}

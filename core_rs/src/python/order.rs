//! Bindings of `rules::order` (judge a table in any order) and of the benchmark's
//! dense baseline loop.

use arrow_array::cast::AsArray;
use arrow_array::types::UInt64Type;
use arrow_schema::DataType;
use pyo3::prelude::*;
use pyo3_arrow::PyTable;

use super::{counts_dict, to_py, to_pyarrow, BatchResult};
use crate::error::RuleError;
use crate::rules::baseline;
use crate::rules::engine::{Engine, TickColumns};
use crate::rules::input::tick_columns;
use crate::rules::output;

/// `Evaluator.process_unordered`: see the stub in `prop_stream/_core.pyi`.
pub(super) fn process_unordered(
    engine: &mut Engine,
    py: Python<'_>,
    ticks: PyTable,
    seq_column: Option<&str>,
    threads: Option<usize>,
) -> PyResult<BatchResult> {
    engine.set_threads(threads.unwrap_or(0));
    let (batches, _schema) = ticks.into_inner();
    let result = py.detach(|| {
        let chunks = batches
            .iter()
            .map(tick_columns)
            .collect::<Result<Vec<TickColumns<'_>>, _>>()?;
        let seq = match seq_column {
            None => None,
            Some(name) => Some(
                batches
                    .iter()
                    .map(|b| {
                        let col = b
                            .column_by_name(name)
                            .ok_or_else(|| RuleError::BadBatch(format!("missing column {name}")))?;
                        if *col.data_type() != DataType::UInt64 || col.null_count() > 0 {
                            return Err(RuleError::BadBatch(format!(
                                "column {name} must be uint64 without nulls, is {}",
                                col.data_type()
                            )));
                        }
                        Ok(col.as_primitive::<UInt64Type>().values().as_ref())
                    })
                    .collect::<Result<Vec<&[u64]>, _>>()?,
            ),
        };
        let (out, stats) = engine.run_unordered(&chunks, seq.as_deref())?;
        let engine = &*engine;
        // The two large tables (a metric row per phase, a daily row per phase
        // and day) are built on two threads: at a million phases they are a
        // good part of the call.
        let (metrics, (breaches, daily, transitions)) = std::thread::scope(|scope| {
            let metrics = scope.spawn(|| output::metrics_batch(engine, &out.touched));
            let rest = (
                output::breaches_batch(engine, &out.breaches),
                output::daily_batch(engine, &out.daily),
                output::transitions_batch(engine, &out.transitions),
            );
            let metrics = metrics
                .join()
                .unwrap_or_else(|e| std::panic::resume_unwind(e));
            (metrics, rest)
        });
        Ok::<_, RuleError>((
            breaches,
            metrics,
            daily,
            transitions,
            output::deal_opens_batch(&out.deal_opens),
            out.counts,
            out.deal_counts,
            stats,
        ))
    });
    let (breaches, metrics, daily, transitions, deal_opens, c, d, stats) =
        result.map_err(|e| to_py(py, e))?;
    let counts = counts_dict(py, &c, &d)?;
    counts.set_item("runs", stats.runs)?;
    counts.set_item("sorted_runs", stats.sorted_runs)?;
    Ok(BatchResult {
        breaches: to_pyarrow(py, breaches)?,
        metrics: to_pyarrow(py, metrics)?,
        daily: to_pyarrow(py, daily)?,
        transitions: to_pyarrow(py, transitions)?,
        counts: counts.unbind(),
        deal_opens: to_pyarrow(py, deal_opens)?,
    })
}

/// The engine benchmark's yardstick: a dense per-account loop over the ticks in
/// the order given (`rules::baseline`). Returns (ticks judged, breaches seen).
#[pyfunction]
pub(super) fn _dense_baseline(py: Python<'_>, ticks: PyTable) -> PyResult<(u64, u64)> {
    let (batches, _schema) = ticks.into_inner();
    py.detach(|| {
        let mut total = (0, 0);
        for b in &batches {
            let c = tick_columns(b)?;
            let (n, k) = baseline::dense_loop(c.account_id, c.ts, c.equity);
            total = (total.0 + n, total.1 + k);
        }
        Ok::<_, RuleError>(total)
    })
    .map_err(|e| to_py(py, e))
}

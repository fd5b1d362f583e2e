//! Tick batches in: borrow the four tick columns of an Arrow record batch.

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type, TimestampMicrosecondType};
use arrow_array::{Array, RecordBatch};
use arrow_schema::{DataType, TimeUnit};

use crate::error::{RuleError, RuleResult};
use crate::rules::engine::TickColumns;

fn column<'a>(
    batch: &'a RecordBatch,
    name: &str,
    expected: &str,
    ok: impl Fn(&DataType) -> bool,
) -> RuleResult<&'a dyn Array> {
    let col = batch
        .column_by_name(name)
        .ok_or_else(|| RuleError::BadBatch(format!("missing column {name}")))?;
    if !ok(col.data_type()) {
        return Err(RuleError::BadBatch(format!(
            "column {name} is {}, expected {expected}",
            col.data_type()
        )));
    }
    if col.null_count() > 0 {
        return Err(RuleError::BadBatch(format!("column {name} has nulls")));
    }
    Ok(col.as_ref())
}

/// Borrow `account_id` (Int64), `ts` (Timestamp µs), `equity` and `balance`
/// (Float64), without copying.
///
/// # Errors
/// [`RuleError::BadBatch`] if a column is missing, has another type or has nulls.
pub fn tick_columns(batch: &RecordBatch) -> RuleResult<TickColumns<'_>> {
    let account_id = column(batch, "account_id", "int64", |t| *t == DataType::Int64)?;
    let ts = column(batch, "ts", "timestamp[us]", |t| {
        matches!(t, DataType::Timestamp(TimeUnit::Microsecond, _))
    })?;
    let equity = column(batch, "equity", "float64", |t| *t == DataType::Float64)?;
    let balance = column(batch, "balance", "float64", |t| *t == DataType::Float64)?;
    Ok(TickColumns {
        account_id: account_id.as_primitive::<Int64Type>().values(),
        ts: ts.as_primitive::<TimestampMicrosecondType>().values(),
        equity: equity.as_primitive::<Float64Type>().values(),
        balance: balance.as_primitive::<Float64Type>().values(),
    })
}

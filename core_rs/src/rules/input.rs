//! Batches in: borrow the four tick columns of an Arrow record batch, and read
//! the rows of a deal batch.

use arrow_array::cast::AsArray;
use arrow_array::types::{ArrowPrimitiveType, Float64Type, Int64Type, TimestampMicrosecondType};
use arrow_array::{
    Array, ArrayRef, LargeStringArray, PrimitiveArray, RecordBatch, StringArray, StringViewArray,
};
use arrow_schema::{DataType, TimeUnit};

use crate::error::{RuleError, RuleResult};
use crate::rules::deals::{DealInput, Entry, Side};
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

/// A text column of any of Arrow's string layouts.
#[derive(Clone, Copy)]
enum Text<'a> {
    Utf8(&'a StringArray),
    Large(&'a LargeStringArray),
    View(&'a StringViewArray),
}

impl<'a> Text<'a> {
    fn of(batch: &'a RecordBatch, name: &str) -> RuleResult<Self> {
        let col = deal_column(batch, name)?;
        match col.data_type() {
            DataType::Utf8 => Ok(Self::Utf8(col.as_string::<i32>())),
            DataType::LargeUtf8 => Ok(Self::Large(col.as_string::<i64>())),
            DataType::Utf8View => Ok(Self::View(col.as_string_view())),
            other => Err(wrong_type(name, other, "utf8")),
        }
    }

    fn get(self, i: usize) -> Option<&'a str> {
        match self {
            Self::Utf8(a) => a.is_valid(i).then(|| a.value(i)),
            Self::Large(a) => a.is_valid(i).then(|| a.value(i)),
            Self::View(a) => a.is_valid(i).then(|| a.value(i)),
        }
    }
}

fn deal_column<'a>(batch: &'a RecordBatch, name: &str) -> RuleResult<&'a ArrayRef> {
    batch
        .column_by_name(name)
        .ok_or_else(|| RuleError::BadBatch(format!("deal batch is missing column {name}")))
}

fn wrong_type(name: &str, got: &DataType, expected: &str) -> RuleError {
    RuleError::BadBatch(format!(
        "deal batch column {name} is {got}, expected {expected}"
    ))
}

fn typed<'a, T: ArrowPrimitiveType>(
    batch: &'a RecordBatch,
    name: &str,
    expected: &str,
    ok: impl Fn(&DataType) -> bool,
) -> RuleResult<&'a PrimitiveArray<T>> {
    let col = deal_column(batch, name)?;
    if !ok(col.data_type()) {
        return Err(wrong_type(name, col.data_type(), expected));
    }
    Ok(col.as_primitive::<T>())
}

fn opt<T: ArrowPrimitiveType>(a: &PrimitiveArray<T>, i: usize) -> Option<T::Native> {
    a.is_valid(i).then(|| a.value(i))
}

/// Read the deals of a batch (`account_id, ts, deal_id, position_id, symbol,
/// side, volume, price, entry, before_tick`) into `out`, in row order. A null or
/// unknown value leaves the field `None`, so the engine counts the deal
/// `invalid`; only `before_tick`, which places the deal among the ticks, must be
/// present and ≥ 0.
///
/// # Errors
/// [`RuleError::BadBatch`] naming the column if one is missing or has another
/// type, or if `before_tick` has a null or a negative value.
pub fn deal_rows<'a>(batch: &'a RecordBatch, out: &mut Vec<DealInput<'a>>) -> RuleResult<()> {
    let int = |t: &DataType| *t == DataType::Int64;
    let float = |t: &DataType| *t == DataType::Float64;
    let account_id = typed::<Int64Type>(batch, "account_id", "int64", int)?;
    let ts = typed::<TimestampMicrosecondType>(batch, "ts", "timestamp[us]", |t| {
        matches!(t, DataType::Timestamp(TimeUnit::Microsecond, _))
    })?;
    let deal_id = typed::<Int64Type>(batch, "deal_id", "int64", int)?;
    let position_id = typed::<Int64Type>(batch, "position_id", "int64", int)?;
    let symbol = Text::of(batch, "symbol")?;
    let side = Text::of(batch, "side")?;
    let volume = typed::<Float64Type>(batch, "volume", "float64", float)?;
    let price = typed::<Float64Type>(batch, "price", "float64", float)?;
    let entry = Text::of(batch, "entry")?;
    let before_tick = typed::<Int64Type>(batch, "before_tick", "int64", int)?;
    out.reserve(batch.num_rows());
    for i in 0..batch.num_rows() {
        let place = opt(before_tick, i)
            .and_then(|b| u64::try_from(b).ok())
            .ok_or_else(|| {
                RuleError::BadBatch(format!(
                    "deal batch column before_tick: row {i} is null or negative"
                ))
            })?;
        out.push(DealInput {
            account_id: opt(account_id, i),
            ts: opt(ts, i),
            deal_id: opt(deal_id, i),
            position_id: opt(position_id, i),
            symbol: symbol.get(i),
            side: side.get(i).and_then(Side::parse),
            volume: opt(volume, i),
            price: opt(price, i),
            entry: entry.get(i).and_then(Entry::parse),
            before_tick: place,
        });
    }
    Ok(())
}

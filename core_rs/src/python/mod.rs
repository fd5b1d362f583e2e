//! Python bindings: thin `#[pyclass]` wrappers over `rules`, and the exceptions.

use arrow_array::RecordBatch;
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyString};
use pyo3_arrow::PyTable;

mod kafka;
mod order;

use crate::error::RuleError;
use crate::rules::config::{RuleSet, RuleValue};
use crate::rules::deals::DealInput;
use crate::rules::engine::{DealCounts, Engine, Grouping, PhaseSpec, TickColumns, TickCounts};
use crate::rules::input::{deal_rows, tick_columns};
use crate::rules::output;

create_exception!(
    prop_stream._core,
    PropStreamError,
    PyException,
    "Root of every prop-stream error."
);
create_exception!(
    prop_stream._core,
    RuleConfigError,
    PropStreamError,
    "A rule set or phase registration is invalid; `field` names the culprit."
);
create_exception!(
    prop_stream._core,
    TickBatchError,
    PropStreamError,
    "A tick batch does not have the engine's schema."
);
create_exception!(
    prop_stream._core,
    SnapshotError,
    PropStreamError,
    "Snapshot bytes can't be restored."
);

/// Map every engine error to its Python exception; `RuleConfigError` gets `field`.
fn to_py(py: Python<'_>, err: RuleError) -> PyErr {
    let message = err.to_string();
    match err {
        RuleError::InvalidRule { field, .. } => {
            with_field(py, RuleConfigError::new_err(message), &field)
        }
        RuleError::DuplicateAccount(_) => {
            with_field(py, RuleConfigError::new_err(message), "account_id")
        }
        RuleError::BadBatch(_) => TickBatchError::new_err(message),
        RuleError::BadSnapshot(_) => SnapshotError::new_err(message),
    }
}

fn with_field(py: Python<'_>, err: PyErr, field: &str) -> PyErr {
    // Setting an attribute on a fresh exception instance cannot fail in practice;
    // if it does, the message still names the field.
    let _ = err.value(py).setattr("field", field);
    err
}

fn rule_value(field: &str, v: &Bound<'_, PyAny>) -> PyResult<RuleValue> {
    Ok(if v.is_none() {
        RuleValue::Null
    } else if let Ok(b) = v.cast::<PyBool>() {
        RuleValue::Bool(b.is_true())
    } else if v.is_instance_of::<PyInt>() {
        match v.extract::<i64>() {
            Ok(i) => RuleValue::Int(i),
            Err(_) => RuleValue::Float(v.extract::<f64>()?),
        }
    } else if v.is_instance_of::<PyFloat>() {
        RuleValue::Float(v.extract::<f64>()?)
    } else if let Ok(s) = v.cast::<PyString>() {
        RuleValue::Str(s.to_str()?.to_owned())
    } else if let Ok(x) = v.call_method0("__float__").and_then(|f| f.extract::<f64>()) {
        // Decimal and other numbers.
        RuleValue::Float(x)
    } else {
        let type_name = v.get_type().name()?;
        return Err(with_field(
            v.py(),
            RuleConfigError::new_err(format!("{field}: unsupported value of type {type_name}")),
            field,
        ));
    })
}

/// A validated rule set (`rules.md`), built from a mapping of rule names to values.
#[pyclass(module = "prop_stream._core", frozen)]
pub struct ChallengeRules {
    inner: RuleSet,
}

#[pymethods]
impl ChallengeRules {
    #[new]
    fn new(py: Python<'_>, rules: &Bound<'_, PyDict>) -> PyResult<Self> {
        let mut pairs = Vec::with_capacity(rules.len());
        for (k, v) in rules.iter() {
            let key: String = k.extract().map_err(|_| {
                with_field(
                    py,
                    RuleConfigError::new_err("rule names must be strings"),
                    "rules",
                )
            })?;
            let value = rule_value(&key, &v)?;
            pairs.push((key, value));
        }
        let inner = RuleSet::from_pairs(pairs).map_err(|e| to_py(py, e))?;
        Ok(Self { inner })
    }

    /// Every rule with its value, defaults filled in.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        pairs_to_dict(py, self.inner.to_pairs())
    }

    fn __repr__(&self) -> String {
        format!("ChallengeRules({:?})", self.inner)
    }
}

fn pairs_to_dict<'py>(
    py: Python<'py>,
    pairs: Vec<(&'static str, RuleValue)>,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (k, v) in pairs {
        match v {
            RuleValue::Null => d.set_item(k, py.None())?,
            RuleValue::Bool(b) => d.set_item(k, b)?,
            RuleValue::Int(i) => d.set_item(k, i)?,
            RuleValue::Float(x) => d.set_item(k, x)?,
            RuleValue::Str(s) => d.set_item(k, s)?,
        }
    }
    Ok(d)
}

/// The defaults of every rule but `initial_balance`.
#[pyfunction]
fn rule_defaults(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let mut pairs = RuleSet::default().to_pairs();
    pairs.retain(|(k, _)| *k != "initial_balance");
    pairs_to_dict(py, pairs)
}

/// What one `Evaluator.process` call produced, as pyarrow tables.
#[pyclass(module = "prop_stream._core", frozen, get_all)]
pub struct BatchResult {
    breaches: Py<PyAny>,
    metrics: Py<PyAny>,
    daily: Py<PyAny>,
    transitions: Py<PyAny>,
    counts: Py<PyDict>,
    deal_opens: Py<PyAny>,
}

/// `BatchResult.counts`: the tick and deal counts of one call.
fn counts_dict<'py>(
    py: Python<'py>,
    c: &TickCounts,
    d: &DealCounts,
) -> PyResult<Bound<'py, PyDict>> {
    let counts = PyDict::new(py);
    counts.set_item("evaluated", c.evaluated)?;
    counts.set_item("late", c.late)?;
    counts.set_item("unknown", c.unknown)?;
    counts.set_item("inactive", c.inactive)?;
    counts.set_item("invalid", c.invalid)?;
    counts.set_item("deals", d.processed)?;
    counts.set_item("late_deals", d.late)?;
    counts.set_item("duplicate_deals", d.duplicate)?;
    counts.set_item("unmatched_deals", d.unmatched)?;
    counts.set_item("unknown_deals", d.unknown)?;
    counts.set_item("inactive_deals", d.inactive)?;
    counts.set_item("invalid_deals", d.invalid)?;
    Ok(counts)
}

fn to_pyarrow(py: Python<'_>, batch: RecordBatch) -> PyResult<Py<PyAny>> {
    let schema = batch.schema();
    Ok(PyTable::try_new(vec![batch], schema)?
        .into_pyarrow(py)?
        .unbind())
}

fn parse_grouping(name: &str) -> PyResult<Grouping> {
    match name {
        "auto" => Ok(Grouping::Auto),
        "always" => Ok(Grouping::Always),
        "never" => Ok(Grouping::Never),
        other => Err(pyo3::exceptions::PyValueError::new_err(format!(
            "grouping must be auto | always | never, got {other:?}"
        ))),
    }
}

/// The rules engine: registered phases judged on Arrow batches of ticks.
#[pyclass(module = "prop_stream._core")]
pub struct Evaluator {
    engine: Engine,
}

#[pymethods]
impl Evaluator {
    #[new]
    #[pyo3(signature = (*, grouping = "auto"))]
    fn new(grouping: &str) -> PyResult<Self> {
        Ok(Self {
            engine: Engine::with_grouping(parse_grouping(grouping)?),
        })
    }

    fn __len__(&self) -> usize {
        self.engine.len()
    }

    fn contains(&self, account_id: i64) -> bool {
        self.engine.contains(account_id)
    }

    #[pyo3(signature = (account_id, *, challenge_id, phase_index, started_at_us, rules))]
    fn register(
        &mut self,
        py: Python<'_>,
        account_id: i64,
        challenge_id: String,
        phase_index: i32,
        started_at_us: i64,
        rules: PyRef<'_, ChallengeRules>,
    ) -> PyResult<()> {
        let spec = PhaseSpec {
            account_id,
            challenge_id,
            phase_index,
            started_at_us,
            rules: rules.inner.clone(),
        };
        self.engine.register(spec).map_err(|e| to_py(py, e))
    }

    fn remove(&mut self, account_id: i64) -> bool {
        self.engine.remove(account_id)
    }

    /// Judge a batch of ticks (any Arrow stream with the engine's schema) and,
    /// optionally, deals placed among them by their `before_tick` column; the GIL
    /// is released while the engine works.
    #[pyo3(signature = (ticks, deals = None))]
    fn process(
        &mut self,
        py: Python<'_>,
        ticks: PyTable,
        deals: Option<PyTable>,
    ) -> PyResult<BatchResult> {
        let (batches, _schema) = ticks.into_inner();
        let deal_batches = deals.map(|d| d.into_inner().0).unwrap_or_default();
        let engine = &mut self.engine;
        let result = py.detach(|| {
            let chunks = batches
                .iter()
                .map(tick_columns)
                .collect::<Result<Vec<TickColumns<'_>>, _>>()?;
            let mut deal_inputs: Vec<DealInput<'_>> = Vec::new();
            for b in &deal_batches {
                deal_rows(b, &mut deal_inputs)?;
            }
            let out = engine.run_with_deals(&chunks, &deal_inputs)?;
            let engine = &*engine;
            Ok::<_, RuleError>((
                output::breaches_batch(engine, &out.breaches),
                output::metrics_batch(engine, &out.touched),
                output::daily_batch(engine, &out.daily),
                output::transitions_batch(engine, &out.transitions),
                output::deal_opens_batch(&out.deal_opens),
                out.counts,
                out.deal_counts,
            ))
        });
        let (breaches, metrics, daily, transitions, deal_opens, c, d) =
            result.map_err(|e| to_py(py, e))?;
        let counts = counts_dict(py, &c, &d)?;
        Ok(BatchResult {
            breaches: to_pyarrow(py, breaches)?,
            metrics: to_pyarrow(py, metrics)?,
            daily: to_pyarrow(py, daily)?,
            transitions: to_pyarrow(py, transitions)?,
            counts: counts.unbind(),
            deal_opens: to_pyarrow(py, deal_opens)?,
        })
    }

    /// Judge a table of ticks in any order as if stably sorted by (`account_id`,
    /// `ts`) first, or by (`account_id`, `ts`, `seq_column`) when given
    /// (`rules::order`), on at most `threads` threads (None: one per core).
    #[pyo3(signature = (ticks, *, seq_column = None, threads = None))]
    fn process_unordered(
        &mut self,
        py: Python<'_>,
        ticks: PyTable,
        seq_column: Option<String>,
        threads: Option<usize>,
    ) -> PyResult<BatchResult> {
        order::process_unordered(&mut self.engine, py, ticks, seq_column.as_deref(), threads)
    }

    /// The state of every registered phase, as a pyarrow table.
    fn phases(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        to_pyarrow(py, output::phases_batch(&self.engine))
    }

    /// The whole engine state as bytes.
    fn snapshot<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        let bytes = py.detach(|| self.engine.snapshot());
        PyBytes::new(py, &bytes)
    }

    /// Rebuild an evaluator from `snapshot()` bytes.
    #[staticmethod]
    #[pyo3(signature = (data, *, grouping = "auto"))]
    fn restore(py: Python<'_>, data: &[u8], grouping: &str) -> PyResult<Self> {
        let grouping = parse_grouping(grouping)?;
        let engine = Engine::restore(data, grouping).map_err(|e| to_py(py, e))?;
        Ok(Self { engine })
    }
}

/// Add the module's classes, functions and exceptions.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("PropStreamError", py.get_type::<PropStreamError>())?;
    m.add("RuleConfigError", py.get_type::<RuleConfigError>())?;
    m.add("TickBatchError", py.get_type::<TickBatchError>())?;
    m.add("SnapshotError", py.get_type::<SnapshotError>())?;
    m.add_class::<ChallengeRules>()?;
    m.add_class::<Evaluator>()?;
    m.add_class::<BatchResult>()?;
    m.add_function(wrap_pyfunction!(rule_defaults, m)?)?;
    m.add_function(wrap_pyfunction!(order::_dense_baseline, m)?)?;
    m.add_class::<kafka::RecordScan>()?;
    m.add_function(wrap_pyfunction!(kafka::scan_record_batches, m)?)?;
    Ok(())
}

//! prop-stream's rules engine: challenge rules judged on batches of equity ticks.
//!
//! The engine (`rules`) is plain Rust; the Python module `prop_stream._core` is
//! built from `python` when the `python` feature is on.

pub mod error;
pub mod kafka;
pub mod rules;

#[cfg(feature = "python")]
mod python;

#[cfg(feature = "python")]
use pyo3::prelude::*;

/// The `prop_stream._core` module: exports only, the bindings live in `python`.
#[cfg(feature = "python")]
#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    python::register(m)
}

#[cfg(feature = "python")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

//! Python bindings of `crate::kafka`: a fetch buffer's records as columns.

use pyo3::exceptions::{PyIndexError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};

use crate::kafka::{self, Scan, Stop};

/// The records of one scan of a fetch buffer (`scan_record_batches`).
///
/// Holds the buffer; keys, values and headers are read from it on demand, so
/// a poll makes Python objects only for the records it needs one by one.
#[pyclass(module = "prop_stream._core", frozen)]
pub struct RecordScan {
    buffer: Py<PyBytes>,
    scan: Scan,
    json_only: bool,
}

impl RecordScan {
    fn index(&self, i: usize) -> PyResult<usize> {
        if i < self.scan.records.len() {
            Ok(i)
        } else {
            Err(PyIndexError::new_err("record index out of range"))
        }
    }
}

#[pymethods]
impl RecordScan {
    fn __len__(&self) -> usize {
        self.scan.records.len()
    }

    /// Where to scan next in the buffer.
    #[getter]
    fn end(&self) -> usize {
        self.scan.end
    }

    /// The offset to fetch or scan from next.
    #[getter]
    fn next_offset(&self) -> i64 {
        self.scan.next_offset
    }

    /// Why the scan ended: `"end"`, `"limit"` or `"unsupported"`.
    #[getter]
    fn stop(&self) -> &'static str {
        match self.scan.stop {
            Stop::End => "end",
            Stop::Limit => "limit",
            Stop::Unsupported => "unsupported",
        }
    }

    /// The leader epoch of the last batch read (-1 if none).
    #[getter]
    fn leader_epoch(&self) -> i32 {
        self.scan.leader_epoch
    }

    /// Bytes of the batches finished.
    #[getter]
    fn bytes_read(&self) -> usize {
        self.scan.bytes_read
    }

    /// Whether no record names an encoding other than `json`.
    #[getter]
    fn json_only(&self) -> bool {
        self.json_only
    }

    /// The offset of the last record (-1 if none).
    #[getter]
    fn last_offset(&self) -> i64 {
        self.scan.records.offsets.last().copied().unwrap_or(-1)
    }

    fn offset(&self, i: usize) -> PyResult<i64> {
        Ok(self.scan.records.offsets[self.index(i)?])
    }

    fn timestamp(&self, i: usize) -> PyResult<i64> {
        Ok(self.scan.records.timestamps[self.index(i)?])
    }

    fn timestamp_type(&self, i: usize) -> PyResult<u8> {
        Ok(self.scan.records.timestamp_types[self.index(i)?])
    }

    fn key<'py>(&self, py: Python<'py>, i: usize) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let span = self.scan.records.keys[self.index(i)?];
        let buf = self.buffer.bind(py).as_bytes();
        Ok(span.get(buf).map(|b| PyBytes::new(py, b)))
    }

    fn value<'py>(&self, py: Python<'py>, i: usize) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let span = self.scan.records.values[self.index(i)?];
        let buf = self.buffer.bind(py).as_bytes();
        Ok(span.get(buf).map(|b| PyBytes::new(py, b)))
    }

    /// The value of the record's first `encoding` header (None when absent or empty).
    fn encoding<'py>(&self, py: Python<'py>, i: usize) -> PyResult<Option<Bound<'py, PyString>>> {
        let code = self.scan.records.encodings[self.index(i)?];
        Ok(match code {
            0 => None,
            c => {
                let name = &self.scan.records.encoding_names[usize::from(c) - 1];
                Some(PyString::new(py, &String::from_utf8_lossy(name)))
            }
        })
    }

    /// The record's headers as `(key, value)` pairs.
    fn headers<'py>(&self, py: Python<'py>, i: usize) -> PyResult<Bound<'py, PyList>> {
        let (at, count) = self.scan.records.headers[self.index(i)?];
        let buf = self.buffer.bind(py).as_bytes();
        let pairs = kafka::headers(buf, at, count)
            .ok_or_else(|| PyValueError::new_err("malformed record headers"))?;
        let list = PyList::empty(py);
        for (k, v) in pairs {
            let key = PyString::new(py, &String::from_utf8_lossy(k));
            let value = v.map(|v| PyBytes::new(py, v));
            list.append(PyTuple::new(
                py,
                [key.into_any(), value.into_pyobject(py)?.into_any()],
            )?)?;
        }
        Ok(list)
    }

    /// Values `lo..hi` joined by newlines (NDJSON), or None if one is null.
    fn ndjson<'py>(
        &self,
        py: Python<'py>,
        lo: usize,
        hi: usize,
    ) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let values = &self.scan.records.values;
        if lo > hi || hi > values.len() {
            return Err(PyIndexError::new_err("record range out of range"));
        }
        let spans = &values[lo..hi];
        if spans.iter().any(|s| s.len < 0) {
            return Ok(None);
        }
        let size =
            spans.iter().map(|s| s.len as usize).sum::<usize>() + spans.len().saturating_sub(1);
        let buf = self.buffer.bind(py).as_bytes();
        let out = PyBytes::new_with(py, size, |out| {
            let mut at = 0;
            for (i, s) in spans.iter().enumerate() {
                if i > 0 {
                    out[at] = b'\n';
                    at += 1;
                }
                let n = s.len as usize;
                out[at..at + n].copy_from_slice(&buf[s.start..s.start + n]);
                at += n;
            }
            Ok(())
        })?;
        Ok(Some(out))
    }
}

/// Read the record batches of a fetch buffer from byte `start` (`crate::kafka::scan`).
///
/// Raises `ValueError` for a corrupt batch or a failed CRC check.
#[pyfunction]
#[pyo3(signature = (buffer, start, fetch_offset, max_records, *, check_crc = true))]
pub fn scan_record_batches(
    py: Python<'_>,
    buffer: Bound<'_, PyBytes>,
    start: usize,
    fetch_offset: i64,
    max_records: usize,
    check_crc: bool,
) -> PyResult<RecordScan> {
    let bytes = buffer.as_bytes();
    let scan = py
        .detach(|| kafka::scan(bytes, start, fetch_offset, max_records, check_crc))
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    let json_only = scan
        .records
        .encoding_names
        .iter()
        .all(|name| name.as_slice() == b"json");
    Ok(RecordScan {
        buffer: buffer.unbind(),
        scan,
        json_only,
    })
}

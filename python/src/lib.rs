//! `tensafe._tensafe_rust`: the compiled half of the Python package.
//!
//! It exposes open files ([`file`]), memory shared through the buffer
//! protocol ([`buffers`]), Python indices for slicing ([`indexing`]), the
//! writers ([`serialize`]), staged loads to a device ([`staging`]) and pickle
//! conversion and scanning ([`pickle`]); this module holds the error
//! conversions they share and the module's table of contents. Framework-specific work (building
//! torch/numpy/… tensors from buffers) lives in the Python modules, which keeps
//! this layer free of any framework import.
//!
//! All file I/O runs with the GIL released.

mod buffers;
mod file;
mod indexing;
mod pickle;
mod progress;
mod serialize;
mod staging;

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyFileNotFoundError, PyValueError};
use pyo3::prelude::*;
use tensafe::{Dtype, Error};

create_exception!(
    tensafe._tensafe_rust,
    SafetensorError,
    PyException,
    "Raised for invalid files, invalid arguments and failed reads or writes."
);

/// The text of `path` when it is a URL tensafe reads (s3://, gs://, az://,
/// http(s)://, … in any case): one rule for opens, saves and checkpoint
/// detection. A name that is not UTF-8 is never a URL, but a local path.
fn remote_url(path: &std::path::Path) -> Option<&str> {
    path.to_str().filter(|text| tensafe_remote::RemoteUrl::is_remote(text))
}

/// Python-visible text of a core error: the reference's message prefix, then ours.
fn error(prefix: &str, e: &Error) -> PyErr {
    if let Error::Io { source, .. } = e.without_file()
        && source.kind() == std::io::ErrorKind::NotFound
    {
        return PyFileNotFoundError::new_err(format!("{prefix}{}", e.without_file()));
    }
    SafetensorError::new_err(format!("{prefix}{}", e.without_file()))
}

/// A remote failure: FileNotFoundError for 404s (like a missing local file),
/// SafetensorError otherwise, with the store's explanation.
fn remote_error(e: tensafe_remote::RemoteError) -> PyErr {
    if e.is_not_found() { PyFileNotFoundError::new_err(e.to_string()) } else { SafetensorError::new_err(e.to_string()) }
}

/// A header that does not parse, in the reference's words.
fn header_error(e: Error) -> PyErr {
    error("Error while deserializing header: ", &e)
}

/// A failed write, in the reference's words.
fn serialize_error(e: Error) -> PyErr {
    // Always SafetensorError here, as in the reference (no FileNotFoundError).
    SafetensorError::new_err(format!("Error while serializing: {}", e.without_file()))
}

/// This rank's share of tensors: rules `[(glob pattern, dim or None), …]`,
/// first match wins, unmatched tensors replicated.
#[pyclass(module = "tensafe._tensafe_rust", frozen, name = "TensorParallelPlan")]
struct PyTensorParallelPlan {
    plan: tensafe::TensorParallelPlan,
}

#[pymethods]
impl PyTensorParallelPlan {
    #[new]
    fn new(rank: usize, world_size: usize, rules: Vec<(String, Option<usize>)>) -> PyResult<Self> {
        let rules: Vec<(String, tensafe::Split)> =
            rules.into_iter().map(|(p, dim)| (p, dim.map_or(tensafe::Split::Replicate, tensafe::Split::Dim))).collect();
        tensafe::TensorParallelPlan::new(rank, world_size, &rules)
            .map(|plan| PyTensorParallelPlan { plan })
            .map_err(|e| PyValueError::new_err(e.to_string()))
    }

    /// `None` for a replicated tensor, else `(dim, start, stop)` of this rank.
    fn split(&self, name: &str, shape: Vec<usize>) -> PyResult<Option<(usize, usize, usize)>> {
        match self.plan.split_for(name) {
            tensafe::Split::Replicate => Ok(None),
            tensafe::Split::Dim(dim) if dim >= shape.len() => Err(PyValueError::new_err(format!(
                "tensor `{}` of shape {shape:?} has no dimension {dim} to split",
                tensafe::Printable(name)
            ))),
            tensafe::Split::Dim(dim) => {
                let (start, stop) = self.plan.bounds(shape[dim]);
                Ok(Some((dim, start, stop)))
            }
        }
    }
}

/// `len` bytes at file offset `offset` cut into reads of at most `chunk`
/// bytes, as `(offset, length)` pairs: with `aligned`, at page-rounded
/// multiples of `chunk` in the file, as direct reads need
/// (`tensafe_io::cut`, the rule the engine applies to its page-rounded chunk size).
#[pyfunction]
fn cut_reads(offset: u64, len: usize, chunk: usize, aligned: bool) -> Vec<(u64, usize)> {
    tensafe_io::cut(offset, len, chunk, aligned)
}

/// `text` (a name from a file) with its control and bidirectional
/// characters escaped, as every message shows names (`tensafe::Printable`).
#[pyfunction]
fn printable(text: &str) -> String {
    tensafe::Printable(text).to_string()
}

/// Parses a shard size such as `"5GB"`, `"500MiB"` or `"1000"`.
#[pyfunction]
fn parse_size(text: &str) -> PyResult<u64> {
    tensafe::parse_size(text).map_err(|e| PyValueError::new_err(e.to_string()))
}

#[pymodule]
fn _tensafe_rust(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("SafetensorError", py.get_type::<SafetensorError>())?;
    m.add("NativeStagingUnavailable", py.get_type::<staging::NativeStagingUnavailable>())?;
    m.add_class::<file::File>()?;
    m.add_class::<buffers::TensorBuffer>()?;
    m.add_class::<buffers::HostBuffer>()?;
    m.add("DIRECT_ALIGN", tensafe_io::DIRECT_ALIGN)?;
    m.add("PROGRESS_STEP", progress::PROGRESS_STEP)?;
    m.add_class::<serialize::TensorSpec>()?;
    m.add_class::<PyTensorParallelPlan>()?;
    m.add_function(wrap_pyfunction!(serialize::serialize, m)?)?;
    m.add_function(wrap_pyfunction!(serialize::serialize_file, m)?)?;
    m.add_function(wrap_pyfunction!(serialize::serialize_buffers, m)?)?;
    m.add_function(wrap_pyfunction!(serialize::deserialize, m)?)?;
    m.add_function(wrap_pyfunction!(parse_size, m)?)?;
    m.add_function(wrap_pyfunction!(printable, m)?)?;
    m.add_function(wrap_pyfunction!(cut_reads, m)?)?;
    m.add_function(wrap_pyfunction!(staging::stage_data, m)?)?;
    m.add_function(wrap_pyfunction!(serialize::save_sharded_buffers, m)?)?;
    m.add_function(wrap_pyfunction!(pickle::convert_pickle, m)?)?;
    m.add_function(wrap_pyfunction!(pickle::scan_pickle, m)?)?;
    // The dtype table, from its single source in the core crate:
    // (code, bits, framework name or None), in the reference's order.
    let dtypes: Vec<(&str, usize, Option<&str>)> = Dtype::ALL.iter().map(|d| (d.code(), d.bits(), d.framework_name())).collect();
    m.add("DTYPES", dtypes)?;
    m.add("SUPPORTED_DTYPE_NAMES", serialize::supported_dtype_names())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}

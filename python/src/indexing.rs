//! Python indices (int, slice, `...`, `None`, tuples of them) turned into
//! the core slicer's items, and slicing errors worded and typed as the
//! reference's.

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyEllipsis, PyList, PySlice, PyTuple};
use tensafe::{Error, SliceIndex};

use crate::SafetensorError;

/// A slicing error of class `tensafe._errors.{class}`: a `SafetensorError`
/// that is also the builtin error torch and numpy raise for the same index
/// (plain `SafetensorError` should that module be missing).
pub(crate) fn typed_slice_error(py: Python<'_>, class: &str, message: String) -> PyErr {
    let typed = py.import("tensafe._errors").and_then(|m| m.getattr(class)).and_then(|c| Ok(c.cast_into::<pyo3::types::PyType>()?));
    match typed {
        Ok(class) => PyErr::from_type(class, message),
        Err(_) => SafetensorError::new_err(message),
    }
}

/// The reference's wording of slicing errors: `Error during slicing {index}
/// with shape {shape}: {reason}`, and its own text for negative indices
/// still out of range; typed as IndexError or ValueError too.
pub(crate) fn slice_error(py: Python<'_>, shape: &[usize], indices: &[SliceIndex], e: &Error) -> PyErr {
    match e {
        Error::SliceOutOfBounds { asked, dim, size } if *asked < 0 => {
            typed_slice_error(py, "SliceIndexError", format!("Invalid index {asked} for dimension {dim} of size {size}"))
        }
        // The reference's texts; numpy raises IndexError for several
        // ellipses, ValueError for a bad step.
        Error::SeveralEllipses => typed_slice_error(py, "SliceIndexError", e.reference_text()),
        Error::InvalidSlice { reason } => typed_slice_error(py, "SliceValueError", reason.clone()),
        _ => {
            let message = format!("Error during slicing {} with shape {shape:?}: {}", display_index(shape, indices), e.reference_text());
            match e {
                Error::SliceOutOfBounds { .. } | Error::TooManyIndices { .. } => typed_slice_error(py, "SliceIndexError", message),
                _ => SafetensorError::new_err(message),
            }
        }
    }
}

/// Shows an index the way the reference does: ints resolved against their
/// dimension, `start:stop[:step]`, `...` expanded to `:` per dimension it covers.
fn display_index(shape: &[usize], indices: &[SliceIndex]) -> String {
    let consuming = indices.iter().filter(|i| matches!(i, SliceIndex::Index(_) | SliceIndex::Range { .. })).count();
    let mut parts = Vec::new();
    let mut dim = 0usize;
    for index in indices {
        match *index {
            SliceIndex::Index(i) => {
                let size = shape.get(dim).copied().unwrap_or(0) as i64;
                parts.push(if i < 0 { (i + size).to_string() } else { i.to_string() });
                dim += 1;
            }
            SliceIndex::Range { start, stop, step } => {
                let bound = |b: Option<i64>| b.map(|b| b.to_string()).unwrap_or_default();
                let step = step.filter(|s| *s != 1).map(|s| format!(":{s}")).unwrap_or_default();
                parts.push(format!("{}:{}{step}", bound(start), bound(stop)));
                dim += 1;
            }
            SliceIndex::Ellipsis => {
                let covered = shape.len().saturating_sub(consuming);
                parts.extend(std::iter::repeat_n(":".to_string(), covered));
                dim += covered;
            }
            SliceIndex::NewAxis => parts.push("None".into()),
        }
    }
    format!("[{}]", parts.join(", "))
}

/// An integer index (a Python or numpy int: anything with `__index__`) as
/// an `i64`, saturated: past ±2^63 every bound clamps and every index is
/// out of range alike, so the slicer's own rules give numpy's answer.
/// `None` for what is not an integer (a float tensor has `__index__` too,
/// which refuses).
fn saturating_int(value: &Bound<'_, PyAny>) -> PyResult<Option<i64>> {
    if let Ok(i) = value.extract::<i64>() {
        return Ok(Some(i));
    }
    match value.call_method0("__index__") {
        Ok(exact) if exact.is_instance_of::<pyo3::types::PyInt>() => Ok(Some(if exact.gt(0)? { i64::MAX } else { i64::MIN })),
        _ => Ok(None),
    }
}

/// Python's own error for a slice bound that is not an integer.
fn not_an_int(value: &Bound<'_, PyAny>) -> PyErr {
    PyTypeError::new_err(format!(
        "slice indices must be integers or None or have an __index__ method, got {}",
        value.get_type().name().map(|n| n.to_string()).unwrap_or_default()
    ))
}

/// Which of several wrong indices an error reports.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorOrder {
    /// The reference's for numpy and the other frameworks: several ellipses,
    /// then each item in turn (its type, a slice's step), then the shape.
    Reference,
    /// torch's (the reference's torch path is torch's indexing): the shape
    /// (too many indices, out of bounds) before a slice's step.
    Torch,
}

/// Turns a Python index (int, slice, Ellipsis, None or a tuple/list of them) into slice items.
pub(crate) fn parse_index(index: &Bound<'_, PyAny>, order: ErrorOrder) -> PyResult<Vec<SliceIndex>> {
    let items: Vec<Bound<'_, PyAny>> = if let Ok(tuple) = index.cast::<PyTuple>() {
        tuple.iter().collect()
    } else if let Ok(list) = index.cast::<PyList>() {
        // As in the reference: `x[[]]` selects nothing of dim 0; index lists
        // (advanced indexing) are not supported.
        if !list.is_empty() {
            return Err(typed_slice_error(index.py(), "SliceIndexError", "Non empty lists are not implemented".into()));
        }
        return Ok(vec![SliceIndex::range(0, 0)]);
    } else {
        vec![index.clone()]
    };
    if items.iter().filter(|item| item.is_instance_of::<PyEllipsis>()).count() > 1 {
        return Err(typed_slice_error(index.py(), "SliceIndexError", Error::SeveralEllipses.reference_text()));
    }
    items
        .iter()
        .enumerate()
        .map(|(position, item)| {
            if item.is_none() {
                Ok(SliceIndex::NewAxis)
            } else if item.is_instance_of::<PyEllipsis>() {
                Ok(SliceIndex::Ellipsis)
            } else if let Ok(slice) = item.cast::<PySlice>() {
                let bound = |attr: &str| -> PyResult<Option<i64>> {
                    let value = slice.getattr(attr)?;
                    if value.is_none() { Ok(None) } else { saturating_int(&value)?.map(Some).ok_or_else(|| not_an_int(&value)) }
                };
                let step = bound("step")?;
                if let Some(step) = step.filter(|&step| step <= 0 && order == ErrorOrder::Reference) {
                    let message = format!("Slice step must be a positive integer, got {step} (position {position})");
                    return Err(typed_slice_error(index.py(), "SliceValueError", message));
                }
                Ok(SliceIndex::Range { start: bound("start")?, stop: bound("stop")?, step })
            } else if let Some(i) = saturating_int(item)? {
                if item.extract::<i64>().is_err() {
                    // Out of bounds for any dimension; said with the value
                    // given, not the clamped one.
                    let message = format!("Error during slicing: index {} at position {position} is out of bounds for every tensor dimension", item.str()?);
                    return Err(typed_slice_error(index.py(), "SliceIndexError", message));
                }
                Ok(SliceIndex::Index(i))
            } else {
                Err(typed_slice_error(
                    index.py(),
                    "SliceIndexError",
                    format!("Unsupported slice index at position {position}: expected slice, int, None or ellipsis, got {}", item.get_type().name()?),
                ))
            }
        })
        .collect()
}

//! Writing safetensors from Python: the reference's `serialize`,
//! `serialize_file` and `TensorSpec`, the framework modules' zero-copy
//! `serialize_buffers` and `save_sharded_buffers`, and `deserialize`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyList};
use tensafe::{Dtype, Error, RawTensor};

use crate::file::NOT_CONTIGUOUS;
use crate::{SafetensorError, error, remote_error, serialize_error};

/// A tensor described by a raw address, for compatibility with the reference's
/// `TensorSpec`. The caller keeps the memory alive and unchanged until the
/// serializer returns.
#[pyclass(module = "tensafe._tensafe_rust", frozen)]
pub(crate) struct TensorSpec {
    dtype: Dtype,
    shape: Vec<usize>,
    data_ptr: usize,
    data_len: usize,
}

#[pymethods]
impl TensorSpec {
    #[new]
    #[pyo3(signature = (*, dtype, shape, data_ptr, data_len))]
    fn new(dtype: &str, shape: Vec<usize>, data_ptr: usize, data_len: usize) -> PyResult<Self> {
        let parsed = Dtype::from_framework_name(dtype).ok_or_else(|| {
            SafetensorError::new_err(format!("Unknown dtype \"{dtype}\". Supported dtypes: {}", supported_dtype_names().join(", ")))
        })?;
        let mut shape = shape;
        if parsed == Dtype::F4 {
            // torch packs two F4 values per element: the header counts values.
            if let Some(last) = shape.last_mut() {
                *last = last.checked_mul(2).ok_or_else(|| SafetensorError::new_err("shape overflows"))?;
            }
        }
        Ok(TensorSpec { dtype: parsed, shape, data_ptr, data_len })
    }

    #[getter]
    fn dtype(&self) -> &'static str {
        self.dtype.code()
    }
    #[getter]
    fn shape(&self) -> Vec<usize> {
        self.shape.clone()
    }
    #[getter]
    fn data_ptr(&self) -> usize {
        self.data_ptr
    }
    #[getter]
    fn data_len(&self) -> usize {
        self.data_len
    }
    fn __repr__(&self) -> String {
        format!(
            "TensorSpec(dtype='{}', shape={:?}, data_ptr={}, data_len={})",
            self.dtype.code(),
            self.shape,
            self.data_ptr,
            self.data_len
        )
    }
}

/// The framework names of the dtypes a save takes, in the order the
/// reference lists them when it refuses one (`SUPPORTED_DTYPE_NAMES` in
/// Python, for the framework modules' message).
pub(crate) fn supported_dtype_names() -> Vec<&'static str> {
    SPEC_DTYPE_ORDER.iter().filter_map(|d| d.framework_name()).collect()
}

/// The order in which the reference lists the dtypes it saves in its error message.
const SPEC_DTYPE_ORDER: [Dtype; 20] = [
    Dtype::Bool,
    Dtype::I8,
    Dtype::U8,
    Dtype::I16,
    Dtype::U16,
    Dtype::I32,
    Dtype::U32,
    Dtype::I64,
    Dtype::U64,
    Dtype::F16,
    Dtype::F32,
    Dtype::F64,
    Dtype::BF16,
    Dtype::F8E4M3,
    Dtype::F8E4M3Fnuz,
    Dtype::F8E5M2,
    Dtype::F8E5M2Fnuz,
    Dtype::F8E8M0,
    Dtype::F4,
    Dtype::C64,
];

/// Where a tensor's bytes come from while serializing.
enum Bytes {
    /// A raw address from a `TensorSpec`.
    Raw { ptr: usize, len: usize },
    /// A buffer export, held until the write ends.
    Buffer(PyUntypedBuffer),
}

struct Owned {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Bytes,
}

impl Owned {
    fn raw(&self) -> RawTensor<'_> {
        let (ptr, len) = match &self.bytes {
            Bytes::Raw { ptr, len } => (*ptr, *len),
            Bytes::Buffer(b) => (b.buf_ptr() as usize, b.len_bytes()),
        };
        // SAFETY: a TensorSpec's caller guarantees the address range (as with the
        // reference); a buffer export stays valid until it is released.
        let data: &[u8] = if len == 0 { &[] } else { unsafe { std::slice::from_raw_parts(ptr as *const u8, len) } };
        RawTensor { dtype: self.dtype, shape: &self.shape, data }
    }
}

fn specs_from_dict(tensor_dict: &Bound<'_, PyDict>) -> PyResult<Vec<Owned>> {
    let mut out = Vec::with_capacity(tensor_dict.len());
    for (name, spec) in tensor_dict.iter() {
        let name = text("tensor_dict", &name)?;
        let spec = spec.cast::<TensorSpec>().map_err(|_| {
            not_an_instance("tensor_dict", &spec, "TensorSpec")
        })?;
        let spec = spec.get();
        out.push(Owned {
            name,
            dtype: spec.dtype,
            shape: spec.shape.clone(),
            bytes: Bytes::Raw { ptr: spec.data_ptr, len: spec.data_len },
        });
    }
    Ok(out)
}

/// pyo3's words for an argument of the wrong type, which the reference
/// raises (None is named as itself).
fn not_an_instance(argument: &str, obj: &Bound<'_, PyAny>, expected: &str) -> PyErr {
    let what = if obj.is_none() { "'None'".to_owned() } else { format!("'{}' object", type_name(obj)) };
    PyTypeError::new_err(format!("argument '{argument}': {what} is not an instance of '{expected}'"))
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into())
}

/// A tensor name or a metadata key or value given as `argument`: a
/// TypeError for what is not a `str`, and the string's own error
/// (UnicodeEncodeError for a lone surrogate) for a `str` that is not UTF-8,
/// as the reference raises them.
fn text(argument: &str, obj: &Bound<'_, PyAny>) -> PyResult<String> {
    match obj.cast::<pyo3::types::PyString>() {
        Ok(text) => text.to_str().map(str::to_owned),
        Err(_) => Err(not_an_instance(argument, obj, "str")),
    }
}

fn metadata_arg(metadata: Option<&Bound<'_, PyDict>>) -> PyResult<Option<BTreeMap<String, String>>> {
    metadata
        .map(|dict| {
            dict.iter()
                .map(|(k, v)| Ok((text("metadata", &k)?, text("metadata", &v)?)))
                .collect()
        })
        .transpose()
}


/// Bytes a save writes between two runs of Python's signal handlers.
const SIGNAL_CHECK_BYTES: usize = 64 << 20;

/// A writer that runs Python's signal handlers (taking the GIL for it)
/// every [`SIGNAL_CHECK_BYTES`] written, so that Ctrl-C stops a long save:
/// the handler's exception fails the write, the temporary file is removed
/// and the file saved to stays as it was. (The reference, and this before,
/// raised it only once the new file was in place.)
struct Interruptible<'w> {
    out: &'w mut dyn Write,
    unchecked: usize,
}

impl<'w> Interruptible<'w> {
    fn new(out: &'w mut dyn Write) -> Self {
        Interruptible { out, unchecked: 0 }
    }
}

impl Write for Interruptible<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.unchecked >= SIGNAL_CHECK_BYTES {
            Python::attach(|py| py.check_signals()).map_err(std::io::Error::other)?;
            self.unchecked = 0;
        }
        let written = self.out.write(&buf[..buf.len().min(SIGNAL_CHECK_BYTES)])?;
        self.unchecked += written;
        Ok(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// The exception a signal handler raised during a save, or the save's error.
fn raised_or_serialize_error(e: Error) -> PyErr {
    if let Error::Io { source, .. } = e.without_file()
        && let Some(raised) = source.get_ref().and_then(|inner| inner.downcast_ref::<PyErr>())
    {
        return Python::attach(|py| raised.clone_ref(py));
    }
    serialize_error(e)
}

/// Writes to `filename` (atomically; a URL is uploaded) or into new
/// `bytes`, without the GIL.
fn write<'py>(py: Python<'py>, tensors: Vec<Owned>, metadata: Option<BTreeMap<String, String>>, filename: Option<PathBuf>) -> PyResult<Option<Bound<'py, PyBytes>>> {
    let items = || tensors.iter().map(|t| (t.name.as_str(), t.raw()));
    match filename.as_deref().map(|path| (path, crate::remote_url(path))) {
        Some((_, Some(url))) => {
            py.detach(|| tensafe_remote::serialize_to_url(items(), metadata.as_ref(), url, &Default::default()).map_err(remote_error))?;
            Ok(None)
        }
        Some((path, None)) => {
            py.detach(|| {
                let prepared = tensafe::prepare(items(), metadata.as_ref(), &Default::default()).map_err(|e| e.in_file(path))?;
                tensafe::write_atomically(path, |out| prepared.write_to(&mut Interruptible::new(out))).map_err(|e| e.in_file(path))
            })
            .map_err(raised_or_serialize_error)?;
            Ok(None)
        }
        None => {
            let prepared = py.detach(|| tensafe::prepare(items(), metadata.as_ref(), &Default::default())).map_err(serialize_error)?;
            let bytes = PyBytes::new_with(py, prepared.file_len() as usize, |mut dst| {
                py.detach(|| prepared.write_to(&mut dst)).map_err(|e| SafetensorError::new_err(e.to_string()))
            })?;
            Ok(Some(bytes))
        }
    }
}

/// `serialize(tensor_dict, metadata=None) -> bytes`, as in the reference.
#[pyfunction]
#[pyo3(signature = (tensor_dict, metadata = None))]
pub(crate) fn serialize<'py>(py: Python<'py>, tensor_dict: &Bound<'py, PyDict>, metadata: Option<&Bound<'py, PyDict>>) -> PyResult<Bound<'py, PyBytes>> {
    let specs = specs_from_dict(tensor_dict)?;
    Ok(write(py, specs, metadata_arg(metadata)?, None)?.expect("bytes requested"))
}

/// `serialize_file(tensor_dict, filename, metadata=None)`, as in the reference.
#[pyfunction]
#[pyo3(signature = (tensor_dict, filename, metadata = None))]
pub(crate) fn serialize_file(py: Python<'_>, tensor_dict: &Bound<'_, PyDict>, filename: PathBuf, metadata: Option<&Bound<'_, PyDict>>) -> PyResult<()> {
    let specs = specs_from_dict(tensor_dict)?;
    write(py, specs, metadata_arg(metadata)?, Some(filename)).map(|_| ())
}

/// Serializes `[(name, dtype_code, shape, buffer), …]` where each buffer is any
/// C-contiguous object with the buffer protocol (numpy arrays, memoryviews):
/// zero-copy and safe, the path the framework modules use. Writes to
/// `filename` when given, else returns bytes.
#[pyfunction]
#[pyo3(signature = (tensors, metadata = None, filename = None))]
pub(crate) fn serialize_buffers<'py>(
    py: Python<'py>,
    tensors: &Bound<'py, PyList>,
    metadata: Option<&Bound<'py, PyDict>>,
    filename: Option<PathBuf>,
) -> PyResult<Option<Bound<'py, PyBytes>>> {
    write(py, buffers_from_list(tensors)?, metadata_arg(metadata)?, filename)
}

/// Takes buffer exports of `[(name, dtype_code, shape, buffer), …]`.
fn buffers_from_list(tensors: &Bound<'_, PyList>) -> PyResult<Vec<Owned>> {
    let mut owned = Vec::with_capacity(tensors.len());
    for item in tensors.iter() {
        let (name, code, shape, obj): (Bound<'_, PyAny>, String, Vec<usize>, Bound<'_, PyAny>) = item.extract()?;
        let name = text("tensor_dict", &name)?;
        let dtype = Dtype::from_code(&code).ok_or_else(|| SafetensorError::new_err(format!("unknown dtype code {code}")))?;
        let buffer = PyUntypedBuffer::get(&obj)?;
        if !buffer.is_c_contiguous() {
            return Err(PyValueError::new_err(format!("tensor `{}`: buffer is not contiguous", tensafe::Printable(&name))));
        }
        owned.push(Owned { name, dtype, shape, bytes: Bytes::Buffer(buffer) });
    }
    Ok(owned)
}

/// `deserialize(bytes) -> [(name, {"shape", "dtype", "data"})]` in file order.
#[pyfunction]
pub(crate) fn deserialize<'py>(py: Python<'py>, bytes: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyList>> {
    // Any bytes-like object is taken (the reference takes `bytes` only).
    let buffer = PyUntypedBuffer::get(bytes)
        .map_err(|_| not_an_instance("bytes", bytes, "bytes"))?;
    if !buffer.is_c_contiguous() {
        return Err(PyValueError::new_err(NOT_CONTIGUOUS));
    }
    // SAFETY: the export is held for this call; the bytes are only read.
    let data = unsafe { std::slice::from_raw_parts(buffer.buf_ptr() as *const u8, buffer.len_bytes()) };
    let file = py
        .detach(|| tensafe::SafeTensors::deserialize(data))
        .map_err(|e| error("Error while deserializing: ", &e))?;
    let out = PyList::empty(py);
    for (name, view) in file.tensors() {
        let entry = PyDict::new(py);
        entry.set_item("shape", view.shape().to_vec())?;
        entry.set_item("dtype", view.dtype().code())?;
        entry.set_item("data", PyByteArray::new(py, view.data()))?;
        out.append((name, entry))?;
    }
    Ok(out)
}



/// Saves `[(name, dtype_code, shape, buffer), …]` (as for `serialize_buffers`)
/// as shards of at most `max_shard_bytes` plus an index in `directory` (or
/// under a URL prefix: s3://, gs://, az://).
/// Returns the index as a dict, or `None` when everything fit in one file.
#[pyfunction]
#[pyo3(signature = (tensors, directory, max_shard_bytes, metadata = None))]
pub(crate) fn save_sharded_buffers<'py>(
    py: Python<'py>,
    tensors: &Bound<'py, PyList>,
    directory: PathBuf,
    max_shard_bytes: u64,
    metadata: Option<&Bound<'py, PyDict>>,
) -> PyResult<Option<Bound<'py, PyAny>>> {
    let owned = buffers_from_list(tensors)?;
    let metadata = metadata_arg(metadata)?;
    let items = || owned.iter().map(|t| (t.name.as_str(), t.raw()));
    let index = match crate::remote_url(&directory) {
        Some(url) => py
            .detach(|| tensafe_remote::save_sharded_to_url(items(), url, max_shard_bytes, metadata.as_ref(), &Default::default()).map_err(remote_error))?,
        None => py
            .detach(|| {
                std::fs::create_dir_all(&directory).map_err(|source| Error::Io { context: "creating the directory".into(), source })?;
                tensafe::save_sharded(items(), &directory, max_shard_bytes, metadata.as_ref())
            })
            .map_err(serialize_error)?,
    };
    index
        .map(|index| py.import("json")?.call_method1("loads", (index.to_json(),)))
        .transpose()
}

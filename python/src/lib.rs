//! `tensafe._tensafe_rust`: the compiled half of the Python package.
//!
//! It exposes files ([`File`]), zero-copy buffers into mapped files
//! ([`TensorBuffer`]), and the serializers. Framework-specific work (building
//! torch/numpy/… tensors from buffers) lives in the Python modules, which keeps
//! this layer free of any framework import.
//!
//! All file I/O runs with the GIL released.

mod staging;

use std::collections::BTreeMap;
use std::ffi::c_int;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use pyo3::buffer::PyUntypedBuffer;
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyFileNotFoundError, PyOSError, PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyEllipsis, PyList, PySlice, PyTuple};
use tensafe::{Dtype, Error, Header, MmapFile, PreadFile, RawTensor, SliceIndex, SlicePlan, TensorInfo};
use tensafe_io::prefetch::Prefetch;

create_exception!(
    tensafe._tensafe_rust,
    SafetensorError,
    PyException,
    "Raised for invalid files, invalid arguments and failed reads or writes."
);

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

/// How far a load gets between two calls of its `progress(done, total)`
/// (and one call at the end): a callback per 4 MiB chunk would cost a GIL
/// acquisition each, 25,000 for 100 GB.
const PROGRESS_STEP: usize = 64 << 20;

/// When a load calls its `progress(done, total)`: at `first` bytes done, then
/// every [`PROGRESS_STEP`] (the end is the caller's to report).
struct ProgressSteps {
    next: usize,
}

impl ProgressSteps {
    fn new(first: usize) -> ProgressSteps {
        ProgressSteps { next: first }
    }

    /// Whether `done` bytes call for a report (counted as made if so).
    fn due(&mut self, done: usize) -> bool {
        let due = done >= self.next;
        if due {
            self.next = done + PROGRESS_STEP;
        }
        due
    }
}

/// `progress(done, total)` at the first report, then every [`PROGRESS_STEP`]
/// bytes, and at the end; with the GIL taken for each call.
fn progress_reporter(progress: Option<&Py<PyAny>>, total: usize) -> impl FnMut(usize) -> PyResult<()> + '_ {
    let mut steps = ProgressSteps::new(0);
    move |done| match progress {
        Some(callback) if done == total || steps.due(done) => Python::attach(|py| callback.call1(py, (done, total)).map(drop)),
        _ => Ok(()),
    }
}

/// The engine's options from the Python knobs (`None`: the default;
/// `direct=None`: decided by how much is cached).
fn engine_options(threads: Option<usize>, chunk_bytes: Option<usize>, direct: Option<bool>) -> tensafe_io::EngineOptions {
    let mut options = tensafe_io::EngineOptions::default();
    options.threads = threads.unwrap_or(options.threads);
    options.chunk_bytes = chunk_bytes.unwrap_or(options.chunk_bytes);
    options.direct = match direct {
        None => tensafe_io::DirectIo::Auto,
        Some(true) => tensafe_io::DirectIo::Always,
        Some(false) => tensafe_io::DirectIo::Never,
    };
    options
}

/// Runs `ranges` of local file `p` into `dst` with the I/O engine (those
/// close together in the file as one span, `tensafe_io::gather`). On the
/// calling thread: `report` in order, and a check for Ctrl-C every tick; an
/// exception from either stops the load and is raised. Returns the pieces read.
fn read_with_engine(
    p: &PreadFile,
    ranges: &[tensafe_io::ReadRange],
    dst: &mut [u8],
    options: tensafe_io::EngineOptions,
    report: &mut impl FnMut(usize) -> PyResult<()>,
) -> PyResult<u64> {
    let heard = |heard: tensafe_io::Progress| match heard {
        tensafe_io::Progress::Done(done) => report(done).map_err(std::io::Error::other),
        tensafe_io::Progress::Tick => Python::attach(|py| py.check_signals()).map_err(std::io::Error::other),
    };
    let stats = tensafe_io::gather::read_runs_into(p.file(), ranges, dst, &options, heard).map_err(|e| match e.downcast::<PyErr>() {
        Ok(raised) => raised,
        Err(e) => SafetensorError::new_err(format!("I/O error reading {}: {e}", p.path().display())),
    })?;
    Ok(stats.reads)
}

/// Asked, from time to time, whether a read should give up (Ctrl-C).
type Stop<'a> = Option<&'a (dyn Fn() -> bool + Sync)>;

/// Reads positioned bytes of any source that is not in memory; `prefix`
/// starts the message of a failed local read (the reference's, where it has
/// one). A remote read ends early, cancelling its requests, once `stop`
/// answers true.
fn read_at(source: &Source, offset: usize, dst: &mut [u8], prefix: &str, stop: Stop<'_>) -> PyResult<()> {
    match source {
        Source::Pread(p) => p.read_data_at(offset as u64, dst).map_err(|e| error(prefix, &e)),
        Source::Remote(r) => {
            let range = r.range(r.header().data_start() + offset as u64, 0, dst.len());
            match stop {
                Some(stop) => tensafe_remote::read_into_until(&[range], dst, r.options(), None, &mut || stop()),
                None => tensafe_remote::read_into(&[range], dst, r.options(), None),
            }
            .map(|_| ())
            .map_err(remote_error)
        }
        _ => unreachable!("sources in memory are copied from, not read"),
    }
}

fn header_error(e: Error) -> PyErr {
    error("Error while deserializing header: ", &e)
}

fn serialize_error(e: Error) -> PyErr {
    // Always SafetensorError here, as in the reference (no FileNotFoundError).
    SafetensorError::new_err(format!("Error while serializing: {}", e.without_file()))
}

fn metadata_to_dict<'py>(py: Python<'py>, header: &Header) -> PyResult<Option<Bound<'py, PyDict>>> {
    header
        .metadata()
        .map(|entries| {
            let dict = PyDict::new(py);
            for (k, v) in entries {
                dict.set_item(k, v)?;
            }
            Ok(dict)
        })
        .transpose()
}

/// One run of `File::runs`: (dtype code, shape, first byte, bytes per tensor, names).
type Run<'a> = (&'static str, Vec<usize>, usize, usize, Vec<&'a str>);

enum Source {
    Mapped(MmapFile),
    Pread(PreadFile),
    /// A whole file held by a Python bytes-like object: `object` is a
    /// memoryview of it in bytes, `buffer` its export, held while this lives.
    Memory { header: Header, object: Py<PyAny>, buffer: PyUntypedBuffer },
    /// A file in object storage or on a web server, read with range requests.
    /// Boxed: far larger than the other variants.
    Remote(Box<tensafe_remote::RemoteFile>),
}

impl Source {
    /// The data section, for sources that hold it in memory.
    fn data(&self) -> Option<&[u8]> {
        match self {
            Source::Mapped(m) => Some(m.data()),
            Source::Pread(_) | Source::Remote(_) => None,
            Source::Memory { header, buffer, .. } => {
                // SAFETY: the buffer export is held as long as this source.
                let all = unsafe { std::slice::from_raw_parts(buffer.buf_ptr() as *const u8, buffer.len_bytes()) };
                Some(&all[header.data_start() as usize..])
            }
        }
    }
}

/// An open safetensors file: the validated header plus a mapping or a file
/// handle for positional reads.
#[pyclass(module = "tensafe._tensafe_rust", frozen)]
struct File {
    source: Source,
    /// A second, `O_DIRECT` handle of a local file, set by the first direct
    /// read that opens it, or `None` once the filesystem has refused
    /// `O_DIRECT` (other failures, such as a shortage of descriptors, leave
    /// it unset for the next read to try again).
    direct: OnceLock<Option<std::fs::File>>,
    /// The background reads of a mapped file into the page cache, stopped
    /// when this file is dropped (which the tensors cut out of its mapping
    /// delay: they hold it).
    prefetches: std::sync::Mutex<Prefetches>,
}

/// A mapped file's background reads into the page cache.
#[derive(Default)]
struct Prefetches {
    /// Their own handle of the file, shared.
    file: Option<std::sync::Arc<std::fs::File>>,
    /// The whole data section's (`prefetch`).
    whole: Option<Prefetch>,
    /// Single tensors' (`prefetch_range`), by offset in the data section.
    ranges: std::collections::HashMap<u64, Prefetch>,
}

/// The error for a bytes-like object whose bytes are not in one piece.
const NOT_CONTIGUOUS: &str = "the bytes-like object must be contiguous (bytes, bytearray or a contiguous memoryview)";

fn check_backend(backend: &str) -> PyResult<()> {
    if !matches!(backend, "mmap" | "pread" | "auto") {
        return Err(SafetensorError::new_err(format!("backend \"{backend}\" is invalid (expected one of: \"mmap\", \"pread\", \"auto\")")));
    }
    Ok(())
}

impl File {
    /// A local file opened with `backend` (checked by the caller):
    /// "auto" reads with positional reads on network and FUSE filesystems,
    /// where page faults on a mapping are slow, and maps it elsewhere.
    fn from_local(py: Python<'_>, file: std::fs::File, filename: PathBuf, backend: &str) -> PyResult<Self> {
        let mapped = match backend {
            "auto" => !tensafe::FilesystemKind::of(&file).prefers_pread(),
            other => other == "mmap",
        };
        py.detach(|| {
            let pread = PreadFile::from_file(file, &filename, &Default::default())?;
            Ok(if mapped { Source::Mapped(MmapFile::from_pread_copy_on_write(pread)?) } else { Source::Pread(pread) })
        })
        .map(File::from_source)
        .map_err(header_error)
    }

    /// Queues a background read of `len` bytes at `offset` in the data
    /// section of a mapped file (`whole`: all of it); see `prefetch`. Once
    /// per range, and nothing more once the whole file is asked for.
    fn start_prefetch(&self, offset: u64, len: u64, whole: bool) {
        let Source::Mapped(m) = &self.source else { return };
        let mut state = self.prefetches.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if state.whole.is_some() || len == 0 || (!whole && state.ranges.contains_key(&offset)) {
            return;
        }
        if state.file.is_none() {
            // Without a second handle (no descriptors left) the load stays lazy.
            state.file = m.positional().file().try_clone().ok().map(std::sync::Arc::new);
        }
        let Some(file) = state.file.clone() else { return };
        let request = Prefetch::start(file, m.header().data_start() + offset, len);
        if whole {
            state.whole = Some(request);
        } else {
            state.ranges.insert(offset, request);
        }
    }

    fn from_source(source: Source) -> Self {
        File { source, direct: OnceLock::new(), prefetches: Default::default() }
    }

    /// The `O_DIRECT` handle of `local` (this file's), opened on first use;
    /// `None` where it cannot be opened.
    fn direct_handle(&self, local: &PreadFile) -> Option<&std::fs::File> {
        if let Some(known) = self.direct.get() {
            return known.as_ref();
        }
        // Two threads may both open one; the second is dropped.
        match tensafe_io::try_open_direct(local.file()) {
            Ok(handle) => {
                let _ = self.direct.set(Some(handle));
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::InvalidInput | std::io::ErrorKind::Unsupported) => {
                let _ = self.direct.set(None);
            }
            Err(_) => return None,
        }
        self.direct.get().and_then(Option::as_ref)
    }

    /// Tensor `name`'s entry and the plan of its selection `index` (numpy
    /// basic indexing), errors worded as the reference's.
    fn slice_plan(&self, py: Python<'_>, name: &str, index: &Bound<'_, PyAny>) -> PyResult<(&TensorInfo, SlicePlan)> {
        let info = self.header().info(name).map_err(|_| not_found(name))?;
        let indices = parse_index(index)?;
        let plan = SlicePlan::new(info.dtype, &info.shape, &indices).map_err(|e| slice_error(py, &info.shape, &indices, &e))?;
        Ok((info, plan))
    }

    /// The handle for positional reads of a local file (mapped files have
    /// one too); `None` for files in memory or remote.
    fn local(&self) -> Option<&PreadFile> {
        match &self.source {
            Source::Pread(p) => Some(p),
            Source::Mapped(m) => Some(m.positional()),
            Source::Memory { .. } | Source::Remote(_) => None,
        }
    }

    /// `dst.len()` bytes of the data section at `offset` into `dst`, without
    /// the GIL (`read_data_into`, the staged loads); `direct` as there, and
    /// `stop` as `read_at`'s. Returns the bytes read past the page cache.
    fn read_data(&self, offset: usize, dst: &mut [u8], direct: bool, stop: Stop<'_>) -> PyResult<usize> {
        if let (true, Some(local)) = (direct, self.local())
            && let Some(direct_file) = self.direct_handle(local)
        {
            let at = local.header().data_start() + offset as u64;
            return tensafe_io::read_exact_at_direct(local.file(), direct_file, dst, at)
                .map_err(|e| SafetensorError::new_err(format!("I/O error reading {}: {e}", local.path().display())));
        }
        match &self.source {
            Source::Mapped(m) => m.positional().read_data_at(offset as u64, dst).map_err(|e| error("", &e)),
            Source::Memory { .. } => {
                dst.copy_from_slice(&self.source.data().expect("in memory")[offset..offset + dst.len()]);
                Ok(())
            }
            Source::Pread(_) | Source::Remote(_) => read_at(&self.source, offset, dst, "", stop),
        }
        .map(|()| 0)
    }

    fn header(&self) -> &Header {
        match &self.source {
            Source::Mapped(m) => m.header(),
            Source::Pread(p) => p.header(),
            Source::Memory { header, .. } => header,
            Source::Remote(r) => r.header(),
        }
    }
}

#[pymethods]
impl File {
    /// Opens `filename` with `backend` `"mmap"` (copy-on-write mapping),
    /// `"pread"`, or `"auto"` (pread on network/FUSE filesystems, else mmap).
    #[new]
    #[pyo3(signature = (filename, backend = "mmap"))]
    fn new(py: Python<'_>, filename: PathBuf, backend: &str) -> PyResult<Self> {
        check_backend(backend)?;
        let text = filename.to_string_lossy();
        if tensafe_remote::RemoteUrl::is_remote(&text) {
            let url = text.into_owned();
            let remote = py.detach(|| tensafe_remote::RemoteFile::open(&url)).map_err(remote_error)?;
            return Ok(File::from_source(Source::Remote(Box::new(remote))));
        }
        let file = tensafe::open_regular(&filename).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                PyFileNotFoundError::new_err(format!("No such file or directory: {}", filename.display()))
            }
            // The reference raises FileNotFoundError for every file it
            // cannot open, and callers catch that; the message says why.
            _ => PyFileNotFoundError::new_err(format!("{}: {e}", filename.display())),
        })?;
        File::from_local(py, file, filename, backend)
    }

    /// Opens the file behind the open descriptor `fd` (the caller keeps
    /// its own), the same file even if `name`, used in messages, now names
    /// another: a duplicate of `fd`, or, when `fd` is open for writing only,
    /// the file reopened for reading through `/proc/self/fd`.
    #[staticmethod]
    #[pyo3(signature = (fd, name, backend = "mmap"))]
    fn from_fd(py: Python<'_>, fd: i32, name: PathBuf, backend: &str) -> PyResult<Self> {
        use std::os::fd::FromRawFd;
        check_backend(backend)?;
        let os_error = |e: std::io::Error| PyOSError::new_err(format!("{}: {e}", name.display()));
        // SAFETY: fcntl on any integer is defined (EBADF when it is not an
        // open descriptor); the duplicate it returns is ours alone.
        let access = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        let duplicate = if access < 0 { -1 } else { unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) } };
        if duplicate < 0 {
            return Err(os_error(std::io::Error::last_os_error()));
        }
        let mut file = unsafe { std::fs::File::from_raw_fd(duplicate) };
        if access & libc::O_ACCMODE == libc::O_WRONLY {
            file = tensafe::open_regular(Path::new(&format!("/proc/self/fd/{duplicate}"))).map_err(os_error)?;
        } else if !file.metadata().map(|m| m.is_file()).unwrap_or(false) {
            return Err(os_error(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file")));
        }
        File::from_local(py, file, name, backend)
    }

    /// Parses a whole file held by a bytes-like object (kept, not copied).
    #[staticmethod]
    fn from_bytes(py: Python<'_>, data: Bound<'_, PyAny>) -> PyResult<Self> {
        let buffer = PyUntypedBuffer::get(&data)?;
        if !buffer.is_c_contiguous() {
            return Err(PyValueError::new_err(NOT_CONTIGUOUS));
        }
        let (ptr, len) = (buffer.buf_ptr() as usize, buffer.len_bytes());
        let header = py
            .detach(|| {
                // SAFETY: the export is held for the call (and later by the File).
                let all = unsafe { std::slice::from_raw_parts(ptr as *const u8, len) };
                Header::parse_file_bytes(all, &Default::default()).map(|(header, _)| header)
            })
            .map_err(header_error)?;
        // Tensors are cut out of `object` by byte offsets: a view in bytes,
        // whatever the item size and shape of what the caller passed.
        let bytes = pyo3::types::PyMemoryView::from(&data)?.call_method1("cast", ("B",))?;
        Ok(File::from_source(Source::Memory { header, object: bytes.unbind(), buffer }))
    }

    /// Offset of the data section in the file (8 + header length).
    #[getter]
    fn data_start(&self) -> u64 {
        self.header().data_start()
    }

    /// `"mmap"`, `"pread"` or `"memory"`.
    #[getter]
    fn backend(&self) -> &'static str {
        match self.source {
            Source::Mapped(_) => "mmap",
            Source::Pread(_) => "pread",
            Source::Memory { .. } => "memory",
            Source::Remote(_) => "remote",
        }
    }

    /// Metadata dict, or `None` when the header has none.
    fn metadata<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        metadata_to_dict(py, self.header())
    }

    /// Tensor names sorted.
    fn keys(&self) -> Vec<&str> {
        self.header().names_sorted()
    }

    /// Tensor names in file order.
    fn offset_keys(&self) -> Vec<&str> {
        self.header().names_in_file_order()
    }

    /// `(dtype_code, shape, begin, end)` of one tensor.
    fn info(&self, name: &str) -> PyResult<(&'static str, Vec<usize>, usize, usize)> {
        let info = self.header().info(name).map_err(|_| not_found(name))?;
        Ok((info.dtype.code(), info.shape.clone(), info.data_offsets.0, info.data_offsets.1))
    }

    /// Tensors grouped into runs for bulk creation, in file order:
    /// `[(dtype_code, shape, begin, bytes_each, [names…]), …]`. A run is a
    /// stretch of consecutive non-empty tensors with one dtype and one shape
    /// (the experts of a MoE layer, say), which Python turns into tensors with
    /// a single `unbind` instead of one slice and view per tensor.
    fn runs(&self) -> Vec<Run<'_>> {
        let mut runs: Vec<Run<'_>> = Vec::new();
        let mut run_end = 0usize;
        for (name, info) in self.header().iter() {
            let (begin, end) = info.data_offsets;
            if let Some(last) = runs.last_mut()
                && end > begin
                && last.3 == end - begin
                && run_end == begin
                && last.0 == info.dtype.code()
                && last.1 == info.shape
            {
                last.4.push(name);
            } else {
                runs.push((info.dtype.code(), info.shape.clone(), begin, end - begin, vec![name]));
            }
            run_end = end;
        }
        runs
    }

    /// Size of the data section in bytes.
    #[getter]
    fn data_len(&self) -> usize {
        self.header().data_len()
    }

    /// The whole data section: a zero-copy buffer for mapped and in-memory
    /// files (tensors are then cut out of it without one object per tensor).
    fn data_buffer<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        let this = slf.get();
        match &this.source {
            Source::Mapped(m) => {
                let buffer = TensorBuffer { file: slf.clone().unbind(), offset: m.header().data_start() as usize, len: m.header().data_len() };
                Ok(Bound::new(py, buffer)?.into_any())
            }
            Source::Memory { header, object, .. } => {
                let start = header.data_start() as isize;
                object.bind(py).get_item(pyo3::types::PySlice::new(py, start, start + header.data_len() as isize, 1))
            }
            Source::Pread(_) | Source::Remote(_) => Err(PyValueError::new_err("this file has no data in memory; use read_all_into")),
        }
    }

    /// Starts reading a mapped file's data section into the page cache on a
    /// background thread (`tensafe_io::prefetch`), ahead of a bulk load's
    /// first touch of its tensors; it stops when this file is dropped. Once
    /// per file; a no-op for other sources.
    fn prefetch(&self) {
        let len = self.header().data_len() as u64;
        self.start_prefetch(0, len, true);
    }

    /// Like `prefetch`, for `len` bytes at `offset` in the data section (one
    /// tensor that `get_tensor` hands out); nothing once the whole file is.
    fn prefetch_range(&self, offset: u64, len: u64) -> PyResult<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.header().data_len() as u64) {
            return Err(PyValueError::new_err("the range is not in the data section"));
        }
        self.start_prefetch(offset, len, false);
        Ok(())
    }

    /// Copies `len(dst)` bytes of the data section starting at `offset` into
    /// `dst` (a writable contiguous buffer), without the GIL: positional reads
    /// for local files, mapped ones included (faster than copying out of the
    /// mapping, see `MmapFile::positional`), a copy out of memory otherwise.
    /// `direct=True` reads the pages of a local file that `dst` is aligned
    /// like (address ≡ file offset mod 4096) past the page cache; returns the
    /// number of bytes read that way.
    #[pyo3(signature = (offset, dst, direct = false))]
    fn read_data_into(&self, py: Python<'_>, offset: usize, dst: &Bound<'_, PyAny>, direct: bool) -> PyResult<usize> {
        let buffer = PyUntypedBuffer::get(dst)?;
        if buffer.readonly() || !buffer.is_c_contiguous() {
            return Err(PyValueError::new_err("read_data_into needs a writable contiguous buffer"));
        }
        let (ptr, len) = (buffer.buf_ptr() as usize, buffer.len_bytes());
        let end = offset.checked_add(len).filter(|end| *end <= self.header().data_len());
        if end.is_none() {
            return Err(PyValueError::new_err(format!(
                "range {offset}+{len} is outside the {}-byte data section",
                self.header().data_len()
            )));
        }
        py.detach(|| {
            // SAFETY: the buffer export is held for the duration of the call.
            let dst = unsafe { std::slice::from_raw_parts_mut(ptr as *mut u8, len) };
            self.read_data(offset, dst, direct, None)
        })
    }

    /// Whether a load of the whole data section should read past the page
    /// cache (`read_data_into(direct=True)`): a large local file mostly not
    /// in the cache. The policy `read_all_into` applies by default.
    fn prefers_direct_reads(&self, py: Python<'_>) -> bool {
        let len = self.header().data_len();
        self.local().is_some_and(|local| py.detach(|| tensafe_io::prefers_direct(local.file(), local.header().data_start(), len)))
    }

    /// Reads the whole data section into `dst` (a writable contiguous buffer of
    /// `data_len` bytes) with the parallel I/O engine, without the GIL.
    /// `progress(done, total)` is called as bytes arrive. Returns the number
    /// of pieces read (`tensafe_io::Stats::reads`).
    /// `direct`: bypass the page cache (`O_DIRECT`) — `None` decides by how
    /// much of the file is cached, `True`/`False` force it. Direct reads need
    /// `dst` aligned like the file: its address ≡ `data_start` mod 4096.
    #[pyo3(signature = (dst, threads = None, chunk_bytes = None, progress = None, direct = None))]
    fn read_all_into(
        &self,
        py: Python<'_>,
        dst: &Bound<'_, PyAny>,
        threads: Option<usize>,
        chunk_bytes: Option<usize>,
        progress: Option<Py<PyAny>>,
        direct: Option<bool>,
    ) -> PyResult<u64> {
        let total = self.header().data_len();
        let buffer = PyUntypedBuffer::get(dst)?;
        if buffer.readonly() || !buffer.is_c_contiguous() || buffer.len_bytes() != total {
            return Err(PyValueError::new_err(format!("read_all_into needs a writable contiguous buffer of {total} bytes")));
        }
        let (ptr, len) = (buffer.buf_ptr() as usize, buffer.len_bytes());
        let mut report = progress_reporter(progress.as_ref(), total);
        py.detach(|| {
            // SAFETY: the buffer export is held for the duration of the call.
            let dst = unsafe { std::slice::from_raw_parts_mut(ptr as *mut u8, len) };
            match &self.source {
                Source::Pread(p) => {
                    let range = tensafe_io::ReadRange { file_offset: p.header().data_start(), dst_offset: 0, len };
                    read_with_engine(p, &[range], dst, engine_options(threads, chunk_bytes, direct), &mut report)
                }
                Source::Remote(r) => {
                    // On this (the calling) thread, which drives the transfer:
                    // the callback in order, and a check for Ctrl-C every tick;
                    // an exception from either cancels the requests at the
                    // next tick. (A Mutex: the transfer takes a `Fn + Sync`.)
                    let state = std::sync::Mutex::new((0usize, None::<PyErr>, &mut report));
                    let heard = |done: u64| {
                        let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
                        let (reported, raised, report) = &mut *state;
                        let done = done as usize;
                        if raised.is_none() && done > *reported {
                            *reported = done;
                            *raised = report(done).err();
                        }
                    };
                    let mut stop = || {
                        let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
                        if state.1.is_none() {
                            state.1 = Python::attach(|py| py.check_signals()).err();
                        }
                        state.1.is_some()
                    };
                    let read = r.read_data_into_until(dst, Some(&heard), &mut stop);
                    if let Some(raised) = state.into_inner().unwrap_or_else(|p| p.into_inner()).1 {
                        return Err(raised);
                    }
                    read.map(|traffic| traffic.requests).map_err(remote_error)
                }
                _ => Err(PyValueError::new_err("read_all_into is for pread and remote files; the others are in memory")),
            }
        })
    }

    /// The shape, byte length and first byte's offset in the file of the
    /// selection `index` of tensor `name` (as `read_slice`), for placing
    /// selections in one buffer before `read_slices_into`.
    fn slice_layout(&self, py: Python<'_>, name: &str, index: &Bound<'_, PyAny>) -> PyResult<(Vec<usize>, usize, u64)> {
        let (info, plan) = self.slice_plan(py, name, index)?;
        let first = plan.ranges().next().map_or(0, |run| run.start);
        Ok((plan.shape().to_vec(), plan.byte_len(), self.header().data_start() + (info.data_offsets.0 + first) as u64))
    }

    /// Reads selections of a local file's tensors, `[(name, index,
    /// dst_offset)]`, each packed at its offset in `dst` (a writable
    /// contiguous buffer; byte lengths as `slice_layout` gives them), with
    /// the parallel I/O engine and without the GIL, `threads` (default 4)
    /// reads at a time: the byte runs of the selections, those at most 16 KiB
    /// apart in the file (the rows of a column slice) read together and
    /// copied apart; runs aligned like the file in `dst` may go past the
    /// page cache (`direct`, as `read_all_into`).
    /// `progress(done, total)` as `read_all_into`. Returns the pieces read.
    #[pyo3(signature = (slices, dst, threads = None, progress = None, direct = None))]
    fn read_slices_into(
        &self,
        py: Python<'_>,
        slices: Vec<(String, Bound<'_, PyAny>, usize)>,
        dst: &Bound<'_, PyAny>,
        threads: Option<usize>,
        progress: Option<Py<PyAny>>,
        direct: Option<bool>,
    ) -> PyResult<u64> {
        let Some(local) = self.local() else {
            return Err(PyValueError::new_err("read_slices_into is for local files (pread or mmap)"));
        };
        let data_start = self.header().data_start();
        let mut ranges = Vec::new();
        for (name, index, at) in &slices {
            let (info, plan) = self.slice_plan(py, name, index)?;
            let mut written = *at;
            for run in plan.ranges() {
                let file_offset = data_start + (info.data_offsets.0 + run.start) as u64;
                ranges.push(tensafe_io::ReadRange { file_offset, dst_offset: written, len: run.len() });
                // Past the end: the engine refuses the run (the buffer is smaller).
                written = written.saturating_add(run.len());
            }
        }
        let buffer = PyUntypedBuffer::get(dst)?;
        if buffer.readonly() || !buffer.is_c_contiguous() {
            return Err(PyValueError::new_err("read_slices_into needs a writable contiguous buffer"));
        }
        let (ptr, len) = (buffer.buf_ptr() as usize, buffer.len_bytes());
        let total = ranges.iter().map(|r| r.len).sum();
        let mut report = progress_reporter(progress.as_ref(), total);
        py.detach(|| {
            // SAFETY: the buffer export is held for the duration of the call.
            let dst = unsafe { std::slice::from_raw_parts_mut(ptr as *mut u8, len) };
            read_with_engine(local, &ranges, dst, engine_options(threads, None, direct), &mut report)
        })
    }

    /// Drops the file's pages from the page cache (`posix_fadvise(DONTNEED)`),
    /// so a model loaded into private or device memory is not also held in
    /// the cache. Pages still mapped by a live mapping stay. A no-op for
    /// sources that are not local files.
    fn drop_cache(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| {
            let io_error = |path: &std::path::Path, e: std::io::Error| SafetensorError::new_err(format!("I/O error dropping {} from the page cache: {e}", path.display()));
            match &self.source {
                Source::Pread(p) => tensafe_io::evict(p.file(), 0, 0).map_err(|e| io_error(p.path(), e)),
                // The mapped file's own handle: the path may name another file by now.
                Source::Mapped(m) => tensafe_io::evict(m.positional().file(), 0, 0).map_err(|e| io_error(m.path(), e)),
                Source::Memory { .. } | Source::Remote(_) => Ok(()),
            }
        })
    }

    /// Whether a local `path` opens as a checkpoint of several files (a
    /// directory or an index) rather than as one safetensors file.
    #[staticmethod]
    fn is_checkpoint(path: PathBuf) -> bool {
        tensafe::is_checkpoint_path(&path)
    }

    /// Opens every file of a checkpoint — a local or remote directory, index
    /// or single file — after checking that its index and shards agree.
    #[staticmethod]
    #[pyo3(signature = (path, backend = "mmap"))]
    fn open_checkpoint(py: Python<'_>, path: PathBuf, backend: &str) -> PyResult<Vec<File>> {
        let text = path.to_string_lossy().into_owned();
        if tensafe_remote::RemoteUrl::is_remote(&text) {
            let checkpoint = py.detach(|| tensafe_remote::RemoteCheckpoint::open(&text, &Default::default())).map_err(remote_error)?;
            return Ok(checkpoint.into_shards().into_iter().map(|r| File::from_source(Source::Remote(Box::new(r)))).collect());
        }
        let checkpoint = py.detach(|| tensafe::ShardedCheckpoint::open(&path)).map_err(|e| {
            let missing = matches!(e.without_file(), Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound);
            match missing {
                // The reference's words for a path that is not there; the
                // core's for what is missing from a directory that is.
                true if !path.exists() => PyFileNotFoundError::new_err(format!("No such file or directory: {}", path.display())),
                true => PyFileNotFoundError::new_err(e.to_string()),
                false => SafetensorError::new_err(e.to_string()),
            }
        })?;
        checkpoint
            .into_shards()
            .into_iter()
            .map(|pread| {
                let mapped = match backend {
                    "auto" => !tensafe::FilesystemKind::of(pread.file()).prefers_pread(),
                    other => other == "mmap",
                };
                let source = if mapped { Source::Mapped(MmapFile::from_pread_copy_on_write(pread).map_err(header_error)?) } else { Source::Pread(pread) };
                Ok(File::from_source(source))
            })
            .collect()
    }

    /// The bytes of one tensor: a zero-copy writable (copy-on-write) buffer
    /// into the mapping, or a new `bytearray` read with `pread`.
    fn buffer<'py>(slf: &Bound<'py, Self>, name: &str) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        let this = slf.get();
        let info = this.header().info(name).map_err(|_| not_found(name))?;
        match &this.source {
            Source::Mapped(m) => {
                let offset = m.header().data_start() as usize + info.data_offsets.0;
                let buffer = TensorBuffer { file: slf.clone().unbind(), offset, len: info.byte_len() };
                Ok(Bound::new(py, buffer)?.into_any())
            }
            source @ (Source::Pread(_) | Source::Remote(_)) => {
                let begin = info.data_offsets.0;
                let prefix = format!("Could not read tensor {} from file: ", tensafe::Printable(name));
                let array = PyByteArray::new_with(py, info.byte_len(), |dst| py.detach(|| read_at(source, begin, dst, &prefix, None)))?;
                Ok(array.into_any())
            }
            Source::Memory { header, object, .. } => {
                let start = header.data_start() as usize + info.data_offsets.0;
                object.bind(py).get_item(pyo3::types::PySlice::new(py, start as isize, (start + info.byte_len()) as isize, 1))
            }
        }
    }

    /// Copies the selection `index` (int, slice, `...`, `None` or a tuple of
    /// them, numpy semantics) of a tensor into a new bytearray.
    /// Returns `(shape, bytearray)`.
    fn read_slice<'py>(&self, py: Python<'py>, name: &str, index: &Bound<'py, PyAny>) -> PyResult<(Vec<usize>, Bound<'py, PyByteArray>)> {
        let (info, plan) = self.slice_plan(py, name, index)?;
        let array = PyByteArray::new_with(py, plan.byte_len(), |dst| {
            py.detach(|| match (self.source.data(), &self.source) {
                (Some(data), _) => plan.copy_into(&data[info.data_offsets.0..info.data_offsets.1], dst).map_err(|e| error("", &e)),
                (None, Source::Remote(r)) => r.read_slice_into(name, &plan, dst).map(|_| ()).map_err(remote_error),
                (None, Source::Pread(p)) => p.read_slice_into(name, &plan, dst).map_err(|e| error("Could not read tensor bytes for slicing: ", &e)),
                (None, _) => unreachable!("only pread and remote files have no data in memory"),
            })
        })?;
        Ok((plan.shape().to_vec(), array))
    }

}

fn not_found(name: &str) -> PyErr {
    SafetensorError::new_err(format!("File does not contain tensor {}", tensafe::Printable(name)))
}

/// A slicing error of class `tensafe._errors.{class}`: a `SafetensorError`
/// that is also the builtin error torch and numpy raise for the same index
/// (plain `SafetensorError` should that module be missing).
fn typed_slice_error(py: Python<'_>, class: &str, message: String) -> PyErr {
    let typed = py.import("tensafe._errors").and_then(|m| m.getattr(class)).and_then(|c| Ok(c.cast_into::<pyo3::types::PyType>()?));
    match typed {
        Ok(class) => PyErr::from_type(class, message),
        Err(_) => SafetensorError::new_err(message),
    }
}

/// The reference's wording of slicing errors: `Error during slicing {index}
/// with shape {shape}: {reason}`, and its own text for negative indices
/// still out of range; typed as IndexError or ValueError too.
fn slice_error(py: Python<'_>, shape: &[usize], indices: &[SliceIndex], e: &Error) -> PyErr {
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

/// Turns a Python index (int, slice, Ellipsis, None or a tuple/list of them) into slice items.
fn parse_index(index: &Bound<'_, PyAny>) -> PyResult<Vec<SliceIndex>> {
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
                Ok(SliceIndex::Range { start: bound("start")?, stop: bound("stop")?, step: bound("step")? })
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

/// A zero-copy window on a tensor inside a [`File`]'s copy-on-write mapping.
/// It keeps the file (and so the mapping) alive while any view of it exists.
#[pyclass(module = "tensafe._tensafe_rust", frozen)]
struct TensorBuffer {
    file: Py<File>,
    offset: usize,
    len: usize,
}

#[pymethods]
impl TensorBuffer {
    unsafe fn __getbuffer__(slf: Bound<'_, Self>, view: *mut ffi::Py_buffer, flags: c_int) -> PyResult<()> {
        let this = slf.get();
        let Source::Mapped(mapped) = &this.file.get().source else {
            unreachable!("buffers are only made for mapped files");
        };
        let base = mapped.as_mut_ptr().expect("File maps copy-on-write");
        // SAFETY: offset..offset+len lies inside the mapping (validated header);
        // the mapping lives as long as `file`, which this object keeps alive,
        // and PyBuffer_FillInfo takes a reference to this object for the view.
        let rc = unsafe {
            ffi::PyBuffer_FillInfo(view, slf.as_ptr(), base.add(this.offset).cast(), this.len as isize, 0, flags)
        };
        if rc < 0 { Err(PyErr::fetch(slf.py())) } else { Ok(()) }
    }

    fn __len__(&self) -> usize {
        self.len
    }
}

/// A fresh, writable host allocation for whole-file loads: an anonymous
/// mapping advised to use transparent huge pages where the kernel has them
/// (2 MiB pages: 512 times fewer page faults while the readers fill it).
/// Exposed through the buffer protocol; tensors made over it keep it alive.
#[pyclass(module = "tensafe._tensafe_rust", frozen)]
struct HostBuffer {
    map: memmap2::MmapMut,
}

#[pymethods]
impl HostBuffer {
    #[new]
    fn new(len: usize) -> PyResult<Self> {
        let map = memmap2::MmapMut::map_anon(len.max(1)).map_err(|e| PyOSError::new_err(format!("allocating {len} bytes: {e}")))?;
        #[cfg(target_os = "linux")]
        {
            // Advisory: without THP support this does nothing, and that is fine.
            let _ = map.advise(memmap2::Advice::HugePage);
        }
        Ok(HostBuffer { map })
    }

    unsafe fn __getbuffer__(slf: Bound<'_, Self>, view: *mut ffi::Py_buffer, flags: c_int) -> PyResult<()> {
        let this = slf.get();
        // SAFETY: the mapping lives as long as this object, which
        // PyBuffer_FillInfo references from the view; writes go through the
        // raw pointer only (the Rust side never reads the bytes).
        let rc = unsafe {
            ffi::PyBuffer_FillInfo(view, slf.as_ptr(), this.map.as_ptr() as *mut _, this.map.len() as isize, 0, flags)
        };
        if rc < 0 { Err(PyErr::fetch(slf.py())) } else { Ok(()) }
    }

    fn __len__(&self) -> usize {
        self.map.len()
    }
}

/// A tensor described by a raw address, for compatibility with the reference's
/// `TensorSpec`. The caller keeps the memory alive and unchanged until the
/// serializer returns.
#[pyclass(module = "tensafe._tensafe_rust", frozen)]
struct TensorSpec {
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
            let names: Vec<&str> = SPEC_DTYPE_ORDER.iter().filter_map(|d| d.framework_name()).collect();
            SafetensorError::new_err(format!("Unknown dtype \"{dtype}\". Supported dtypes: {}", names.join(", ")))
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

/// The order in which the reference lists TensorSpec dtypes in its error message.
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
        let name: String = name.extract().map_err(|_| {
            PyTypeError::new_err(format!("argument 'tensor_dict': '{}' object is not an instance of 'str'", type_name(&name)))
        })?;
        let spec = spec.cast::<TensorSpec>().map_err(|_| {
            PyTypeError::new_err(format!("argument 'tensor_dict': '{}' object is not an instance of 'TensorSpec'", type_name(&spec)))
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

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into())
}

/// A metadata key or value: a TypeError for what is not a `str`, and the
/// string's own error (UnicodeEncodeError for a lone surrogate) for a `str`
/// that is not UTF-8, as the reference raises them.
fn metadata_text(obj: &Bound<'_, PyAny>) -> PyResult<String> {
    match obj.cast::<pyo3::types::PyString>() {
        Ok(text) => text.to_str().map(str::to_owned),
        Err(_) => Err(PyTypeError::new_err(format!("argument 'metadata': '{}' object is not an instance of 'str'", type_name(obj)))),
    }
}

fn metadata_arg(metadata: Option<&Bound<'_, PyDict>>) -> PyResult<Option<BTreeMap<String, String>>> {
    metadata
        .map(|dict| {
            dict.iter()
                .map(|(k, v)| Ok((metadata_text(&k)?, metadata_text(&v)?)))
                .collect()
        })
        .transpose()
}

/// The text of `path` when it is a URL (s3://, gs://, az://, http(s)://).
fn remote_url(path: &std::path::Path) -> Option<&str> {
    path.to_str().filter(|text| tensafe_remote::RemoteUrl::is_remote(text))
}

/// Writes to `filename` (atomically; a URL is uploaded) or into new
/// `bytes`, without the GIL.
fn write<'py>(py: Python<'py>, tensors: Vec<Owned>, metadata: Option<BTreeMap<String, String>>, filename: Option<PathBuf>) -> PyResult<Option<Bound<'py, PyBytes>>> {
    let items = || tensors.iter().map(|t| (t.name.as_str(), t.raw()));
    match filename {
        Some(path) if remote_url(&path).is_some() => {
            let url = remote_url(&path).expect("checked");
            py.detach(|| tensafe_remote::serialize_to_url(items(), metadata.as_ref(), url, &Default::default()).map_err(remote_error))?;
            Ok(None)
        }
        Some(path) => {
            py.detach(|| tensafe::serialize_to_file(items(), metadata.as_ref(), &path)).map_err(serialize_error)?;
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
fn serialize<'py>(py: Python<'py>, tensor_dict: &Bound<'py, PyDict>, metadata: Option<&Bound<'py, PyDict>>) -> PyResult<Bound<'py, PyBytes>> {
    let specs = specs_from_dict(tensor_dict)?;
    Ok(write(py, specs, metadata_arg(metadata)?, None)?.expect("bytes requested"))
}

/// `serialize_file(tensor_dict, filename, metadata=None)`, as in the reference.
#[pyfunction]
#[pyo3(signature = (tensor_dict, filename, metadata = None))]
fn serialize_file(py: Python<'_>, tensor_dict: &Bound<'_, PyDict>, filename: PathBuf, metadata: Option<&Bound<'_, PyDict>>) -> PyResult<()> {
    let specs = specs_from_dict(tensor_dict)?;
    write(py, specs, metadata_arg(metadata)?, Some(filename)).map(|_| ())
}

/// Serializes `[(name, dtype_code, shape, buffer), …]` where each buffer is any
/// C-contiguous object with the buffer protocol (numpy arrays, memoryviews):
/// zero-copy and safe, the path the framework modules use. Writes to
/// `filename` when given, else returns bytes.
#[pyfunction]
#[pyo3(signature = (tensors, metadata = None, filename = None))]
fn serialize_buffers<'py>(
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
        let (name, code, shape, obj): (String, String, Vec<usize>, Bound<'_, PyAny>) = item.extract()?;
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
fn deserialize<'py>(py: Python<'py>, bytes: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyList>> {
    let buffer = PyUntypedBuffer::get(bytes)?;
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

/// Saves `[(name, dtype_code, shape, buffer), …]` (as for `serialize_buffers`)
/// as shards of at most `max_shard_bytes` plus an index in `directory` (or
/// under a URL prefix: s3://, gs://, az://).
/// Returns the index as a dict, or `None` when everything fit in one file.
#[pyfunction]
#[pyo3(signature = (tensors, directory, max_shard_bytes, metadata = None))]
fn save_sharded_buffers<'py>(
    py: Python<'py>,
    tensors: &Bound<'py, PyList>,
    directory: PathBuf,
    max_shard_bytes: u64,
    metadata: Option<&Bound<'py, PyDict>>,
) -> PyResult<Option<Bound<'py, PyAny>>> {
    let owned = buffers_from_list(tensors)?;
    let metadata = metadata_arg(metadata)?;
    let items = || owned.iter().map(|t| (t.name.as_str(), t.raw()));
    let index = match remote_url(&directory) {
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

/// Converts a pickle (PyTorch) checkpoint to safetensors without executing
/// it; returns the conversion report as JSON. An `.index.json` input
/// converts a sharded checkpoint into `output` (a directory).
#[pyfunction]
#[pyo3(signature = (input, output, *, key = None, flatten = false, include_optimizer = false, dedupe = false, keep_non_tensors = false, lenient_bool = false))]
#[allow(clippy::too_many_arguments, reason = "mirrors the keyword arguments of tensafe.convert")]
fn convert_pickle(
    py: Python<'_>,
    input: PathBuf,
    output: PathBuf,
    key: Option<String>,
    flatten: bool,
    include_optimizer: bool,
    dedupe: bool,
    keep_non_tensors: bool,
    lenient_bool: bool,
) -> PyResult<String> {
    let mut options = tensafe_pickle::ConvertOptions { dedupe, keep_non_tensors, lenient_bool, ..Default::default() };
    options.extract.key = key;
    options.extract.flatten = flatten;
    options.extract.include_optimizer = include_optimizer;
    py.detach(|| {
        if input.to_string_lossy().ends_with(".json") {
            tensafe_pickle::convert_sharded(&input, &output, &options).map(|r| serde_json::to_string(&r))
        } else {
            tensafe_pickle::convert_file(&input, &output, &options).map(|r| serde_json::to_string(&r))
        }
    })
    // tensafe-pickle's messages escape the names they quote from the input.
    .map_err(|e| SafetensorError::new_err(e.to_string()))?
    .map_err(|e| SafetensorError::new_err(e.to_string()))
}

/// Scans a file for what loading it with pickle would import and call;
/// returns the report as JSON (never raises for hostile content).
#[pyfunction]
fn scan_pickle(py: Python<'_>, path: PathBuf) -> PyResult<String> {
    let report = py.detach(|| tensafe_pickle::scan_file(&path, &Default::default()));
    serde_json::to_string(&report).map_err(|e| SafetensorError::new_err(e.to_string()))
}

#[pymodule]
fn _tensafe_rust(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("SafetensorError", py.get_type::<SafetensorError>())?;
    m.add("NativeStagingUnavailable", py.get_type::<staging::NativeStagingUnavailable>())?;
    m.add_class::<File>()?;
    m.add_class::<TensorBuffer>()?;
    m.add_class::<HostBuffer>()?;
    m.add("DIRECT_ALIGN", tensafe_io::DIRECT_ALIGN)?;
    m.add("PROGRESS_STEP", PROGRESS_STEP)?;
    m.add_class::<TensorSpec>()?;
    m.add_class::<PyTensorParallelPlan>()?;
    m.add_function(wrap_pyfunction!(serialize, m)?)?;
    m.add_function(wrap_pyfunction!(serialize_file, m)?)?;
    m.add_function(wrap_pyfunction!(serialize_buffers, m)?)?;
    m.add_function(wrap_pyfunction!(deserialize, m)?)?;
    m.add_function(wrap_pyfunction!(parse_size, m)?)?;
    m.add_function(wrap_pyfunction!(printable, m)?)?;
    m.add_function(wrap_pyfunction!(cut_reads, m)?)?;
    m.add_function(wrap_pyfunction!(staging::stage_data, m)?)?;
    m.add_function(wrap_pyfunction!(save_sharded_buffers, m)?)?;
    m.add_function(wrap_pyfunction!(convert_pickle, m)?)?;
    m.add_function(wrap_pyfunction!(scan_pickle, m)?)?;
    // The dtype table, from its single source in the core crate:
    // (code, bits, framework name or None), in the reference's order.
    let dtypes: Vec<(&str, usize, Option<&str>)> = Dtype::ALL.iter().map(|d| (d.code(), d.bits(), d.framework_name())).collect();
    m.add("DTYPES", dtypes)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}

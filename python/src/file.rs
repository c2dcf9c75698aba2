//! `File`: an open safetensors file (mapped, read positionally, held in
//! memory, or remote) and its reads, with the GIL released.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyDict};
use tensafe::{Error, FileVersion, Header, MmapFile, PreadFile, SlicePlan, TensorInfo};

use crate::buffers::{MappedRegion, TensorBuffer};
use crate::indexing::{ErrorOrder, parse_index, slice_error};
use crate::progress::progress_reporter;
use crate::{SafetensorError, error, header_error, remote_error};

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
    let before = FileVersion::of(p.file()).ok();
    let stats = tensafe_io::gather::read_runs_into(p.file(), ranges, dst, &options, heard).map_err(|e| match e.downcast::<PyErr>() {
        Ok(raised) => raised,
        Err(e) => SafetensorError::new_err(format!("I/O error reading {}: {e}", p.path().display())),
    })?;
    check_unchanged(p, before)?;
    Ok(stats.reads)
}

/// A slice of a pread file of one run up to this size is one read on the
/// calling thread; larger ones, and those of several runs (a column's
/// rows), go through the engine: its readers, runs close together read as
/// one span, a check for Ctrl-C every tick.
const ENGINE_SLICE_BYTES: usize = 1 << 20;

/// Reads the runs of `plan`, of the tensor whose bytes begin at `begin` in
/// `p`, into `dst` with the engine: the span, its runs copied out of it,
/// where [`SlicePlan::reads_as_span`] (a column of a narrow matrix); else
/// the runs, a million at a time ([`SlicePlan::batches`]).
fn read_plan_with_engine(p: &PreadFile, begin: u64, plan: &SlicePlan, dst: &mut [u8]) -> PyResult<()> {
    const RUNS_AT_A_TIME: usize = 1 << 20;
    if plan.reads_as_span() {
        let span = plan.span();
        let mut bytes = vec![0u8; span.len()];
        let whole = [tensafe_io::ReadRange { file_offset: begin + span.start as u64, dst_offset: 0, len: span.len() }];
        read_with_engine(p, &whole, &mut bytes, engine_options(None, None, None), &mut |_| Ok(()))?;
        return plan.copy_from_span(&bytes, dst).map_err(|e| error("", &e));
    }
    for (part, runs) in plan.batches(RUNS_AT_A_TIME) {
        let ranges: Vec<_> = runs.into_iter().map(|(at, dst_offset, len)| tensafe_io::ReadRange { file_offset: begin + at as u64, dst_offset, len }).collect();
        read_with_engine(p, &ranges, &mut dst[part], engine_options(None, None, None), &mut |_| Ok(()))?;
    }
    Ok(())
}

/// Refuses what a long read of `p` gave if the file was written since
/// `before` (by another process, in place, which a truncation check does
/// not see): the bytes read could mix two versions of it.
pub(crate) fn check_unchanged(p: &PreadFile, before: Option<FileVersion>) -> PyResult<()> {
    if before.is_some() && FileVersion::of(p.file()).ok() != before {
        return Err(SafetensorError::new_err(format!(
            "{} changed while it was read (its size or modification time moved: another process wrote to it): what was read may mix its old and new bytes",
            p.path().display()
        )));
    }
    Ok(())
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

pub(crate) enum Source {
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
    pub(crate) fn data(&self) -> Option<&[u8]> {
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
pub(crate) struct File {
    pub(crate) source: Source,
    /// A second, `O_DIRECT` handle of a local file, set by the first direct
    /// read that opens it, or `None` once the filesystem has refused
    /// `O_DIRECT` (other failures, such as a shortage of descriptors, leave
    /// it unset for the next read to try again).
    direct: OnceLock<Option<std::fs::File>>,
    /// A mapped file's mapping as the tensors cut out of it hold it (and its
    /// background reads), made by the first of them.
    region: OnceLock<Py<MappedRegion>>,
}

/// The error for a bytes-like object whose bytes are not in one piece.
pub(crate) const NOT_CONTIGUOUS: &str = "the bytes-like object must be contiguous (bytes, bytearray or a contiguous memoryview)";

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
    fn start_prefetch(&self, py: Python<'_>, offset: u64, len: u64, whole: bool) -> PyResult<()> {
        let Source::Mapped(m) = &self.source else { return Ok(()) };
        let region = self.region(py, m)?.get();
        let mut state = region.prefetches.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if state.whole.is_some() || len == 0 || (!whole && state.ranges.contains_key(&offset)) {
            return Ok(());
        }
        let request = region.start_prefetch(m.header().data_start() + offset, len);
        if whole {
            state.whole = Some(request);
        } else {
            state.ranges.insert(offset, request);
        }
        Ok(())
    }

    /// The mapped region of `m` (this file's), made on first use.
    fn region(&self, py: Python<'_>, m: &MmapFile) -> PyResult<&Py<MappedRegion>> {
        if let Some(region) = self.region.get() {
            return Ok(region);
        }
        // Two threads may both make one; the second is dropped unused.
        let _ = self.region.set(Py::new(py, MappedRegion::new(m.shared_mapping(), m.positional().file()))?);
        Ok(self.region.get().expect("just set"))
    }

    /// A zero-copy buffer of `len` bytes at `offset` in the mapped file `m`
    /// (this file's), which keeps the mapping alive but not this file.
    fn mapped_buffer<'py>(&self, py: Python<'py>, m: &MmapFile, offset: usize, len: usize) -> PyResult<Bound<'py, PyAny>> {
        let region = self.region(py, m)?.clone_ref(py);
        Ok(Bound::new(py, TensorBuffer { region, offset, len })?.into_any())
    }

    fn from_source(source: Source) -> Self {
        File { source, direct: OnceLock::new(), region: OnceLock::new() }
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
    fn slice_plan(&self, py: Python<'_>, name: &str, index: &Bound<'_, PyAny>, order: ErrorOrder) -> PyResult<(&TensorInfo, SlicePlan)> {
        let info = self.header().info(name).map_err(|_| not_found(name))?;
        let indices = parse_index(index, order)?;
        let plan = SlicePlan::new(info.dtype, &info.shape, &indices).map_err(|e| slice_error(py, &info.shape, &indices, &e))?;
        Ok((info, plan))
    }

    /// The handle for positional reads of a local file (mapped files have
    /// one too); `None` for files in memory or remote.
    pub(crate) fn local(&self) -> Option<&PreadFile> {
        match &self.source {
            Source::Pread(p) => Some(p),
            Source::Mapped(m) => Some(m.positional()),
            Source::Memory { .. } | Source::Remote(_) => None,
        }
    }

    /// `dst.len()` bytes of the data section at `offset` into `dst`, without
    /// the GIL (`read_data_into`, the staged loads); `direct` as there, and
    /// `stop` as `read_at`'s. Returns the bytes read past the page cache.
    pub(crate) fn read_data(&self, offset: usize, dst: &mut [u8], direct: bool, stop: Stop<'_>) -> PyResult<usize> {
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

    pub(crate) fn header(&self) -> &Header {
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
        if let Some(url) = crate::remote_url(&filename) {
            let remote = py.detach(|| tensafe_remote::RemoteFile::open(url)).map_err(remote_error)?;
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
            Source::Mapped(m) => this.mapped_buffer(py, m, m.header().data_start() as usize, m.header().data_len()),
            Source::Memory { header, object, .. } => {
                let start = header.data_start() as isize;
                object.bind(py).get_item(pyo3::types::PySlice::new(py, start, start + header.data_len() as isize, 1))
            }
            Source::Pread(_) | Source::Remote(_) => Err(PyValueError::new_err("this file has no data in memory; use read_all_into")),
        }
    }

    /// Starts reading a mapped file's data section into the page cache on a
    /// background thread (`tensafe_io::prefetch`), ahead of a bulk load's
    /// first touch of its tensors; it stops when the tensors' mapping
    /// (`MappedRegion`) is dropped. Once per file; a no-op for other sources.
    fn prefetch(&self, py: Python<'_>) -> PyResult<()> {
        let len = self.header().data_len() as u64;
        self.start_prefetch(py, 0, len, true)
    }

    /// Like `prefetch`, for `len` bytes at `offset` in the data section (one
    /// tensor that `get_tensor` hands out); nothing once the whole file is.
    fn prefetch_range(&self, py: Python<'_>, offset: u64, len: u64) -> PyResult<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.header().data_len() as u64) {
            return Err(PyValueError::new_err("the range is not in the data section"));
        }
        self.start_prefetch(py, offset, len, false)
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
        // A file in memory is copied from a Rust slice of it, which `dst`
        // (a `&mut` of its own) must not share bytes with.
        if let (Source::Memory { .. }, Some(data)) = (&self.source, self.source.data()) {
            let start = data.as_ptr() as usize;
            if ptr < start + data.len() && start < ptr + len {
                return Err(PyValueError::new_err("read_data_into's buffer must not share memory with the file's bytes"));
            }
        }
        py.detach(|| {
            // SAFETY: the buffer export is held for the duration of the call,
            // and it is apart from a source in memory (checked above).
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

    /// Reads the whole data section of a local (pread or mapped: from the
    /// file) or remote file into `dst` (a writable contiguous buffer of
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
            match (self.local(), &self.source) {
                // A mapped file too: read from the file, not the mapping, for
                // a private copy (numpy's loads).
                (Some(local), _) => {
                    let range = tensafe_io::ReadRange { file_offset: local.header().data_start(), dst_offset: 0, len };
                    read_with_engine(local, &[range], dst, engine_options(threads, chunk_bytes, direct), &mut report)
                }
                (None, Source::Remote(r)) => {
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
                (None, _) => Err(PyValueError::new_err("read_all_into is for files, local or remote; this one is in memory")),
            }
        })
    }

    /// The shape, byte length and first byte's offset in the file of the
    /// selection `index` of tensor `name` (as `read_slice`), for placing
    /// selections in one buffer before `read_slices_into`.
    fn slice_layout(&self, py: Python<'_>, name: &str, index: &Bound<'_, PyAny>) -> PyResult<(Vec<usize>, usize, u64)> {
        let (info, plan) = self.slice_plan(py, name, index, ErrorOrder::Torch)?;
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
            let (info, plan) = self.slice_plan(py, name, index, ErrorOrder::Torch)?;
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

    /// Whether `name` is a URL that opens remotely (a scheme tensafe reads,
    /// in any case, then `://`) rather than a local path.
    #[staticmethod]
    fn is_remote(name: PathBuf) -> bool {
        crate::remote_url(&name).is_some()
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
        if let Some(url) = crate::remote_url(&path) {
            let checkpoint = py.detach(|| tensafe_remote::RemoteCheckpoint::open(url, &Default::default())).map_err(remote_error)?;
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
            Source::Mapped(m) => this.mapped_buffer(py, m, m.header().data_start() as usize + info.data_offsets.0, info.byte_len()),
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
    /// Returns `(shape, bytearray)`. With `torch_order`, a wrong index is
    /// reported in the order torch checks them (the shape before the steps),
    /// else in the reference's order for the other frameworks.
    #[pyo3(signature = (name, index, torch_order = false))]
    fn read_slice<'py>(&self, py: Python<'py>, name: &str, index: &Bound<'py, PyAny>, torch_order: bool) -> PyResult<(Vec<usize>, Bound<'py, PyByteArray>)> {
        let order = if torch_order { ErrorOrder::Torch } else { ErrorOrder::Reference };
        let (info, plan) = self.slice_plan(py, name, index, order)?;
        let array = PyByteArray::new_with(py, plan.byte_len(), |dst| {
            py.detach(|| match (self.source.data(), &self.source) {
                (Some(data), _) => plan.copy_into(&data[info.data_offsets.0..info.data_offsets.1], dst).map_err(|e| error("", &e)),
                (None, Source::Remote(r)) => r.read_slice_into(name, &plan, dst).map(|_| ()).map_err(remote_error),
                (None, Source::Pread(p)) if plan.num_ranges() > 1 || plan.byte_len() > ENGINE_SLICE_BYTES => {
                    let data_start = self.header().data_start() + info.data_offsets.0 as u64;
                    read_plan_with_engine(p, data_start, &plan, dst)
                }
                (None, Source::Pread(p)) => p.read_slice_into(name, &plan, dst).map_err(|e| error("Could not read tensor bytes for slicing: ", &e)),
                (None, _) => unreachable!("only pread and remote files have no data in memory"),
            })
        })?;
        Ok((plan.shape().to_vec(), array))
    }

}

pub(crate) fn not_found(name: &str) -> PyErr {
    SafetensorError::new_err(format!("File does not contain tensor {}", tensafe::Printable(name)))
}

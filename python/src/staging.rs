//! `stage_data`: the staged load of a file's data section
//! (`tensafe_io::staging`), with reads and copies on Rust threads that never
//! take the GIL. Python (`_pipeline.py`, `schedule="native"`) allocates the
//! destination and the pinned slots and plans the chunks; this runs them.

use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use pyo3::buffer::PyUntypedBuffer;
use pyo3::create_exception;
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use tensafe::FileVersion;
use tensafe_cuda::DeviceSink;
use tensafe_io::staging::{self, Chunk, Progress};

use crate::file::{File, check_unchanged};
use crate::progress::{PROGRESS_STEP, ProgressSteps};

create_exception!(
    tensafe._tensafe_rust,
    NativeStagingUnavailable,
    PyRuntimeError,
    "A native staged load could not start on this device, before anything was read or copied: the CUDA driver \
     library is missing, a stub, or not the driver torch uses, or the destination is memory the driver does not \
     know as that device's. `_pipeline.py` then loads through torch's copies instead."
);

/// Where the chunks go: host memory (a writable buffer; the CPU stand-in the
/// tests use) or device memory given as (device ordinal, device pointer,
/// length, raw stream handle to order after).
#[derive(FromPyObject)]
pub enum Target<'py> {
    Device((i32, u64, usize, usize)),
    Host(Bound<'py, PyAny>),
}

/// A writable, contiguous buffer export, held while Rust writes into it.
struct Writable {
    _export: PyUntypedBuffer,
    ptr: usize,
    len: usize,
}

impl Writable {
    fn get(object: &Bound<'_, PyAny>, what: &str) -> PyResult<Self> {
        let export = PyUntypedBuffer::get(object)?;
        if export.readonly() || !export.is_c_contiguous() {
            return Err(PyValueError::new_err(format!("{what} must be a writable contiguous buffer")));
        }
        let (ptr, len) = (export.buf_ptr() as usize, export.len_bytes());
        Ok(Writable { _export: export, ptr, len })
    }
}

/// Runs a staged load of `file`'s data section: `chunks` are (offset in the
/// data section, length, place in a slot), read by `readers` threads into
/// `slots` (writable buffers; for a device target, pinned memory) and
/// copied to `target`. Calls `progress(done, total)` every `PROGRESS_STEP`
/// bytes whose copy started, and `progress(total, total)` once every copy
/// has completed. Ctrl-C stops the load, remote requests in flight
/// included. Returns (chunks copied, most reads in flight, bytes read past
/// the page cache).
///
/// Internal to `_pipeline.py`. A device target's pointer must be memory of
/// that device (checked: `NativeStagingUnavailable` otherwise, as for any
/// failure to set the device up); its length and stream are trusted to be
/// torch's.
#[pyfunction]
#[pyo3(signature = (file, chunks, slots, readers, target, *, direct, progress = None))]
#[allow(clippy::too_many_arguments)]
pub fn stage_data(
    py: Python<'_>,
    file: &Bound<'_, File>,
    chunks: Vec<(usize, usize, usize)>,
    slots: Vec<Bound<'_, PyAny>>,
    readers: usize,
    target: Target<'_>,
    direct: bool,
    progress: Option<Py<PyAny>>,
) -> PyResult<(usize, usize, u64)> {
    let file = file.get();
    let total = file.header().data_len();
    let chunks: Vec<Chunk> = chunks.into_iter().map(|(offset, len, place)| Chunk { offset, len, place }).collect();
    if let Some(c) = chunks.iter().find(|c| c.offset.checked_add(c.len).is_none_or(|end| end > total)) {
        return Err(PyValueError::new_err(format!("chunk {}+{} is outside the {total}-byte data section", c.offset, c.len)));
    }
    let slots = slots.iter().map(|s| Writable::get(s, "a staging slot")).collect::<PyResult<Vec<_>>>()?;
    let host = match &target {
        Target::Host(out) => Some(Writable::get(out, "the destination")?),
        Target::Device(_) => None,
    };
    let slot_regions: Vec<(usize, usize)> = slots.iter().map(|w| (w.ptr, w.len)).collect();
    let host_region = host.as_ref().map(|w| (w.ptr, w.len));
    // Rust hands out each slot, and the host destination, as `&mut`: they
    // must not share memory, with each other or with a source in memory.
    let source = file.source.data().map(|data| (data.as_ptr() as usize, data.len()));
    let mut regions: Vec<(usize, usize)> = slot_regions.iter().copied().chain(host_region).chain(source).collect();
    regions.sort_unstable();
    if regions.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0) {
        return Err(PyValueError::new_err("staging slots, the destination and the file's memory must not overlap"));
    }
    let sink = match target {
        Target::Device((ordinal, ptr, len, stream)) => Some(py.detach(|| open_sink(ordinal, ptr, len, stream))?),
        Target::Host(_) => None,
    };
    let failure = FirstFailure::default();
    let before = file.local().and_then(|local| FileVersion::of(local.file()).ok());
    let report = py.detach(|| {
        // SAFETY: the exports are held until this returns, and the regions are disjoint.
        let slot_slices = slot_regions.iter().map(|&(ptr, len)| unsafe { std::slice::from_raw_parts_mut(ptr as *mut u8, len) }).collect();
        let stop = || failure.happened();
        let read = |chunk: &Chunk, dst: &mut [u8]| {
            file.read_data(chunk.offset, dst, direct, Some(&stop)).map(|n| n as u64).map_err(|e| failure.record(e))
        };
        let mut steps = ProgressSteps::new(PROGRESS_STEP);
        let on_progress = |heard: Progress| -> io::Result<()> {
            match (heard, &progress) {
                // The last report waits until the copies have completed.
                (Progress::Done(done), Some(callback)) if done < total && steps.due(done) => {
                    Python::attach(|py| callback.call1(py, (done, total)).map(drop)).map_err(|e| failure.record(e))
                }
                (Progress::Done(_), _) => Ok(()),
                // Ctrl-C stops a long load (Python's handlers run on the main thread only).
                (Progress::Tick, _) => Python::attach(|py| py.check_signals()).map_err(|e| failure.record(e)),
            }
        };
        match (host_region, &sink) {
            (Some((ptr, len)), _) => {
                // SAFETY: as the slots.
                let out = unsafe { std::slice::from_raw_parts_mut(ptr as *mut u8, len) };
                staging::stage_to_host(&chunks, slot_slices, readers, out, read, on_progress)
            }
            (None, Some(sink)) => staging::stage(&chunks, slot_slices, readers, sink, read, on_progress),
            (None, None) => unreachable!("a target is on the host or on a device"),
        }
    });
    drop((slots, host, sink));
    if let Some(raised) = failure.into_first() {
        return Err(raised);
    }
    let report = report.map_err(to_python)?;
    if let Some(local) = file.local() {
        check_unchanged(local, before)?;
    }
    if let Some(callback) = &progress {
        callback.call1(py, (total, total))?;
    }
    Ok((report.chunks, report.max_reading, report.direct_bytes))
}

/// Why a staged load failed: the first exception of a read, of the progress
/// callback or of Ctrl-C. Once there is one, remote reads in flight give up
/// (`happened`), and their "stopped" errors, which may reach the engine
/// before the cause does, are not what the caller is told.
#[derive(Default)]
struct FirstFailure {
    /// Whether `first` is set, read without the lock (remote reads ask every tick).
    happened: AtomicBool,
    first: Mutex<Option<PyErr>>,
}

impl FirstFailure {
    fn happened(&self) -> bool {
        self.happened.load(Ordering::Relaxed)
    }

    /// Keeps `raised` if it is the first; the engine, which stops on any
    /// error, gets a stand-in (what the caller is told is `first`).
    fn record(&self, raised: PyErr) -> io::Error {
        let mut first = self.first.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if first.is_none() {
            *first = Some(raised);
            self.happened.store(true, Ordering::Relaxed);
        }
        io::Error::other("the load failed (the first failure is raised)")
    }

    fn into_first(self) -> Option<PyErr> {
        self.first.into_inner().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The device sink. `NativeStagingUnavailable` where the driver cannot
/// serve this load at all ([`tensafe_cuda::CudaError::means_unavailable`]);
/// RuntimeError, as for other CUDA failures, otherwise.
fn open_sink(ordinal: i32, ptr: u64, len: usize, stream: usize) -> PyResult<DeviceSink> {
    // SAFETY: `_pipeline.py` passes torch's pointer, length and stream for that device.
    unsafe { DeviceSink::new(ordinal, ptr, len, stream) }.map_err(|e| {
        if e.means_unavailable() { NativeStagingUnavailable::new_err(e.to_string()) } else { to_python(e.into()) }
    })
}

/// The Python exception for a staged load that failed in the engine or the
/// sink (what reads, the progress callback and Ctrl-C raise is kept by
/// [`FirstFailure`]): RuntimeError for CUDA (as torch's); ValueError for a
/// refused plan; OSError otherwise.
fn to_python(e: io::Error) -> PyErr {
    if e.get_ref().is_some_and(|inner| inner.is::<tensafe_cuda::CudaError>()) {
        return PyRuntimeError::new_err(e.to_string());
    }
    if e.kind() == io::ErrorKind::InvalidInput {
        return PyValueError::new_err(e.to_string());
    }
    PyOSError::new_err(e.to_string())
}

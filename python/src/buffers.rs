//! Memory exposed to Python through the buffer protocol: windows on a
//! mapped file's tensors, and fresh host allocations for whole-file loads.

use std::ffi::c_int;
use std::sync::Arc;

use pyo3::exceptions::PyOSError;
use pyo3::ffi;
use pyo3::prelude::*;
use tensafe::SharedMapping;
use tensafe_io::prefetch::Prefetch;

/// A mapped file's bytes, which the tensors cut out of them keep alive, and
/// the background reads that fill the page cache ahead of their first
/// touch (through the mapping), which stop when it is dropped. It holds no
/// descriptor: only the `File` does, while it is open, so the tensors alone
/// hold none (as the reference's).
#[pyclass(module = "tensafe._tensafe_rust", frozen)]
pub(crate) struct MappedRegion {
    mapping: Arc<RegionBytes>,
    /// The most one read-ahead call asks for (`tensafe_io::prefetch::advice_limit`).
    advice_limit: u64,
    pub(crate) prefetches: std::sync::Mutex<Prefetches>,
}

/// The mapping as the background reads hold it.
struct RegionBytes(SharedMapping);

impl tensafe_io::prefetch::Mapped for RegionBytes {
    fn region(&self) -> (*const u8, usize) {
        self.0.region()
    }
}

impl MappedRegion {
    /// The region of a mapping of `file`.
    pub(crate) fn new(mapping: SharedMapping, file: &std::fs::File) -> Self {
        let advice_limit = tensafe_io::prefetch::advice_limit(file);
        MappedRegion { mapping: Arc::new(RegionBytes(mapping)), advice_limit, prefetches: Default::default() }
    }

    /// Starts reading `len` bytes at `offset` in the mapped file into the page
    /// cache in the background (see `tensafe_io::prefetch`).
    pub(crate) fn start_prefetch(&self, offset: u64, len: u64) -> Prefetch {
        Prefetch::start(self.mapping.clone(), offset, len, self.advice_limit)
    }
}

/// A mapped file's background reads into the page cache.
#[derive(Default)]
pub(crate) struct Prefetches {
    /// The whole data section's (`prefetch`).
    pub(crate) whole: Option<Prefetch>,
    /// Single tensors' (`prefetch_range`), by offset in the data section.
    pub(crate) ranges: std::collections::HashMap<u64, Prefetch>,
}

/// A zero-copy window on a tensor inside a copy-on-write [`MappedRegion`],
/// which it keeps alive while any view of it exists.
#[pyclass(module = "tensafe._tensafe_rust", frozen)]
pub(crate) struct TensorBuffer {
    pub(crate) region: Py<MappedRegion>,
    /// From the start of the mapped file.
    pub(crate) offset: usize,
    pub(crate) len: usize,
}

#[pymethods]
impl TensorBuffer {
    unsafe fn __getbuffer__(slf: Bound<'_, Self>, view: *mut ffi::Py_buffer, flags: c_int) -> PyResult<()> {
        let this = slf.get();
        let base = this.region.get().mapping.0.as_mut_ptr().expect("File maps copy-on-write");
        // SAFETY: offset..offset+len lies inside the mapping (validated header);
        // the mapping lives as long as `region`, which this object keeps alive,
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
pub(crate) struct HostBuffer {
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

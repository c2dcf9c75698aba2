//! Copies of staged chunks ([`tensafe_io::staging`]) to a CUDA device.
//!
//! The driver API is loaded when first used (cudarc's dynamic loading), so
//! tensafe builds and runs on machines without CUDA; on a GPU machine the
//! process — torch — has already loaded the driver. The copies go into the
//! device's primary context, the one torch's runtime uses, so device
//! pointers and streams that torch hands out are valid here.
//!
//! Each reader gets its own non-blocking stream, which first waits for the
//! work queued on the caller's stream before the load (the destination may
//! be memory that work still uses). Every copy is recorded by an event the
//! reader waits on before it refills the slot, and
//! [`tensafe_io::staging::stage`] waits for all of them before it returns:
//! when it does, the data is on the device. A reader's stream is drained
//! before it is destroyed, so no copy outlives a load, errors included.

use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};

use cudarc::driver::result::{self as cu, DriverError};
use cudarc::driver::sys;
use tensafe_io::staging::{Sink, panic_message};

/// What fails here.
#[derive(Debug)]
pub enum CudaError {
    /// The driver library could not be loaded.
    NoDriver,
    /// The destination is not memory of the device.
    BadDestination {
        /// The device.
        ordinal: i32,
        /// Its start.
        dst: u64,
        /// Its length.
        len: usize,
    },
    /// The driver bindings panicked while setting up: a loaded library that
    /// lacks a function they look up (cudarc panics rather than failing).
    Bindings(String),
    /// A driver call failed.
    Call {
        /// The driver function.
        call: &'static str,
        /// Its result.
        error: DriverError,
    },
}

impl std::fmt::Display for CudaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CudaError::NoDriver => write!(f, "the CUDA driver library (libcuda) could not be loaded"),
            CudaError::BadDestination { ordinal, dst, len } => {
                write!(f, "the destination ({len} bytes at {dst:#x}) is not memory of CUDA device {ordinal}")
            }
            CudaError::Bindings(panic) => write!(f, "the CUDA driver bindings failed: {panic}"),
            CudaError::Call { call, error } => {
                // The driver names its errors; it is loaded, as a call failed.
                let name = error.error_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|_| format!("{:?}", error.0));
                let text = error.error_string().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                write!(f, "CUDA {call} failed: {name} ({text})")
            }
        }
    }
}

impl std::error::Error for CudaError {}

impl CudaError {
    /// Whether the error says that this driver cannot serve loads here at
    /// all, rather than that one load failed: no driver library, one whose
    /// `cuInit` fails (a stub library, a driver without a usable device) or
    /// that does not know the device, one without a function the bindings
    /// need, or a destination it does not know as that device's memory
    /// (another driver than the caller's, or memory it cannot address).
    pub fn means_unavailable(&self) -> bool {
        match self {
            CudaError::NoDriver | CudaError::Bindings(_) | CudaError::BadDestination { .. } => true,
            CudaError::Call { call, .. } => matches!(*call, "cuInit" | "cuDeviceGet"),
        }
    }
}

impl From<CudaError> for io::Error {
    fn from(e: CudaError) -> Self {
        io::Error::other(e)
    }
}

/// Tags a driver result with the call's name.
fn check<T>(call: &'static str, result: Result<T, DriverError>) -> Result<T, CudaError> {
    result.map_err(|error| CudaError::Call { call, error })
}

/// Whether the CUDA driver library can be loaded here.
pub fn driver_present() -> bool {
    // SAFETY: only tries to open the library.
    unsafe { sys::is_culib_present() }
}

/// Copies into `len` bytes of device memory at `dst` on one device.
pub struct DeviceSink {
    device: sys::CUdevice,
    context: sys::CUcontext,
    dst: sys::CUdeviceptr,
    len: usize,
    /// Recorded on the caller's stream when the sink was made: the readers'
    /// streams start after it.
    caller_done: sys::CUevent,
}

// SAFETY: driver handles may be used from any thread; each reader makes the
// context current on its own thread before using them.
unsafe impl Send for DeviceSink {}
unsafe impl Sync for DeviceSink {}

impl DeviceSink {
    /// A sink writing into device memory `[dst, dst + len)` of device
    /// `ordinal`, ordered after the work queued on stream `caller` so far (a
    /// raw `CUstream`/`cudaStream_t`; 0 is the legacy default stream).
    /// Refuses a `dst` that the driver does not know as memory of that
    /// device; a panic of the driver bindings is returned as
    /// [`CudaError::Bindings`].
    ///
    /// # Safety
    /// `[dst, dst + len)` must be device memory the caller owns (the driver
    /// only vouches for `dst`), `caller` a stream of that device's primary
    /// context, and both must stay valid until the sink is dropped.
    pub unsafe fn new(ordinal: i32, dst: u64, len: usize, caller: usize) -> Result<Self, CudaError> {
        // A sink half made when the bindings panic is dropped on the way out
        // (its context released; `in_context` pops what it pushed).
        // SAFETY: the caller's contract, passed on.
        catch_unwind(AssertUnwindSafe(|| unsafe { Self::open(ordinal, dst, len, caller) }))
            .unwrap_or_else(|panic| Err(CudaError::Bindings(panic_message(&*panic).to_owned())))
    }

    /// [`DeviceSink::new`] without the panic guard.
    ///
    /// # Safety
    /// As for [`DeviceSink::new`].
    unsafe fn open(ordinal: i32, dst: u64, len: usize, caller: usize) -> Result<Self, CudaError> {
        if !driver_present() {
            return Err(CudaError::NoDriver);
        }
        check("cuInit", cu::init())?;
        let device = check("cuDeviceGet", cu::device::get(ordinal))?;
        // SAFETY: `device` came from cuDeviceGet; released in Drop, which
        // from here on also runs on errors.
        let context = check("cuDevicePrimaryCtxRetain", unsafe { cu::primary_ctx::retain(device) })?;
        let mut sink = DeviceSink { device, context, dst, len, caller_done: std::ptr::null_mut() };
        sink.in_context(|sink| {
            sink.check_destination(ordinal)?;
            sink.caller_done = check("cuEventCreate", cu::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING))?;
            // SAFETY: `caller` is a stream of this context (the contract above).
            check("cuEventRecord", unsafe { cu::event::record(sink.caller_done, caller as sys::CUstream) })
        })?;
        Ok(sink)
    }

    /// `work`, with the sink's context pushed on the calling thread and
    /// popped after, leaving that thread's current context as it was (the
    /// caller's thread is torch's).
    fn in_context<T>(&mut self, work: impl FnOnce(&mut Self) -> Result<T, CudaError>) -> Result<T, CudaError> {
        // SAFETY: the context is retained for the sink's life; push and pop pair up.
        check("cuCtxPushCurrent", unsafe { sys::cuCtxPushCurrent_v2(self.context).result() })?;
        // A panic of the bindings in `work` pops too, before it goes on
        // (`new` turns it into an error); not from a drop guard, where a
        // second panic would abort.
        let result = catch_unwind(AssertUnwindSafe(|| work(self)));
        // SAFETY: as above.
        let _ = unsafe { sys::cuCtxPopCurrent_v2(&mut std::ptr::null_mut()) };
        result.unwrap_or_else(|panic| resume_unwind(panic))
    }

    /// Whether the driver knows `dst` as memory of device `ordinal`. Not
    /// the range: torch's caching allocator hands out pieces of larger
    /// allocations (and with expandable segments, of several), so the
    /// driver's view of the allocation bounds nothing useful.
    fn check_destination(&self, ordinal: i32) -> Result<(), CudaError> {
        let refused = || CudaError::BadDestination { ordinal, dst: self.dst, len: self.len };
        let attribute = |what: sys::CUpointer_attribute, out: *mut std::ffi::c_void| {
            // SAFETY: `out` points at a value of the type the attribute has.
            match unsafe { sys::cuPointerGetAttribute(out, what, self.dst) } {
                sys::CUresult::CUDA_SUCCESS => Ok(()),
                // What the driver says of memory it did not allocate.
                sys::CUresult::CUDA_ERROR_INVALID_VALUE => Err(refused()),
                error => Err(CudaError::Call { call: "cuPointerGetAttribute", error: DriverError(error) }),
            }
        };
        let (mut owner, mut kind): (std::ffi::c_int, std::ffi::c_uint) = (-1, 0);
        attribute(sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, (&raw mut owner).cast())?;
        // Pinned host memory has a device ordinal too.
        attribute(sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE, (&raw mut kind).cast())?;
        if owner != ordinal || kind != sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as std::ffi::c_uint {
            return Err(refused());
        }
        Ok(())
    }
}

impl Drop for DeviceSink {
    fn drop(&mut self) {
        if !self.caller_done.is_null() {
            // SAFETY: `new` made the event; an event may be destroyed while
            // work waits on it.
            let _ = self.in_context(|sink| check("cuEventDestroy", unsafe { cu::event::destroy(sink.caller_done) }));
        }
        // SAFETY: balances the retain in `new`.
        let _ = unsafe { cu::primary_ctx::release(self.device) };
    }
}

/// A reader's stream, and the events its copies are recorded with (reused:
/// an event is free again once its copy was waited for).
pub struct Lane {
    stream: sys::CUstream,
    free: Vec<sys::CUevent>,
}

/// A copy in flight: the event recorded after it.
pub struct InFlight {
    event: sys::CUevent,
}

impl Sink for DeviceSink {
    type Lane = Lane;
    type InFlight = InFlight;
    type Error = io::Error;

    fn dst_len(&self) -> usize {
        self.len
    }

    fn lane(&self) -> io::Result<Lane> {
        // SAFETY: the context is retained for the sink's life and this is a
        // reader's own thread; `caller_done` lives as long as the sink.
        unsafe {
            check("cuCtxSetCurrent", cu::ctx::set_current(self.context))?;
            let stream = check("cuStreamCreate", cu::stream::create(cu::stream::StreamKind::NonBlocking))?;
            if let Err(e) = check("cuStreamWaitEvent", cu::stream::wait_event(stream, self.caller_done, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT)) {
                let _ = cu::stream::destroy(stream);
                return Err(e.into());
            }
            Ok(Lane { stream, free: Vec::new() })
        }
    }

    unsafe fn copy(&self, lane: &mut Lane, offset: usize, src: &[u8]) -> io::Result<InFlight> {
        // SAFETY: the range is inside the destination and `src` stays put
        // until `wait` (the caller's contract); `close` drains the stream
        // whatever fails here.
        unsafe {
            let event = match lane.free.pop() {
                Some(event) => event,
                None => check("cuEventCreate", cu::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING))?,
            };
            let started = check("cuMemcpyHtoDAsync", cu::memcpy_htod_async(self.dst + offset as u64, src, lane.stream))
                .and_then(|()| check("cuEventRecord", cu::event::record(event, lane.stream)));
            if let Err(e) = started {
                lane.free.push(event);
                return Err(e.into());
            }
            Ok(InFlight { event })
        }
    }

    fn wait(&self, lane: &mut Lane, copy: InFlight) -> io::Result<()> {
        // SAFETY: the event was recorded by `copy`; it goes back to the pool.
        let waited = check("cuEventSynchronize", unsafe { cu::event::synchronize(copy.event) });
        lane.free.push(copy.event);
        Ok(waited?)
    }

    fn close(&self, lane: Lane) -> io::Result<()> {
        // SAFETY: the stream is drained before it and the events are
        // destroyed, each once.
        unsafe {
            let drained = check("cuStreamSynchronize", cu::stream::synchronize(lane.stream));
            for event in lane.free {
                let _ = cu::event::destroy(event);
            }
            let destroyed = check("cuStreamDestroy", cu::stream::destroy(lane.stream));
            drained?;
            Ok(destroyed?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_driver_a_sink_is_an_error_not_a_panic() {
        if driver_present() {
            eprintln!("skipped: this machine has a CUDA driver");
            return;
        }
        // SAFETY: fails before touching the (nonexistent) device memory.
        let e = unsafe { DeviceSink::new(0, 0, 0, 0) }.err().expect("no driver, no sink");
        assert!(matches!(e, CudaError::NoDriver), "{e}");
        assert!(e.to_string().contains("could not be loaded"), "{e}");
        assert!(e.means_unavailable());
    }

    #[test]
    fn only_a_driver_that_cannot_serve_at_all_is_unavailable() {
        let call = |call, error| CudaError::Call { call, error: DriverError(error) };
        assert!(CudaError::BadDestination { ordinal: 0, dst: 0, len: 1 }.means_unavailable());
        assert!(call("cuInit", sys::CUresult::CUDA_ERROR_STUB_LIBRARY).means_unavailable());
        assert!(CudaError::Bindings("Missing symbol cuInit".into()).means_unavailable());
        assert!(call("cuDeviceGet", sys::CUresult::CUDA_ERROR_INVALID_DEVICE).means_unavailable());
        // One load's trouble (memory, a broken context) is not the driver's.
        assert!(!call("cuEventCreate", sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY).means_unavailable());
        assert!(!call("cuDevicePrimaryCtxRetain", sys::CUresult::CUDA_ERROR_ILLEGAL_ADDRESS).means_unavailable());
    }
}

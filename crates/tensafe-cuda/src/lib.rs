//! Copies of staged chunks ([`tensafe_io::staging`]) to a CUDA device.
//!
//! The driver API is loaded when first used (cudarc's dynamic loading), so
//! tensafe builds and runs on machines without CUDA; on a GPU machine the
//! process — torch — has already loaded the driver. The copies go into the
//! device's primary context, the one torch's runtime uses, so device
//! pointers and streams that torch hands out are valid here.
//!
//! Each reader gets its own non-blocking stream, which first waits for the
//! work queued on the caller's stream so far (the destination may be memory
//! that work still uses). Every copy is recorded by an event the reader
//! waits on before it refills the slot, and [`tensafe_io::staging::stage`]
//! waits for all of them before it returns: when it does, the data is on
//! the device.

use std::io;

use cudarc::driver::result::{self as cu, DriverError};
use cudarc::driver::sys;
use tensafe_io::staging::Sink;

/// What fails here.
#[derive(Debug)]
pub enum CudaError {
    /// The driver library could not be loaded.
    NoDriver,
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
    caller: sys::CUstream,
}

// SAFETY: driver handles may be used from any thread; each reader makes the
// context current on its own thread before using them.
unsafe impl Send for DeviceSink {}
unsafe impl Sync for DeviceSink {}

impl DeviceSink {
    /// A sink writing into device memory `[dst, dst + len)` of device
    /// `ordinal`, ordered after the work queued on stream `caller` (a raw
    /// `CUstream`/`cudaStream_t`; 0 is the legacy default stream).
    ///
    /// # Safety
    /// `dst..dst + len` must be device memory of that device's primary
    /// context, and it and `caller` must stay valid until the sink is dropped.
    pub unsafe fn new(ordinal: i32, dst: u64, len: usize, caller: usize) -> Result<Self, CudaError> {
        if !driver_present() {
            return Err(CudaError::NoDriver);
        }
        check("cuInit", cu::init())?;
        let device = check("cuDeviceGet", cu::device::get(ordinal))?;
        // SAFETY: `device` came from cuDeviceGet; released in Drop.
        let context = check("cuDevicePrimaryCtxRetain", unsafe { cu::primary_ctx::retain(device) })?;
        Ok(DeviceSink { device, context, dst, len, caller: caller as sys::CUstream })
    }
}

impl Drop for DeviceSink {
    fn drop(&mut self) {
        // SAFETY: balances the retain in `new`.
        let _ = unsafe { cu::primary_ctx::release(self.device) };
    }
}

/// A reader's stream.
pub struct Lane {
    stream: sys::CUstream,
}

/// A copy in flight: the event recorded after it.
pub struct InFlight {
    event: sys::CUevent,
}

impl Sink for DeviceSink {
    type Lane = Lane;
    type InFlight = InFlight;
    type Error = io::Error;

    fn lane(&self) -> io::Result<Lane> {
        // SAFETY: the context is retained for the sink's life; the caller's
        // stream is valid (`new`'s contract); handles made here are released below.
        unsafe {
            check("cuCtxSetCurrent", cu::ctx::set_current(self.context))?;
            let stream = check("cuStreamCreate", cu::stream::create(cu::stream::StreamKind::NonBlocking))?;
            let joined = (|| {
                let caller_now = check("cuEventCreate", cu::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING))?;
                let waited = check("cuEventRecord", cu::event::record(caller_now, self.caller)).and_then(|()| {
                    check("cuStreamWaitEvent", cu::stream::wait_event(stream, caller_now, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT))
                });
                // A recorded event may be destroyed before it completes.
                let _ = cu::event::destroy(caller_now);
                waited
            })();
            if let Err(e) = joined {
                let _ = cu::stream::destroy(stream);
                return Err(e.into());
            }
            Ok(Lane { stream })
        }
    }

    fn copy(&self, lane: &mut Lane, offset: usize, src: &[u8]) -> io::Result<InFlight> {
        if offset.checked_add(src.len()).is_none_or(|end| end > self.len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("copy of {} bytes to {offset} is outside the {}-byte device buffer", src.len(), self.len),
            ));
        }
        // SAFETY: the destination range is inside the buffer (checked above,
        // `new`'s contract); the engine keeps `src` unwritten until `wait`.
        unsafe {
            check("cuMemcpyHtoDAsync", cu::memcpy_htod_async(self.dst + offset as u64, src, lane.stream))?;
            let event = check("cuEventCreate", cu::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING))?;
            if let Err(e) = check("cuEventRecord", cu::event::record(event, lane.stream)) {
                let _ = cu::event::destroy(event);
                // The copy may be running: wait for the stream before giving up the slot.
                let _ = cu::stream::synchronize(lane.stream);
                return Err(e.into());
            }
            Ok(InFlight { event })
        }
    }

    fn wait(&self, copy: InFlight) -> io::Result<()> {
        // SAFETY: the event was created by `copy` and is destroyed once, here.
        unsafe {
            let waited = check("cuEventSynchronize", cu::event::synchronize(copy.event));
            let _ = cu::event::destroy(copy.event);
            Ok(waited?)
        }
    }

    fn close(&self, lane: Lane) -> io::Result<()> {
        // SAFETY: every copy on the stream was waited for; destroyed once.
        unsafe { Ok(check("cuStreamDestroy", cu::stream::destroy(lane.stream))?) }
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
    }
}

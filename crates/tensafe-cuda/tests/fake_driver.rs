//! `DeviceSink` against a fake CUDA driver (`fake_driver/libcuda.c`), on
//! machines without a GPU: the test builds the fake with the C compiler and
//! runs itself again in a child process whose library path finds it first.
//! The fake runs a copy only when something synchronizes with it, so a slot
//! rewritten before its copy was waited for, or copies not ordered after the
//! caller's stream, give wrong bytes here. On a GPU machine the real driver
//! is `python/tests/test_cuda.py`'s.

use std::ffi::{CStr, c_char, c_long};
use std::io;
use std::path::Path;
use std::process::Command;

use tensafe_cuda::DeviceSink;
use tensafe_io::staging::{self, Chunk};

const CHILD: &str = "TENSAFE_FAKE_CUDA_CHILD";

#[test]
fn device_sink_against_a_fake_driver() {
    if std::env::var_os(CHILD).is_some() {
        return in_child();
    }
    let dir = tempfile::tempdir().unwrap();
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake_driver/libcuda.c");
    let library = dir.path().join("libcuda.so");
    let compiler = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let built = Command::new(&compiler).args(["-shared", "-fPIC", "-O1", "-o"]).arg(&library).arg(&source).arg("-lpthread").status();
    assert!(built.is_ok_and(|s| s.success()), "building the fake driver with {compiler} failed");
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "device_sink_against_a_fake_driver", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .env("LD_LIBRARY_PATH", library_path(dir.path()))
        .output()
        .unwrap();
    let output = format!("{}{}", String::from_utf8_lossy(&child.stdout), String::from_utf8_lossy(&child.stderr));
    assert!(child.status.success(), "the child failed:\n{output}");
    assert!(output.contains("fake driver: all checks passed"), "the child did not run the checks:\n{output}");
}

/// `dir` first, then the library path this process was given.
fn library_path(dir: &Path) -> std::ffi::OsString {
    let mut path = dir.as_os_str().to_owned();
    if let Some(inherited) = std::env::var_os("LD_LIBRARY_PATH") {
        path.push(":");
        path.push(inherited);
    }
    path
}

/// Device memory (2) or pinned host memory (1), as the fake registers it.
const DEVICE: i32 = 2;
const PINNED_HOST: i32 = 1;

/// The fake's test hooks, from the library the sink also loaded.
struct Fake {
    library: libloading::Library,
}

impl Fake {
    fn load() -> Fake {
        // SAFETY: the fake has no initialisers; same handle as cudarc's.
        Fake { library: unsafe { libloading::Library::new("libcuda.so") }.expect("the fake driver on the library path") }
    }

    fn register(&self, memory: &[u8], memory_type: i32) {
        // SAFETY: the hook's C signature.
        unsafe { self.library.get::<unsafe extern "C" fn(u64, usize, i32)>(b"fake_register").unwrap()(memory.as_ptr() as u64, memory.len(), memory_type) }
    }

    fn counter(&self, name: &CStr) -> i64 {
        // SAFETY: the hook's C signature.
        unsafe { self.library.get::<unsafe extern "C" fn(*const c_char) -> c_long>(b"fake_counter").unwrap()(name.as_ptr()) }
    }

    /// Makes the call after `after` more calls of `call` fail.
    fn fail(&self, call: &CStr, after: i64) {
        // SAFETY: the hook's C signature.
        unsafe { self.library.get::<unsafe extern "C" fn(*const c_char, c_long)>(b"fake_fail_call").unwrap()(call.as_ptr(), after as c_long) }
    }

    fn stop_failing(&self) {
        self.fail(c"", -1);
    }

    /// Queues a copy of `src` into `dst` on the legacy stream (the caller's
    /// earlier work), run only when that stream is synchronized.
    fn queue_on_legacy(&self, dst: &[u8], src: &[u8]) {
        type Push = unsafe extern "C" fn(*mut std::ffi::c_void) -> i32;
        type Pop = unsafe extern "C" fn(*mut *mut std::ffi::c_void) -> i32;
        type Retain = unsafe extern "C" fn(*mut *mut std::ffi::c_void, i32) -> i32;
        type Copy = unsafe extern "C" fn(u64, *const u8, usize, *mut std::ffi::c_void) -> i32;
        // SAFETY: the driver API's C signatures.
        unsafe {
            let mut context = std::ptr::null_mut();
            assert_eq!(self.library.get::<Retain>(b"cuDevicePrimaryCtxRetain").unwrap()(&mut context, 0), 0);
            assert_eq!(self.library.get::<Push>(b"cuCtxPushCurrent_v2").unwrap()(context), 0);
            assert_eq!(self.library.get::<Copy>(b"cuMemcpyHtoDAsync_v2").unwrap()(dst.as_ptr() as u64, src.as_ptr(), src.len(), std::ptr::null_mut()), 0);
            assert_eq!(self.library.get::<Pop>(b"cuCtxPopCurrent_v2").unwrap()(&mut std::ptr::null_mut()), 0);
            self.library.get::<unsafe extern "C" fn(i32) -> i32>(b"cuDevicePrimaryCtxRelease_v2").unwrap()(0);
        }
    }

    /// Nothing left running or held: no call without a context, no stream
    /// destroyed busy, no queued work, no retained context, stream or event.
    fn assert_released(&self, when: &str) {
        for counter in [c"no_context", c"busy_destroys", c"pending", c"retained", c"streams", c"events"] {
            assert_eq!(self.counter(counter), 0, "{counter:?} {when}");
        }
    }

    fn sync_legacy(&self) {
        // SAFETY: the hook's C signature.
        unsafe { self.library.get::<unsafe extern "C" fn()>(b"fake_sync_legacy").unwrap()() }
    }
}

fn source(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 13 + i / 509) as u8).collect()
}

/// Stages `src` into `device` through a sink on it: 3 readers, 5 slots of 1000 bytes.
fn load(device: &mut [u8], src: &[u8]) -> io::Result<staging::Report> {
    let chunks: Vec<Chunk> = (0..src.len()).step_by(1000).map(|offset| Chunk { offset, len: 1000.min(src.len() - offset), place: 0 }).collect();
    let mut slots = vec![vec![0u8; 1000]; 5];
    // SAFETY: `device` is registered with the fake and outlives the sink.
    let sink = unsafe { DeviceSink::new(0, device.as_mut_ptr() as u64, device.len(), 0) }?;
    let read = |chunk: &Chunk, dst: &mut [u8]| {
        dst.copy_from_slice(&src[chunk.offset..chunk.offset + chunk.len]);
        Ok(0)
    };
    staging::stage(&chunks, slots.iter_mut().map(|s| s.as_mut_slice()).collect(), 3, &sink, read, |_| Ok(()))
}

fn in_child() {
    let fake = Fake::load();
    let src = source(100_003);
    let mut device = vec![0u8; src.len()];
    fake.register(&device, DEVICE);

    // The caller's stream holds a copy of junk into the destination, queued
    // before the load: the load's copies must come after it.
    let junk = vec![0xEEu8; src.len()];
    fake.queue_on_legacy(&device, &junk);
    let report = load(&mut device, &src).expect("a load through the fake driver");
    fake.sync_legacy();
    assert_eq!(report.chunks, 101);
    assert!(device == src, "wrong bytes on the device: {} differ", device.iter().zip(&src).filter(|(a, b)| a != b).count());
    assert_eq!(fake.counter(c"copies_run"), 102, "101 chunks and the caller's copy");
    fake.assert_released("after a load");

    // A copy refused halfway: the error names the call, and nothing is left
    // running or held.
    device.fill(0);
    fake.fail(c"cuMemcpyHtoDAsync_v2", 40);
    let error = load(&mut device, &src).expect_err("the 41st copy fails").to_string();
    assert!(error.contains("cuMemcpyHtoDAsync failed: CUDA_ERROR_INVALID_VALUE"), "{error}");
    fake.fail(c"cuEventRecord", 10);
    let error = load(&mut device, &src).expect_err("the 11th record fails").to_string();
    assert!(error.contains("cuEventRecord failed: CUDA_ERROR_INVALID_HANDLE"), "{error}");
    fake.stop_failing();
    fake.assert_released("after failed loads");

    // A destination that is not device memory is refused before any copy.
    let stranger = [0u8; 10];
    // SAFETY: refused before it is written to.
    let refused = unsafe { DeviceSink::new(0, stranger.as_ptr() as u64, 10, 0) }.err().expect("an unregistered pointer");
    assert!(refused.to_string().contains("is not memory of CUDA device 0"), "{refused}");
    let pinned = vec![0u8; 4096];
    fake.register(&pinned, PINNED_HOST);
    // SAFETY: as above.
    let refused = unsafe { DeviceSink::new(0, pinned.as_ptr() as u64, 4096, 0) }.err().expect("pinned host memory");
    assert!(refused.to_string().contains("is not memory of CUDA device 0"), "{refused}");
    // A destination shorter than the data: refused before any copy.
    let copies_before = fake.counter(c"copies_run");
    let error = load(&mut device[..50_000], &src).expect_err("a short destination").to_string();
    assert!(error.contains("is outside the 50000-byte destination"), "{error}");
    assert_eq!(fake.counter(c"copies_run"), copies_before, "no copy before the refusal");
    // SAFETY: as above.
    let refused = unsafe { DeviceSink::new(1, device.as_ptr() as u64, 10, 0) }.err().expect("no second device");
    assert!(refused.to_string().contains("cuDeviceGet failed: CUDA_ERROR_INVALID_DEVICE"), "{refused}");
    assert_eq!(fake.counter(c"retained"), 0, "refused sinks release the context");
    assert_eq!(fake.counter(c"events"), 0, "refused sinks destroy their event");
    println!("fake driver: all checks passed");
}

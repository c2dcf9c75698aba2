//! What a save leaves on disk when it does not complete, and which file mode
//! and which file it ends up with when it does.
//!
//! * A writer killed mid-save (SIGKILL, so no destructor runs) leaves the old
//!   file under the target name, byte for byte, or no file if there was none,
//!   and (on Linux, where it writes a file with no name) nothing else.
//!   The killing is real: the test binary re-executes itself as a child
//!   process (see [`child_process`]) that saves a slow, large tensor, and the
//!   parent kills it once the temporary file has data in it.
//! * A save that fails with an error, before or during writing, leaves no
//!   temporary file behind.
//! * The cleanup a signal handler runs removes the staged temporary files,
//!   and a commit after it renames nothing (it waits for the process to end).
//! * A new file's mode is `0o666` minus the umask; a replaced file keeps its
//!   permission bits (not setuid, setgid or sticky); a symbolic link is kept
//!   and the file it names is replaced.
//! * A name of the longest length (255 bytes) can be saved to, although the
//!   temporary file beside it has a longer name.

#![cfg(unix)]

use std::borrow::Cow;
use std::ffi::OsString;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tensafe::{Dtype, RawTensor, SafeTensors, View};

/// Names the job of a child process; unset in the parent.
const CHILD_JOB: &str = "TENSAFE_CRASH_SAFETY_JOB";
/// The file the child saves to.
const CHILD_PATH: &str = "TENSAFE_CRASH_SAFETY_PATH";

/// Child job: save [`SLOW_TENSORS`] slow tensors, to be killed half-way.
const JOB_SLOW_SAVE: &str = "slow-save";
/// Child job: a sharded save of [`SLOW_TENSORS`] slow tensors into the
/// directory at the path, 4 of them a shard, to be killed half-way.
const JOB_SLOW_SHARDED_SAVE: &str = "slow-sharded-save";
/// Child job: save under a file-size limit, so that writing fails with EFBIG.
const JOB_SIZE_LIMITED_SAVE: &str = "size-limited-save";
/// Child job: save new files under various umasks (the umask is per process,
/// so changing it among the parallel tests would be a race).
const JOB_UMASK_MODES: &str = "umask-modes";

/// Child job: save (twice, so once replacing) to names of the longest length
/// a file name may have, in the path's directory.
const JOB_LONGEST_NAMES: &str = "longest-names";

/// Child job: stage two files beside the path, run the signal cleanup
/// ([`tensafe::remove_unfinished_files`]), then commit on another thread.
const JOB_CLEANUP_THEN_COMMIT: &str = "cleanup-then-commit";

/// Bytes in one slow tensor.
const CHUNK: usize = 1 << 20;
/// Number of slow tensors: 1 GiB in all, far more than gets written.
const SLOW_TENSORS: usize = 1024;
/// How long the slow tensor takes to hand over its bytes (20 s for them all).
const SLOW_DELAY: Duration = Duration::from_millis(20);

static ZEROS: [u8; CHUNK] = [0; CHUNK];

/// A 1 MiB tensor of zeros that takes [`SLOW_DELAY`] to produce its bytes.
struct SlowZeros;

impl View for SlowZeros {
    fn dtype(&self) -> Dtype {
        Dtype::U8
    }
    fn shape(&self) -> &[usize] {
        &[CHUNK]
    }
    fn data(&self) -> Cow<'_, [u8]> {
        std::thread::sleep(SLOW_DELAY);
        Cow::Borrowed(&ZEROS)
    }
    fn data_len(&self) -> usize {
        CHUNK
    }
}

/// The entry point of child processes: does the job named in [`CHILD_JOB`],
/// and nothing when run as an ordinary (ignored) test.
#[test]
#[ignore = "helper: the other tests run it in a child process"]
fn child_process() {
    let (Some(job), Some(path)) = (std::env::var_os(CHILD_JOB), std::env::var_os(CHILD_PATH)) else {
        return;
    };
    let path = PathBuf::from(path);
    match job.to_str() {
        Some(JOB_SLOW_SAVE) => {
            let tensors = (0..SLOW_TENSORS).map(|i| (format!("t{i:04}"), SlowZeros));
            tensafe::serialize_to_file(tensors, None, &path).expect("the slow save itself works");
            panic!("the slow save finished before it was killed");
        }
        Some(JOB_SLOW_SHARDED_SAVE) => {
            let tensors = (0..SLOW_TENSORS).map(|i| (format!("t{i:04}"), SlowZeros));
            tensafe::save_sharded(tensors, &path, 4 * CHUNK as u64, None).expect("the slow save itself works");
            panic!("the slow save finished before it was killed");
        }
        Some(JOB_SIZE_LIMITED_SAVE) => {
            let dir = path.parent().expect("the path has a directory");
            let before = listing(dir);
            // SAFETY: plain libc calls with valid arguments, in a child process
            // whose only job is this save.
            unsafe {
                assert_ne!(libc::signal(libc::SIGXFSZ, libc::SIG_IGN), libc::SIG_ERR);
                let limit = libc::rlimit { rlim_cur: 64 * 1024, rlim_max: libc::RLIM_INFINITY };
                assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
            }
            let data = vec![7u8; CHUNK];
            let tensor = RawTensor { dtype: Dtype::U8, shape: &[CHUNK], data: &data };
            let err = tensafe::serialize_to_file([("big", tensor)], None, &path)
                .expect_err("the file size limit makes the save fail");
            let message = err.to_string();
            eprintln!("the save failed as expected: {message}");
            assert!(message.contains("File too large") && message.contains("writing"), "{message}");
            assert_eq!(listing(dir), before, "the failed save left files behind");
        }
        Some(JOB_UMASK_MODES) => {
            for mask in [0o022, 0o027, 0o077, 0o002, 0o000, 0o266] {
                let new_path = path.with_file_name(format!("umask-{mask:03o}.safetensors"));
                // SAFETY: umask cannot fail, and this process runs no other test.
                unsafe { libc::umask(mask) };
                save_small(&new_path, "w", 1).unwrap();
                #[allow(clippy::useless_conversion, reason = "mode_t is narrower than u32 on some systems")]
                let expected = u32::from(0o666 & !mask);
                assert_eq!(mode(&new_path), expected, "umask {mask:03o}");
            }
        }
        Some(JOB_LONGEST_NAMES) => {
            let dir = path.parent().expect("the path has a directory");
            // 255 bytes each: ASCII, and two-byte characters after one ASCII.
            let names = ["n".repeat(251) + ".bin", "x".to_owned() + &"é".repeat(127)];
            for name in &names {
                assert_eq!(name.len(), 255);
                for fill in [1, 2] {
                    save_small(&dir.join(name), "w", fill).unwrap_or_else(|e| panic!("saving to a {}-byte name: {e}", name.len()));
                }
                let saved = fs::read(dir.join(name)).unwrap();
                assert_eq!(SafeTensors::deserialize(&saved).unwrap().tensor("w").unwrap().data(), [2; 4]);
            }
            let mut expected: Vec<OsString> = names.iter().map(OsString::from).collect();
            expected.sort();
            assert_eq!(listing(dir), expected);
        }
        #[cfg(target_os = "linux")]
        Some(JOB_CLEANUP_THEN_COMMIT) => {
            let dir = path.parent().expect("the path has a directory");
            let mut staged = tensafe::StagedWrites::default();
            for name in ["a.safetensors", "b.safetensors"] {
                staged.write(&dir.join(name), |out| out.write_all(b"new")).unwrap();
            }
            // Named temporary files are listed and removed; unnamed ones
            // have no name to remove (they end with the process).
            let named = std::env::var_os(tensafe::NAMED_TEMP_FILES_ENV).is_some() || !has_unnamed_files(dir);
            assert_eq!(tensafe::remove_unfinished_files(), if named { 2 } else { 0 });
            assert!(listing(dir).is_empty(), "the cleanup left {:?}", listing(dir));
            // A commit after the cleanup waits for good: the process is
            // about to end on its signal, and must not rename anything.
            let (committed, heard) = std::sync::mpsc::channel();
            std::thread::spawn(move || committed.send(staged.commit().is_ok()));
            let outcome = heard.recv_timeout(Duration::from_millis(500));
            assert!(outcome.is_err(), "the commit after the cleanup went on: {outcome:?}");
            assert!(listing(dir).is_empty(), "the commit after the cleanup renamed {:?}", listing(dir));
            eprintln!("the commit waited");
        }
        other => panic!("unknown child job {other:?}"),
    }
}

/// Starts this test binary again, running only [`child_process`] with `job`.
fn spawn_child(job: &str, path: &Path) -> Child {
    spawn_child_with(job, path, false)
}

/// [`spawn_child`]; with `named`, the child writes named temporary files
/// only, as on filesystems without `O_TMPFILE` ([`tensafe::NAMED_TEMP_FILES_ENV`]).
fn spawn_child_with(job: &str, path: &Path, named: bool) -> Child {
    let mut command = Command::new(std::env::current_exe().expect("the test binary's path"));
    if named {
        command.env(tensafe::NAMED_TEMP_FILES_ENV, "1");
    }
    command
        .args(["child_process", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_JOB, job)
        .env(CHILD_PATH, path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the child process")
}

/// Runs [`child_process`] with `job` to completion; asserts that it passed.
fn run_child(job: &str, path: &Path) -> Output {
    run_child_with(job, path, false)
}

/// [`run_child`], with `named` as [`spawn_child_with`]'s.
fn run_child_with(job: &str, path: &Path, named: bool) -> Output {
    let output = spawn_child_with(job, path, named).wait_with_output().expect("waiting for the child");
    assert!(output.status.success(), "{}", describe(&output));
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("1 passed"),
        "the child did not run:\n{}",
        describe(&output)
    );
    output
}

/// The child's output, for failure messages.
fn describe(output: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<OsString> {
    let mut names: Vec<_> =
        fs::read_dir(dir).expect("listing the directory").map(|e| e.expect("a directory entry").file_name()).collect();
    names.sort();
    names
}

/// The sizes of the files with no name that process `pid` has open in
/// `dir`: those a save writes, and stages, before naming them.
#[cfg(target_os = "linux")]
fn unnamed_files(pid: u32, dir: &Path) -> Vec<u64> {
    let dir = dir.canonicalize().expect("the directory exists");
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else { return Vec::new() };
    fds.flatten()
        .filter_map(|fd| {
            let target = fs::read_link(fd.path()).ok()?;
            // An O_TMPFILE file shows as `DIR/#INODE (deleted)`.
            let unnamed = target.parent() == Some(&dir) && target.to_string_lossy().ends_with(" (deleted)");
            unnamed.then(|| fs::metadata(fd.path()).ok()).flatten().map(|m| m.len())
        })
        .collect()
}

/// A temporary directory whose filesystem makes files with no name; `None`
/// (the test is skipped) where it cannot.
#[cfg(target_os = "linux")]
fn dir_with_unnamed_files() -> Option<tempfile::TempDir> {
    let dir = tempfile::tempdir().unwrap();
    has_unnamed_files(dir.path()).then_some(dir)
}

/// Whether `dir`'s filesystem can make files with no name (`O_TMPFILE`;
/// NFS and older overlayfs cannot, and saves then write named files).
#[cfg(target_os = "linux")]
fn has_unnamed_files(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let dir = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
    // SAFETY: open(2) with a valid C string; the descriptor is closed at once.
    let fd = unsafe { libc::open(dir.as_ptr(), libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC, 0o600 as libc::c_uint) };
    if fd < 0 {
        eprintln!("SKIPPED: {} has no O_TMPFILE", dir.to_string_lossy());
        return false;
    }
    // SAFETY: closing the descriptor just opened.
    unsafe { libc::close(fd) };
    true
}

/// A small valid file to be replaced.
fn old_file_bytes() -> Vec<u8> {
    let data: Vec<u8> = (0..24).collect();
    let mut metadata = tensafe::Metadata::new();
    metadata.insert("version".into(), "old".into());
    tensafe::serialize([("old", RawTensor { dtype: Dtype::F32, shape: &[2, 3], data: &data })], Some(&metadata))
        .unwrap()
}

/// Asserts `path` holds exactly `expected`, which parses as the old file.
fn assert_old_file(path: &Path, expected: &[u8]) {
    let bytes = fs::read(path).expect("the old file is still there");
    assert!(
        bytes == expected,
        "the file under the target name changed ({} bytes, was {})",
        bytes.len(),
        expected.len()
    );
    let file = SafeTensors::deserialize(&bytes).expect("the old file still parses");
    assert_eq!(file.tensor("old").unwrap().shape(), [2, 3]);
}

/// A file holding one small `U8` tensor named `name` filled with `fill`.
fn save_small(path: &Path, name: &str, fill: u8) -> tensafe::Result<()> {
    let data = [fill; 4];
    tensafe::serialize_to_file([(name, RawTensor { dtype: Dtype::U8, shape: &[4], data: &data })], None, path)
}

/// Starts the slow save `job` to `path`, waits until it has `files` files
/// with no name in `dir`, the last of them with data, and SIGKILLs it.
#[cfg(target_os = "linux")]
fn kill_mid_save(job: &str, path: &Path, dir: &Path, files: usize) {
    let written = kill_once(spawn_child(job, path), |pid| {
        let unnamed = unnamed_files(pid, dir);
        (unnamed.len() >= files && unnamed.iter().all(|&n| n > 0)).then(|| unnamed.iter().sum::<u64>())
    });
    assert!(written < (SLOW_TENSORS * CHUNK) as u64, "{written} bytes written");
}

/// SIGKILLs `child` as soon as `ready(its pid)` gives something (checked
/// every 2 ms, for up to a minute), and returns that; asserts that the
/// child was killed, not ended on its own.
fn kill_once<T>(mut child: Child, mut ready: impl FnMut(u32) -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    let seen = loop {
        if let Some(seen) = ready(child.id()) {
            break seen;
        }
        if child.try_wait().expect("polling the child").is_some() || Instant::now() > deadline {
            let _ = child.kill();
            panic!("the child never started writing:\n{}", describe(&child.wait_with_output().unwrap()));
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    child.kill().expect("killing the child");
    let output = child.wait_with_output().expect("waiting for the child");
    assert_eq!(
        output.status.signal(),
        Some(libc::SIGKILL),
        "the child was not killed mid-save:\n{}",
        describe(&output)
    );
    seen
}

#[test]
#[cfg(target_os = "linux")]
fn killed_writer_leaves_the_old_file_intact_and_nothing_else() {
    let Some(dir) = dir_with_unnamed_files() else { return };
    let path = dir.path().join("model.safetensors");
    let old = old_file_bytes();
    fs::write(&path, &old).unwrap();

    kill_mid_save(JOB_SLOW_SAVE, &path, dir.path(), 1);
    assert_old_file(&path, &old);
    // What was written had no name: it went with the process.
    assert_eq!(listing(dir.path()), ["model.safetensors"]);
}

#[test]
#[cfg(target_os = "linux")]
fn killed_first_save_leaves_no_file() {
    let Some(dir) = dir_with_unnamed_files() else { return };
    let path = dir.path().join("new.safetensors");
    kill_mid_save(JOB_SLOW_SAVE, &path, dir.path(), 1);
    assert!(listing(dir.path()).is_empty(), "a killed first save left {:?}", listing(dir.path()));
}

#[test]
#[cfg(target_os = "linux")]
fn killed_sharded_save_leaves_the_old_checkpoint_and_nothing_else() {
    let Some(dir) = dir_with_unnamed_files() else { return };
    let old = old_file_bytes();
    fs::write(dir.path().join("model.safetensors"), &old).unwrap();
    // Two shards written and staged, a third being written.
    kill_mid_save(JOB_SLOW_SHARDED_SAVE, dir.path(), dir.path(), 3);
    assert_old_file(&dir.path().join("model.safetensors"), &old);
    assert_eq!(listing(dir.path()), ["model.safetensors"]);
}

#[test]
#[cfg(target_os = "linux")]
fn the_signal_cleanup_removes_staged_files_and_stops_later_commits() {
    for named in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let output = run_child_with(JOB_CLEANUP_THEN_COMMIT, &dir.path().join("x"), named);
        assert!(String::from_utf8_lossy(&output.stderr).contains("the commit waited"), "{}", describe(&output));
        // The process ended with its commit waiting: nothing in place, nothing left.
        assert!(listing(dir.path()).is_empty(), "named: {named}: left {:?}", listing(dir.path()));
    }
}

#[test]
fn files_staged_past_the_unnamed_limit_are_named_and_all_move_into_place() {
    let dir = tempfile::tempdir().unwrap();
    let count = tensafe::MAX_UNNAMED_STAGED_FILES + 3;
    let mut staged = tensafe::StagedWrites::default();
    for i in 0..count {
        staged.write(&dir.path().join(format!("f{i}")), |out| out.write_all(&[i as u8; 3])).unwrap();
    }
    // On Linux only the files past the limit have (temporary) names yet
    // (the limit is lower where the process may open few descriptors).
    #[cfg(target_os = "linux")]
    let named = if has_unnamed_files(dir.path()) {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit fills the struct it is given.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) }, 0);
        count - (limit.rlim_cur as usize / 16).min(tensafe::MAX_UNNAMED_STAGED_FILES)
    } else {
        count
    };
    #[cfg(not(target_os = "linux"))]
    let named = count;
    assert_eq!(listing(dir.path()).len(), named, "{:?}", listing(dir.path()));
    staged.commit().unwrap();
    let mut expected: Vec<OsString> = (0..count).map(|i| OsString::from(format!("f{i}"))).collect();
    expected.sort();
    assert_eq!(listing(dir.path()), expected);
    for i in 0..count {
        assert_eq!(fs::read(dir.path().join(format!("f{i}"))).unwrap(), [i as u8; 3]);
    }
    // Dropped before its commit: nothing stays, named or not.
    let mut dropped = tensafe::StagedWrites::default();
    for i in 0..count {
        dropped.write(&dir.path().join(format!("g{i}")), |out| out.write_all(b"x")).unwrap();
    }
    drop(dropped);
    assert_eq!(listing(dir.path()), expected);
}

#[test]
fn invalid_tensors_fail_before_touching_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let old = old_file_bytes();
    fs::write(&path, &old).unwrap();

    // 4 bytes for two F32 values.
    let short = [0u8; 4];
    let err =
        tensafe::serialize_to_file([("w", RawTensor { dtype: Dtype::F32, shape: &[2], data: &short })], None, &path)
            .expect_err("data_len disagrees with the shape");
    assert!(err.to_string().contains("takes 8 bytes but data_offsets span 4"), "{err}");

    // A name the writer refuses, and a bad option.
    let err = save_small(&path, "__metadata__", 1).expect_err("the reserved name");
    assert!(err.to_string().contains("reserved for the metadata map"), "{err}");
    let options = tensafe::WriteOptions { data_alignment: 12, ..Default::default() };
    let data = [0u8; 4];
    let tensors = [("w", RawTensor { dtype: Dtype::U8, shape: &[4], data: &data })];
    assert!(tensafe::serialize_to_file_with(tensors, None, &path, &options).is_err());

    assert_old_file(&path, &old);
    assert_eq!(listing(dir.path()), ["model.safetensors"]);
}

/// A `View` whose `data()` is shorter than the `data_len()` it announced.
struct ShortData;

impl View for ShortData {
    fn dtype(&self) -> Dtype {
        Dtype::U8
    }
    fn shape(&self) -> &[usize] {
        &[8]
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&[1, 2, 3])
    }
    fn data_len(&self) -> usize {
        8
    }
}

#[test]
fn view_whose_data_disagrees_with_data_len_fails_the_save() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let old = old_file_bytes();
    fs::write(&path, &old).unwrap();

    let result = tensafe::serialize_to_file([("w", ShortData)], None, &path);
    assert!(result.is_err(), "a save with 3 of the 8 announced bytes succeeded");
    assert_old_file(&path, &old);
    assert_eq!(listing(dir.path()), ["model.safetensors"]);
}

#[test]
fn missing_directory_is_an_error_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing").join("model.safetensors");
    let err = save_small(&path, "w", 1).expect_err("the directory does not exist");
    let message = err.to_string();
    assert!(message.contains("model.safetensors") && message.contains("creating a temporary file"), "{message}");
    // The OS's words, as the reference shows them; not tempfile's random path.
    assert!(message.contains("No such file or directory (os error 2)"), "{message}");
    assert!(!message.contains("at path"), "{message}");
    assert!(listing(dir.path()).is_empty(), "{:?}", listing(dir.path()));
}

#[test]
fn a_destination_that_is_not_a_regular_file_is_refused_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    let c_fifo = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo with a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o644) }, 0);
    let directory = dir.path().join("directory");
    fs::create_dir(&directory).unwrap();
    let link = dir.path().join("link.safetensors");
    std::os::unix::fs::symlink("fifo", &link).unwrap();

    for (path, what) in [(&fifo, "a FIFO"), (&directory, "a directory")] {
        let message = save_small(path, "w", 1).expect_err("not a regular file").to_string();
        assert!(message.contains(what) && message.contains("which a save does not replace"), "{message}");
    }
    // A link to one is replaced like any link, what it names left alone.
    save_small(&link, "w", 1).unwrap();
    assert!(fs::symlink_metadata(&link).unwrap().is_file());
    use std::os::unix::fs::FileTypeExt;
    assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo(), "the FIFO was replaced");
    assert!(fs::symlink_metadata(&directory).unwrap().is_dir());
    assert_eq!(listing(dir.path()), ["directory", "fifo", "link.safetensors"]);
}

#[test]
fn failed_write_removes_its_temporary_file() {
    // Unnamed temporary files (Linux) have nothing to remove; named ones, as
    // on filesystems without O_TMPFILE, must be removed.
    for named in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let old = old_file_bytes();
        fs::write(&path, &old).unwrap();

        // The child checks the directory itself right after the error, then exits.
        run_child_with(JOB_SIZE_LIMITED_SAVE, &path, named);

        assert_old_file(&path, &old);
        assert_eq!(listing(dir.path()), ["model.safetensors"], "named temporary files: {named}");
    }
}

#[test]
fn killed_writer_with_named_temporary_files_leaves_the_old_file_intact() {
    // Where there is no O_TMPFILE (or it is turned off, as here), the part
    // written so far stays under a hidden temporary name: the old file is
    // never touched.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let old = old_file_bytes();
    fs::write(&path, &old).unwrap();
    let temporary = || listing(dir.path()).into_iter().filter(|name| name != "model.safetensors").collect::<Vec<_>>();

    let started = |_| temporary().iter().any(|name| fs::metadata(dir.path().join(name)).is_ok_and(|m| m.len() > 0)).then_some(());
    kill_once(spawn_child_with(JOB_SLOW_SAVE, &path, true), started);
    assert_old_file(&path, &old);
    let left = temporary();
    assert!(
        left.len() == 1 && left[0].to_string_lossy().starts_with(".model.safetensors.") && left[0].to_string_lossy().ends_with(".tmp"),
        "{left:?}"
    );
}

/// Permission bits of `path`.
fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn new_file_mode_follows_the_umask() {
    let dir = tempfile::tempdir().unwrap();
    run_child(JOB_UMASK_MODES, &dir.path().join("unused"));
    assert_eq!(listing(dir.path()).len(), 6, "{:?}", listing(dir.path()));
}

#[test]
fn names_of_the_longest_length_can_be_saved_to() {
    // The temporary file beside the destination has a longer name than it.
    for named in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        run_child_with(JOB_LONGEST_NAMES, &dir.path().join("unused"), named);
    }
}

#[test]
fn replacing_a_file_keeps_its_mode() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    for kept in [0o640, 0o600, 0o755, 0o444] {
        save_small(&path, "w", 1).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(kept)).unwrap();
        let mut old_handle = fs::File::open(&path).unwrap();
        let old_inode = fs::metadata(&path).unwrap().ino();

        save_small(&path, "w", 2).unwrap();
        assert_eq!(mode(&path), kept, "mode {kept:o} not kept");
        // Replaced by a new inode: a reader of the old file still sees it whole.
        assert_ne!(fs::metadata(&path).unwrap().ino(), old_inode);
        let mut old = Vec::new();
        old_handle.read_to_end(&mut old).unwrap();
        assert_eq!(SafeTensors::deserialize(&old).unwrap().tensor("w").unwrap().data(), [1; 4]);
        let new = fs::read(&path).unwrap();
        assert_eq!(SafeTensors::deserialize(&new).unwrap().tensor("w").unwrap().data(), [2; 4]);
        assert_eq!(listing(dir.path()), ["model.safetensors"]);
    }
    // Of a setuid, setgid or sticky file, the permission bits only.
    fs::set_permissions(&path, fs::Permissions::from_mode(0o7755)).unwrap();
    save_small(&path, "w", 3).unwrap();
    assert_eq!(mode(&path), 0o755);
}

#[test]
fn a_symlinked_destination_is_replaced_and_what_it_names_kept() {
    // The Hugging Face cache's layout: a snapshot's files link to blobs that
    // several revisions share.
    let dir = tempfile::tempdir().unwrap();
    let blobs = dir.path().join("blobs");
    let snapshot = dir.path().join("snapshot");
    fs::create_dir_all(&blobs).unwrap();
    fs::create_dir_all(&snapshot).unwrap();
    let blob = blobs.join("sha-old");
    save_small(&blob, "w", 1).unwrap();
    fs::set_permissions(&blob, fs::Permissions::from_mode(0o444)).unwrap();

    // snapshot/b -> snapshot/a -> ../blobs/sha-old, both relative.
    let a = snapshot.join("a.safetensors");
    let b = snapshot.join("b.safetensors");
    std::os::unix::fs::symlink("../blobs/sha-old", &a).unwrap();
    std::os::unix::fs::symlink("a.safetensors", &b).unwrap();
    let read = |path: &Path| SafeTensors::deserialize(&fs::read(path).unwrap()).unwrap().tensor("w").unwrap().data().to_vec();

    save_small(&b, "w", 2).unwrap();
    assert!(fs::symlink_metadata(&b).unwrap().is_file(), "the link was kept");
    assert_eq!(read(&b), [2; 4]);
    // The other link and the blob are as they were.
    assert_eq!(fs::read_link(&a).unwrap(), Path::new("../blobs/sha-old"));
    assert_eq!((read(&a), read(&blob), mode(&blob)), (vec![1; 4], vec![1; 4], 0o444));
    assert_eq!(listing(&blobs), ["sha-old"]);
    assert_eq!(listing(&snapshot), ["a.safetensors", "b.safetensors"]);

    // A dangling link: replaced, and the file it names not created.
    let dangling = snapshot.join("dangling.safetensors");
    std::os::unix::fs::symlink("../blobs/created", &dangling).unwrap();
    save_small(&dangling, "w", 4).unwrap();
    assert_eq!(read(&dangling), [4; 4]);
    assert_eq!(listing(&blobs), ["sha-old"]);
}

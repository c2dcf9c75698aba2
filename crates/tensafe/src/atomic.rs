//! Replacing a file atomically, or several together.
//!
//! The new content goes to a temporary file next to the destination, is flushed
//! to disk and renamed over it. A crash or an error at any point leaves the old
//! file (or no file) under the destination name, never a half-written one;
//! on error the temporary file is removed. Readers that still have the old
//! file mapped keep their pages: the old inode is not truncated.
//!
//! [`StagedWrites`] does the same for the files of a sharded checkpoint:
//! every file is written and flushed before the first rename, so an error
//! while writing (a full disk, a bad input tensor) leaves every old file in
//! place, an in-place rewrite included.
//!
//! On Linux the new content is written to a file with no name (`O_TMPFILE`),
//! which is named (linked into the directory) only when it is moved into
//! place: a process killed while writing (SIGKILL, the OOM killer, a signal
//! it does not handle) leaves nothing behind, where named temporary files
//! would stay, as large as what was written. Past [`MAX_UNNAMED_STAGED_FILES`]
//! files staged at once (a descriptor each), the files get a temporary name
//! as soon as they are written; where the filesystem has no `O_TMPFILE`
//! (NFS, older overlayfs), from the start, as before. Where it has it but
//! refuses the link, the bytes are copied into a named file, under the lock
//! of the list below (a Ctrl-C waits for that copy). The environment
//! variable [`NAMED_TEMP_FILES_ENV`] (set to anything) makes a process use
//! named temporary files only: how the tests check that path on Linux.
//!
//! The temporary files of this process that are not yet in place are listed,
//! so that a program stopped by a signal can remove them first
//! ([`remove_unfinished_files`]): destructors do not run when a signal ends a
//! process, and a stopped multi-GB write would otherwise stay on disk.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex, MutexGuard};

use crate::error::{Error, Result};

/// Buffer for small writes; writes at least this large bypass it.
const WRITE_BUFFER: usize = 1 << 20;

/// Set (to anything), this environment variable makes the process write
/// named temporary files only, as on systems without `O_TMPFILE`: read once.
pub const NAMED_TEMP_FILES_ENV: &str = "TENSAFE_NAMED_TEMP_FILES";

/// Writes a file through `write` and moves it into place at `path`.
///
/// The new file gets the permission bits of the file it replaces (not its
/// setuid, setgid or sticky bits), or `0o666` minus the
/// process umask when there is none, like any newly created file. When `path`
/// is a symbolic link, the link itself is replaced and what it names is left
/// as it was (as the reference and huggingface_hub do): a save writes in the
/// destination's directory only, and a Hugging Face cache blob, which links
/// of several revisions share, is never rewritten through one of them.
pub fn write_atomically<F>(path: &Path, write: F) -> Result<()>
where
    F: FnOnce(&mut dyn Write) -> std::io::Result<()>,
{
    let mut staged = StagedWrites::default();
    staged.write(path, write)?;
    staged.commit()
}

/// Like [`write_atomically`], handing `write` the temporary [`File`] itself
/// (unbuffered, positioned at its start) so that it can use file-to-file
/// copies such as `copy_file_range` (`std::io::copy` between files). What it
/// leaves in the file is synced and renamed into place the same way.
pub fn write_file_atomically<F>(path: &Path, write: F) -> Result<()>
where
    F: FnOnce(&mut File) -> std::io::Result<()>,
{
    let mut staged = StagedWrites::default();
    staged.write_file(path, write)?;
    staged.commit()
}

/// Files written now and moved into place together later, by
/// [`StagedWrites::commit`]: until then each is a flushed temporary file
/// beside its destination, and dropping the `StagedWrites` removes them all.
/// What is atomic is the writing: no destination changes before every file
/// is written. The commit is a sequence of renames, each atomic; should one
/// fail (or the machine stop) midway, the files before it are new and the
/// rest old, so callers rename what refers to the others (an index) last.
#[derive(Default)]
pub struct StagedWrites {
    /// Each written file, with the path it replaces (links resolved).
    files: Vec<(Staged, PathBuf)>,
}

/// Most files a [`StagedWrites`] keeps unnamed (each holds a descriptor),
/// and fewer where the process may open few descriptors (a sixteenth of its
/// limit); the later ones of a checkpoint of more shards are named once
/// written.
pub const MAX_UNNAMED_STAGED_FILES: usize = 64;

/// A written, flushed file waiting to be moved into place.
enum Staged {
    /// Still without a name, in `dir` (Linux); named (`prefix`…`.tmp`) by
    /// the commit, which renames it at once.
    #[cfg(target_os = "linux")]
    Unnamed { file: File, dir: PathBuf, prefix: String },
    /// A named temporary file (closed, so that a checkpoint of thousands of
    /// shards does not hold thousands of descriptors), listed as unfinished.
    Named(tempfile::TempPath, Unfinished),
}

/// The temporary files of this process not yet renamed into place.
static UNFINISHED: LazyLock<Mutex<HashSet<PathBuf>>> = LazyLock::new(Default::default);

fn unfinished() -> MutexGuard<'static, HashSet<PathBuf>> {
    UNFINISHED.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A temporary file's place in the list of unfinished files, for as long as
/// this value lives (or until [`Unfinished::finish`]).
struct Unfinished(PathBuf);

impl Unfinished {
    /// Puts `path` on the list through `list` (the list's lock, held by the
    /// caller since before the file got its name, so that no temporary file
    /// has a name unlisted).
    fn listed(list: &mut HashSet<PathBuf>, path: &Path) -> Unfinished {
        list.insert(path.to_owned());
        Unfinished(path.to_owned())
    }

    /// Takes the file off the list through `list` (the list's lock, held).
    fn finish(mut self, list: &mut HashSet<PathBuf>) {
        list.remove(&std::mem::take(&mut self.0));
    }
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if !self.0.as_os_str().is_empty() {
            unfinished().remove(&self.0);
        }
    }
}

/// Removes the temporary files of every write of this process that has not
/// finished (not yet renamed into place), and keeps any from being renamed
/// afterwards; returns how many it removed. For a program that is about to
/// end on a signal (Ctrl-C, `kill`), where no destructor would remove them:
/// the destinations keep their old files (all new ones, when a commit was
/// under way: it is let finish first), and no temporary file stays behind.
/// Writes still running go on (into deleted or unnamed files) and then wait
/// for good before naming or renaming one: the process must exit.
pub fn remove_unfinished_files() -> usize {
    let mut files = unfinished();
    let removed = files.iter().filter(|path| std::fs::remove_file(path).is_ok()).count();
    files.clear();
    // Held until the process ends: a commit that waits for the list renames nothing.
    std::mem::forget(files);
    removed
}

impl StagedWrites {
    /// Writes what will replace `path` through `write` (buffered).
    pub fn write<F>(&mut self, path: &Path, write: F) -> Result<()>
    where
        F: FnOnce(&mut dyn Write) -> std::io::Result<()>,
    {
        self.write_file(path, |file| {
            let mut out = BufWriter::with_capacity(WRITE_BUFFER, file);
            write(&mut out)?;
            out.flush()
        })
    }

    /// Writes what will replace `path` through `write`, which gets the
    /// temporary [`File`] itself, as [`write_file_atomically`] describes.
    pub fn write_file<F>(&mut self, path: &Path, write: F) -> Result<()>
    where
        F: FnOnce(&mut File) -> std::io::Result<()>,
    {
        let existing = existing_file(path);
        refuse_unless_regular(path, existing.as_ref())?;
        let target = path.to_path_buf();
        let dir = match target.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let file_name = target.file_name().ok_or_else(|| Error::Io {
            context: "the destination has no file name".into(),
            source: std::io::ErrorKind::InvalidInput.into(),
        })?;

        let mut builder = tempfile::Builder::new();
        let prefix = temp_prefix(file_name);
        builder.prefix(&prefix).suffix(".tmp");
        #[cfg(unix)]
        let existing_mode = {
            use std::os::unix::fs::PermissionsExt;
            // The permission bits only: a replaced setuid, setgid or sticky
            // file does not make the save's file one.
            let mode = existing.as_ref().map(|m| m.permissions().mode() & 0o777);
            // Created with 0o666 the kernel applies the umask, as for any new file.
            builder.permissions(std::fs::Permissions::from_mode(0o666));
            mode
        };
        #[cfg(not(unix))]
        let existing_mode = None;
        // Its directory made absolute, as the named path's is: the file is
        // named later, maybe after a chdir. (The destination itself stays as
        // given, relative to the working directory of the commit.)
        #[cfg(target_os = "linux")]
        if let Some((mut file, dir)) = std::path::absolute(&dir).ok().and_then(|dir| Some((unnamed::create_in(&dir)?, dir))) {
            write(&mut file).map_err(|e| Error::io("writing", e))?;
            finish_file(&file, existing_mode)?;
            let unnamed = self.files.iter().filter(|(staged, _)| matches!(staged, Staged::Unnamed { .. })).count();
            if unnamed < unnamed::limit() {
                self.files.push((Staged::Unnamed { file, dir, prefix }, target));
            } else {
                let mut list = unfinished();
                let temp = unnamed::name(&file, &dir, &prefix)?;
                let listed = Unfinished::listed(&mut list, &temp);
                drop(list);
                self.files.push((Staged::Named(temp, listed), target));
            }
            return Ok(());
        }
        // Declared first, `listed` is dropped after `temp`.
        let listed: Unfinished;
        let mut temp = {
            let mut list = unfinished();
            let temp = builder
                .tempfile_in(&dir)
                // tempfile names its random path in the error; report the directory instead.
                .map_err(|e| Error::io(format!("creating a temporary file in {}", dir.display()), without_path(e)))?;
            listed = Unfinished::listed(&mut list, temp.path());
            temp
        };

        write(temp.as_file_mut()).map_err(|e| Error::io("writing", e))?;
        finish_file(temp.as_file(), existing_mode)?;
        self.files.push((Staged::Named(temp.into_temp_path(), listed), target));
        Ok(())
    }

    /// Renames every file into place, in the order written, then makes the
    /// renames durable.
    pub fn commit(self) -> Result<()> {
        let mut dirs: Vec<PathBuf> = Vec::new();
        let mut files = self.files.into_iter();
        // Named files waiting for their rename (with their place in the
        // list, for those listed), and those a failure leaves over: dropped
        // only once the lock is free, since an `Unfinished` takes it.
        let mut named: Vec<(tempfile::TempPath, PathBuf, Option<Unfinished>)> = Vec::new();
        let mut left_over = Vec::new();
        let mut outcome = Ok(());
        {
            // Everything under one hold of the list's lock: a signal's
            // cleanup comes before or after, so the destination is all old
            // or all new. After the cleanup began, this waits for good.
            let mut list = unfinished();
            // First every file gets a name (the unnamed ones: never listed,
            // as they are renamed under this same hold), then the renames:
            // a file that cannot be named stops the commit before any
            // destination changes.
            for (staged, target) in files.by_ref() {
                match staged {
                    #[cfg(target_os = "linux")]
                    Staged::Unnamed { file, dir, prefix } => match unnamed::name(&file, &dir, &prefix) {
                        Ok(temp) => named.push((temp, target, None)),
                        Err(e) => {
                            outcome = Err(e.in_file(&target));
                            break;
                        }
                    },
                    Staged::Named(temp, listed) => named.push((temp, target, Some(listed))),
                }
            }
            if outcome.is_ok() {
                let mut renames = std::mem::take(&mut named).into_iter();
                for (temp, target, listed) in renames.by_ref() {
                    if let Some(listed) = listed {
                        listed.finish(&mut list);
                    }
                    if let Err(e) = temp.persist(&target) {
                        // Its temporary file goes with the error.
                        outcome = Err(Error::io("renaming the temporary file into place", e.error).in_file(&target));
                        break;
                    }
                    let dir = target.parent().filter(|p| !p.as_os_str().is_empty()).map_or_else(|| PathBuf::from("."), Path::to_path_buf);
                    if !dirs.contains(&dir) {
                        dirs.push(dir);
                    }
                }
                left_over.extend(renames);
            }
        }
        // The files not renamed (after a failure) are removed, and unlisted
        // with the lock free again.
        drop((files, named, left_over));
        outcome?;
        // Not every filesystem supports syncing a directory; the data is
        // already safe, so a failure here is not an error.
        #[cfg(unix)]
        for dir in dirs {
            if let Ok(dir) = File::open(&dir) {
                let _ = dir.sync_all();
            }
        }
        Ok(())
    }
}

/// The start of a temporary file's name beside `file_name`: `.`, the name,
/// `.`, cut short enough that the whole name (with tempfile's 6 random
/// letters and `.tmp`) stays within the 255 bytes a file name may have on
/// common filesystems, so that any name that can be saved to can be staged.
fn temp_prefix(file_name: &std::ffi::OsStr) -> String {
    const NAME_MAX: usize = 255;
    const ADDED: usize = ".".len() + ".".len() + 6 + ".tmp".len();
    let name = file_name.to_string_lossy();
    let mut end = name.len().min(NAME_MAX - ADDED);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!(".{}.", &name[..end])
}

/// Gives a written file the mode of the file it replaces (when there is
/// one), and flushes it to disk.
fn finish_file(file: &File, replaced_mode: Option<u32>) -> Result<()> {
    if let Some(mode) = replaced_mode {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(std::fs::Permissions::from_mode(mode))
                .map_err(|e| Error::io("copying the permissions of the replaced file", e))?;
        }
        #[cfg(not(unix))]
        let _ = mode;
    }
    file.sync_all().map_err(|e| Error::io("flushing to disk", e))
}

/// Files written with no name, and named once complete (Linux).
#[cfg(target_os = "linux")]
mod unnamed {
    use std::ffi::CString;
    use std::fs::File;
    use std::io::{Seek, SeekFrom};
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;

    use tempfile::TempPath;

    use super::without_path;
    use crate::error::{Error, Result};

    /// A new, empty file in `dir` with no name yet (`O_TMPFILE`, mode
    /// `0o666` minus the umask); `None` where that cannot be had: a
    /// filesystem or kernel without it, or no `/proc` to name it through.
    /// The caller then writes a named temporary file, which also reports
    /// any error (a read-only or full disk) as such.
    pub(super) fn create_in(dir: &Path) -> Option<File> {
        static USABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let usable = *USABLE.get_or_init(|| Path::new("/proc/self/fd").is_dir() && std::env::var_os(super::NAMED_TEMP_FILES_ENV).is_none());
        if !usable {
            return None;
        }
        let dir = CString::new(dir.as_os_str().as_bytes()).ok()?;
        // SAFETY: open(2) with a valid C string; the descriptor it returns
        // is owned by the File from then on.
        let fd = unsafe { libc::open(dir.as_ptr(), libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC, 0o666 as libc::c_uint) };
        // SAFETY: a descriptor just opened, owned by nothing else.
        (fd >= 0).then(|| unsafe { File::from_raw_fd(fd) })
    }

    /// How many files a [`super::StagedWrites`] keeps unnamed here:
    /// [`super::MAX_UNNAMED_STAGED_FILES`], or a sixteenth of the
    /// descriptors this process may open, if that is fewer.
    pub(super) fn limit() -> usize {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit fills the struct it is given.
        let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 { limit.rlim_cur } else { 1024 };
        usize::try_from(soft / 16).unwrap_or(usize::MAX).min(super::MAX_UNNAMED_STAGED_FILES)
    }

    /// Names the unnamed, written `file` in `dir`: `prefix`, random letters,
    /// `.tmp`. Where the filesystem cannot link it (it had `O_TMPFILE` but
    /// refuses the link), its bytes are copied into a named temporary file
    /// instead, rather than lost.
    pub(super) fn name(file: &File, dir: &Path, prefix: &str) -> Result<TempPath> {
        name_with(file, dir, prefix, link)
    }

    /// [`name`], linking with `link` (the tests' way to a refused link).
    fn name_with(file: &File, dir: &Path, prefix: &str, link: impl Fn(&File, &Path) -> std::io::Result<()>) -> Result<TempPath> {
        let mut builder = tempfile::Builder::new();
        builder.prefix(prefix).suffix(".tmp");
        match builder.make_in(dir, |path| link(file, path)) {
            Ok(named) => Ok(named.into_temp_path()),
            Err(link_error) => {
                let context = || format!("naming the written file in {} (it could not be linked: {link_error})", dir.display());
                let mut copy = builder.tempfile_in(dir).map_err(|e| Error::io(context(), without_path(e)))?;
                let mut source = file;
                source.seek(SeekFrom::Start(0)).and_then(|_| std::io::copy(&mut source, copy.as_file_mut())).map_err(|e| Error::io(context(), e))?;
                let mode = file.metadata().map_err(|e| Error::io(context(), e))?.permissions();
                copy.as_file().set_permissions(mode).map_err(|e| Error::io(context(), e))?;
                copy.as_file().sync_all().map_err(|e| Error::io(context(), e))?;
                Ok(copy.into_temp_path())
            }
        }
    }

    /// Names the unnamed `file` `path` (`AlreadyExists` when that is taken).
    fn link(file: &File, path: &Path) -> std::io::Result<()> {
        let from = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd())).expect("no NUL in a number");
        let to = CString::new(path.as_os_str().as_bytes())?;
        // SAFETY: linkat(2) with valid C strings.
        let rc = unsafe { libc::linkat(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), libc::AT_SYMLINK_FOLLOW) };
        if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
    }

    #[cfg(test)]
    mod tests {
        use std::io::Write;
        use std::os::unix::fs::PermissionsExt;

        use super::*;

        /// An unnamed file in a fresh directory, or `None` (with a note)
        /// where the filesystem has no `O_TMPFILE`.
        fn unnamed_file() -> Option<(tempfile::TempDir, File)> {
            let dir = tempfile::tempdir().unwrap();
            let file = create_in(dir.path());
            if file.is_none() {
                eprintln!("SKIPPED: {} has no O_TMPFILE", dir.path().display());
            }
            Some((dir, file?))
        }

        #[test]
        fn a_file_that_cannot_be_linked_is_copied_under_a_name() {
            let Some((dir, mut file)) = unnamed_file() else { return };
            let bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
            file.write_all(&bytes).unwrap();
            file.set_permissions(std::fs::Permissions::from_mode(0o640)).unwrap();
            let refuse = |_: &File, _: &Path| Err(std::io::Error::from_raw_os_error(libc::EXDEV));
            let named = name_with(&file, dir.path(), ".x.", refuse).unwrap();
            assert_eq!(named.parent(), Some(dir.path()));
            assert!(named.file_name().unwrap().to_string_lossy().starts_with(".x."));
            assert_eq!(std::fs::read(&named).unwrap(), bytes);
            assert_eq!(std::fs::metadata(&named).unwrap().permissions().mode() & 0o777, 0o640);
        }

        #[test]
        fn a_linked_file_is_the_same_file() {
            let Some((dir, mut file)) = unnamed_file() else { return };
            file.write_all(b"abc").unwrap();
            let named = name(&file, dir.path(), ".y.").unwrap();
            file.write_all(b"def").unwrap();
            assert_eq!(std::fs::read(&named).unwrap(), b"abcdef", "a link, not a copy");
        }
    }
}

/// The OS error alone, without the path tempfile attaches to it (it wraps
/// the OS error in an error of its own that names the path).
fn without_path(e: std::io::Error) -> std::io::Error {
    if let Some(code) = e.raw_os_error() {
        return std::io::Error::from_raw_os_error(code);
    }
    // tempfile's error shows as "{the OS error} at path {path}" and does not
    // hand out the OS error itself (its `source` is that error's source).
    let text = e.to_string();
    match text.rsplit_once(" at path ") {
        Some((os_error, _)) => std::io::Error::new(e.kind(), os_error.to_owned()),
        None => std::io::Error::from(e.kind()),
    }
}

/// Refuses a destination that exists and is not a regular file: a save
/// replaces what is there, and a device, FIFO, socket or directory is not
/// the user's earlier save (run as root, a rename replaces even `/dev/null`).
fn refuse_unless_regular(target: &Path, existing: Option<&std::fs::Metadata>) -> Result<()> {
    let Some(meta) = existing else { return Ok(()) };
    let kind = meta.file_type();
    if kind.is_file() {
        return Ok(());
    }
    #[cfg(unix)]
    let what = {
        use std::os::unix::fs::FileTypeExt;
        match () {
            _ if kind.is_dir() => "a directory",
            _ if kind.is_char_device() || kind.is_block_device() => "a device",
            _ if kind.is_fifo() => "a FIFO",
            _ if kind.is_socket() => "a socket",
            _ => "not a regular file",
        }
    };
    #[cfg(not(unix))]
    let what = if kind.is_dir() { "a directory" } else { "not a regular file" };
    Err(Error::io(
        format!("the destination {} is {what}, which a save does not replace", target.display()),
        std::io::ErrorKind::InvalidInput.into(),
    ))
}

/// What is at `path` now: `None` for nothing, or for a symbolic link, which
/// the new file replaces like any file (whatever it names).
fn existing_file(path: &Path) -> Option<std::fs::Metadata> {
    std::fs::symlink_metadata(path).ok().filter(|meta| !meta.file_type().is_symlink())
}

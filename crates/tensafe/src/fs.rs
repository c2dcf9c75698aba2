//! Opening the files a user names ([`open_regular`]), telling whether one
//! changed while it was read ([`FileVersion`]), and which read strategy
//! suits the filesystem a file lives on ([`FilesystemKind`]).
//!
//! Page faults on a mapping of a network or FUSE file each become a round trip
//! to the server, which makes mmap 10–50× slower there than positional reads
//! of large blocks; on local filesystems mmap is as fast and lazy.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

/// Opens `path` for reading, refusing what is not a regular file with an
/// error that says what it is: a FIFO (whose open would wait for a writer,
/// forever for a file nobody writes), a device (`/dev/zero` never ends, and
/// some devices act on being opened), a directory. The path's type is
/// checked before the open, so none of these is opened, and the open file's
/// again after it (the path may have changed in between); the open is
/// non-blocking so that even then it cannot wait, and the flag is cleared
/// on the file returned (local filesystems ignore it there, FUSE passes it
/// to its server). Every reader of files a user names goes through here.
pub fn open_regular(path: &Path) -> io::Result<File> {
    refuse_unless_regular(std::fs::metadata(path)?.file_type())?;
    let mut options = OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path)?;
    refuse_unless_regular(file.metadata()?.file_type())?;
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: plain fcntl calls on a descriptor this function owns.
        let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        if flags < 0 || unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(file)
}

fn refuse_unless_regular(kind: std::fs::FileType) -> io::Result<()> {
    if kind.is_file() {
        return Ok(());
    }
    let what = if kind.is_dir() { "a directory" } else { special_kind(kind) };
    Err(io::Error::new(io::ErrorKind::InvalidInput, format!("is {what}, not a regular file")))
}

#[cfg(unix)]
fn special_kind(kind: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "something else"
    }
}

#[cfg(not(unix))]
fn special_kind(_: std::fs::FileType) -> &'static str {
    "something else"
}

/// One state of a file's bytes as its metadata tells it, without reading
/// them: its size and last modification time. A write in place moves the
/// time (to the filesystem's clock granularity), so a reader that finds the
/// same version after a long read as before it knows that no write it could
/// tell happened meanwhile. (The status-change time is left out: a chmod, a
/// new hard link or a rename move it without touching a byte.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileVersion {
    len: u64,
    modified: Option<std::time::SystemTime>,
}

impl FileVersion {
    /// The version of an open file now.
    pub fn of(file: &File) -> io::Result<FileVersion> {
        let meta = file.metadata()?;
        Ok(FileVersion { len: meta.len(), modified: meta.modified().ok() })
    }
}

/// What kind of filesystem holds a file, as far as read strategy goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilesystemKind {
    /// Local disk, tmpfs, overlay…: mmap is the better default.
    Local,
    /// Network or userspace (FUSE) filesystem, named: prefer `pread`.
    Remote(&'static str),
}

impl FilesystemKind {
    /// Classifies a `statfs` filesystem magic number.
    pub fn from_magic(magic: u64) -> FilesystemKind {
        match magic {
            0x6969 => FilesystemKind::Remote("nfs"),
            0x517b => FilesystemKind::Remote("smb"),
            0xff53_4d42 => FilesystemKind::Remote("cifs"),
            0xfe53_4d42 => FilesystemKind::Remote("smb2"),
            0x6573_5546 => FilesystemKind::Remote("fuse"),
            0x00c3_6400 => FilesystemKind::Remote("ceph"),
            0x0102_1997 => FilesystemKind::Remote("9p"),
            0x5346_414f => FilesystemKind::Remote("afs"),
            0x0bd0_0bd0 => FilesystemKind::Remote("lustre"),
            0x4750_4653 => FilesystemKind::Remote("gpfs"),
            0x1346_1993 | 0x7461_636f => FilesystemKind::Remote("ocfs2"),
            _ => FilesystemKind::Local,
        }
    }

    /// The filesystem of an open file; `Local` when it cannot be told.
    pub fn of(file: &File) -> FilesystemKind {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let mut stat = std::mem::MaybeUninit::<libc::statfs>::uninit();
            // SAFETY: fstatfs fills `stat` on success and we read it only then.
            if unsafe { libc::fstatfs(file.as_raw_fd(), stat.as_mut_ptr()) } == 0 {
                let magic = unsafe { stat.assume_init() }.f_type as u64;
                return FilesystemKind::from_magic(magic);
            }
        }
        let _ = file;
        FilesystemKind::Local
    }

    /// Whether positional reads should be preferred over a mapping.
    pub fn prefers_pread(self) -> bool {
        matches!(self, FilesystemKind::Remote(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_and_fuse_filesystems_prefer_pread() {
        assert_eq!(FilesystemKind::from_magic(0x6969), FilesystemKind::Remote("nfs"));
        assert_eq!(FilesystemKind::from_magic(0x6573_5546), FilesystemKind::Remote("fuse"));
        assert!(FilesystemKind::from_magic(0xff53_4d42).prefers_pread());
        assert!(!FilesystemKind::from_magic(0xef53).prefers_pread(), "ext4 is local");
        assert!(!FilesystemKind::from_magic(0x0102_1994).prefers_pread(), "tmpfs is local");
    }

    #[test]
    #[cfg(unix)]
    fn only_regular_files_open_and_nothing_waits() {
        use std::os::fd::AsRawFd;

        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe.safetensors");
        let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        // A blocking open of a FIFO nobody writes would never return.
        let refused = |path: &Path| open_regular(path).unwrap_err().to_string();
        assert_eq!(refused(&fifo), "is a FIFO, not a regular file");
        assert_eq!(refused(dir.path()), "is a directory, not a regular file");
        assert_eq!(refused(Path::new("/dev/zero")), "is a character device, not a regular file");
        let socket = dir.path().join("socket");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        assert_eq!(refused(&socket), "is a socket, not a regular file");
        assert_eq!(open_regular(&dir.path().join("missing")).unwrap_err().kind(), io::ErrorKind::NotFound);

        let regular = dir.path().join("model.safetensors");
        std::fs::write(&regular, b"data").unwrap();
        let file = open_regular(&regular).unwrap();
        // SAFETY: F_GETFL on an open descriptor.
        let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_NONBLOCK, 0, "the returned file blocks as usual");
    }

    #[test]
    fn the_test_directory_is_local() {
        let file = tempfile::tempfile().unwrap();
        assert_eq!(FilesystemKind::of(&file), FilesystemKind::Local);
    }
}

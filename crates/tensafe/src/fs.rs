//! Which read strategy suits the filesystem a file lives on.
//!
//! Page faults on a mapping of a network or FUSE file each become a round trip
//! to the server, which makes mmap 10–50× slower there than positional reads
//! of large blocks; on local filesystems mmap is as fast and lazy.

use std::fs::File;

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
    fn the_test_directory_is_local() {
        let file = tempfile::tempfile().unwrap();
        assert_eq!(FilesystemKind::of(&file), FilesystemKind::Local);
    }
}

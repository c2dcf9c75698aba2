//! Three ways to read a file, sharing one validated [`Header`]:
//!
//! * [`SafeTensors`] — bytes already in memory (a `&[u8]`);
//! * [`MmapFile`] — a read-only or copy-on-write memory map, zero-copy views
//!   into the page cache;
//! * [`PreadFile`] — positional reads: the header in at most two reads, each
//!   tensor only when asked for. Prefer it on network and FUSE filesystems,
//!   where page faults on a mapping are slow, and for header-only inspection.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::{Mmap, MmapMut, MmapOptions};

use crate::error::{Error, Result};
use crate::header::{Header, ReadOptions, TensorInfo};
use crate::slice::{SliceIndex, SlicePlan};
use crate::Dtype;

/// A zero-copy view of one tensor's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorView<'a> {
    info: &'a TensorInfo,
    data: &'a [u8],
}

impl<'a> TensorView<'a> {
    /// Element type.
    pub fn dtype(&self) -> Dtype {
        self.info.dtype
    }

    /// Logical shape.
    pub fn shape(&self) -> &'a [usize] {
        &self.info.shape
    }

    /// Raw little-endian bytes, row-major.
    pub fn data(&self) -> &'a [u8] {
        self.data
    }

    /// Position of the tensor in the file.
    pub fn info(&self) -> &'a TensorInfo {
        self.info
    }

    /// Plans a numpy-style selection of this tensor.
    pub fn slice(&self, indices: &[SliceIndex]) -> Result<SlicePlan> {
        SlicePlan::new(self.dtype(), self.shape(), indices)
    }

    /// Copies a planned selection into `dst` (exactly `plan.byte_len()` bytes).
    pub fn copy_slice_into(&self, plan: &SlicePlan, dst: &mut [u8]) -> Result<()> {
        plan.copy_into(self.data, dst)
    }
}

/// Builds the view of `name` from a header and the data section it describes.
fn view<'a>(header: &'a Header, data: &'a [u8], name: &str) -> Result<TensorView<'a>> {
    let info = header.info(name)?;
    Ok(TensorView { info, data: &data[info.data_offsets.0..info.data_offsets.1] })
}

fn views<'a>(header: &'a Header, data: &'a [u8]) -> impl ExactSizeIterator<Item = (&'a str, TensorView<'a>)> + 'a {
    header
        .iter()
        .map(move |(name, info)| (name, TensorView { info, data: &data[info.data_offsets.0..info.data_offsets.1] }))
}

/// A safetensors file held in memory.
#[derive(Debug, Clone)]
pub struct SafeTensors<'data> {
    header: Header,
    data: &'data [u8],
}

impl<'data> SafeTensors<'data> {
    /// Parses and validates a whole file held in `bytes`.
    pub fn deserialize(bytes: &'data [u8]) -> Result<Self> {
        SafeTensors::deserialize_with(bytes, &ReadOptions::default())
    }

    /// Like [`SafeTensors::deserialize`], with options.
    pub fn deserialize_with(bytes: &'data [u8], options: &ReadOptions) -> Result<Self> {
        let (header, data) = Header::parse_file_bytes(bytes, options)?;
        Ok(SafeTensors { header, data })
    }

    /// The validated header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The view of one tensor.
    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        view(&self.header, self.data, name)
    }

    /// Every tensor in file order.
    pub fn tensors(&self) -> impl ExactSizeIterator<Item = (&str, TensorView<'_>)> + '_ {
        views(&self.header, self.data)
    }
}

/// A file opened for positional reads of the header and then of single tensors.
#[derive(Debug)]
pub struct PreadFile {
    path: PathBuf,
    file: File,
    header: Header,
}

/// The first read takes this many bytes, which holds the whole header of all but
/// very large checkpoints; a second read fetches the rest when it does not.
const FIRST_READ: usize = 64 * 1024;

impl PreadFile {
    /// Opens a file and reads and validates its header, and nothing else.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        PreadFile::open_with(path, &ReadOptions::default())
    }

    /// Like [`PreadFile::open`], with options.
    pub fn open_with(path: impl AsRef<Path>, options: &ReadOptions) -> Result<Self> {
        let path = path.as_ref();
        let file = crate::fs::open_regular(path).map_err(|e| Error::io("opening the file", e).in_file(path))?;
        PreadFile::from_file(file, path, options)
    }

    /// Reads the header of an already opened file; `path` is used in messages.
    pub fn from_file(file: File, path: impl Into<PathBuf>, options: &ReadOptions) -> Result<Self> {
        let path = path.into();
        let header = read_header(&file, options).map_err(|e| e.in_file(&path))?;
        Ok(PreadFile { path, file, header })
    }

    /// The validated header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The path given at open.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Reads `buf.len()` bytes starting at `offset` within the data section.
    pub fn read_data_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let at = self.header.data_start() + offset;
        read_exact_at(&self.file, buf, at).map_err(|e| Error::io(format!("reading {} bytes at file offset {at}", buf.len()), e).in_file(&self.path))
    }

    /// Reads one tensor's bytes into a new buffer.
    pub fn read_tensor(&self, name: &str) -> Result<Vec<u8>> {
        let info = self.header.info(name)?;
        let mut buf = vec![0u8; info.byte_len()];
        self.read_data_at(info.data_offsets.0 as u64, &mut buf)?;
        Ok(buf)
    }

    /// Reads one tensor's bytes into `dst`, which must have exactly its size.
    pub fn read_tensor_into(&self, name: &str, dst: &mut [u8]) -> Result<()> {
        let info = self.header.info(name)?;
        if dst.len() != info.byte_len() {
            return Err(Error::BufferSize { expected: info.byte_len() as u64, actual: dst.len() as u64 });
        }
        self.read_data_at(info.data_offsets.0 as u64, dst)
    }

    /// Reads only the bytes a slice selects into `dst` (`plan.byte_len()` bytes).
    pub fn read_slice_into(&self, name: &str, plan: &SlicePlan, dst: &mut [u8]) -> Result<()> {
        let info = self.header.info(name)?;
        if dst.len() != plan.byte_len() {
            return Err(Error::BufferSize { expected: plan.byte_len() as u64, actual: dst.len() as u64 });
        }
        let mut written = 0;
        for range in plan.ranges() {
            let len = range.len();
            self.read_data_at((info.data_offsets.0 + range.start) as u64, &mut dst[written..written + len])?;
            written += len;
        }
        Ok(())
    }
}

/// Reads and validates the header of `file` with at most two reads.
fn read_header(file: &File, options: &ReadOptions) -> Result<Header> {
    let file_len = file.metadata().map_err(|e| Error::io("reading the file size", e))?.len();
    let first_len = FIRST_READ.min(usize::try_from(file_len).unwrap_or(FIRST_READ));
    let mut first = vec![0u8; first_len];
    read_exact_at(file, &mut first, 0).map_err(|e| Error::io("reading the header", e))?;
    let n = Header::header_len(&first, file_len, options)?;
    if 8 + n <= first.len() {
        return Header::parse(&first[8..8 + n], file_len);
    }
    let mut json = vec![0u8; n];
    let have = first.len() - 8;
    json[..have].copy_from_slice(&first[8..]);
    read_exact_at(file, &mut json[have..], first.len() as u64).map_err(|e| Error::io("reading the header", e))?;
    Header::parse(&json, file_len)
}

#[cfg(unix)]
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(windows)]
fn read_exact_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_read(buf, offset)? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
        }
    }
    Ok(())
}

/// A file mapped into memory; tensor views borrow from the mapping.
#[derive(Debug)]
pub struct MmapFile {
    /// The open file the mapping was made from, kept for positional reads
    /// (see [`MmapFile::positional`]).
    file: PreadFile,
    mapping: SharedMapping,
}

#[derive(Debug)]
enum Mapping {
    ReadOnly(Mmap),
    CopyOnWrite(MmapMut),
}

/// A file's mapping, shared: it stays valid as long as one of these lives,
/// without the file's descriptor (a mapping does not need it), so that
/// views handed out can outlive the open [`MmapFile`] and hold no
/// descriptor once it is closed (as the reference's mapped tensors hold none).
#[derive(Debug, Clone)]
pub struct SharedMapping(Arc<Mapping>);

impl SharedMapping {
    /// The whole mapped file.
    pub fn bytes(&self) -> &[u8] {
        match &*self.0 {
            Mapping::ReadOnly(m) => m,
            Mapping::CopyOnWrite(m) => m,
        }
    }

    /// Where the mapping starts and its length, for callers that need the
    /// address only (and keep no reference to bytes that others may be
    /// writing through [`Self::as_mut_ptr`]).
    pub fn region(&self) -> (*const u8, usize) {
        match &*self.0 {
            Mapping::ReadOnly(m) => (m.as_ptr(), m.len()),
            Mapping::CopyOnWrite(m) => (m.as_ptr(), m.len()),
        }
    }

    /// Start of a copy-on-write mapping, for callers that hand out writable
    /// views; `None` for a read-only mapping. Writing through it is only sound
    /// while no Rust reference to the same bytes is in use.
    pub fn as_mut_ptr(&self) -> Option<*mut u8> {
        match &*self.0 {
            Mapping::CopyOnWrite(m) => Some(m.as_ptr() as *mut u8),
            Mapping::ReadOnly(_) => None,
        }
    }
}

impl MmapFile {
    /// Opens and maps a file after validating its header with positional reads.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        MmapFile::open_with(path, &ReadOptions::default())
    }

    /// Like [`MmapFile::open`], with options.
    pub fn open_with(path: impl AsRef<Path>, options: &ReadOptions) -> Result<Self> {
        let pread = PreadFile::open_with(path, options)?;
        MmapFile::from_pread(pread)
    }

    /// Maps a file whose header is already read, read-only.
    pub fn from_pread(pread: PreadFile) -> Result<Self> {
        MmapFile::map(pread, false)
    }

    /// Maps a file whose header is already read as a private copy-on-write
    /// mapping: the bytes may be modified through [`MmapFile::as_mut_ptr`]
    /// (this is how Python frameworks get writable zero-copy tensors), and no
    /// write ever reaches the file.
    pub fn from_pread_copy_on_write(pread: PreadFile) -> Result<Self> {
        MmapFile::map(pread, true)
    }

    fn map(pread: PreadFile, copy_on_write: bool) -> Result<Self> {
        let (path, file, header) = (&pread.path, &pread.file, &pread.header);
        // SAFETY: writes to the mapping (copy-on-write only) never reach the
        // file. Like every reader of memory-mapped files, we rely on the file
        // not being truncated or modified in place while mapped; the tensafe
        // writer never does that, it replaces files by rename.
        let mapping = unsafe {
            if copy_on_write {
                // No swap reserved up front (MAP_NORESERVE): pages are only
                // copied where written, and the kernel's default overcommit
                // check refuses a private writable mapping larger than RAM
                // and swap, which a read-only one of the same file is not.
                MmapOptions::new().no_reserve_swap().map_copy(file).map(Mapping::CopyOnWrite)
            } else {
                Mmap::map(file).map(Mapping::ReadOnly)
            }
        }
        .map(|mapping| SharedMapping(Arc::new(mapping)))
        .map_err(|e| Error::io("mapping the file", e).in_file(path))?;
        let expected = header.data_start() + header.data_len() as u64;
        let actual = mapping.bytes().len() as u64;
        if actual != expected {
            // The file changed size between the header read and the mapping.
            return Err(Error::MetadataIncompleteBuffer { expected, actual }.in_file(path));
        }
        Ok(MmapFile { file: pread, mapping })
    }

    /// Start of a copy-on-write mapping (see [`SharedMapping::as_mut_ptr`]).
    pub fn as_mut_ptr(&self) -> Option<*mut u8> {
        self.mapping.as_mut_ptr()
    }

    /// The mapping, shared: it outlives this file (and its descriptor).
    pub fn shared_mapping(&self) -> SharedMapping {
        self.mapping.clone()
    }

    /// The validated header.
    pub fn header(&self) -> &Header {
        &self.file.header
    }

    /// The path given at open.
    pub fn path(&self) -> &Path {
        &self.file.path
    }

    /// Positional reads of the same open file (the same inode as the
    /// mapping). Copying a large range this way is faster than copying it
    /// out of the mapping, which must first map every page: on an H100 host,
    /// 16 readers moved 36.8 GB/s with reads and 21.9 GB/s out of the mapping
    /// (`bench/gpu_bench.py --sweep`). It sees the file, not writes made
    /// through a copy-on-write mapping.
    pub fn positional(&self) -> &PreadFile {
        &self.file
    }

    /// The whole mapped file.
    pub fn bytes(&self) -> &[u8] {
        self.mapping.bytes()
    }

    /// The data section of the mapping.
    pub fn data(&self) -> &[u8] {
        &self.bytes()[self.header().data_start() as usize..]
    }

    /// The zero-copy view of one tensor.
    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        view(self.header(), self.data(), name)
    }

    /// Every tensor in file order.
    pub fn tensors(&self) -> impl ExactSizeIterator<Item = (&str, TensorView<'_>)> + '_ {
        views(self.header(), self.data())
    }
}

//! Writing files byte-identical to the reference implementation's.
//!
//! Tensors are ordered by dtype rank (descending) then name, given contiguous
//! offsets, and described by compact JSON with `__metadata__` first; the header
//! is padded with spaces to a multiple of 8. Metadata keys are written sorted
//! (the reference uses a random hash order, so only files with at most one key
//! are reproducible there; ours always are).
//!
//! Tensor bytes are streamed from the caller's buffers ([`View`]) straight to
//! the destination: no copy of tensor data is made, and memory use does not
//! depend on the model size.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::Path;

use crate::atomic::write_atomically;
use crate::error::{Error, Result};
use crate::header::{expected_byte_len, DEFAULT_MAX_HEADER_SIZE, METADATA_KEY};
use crate::reader::TensorView;
use crate::Dtype;

/// A tensor the writer can save: its type, shape and little-endian bytes.
pub trait View {
    /// Element type.
    fn dtype(&self) -> Dtype;
    /// Logical shape.
    fn shape(&self) -> &[usize];
    /// The bytes to write, row-major and little-endian. Borrow them when you
    /// can: an owned buffer is a copy the writer cannot avoid.
    fn data(&self) -> Cow<'_, [u8]>;
    /// Length of [`View::data`], known without producing it.
    fn data_len(&self) -> usize;
}

impl<T: View + ?Sized> View for &T {
    fn dtype(&self) -> Dtype {
        (**self).dtype()
    }
    fn shape(&self) -> &[usize] {
        (**self).shape()
    }
    fn data(&self) -> Cow<'_, [u8]> {
        (**self).data()
    }
    fn data_len(&self) -> usize {
        (**self).data_len()
    }
}

impl View for TensorView<'_> {
    fn dtype(&self) -> Dtype {
        TensorView::dtype(self)
    }
    fn shape(&self) -> &[usize] {
        TensorView::shape(self)
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(TensorView::data(self))
    }
    fn data_len(&self) -> usize {
        TensorView::data(self).len()
    }
}

/// A borrowed tensor given by its parts; handy for tests and bindings.
#[derive(Debug, Clone, Copy)]
pub struct RawTensor<'a> {
    /// Element type.
    pub dtype: Dtype,
    /// Logical shape.
    pub shape: &'a [usize],
    /// Little-endian bytes.
    pub data: &'a [u8],
}

impl View for RawTensor<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Writer options.
#[derive(Debug, Clone)]
pub struct WriteOptions {
    /// The data section starts at a multiple of this many bytes from the start
    /// of the file (the header is padded with spaces). 8 gives the reference's
    /// bytes; 4096 suits direct I/O. Must be a power of two ≥ 8.
    pub data_alignment: usize,
    /// Largest header written, like the reader's limit.
    pub max_header_size: u64,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions { data_alignment: 8, max_header_size: DEFAULT_MAX_HEADER_SIZE }
    }
}

/// Metadata as the writer takes it: sorted by key.
pub type Metadata = BTreeMap<String, String>;

/// A checked layout ready to be written: the 8-byte length plus padded header,
/// and the tensors in file order.
pub struct Prepared<N, V> {
    /// `N` as 8 little-endian bytes followed by the padded JSON header.
    pub header: Vec<u8>,
    /// Tensors in the order their bytes follow the header.
    pub tensors: Vec<(N, V)>,
    /// Size of the data section.
    pub data_len: u64,
}

impl<N: AsRef<str>, V: View> Prepared<N, V> {
    /// Total size of the file.
    pub fn file_len(&self) -> u64 {
        self.header.len() as u64 + self.data_len
    }

    /// Streams header then tensor bytes to `out`. Fails, before writing a
    /// tensor, if its [`View::data`] disagrees with the `data_len` the header
    /// was built from (a file written anyway would be unreadable).
    pub fn write_to<W: Write + ?Sized>(&self, out: &mut W) -> std::io::Result<()>
    where
        N: AsRef<str>,
    {
        out.write_all(&self.header)?;
        for (name, view) in &self.tensors {
            let data = view.data();
            if data.len() != view.data_len() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "tensor `{}`: the view gave {} bytes but announced {}",
                        name.as_ref(),
                        data.len(),
                        view.data_len()
                    ),
                ));
            }
            out.write_all(&data)?;
        }
        Ok(())
    }
}

/// Orders and checks tensors and builds the header.
pub fn prepare<N, V, I>(tensors: I, metadata: Option<&Metadata>, options: &WriteOptions) -> Result<Prepared<N, V>>
where
    N: AsRef<str>,
    V: View,
    I: IntoIterator<Item = (N, V)>,
{
    let align = options.data_alignment;
    if align < 8 || !align.is_power_of_two() {
        return Err(Error::InvalidOption { reason: format!("data_alignment must be a power of two ≥ 8, got {align}") });
    }
    let mut tensors: Vec<(N, V)> = tensors.into_iter().collect();
    let mut seen = HashSet::with_capacity(tensors.len());
    for (name, _) in &tensors {
        let name = name.as_ref();
        if name == METADATA_KEY {
            return Err(Error::InvalidName { name: name.to_owned(), reason: "is reserved for the metadata map" });
        }
        if !seen.insert(name) {
            return Err(Error::InvalidName { name: name.to_owned(), reason: "appears twice" });
        }
    }
    drop(seen);
    tensors.sort_by(|(a_name, a), (b_name, b)| {
        b.dtype().rank().cmp(&a.dtype().rank()).then_with(|| a_name.as_ref().cmp(b_name.as_ref()))
    });

    let mut json = Vec::with_capacity(64 + tensors.len() * 64);
    json.push(b'{');
    if let Some(metadata) = metadata {
        write_json_str(&mut json, METADATA_KEY);
        json.extend_from_slice(b":{");
        for (i, (key, value)) in metadata.iter().enumerate() {
            if i > 0 {
                json.push(b',');
            }
            write_json_str(&mut json, key);
            json.push(b':');
            write_json_str(&mut json, value);
        }
        json.push(b'}');
    }
    let mut offset = 0usize;
    for (i, (name, view)) in tensors.iter().enumerate() {
        let name = name.as_ref();
        let needed = expected_byte_len(name, view.dtype(), view.shape())?;
        if needed != view.data_len() {
            return Err(Error::TensorInvalidInfo {
                name: name.to_owned(),
                dtype: view.dtype(),
                shape: view.shape().to_vec(),
                expected: needed as u64,
                actual: view.data_len() as u64,
            });
        }
        let end = offset.checked_add(needed).ok_or_else(|| Error::Overflow { name: name.to_owned(), shape: view.shape().to_vec() })?;
        if i > 0 || metadata.is_some() {
            json.push(b',');
        }
        write_json_str(&mut json, name);
        json.extend_from_slice(b":{\"dtype\":");
        write_json_str(&mut json, view.dtype().code());
        json.extend_from_slice(b",\"shape\":[");
        for (k, dim) in view.shape().iter().enumerate() {
            if k > 0 {
                json.push(b',');
            }
            json.extend_from_slice(dim.to_string().as_bytes());
        }
        json.extend_from_slice(format!("],\"data_offsets\":[{offset},{end}]}}").as_bytes());
        offset = end;
    }
    json.push(b'}');

    // Pad so that 8 + N is a multiple of the alignment.
    let padded = (8 + json.len()).next_multiple_of(align) - 8;
    if padded as u64 > options.max_header_size {
        return Err(Error::HeaderTooLargeToWrite { size: padded as u64, limit: options.max_header_size });
    }
    let mut header = Vec::with_capacity(8 + padded);
    header.extend_from_slice(&(padded as u64).to_le_bytes());
    header.extend_from_slice(&json);
    header.resize(8 + padded, b' ');
    Ok(Prepared { header, tensors, data_len: offset as u64 })
}

/// Appends `s` as a JSON string literal with serde_json's escaping (the
/// reference's): `"`, `\`, and control characters only; UTF-8 kept as is.
fn write_json_str(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(&mut *out, s).expect("writing a string into a Vec cannot fail");
}

/// Serializes tensors and metadata into a new buffer holding the whole file.
pub fn serialize<N, V, I>(tensors: I, metadata: Option<&Metadata>) -> Result<Vec<u8>>
where
    N: AsRef<str>,
    V: View,
    I: IntoIterator<Item = (N, V)>,
{
    let prepared = prepare(tensors, metadata, &WriteOptions::default())?;
    let mut out = Vec::with_capacity(prepared.file_len() as usize);
    // Writing into a Vec only fails when a view's data disagrees with its length.
    prepared.write_to(&mut out).map_err(|e| Error::io("serializing", e))?;
    Ok(out)
}

/// Writes tensors and metadata to `path` atomically: the bytes go to a
/// temporary file in the same directory, which is flushed to disk and renamed
/// over `path`. Readers that have the old file mapped keep seeing it.
pub fn serialize_to_file<N, V, I>(tensors: I, metadata: Option<&Metadata>, path: impl AsRef<Path>) -> Result<()>
where
    N: AsRef<str>,
    V: View,
    I: IntoIterator<Item = (N, V)>,
{
    serialize_to_file_with(tensors, metadata, path, &WriteOptions::default())
}

/// Like [`serialize_to_file`], with options.
pub fn serialize_to_file_with<N, V, I>(
    tensors: I,
    metadata: Option<&Metadata>,
    path: impl AsRef<Path>,
    options: &WriteOptions,
) -> Result<()>
where
    N: AsRef<str>,
    V: View,
    I: IntoIterator<Item = (N, V)>,
{
    let path = path.as_ref();
    let prepared = prepare(tensors, metadata, options).map_err(|e| e.in_file(path))?;
    write_atomically(path, |out| prepared.write_to(out)).map_err(|e| e.in_file(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Dtype, RawTensor};

    #[test]
    fn a_header_above_the_limit_is_refused_as_a_write_error() {
        let data = [0u8; 4];
        let tensors = (0..20).map(|i| (format!("tensor.{i}"), RawTensor { dtype: Dtype::F32, shape: &[1], data: &data }));
        let err = prepare(tensors, None, &WriteOptions { max_header_size: 256, ..Default::default() }).err().expect("too large");
        let message = err.to_string();
        assert!(message.starts_with("header too large: the tensors' names, shapes and the metadata take a "), "{message}");
        assert!(message.ends_with("above the limit of 256 bytes that readers accept"), "{message}");
        assert_eq!(err.reference_text(), "header too large");
    }
}

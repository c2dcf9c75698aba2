//! Sharded checkpoints: several safetensors files plus an index, in the
//! transformers convention.
//!
//! ```text
//! model-00001-of-00003.safetensors
//! model-00002-of-00003.safetensors
//! model-00003-of-00003.safetensors
//! model.safetensors.index.json   {"metadata": {"total_size": N}, "weight_map": {tensor: file}}
//! ```
//!
//! [`ShardedCheckpoint`] opens a directory, an index file or a single file as
//! one checkpoint and checks that the pieces agree (every shard present, every
//! tensor exactly where the index says, sizes consistent). [`save_sharded`]
//! splits tensors into shards no larger than a limit and writes the index.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;

use crate::atomic::StagedWrites;
use crate::error::{Error, Result};
use crate::header::{Header, Printable, TensorInfo};
use crate::reader::PreadFile;
use crate::writer::{prepare, Metadata, View, WriteOptions};
use crate::Dtype;

/// The usual name of the index file.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The usual name of an unsharded checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";

/// The parsed index file.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardIndex {
    /// The index's `metadata` object (`total_size` and anything else kept as is).
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// Tensor name → shard file name (relative to the index's directory).
    pub weight_map: BTreeMap<String, String>,
}

impl ShardIndex {
    /// Parses index JSON.
    pub fn parse(text: &str) -> Result<ShardIndex> {
        let invalid = |reason: String| Error::InvalidCheckpoint { reason };
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| invalid(format!("the index is not valid JSON: {e}")))?;
        let object = value.as_object().ok_or_else(|| invalid("the index is not a JSON object".into()))?;
        let weight_map = object
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| invalid("the index has no `weight_map` object".into()))?
            .iter()
            .map(|(name, file)| match file.as_str() {
                Some(file) if is_plain_file_name(file) => Ok((name.clone(), file.to_owned())),
                Some(file) => Err(invalid(format!("tensor `{}` points outside the checkpoint directory: {file:?}", Printable(name)))),
                None => Err(invalid(format!("the weight_map entry of `{}` is not a file name", Printable(name)))),
            })
            .collect::<Result<BTreeMap<_, _>>>()?;
        let metadata = match object.get("metadata") {
            None | Some(serde_json::Value::Null) => serde_json::Map::new(),
            Some(serde_json::Value::Object(m)) => m.clone(),
            Some(_) => return Err(invalid("the index's `metadata` is not an object".into())),
        };
        Ok(ShardIndex { metadata, weight_map })
    }

    /// The shard files the index names, sorted (`00001`, `00002`, …) and
    /// each once: the order of a checkpoint's shards and of their tensors.
    pub fn shard_files(&self) -> Vec<&str> {
        let mut files: Vec<&str> = self.weight_map.values().map(String::as_str).collect();
        files.sort_unstable();
        files.dedup();
        files
    }

    /// Checks the headers of the shards (in [`ShardIndex::shard_files`]
    /// order) against the index: every tensor of a shard is listed for that
    /// shard, every listed tensor is there, and `total_size` (when given)
    /// equals the shards' tensor bytes. Returns tensor name → shard position,
    /// or the reason they disagree. Shared by local and remote checkpoints.
    pub fn locate(&self, headers: &[&Header]) -> std::result::Result<HashMap<String, usize>, String> {
        let files = self.shard_files();
        if headers.len() != files.len() {
            return Err(format!("the index lists {} shard files but {} headers were given", files.len(), headers.len()));
        }
        let position: HashMap<&str, usize> = files.iter().enumerate().map(|(i, f)| (*f, i)).collect();
        let mut location = HashMap::with_capacity(self.weight_map.len());
        for (i, header) in headers.iter().enumerate() {
            for (name, _) in header.iter() {
                match self.weight_map.get(name) {
                    None => return Err(format!("tensor `{}` is in shard {} but not in the index", Printable(name), Printable(files[i]))),
                    Some(listed) if position[listed.as_str()] != i => {
                        return Err(format!(
                            "tensor `{}` is in shard {} but the index lists it in {}",
                            Printable(name),
                            Printable(files[i]),
                            Printable(listed)
                        ));
                    }
                    Some(_) => {
                        location.insert(name.to_owned(), i);
                    }
                }
            }
        }
        if let Some((name, file)) = self.weight_map.iter().find(|(name, _)| !location.contains_key(*name)) {
            return Err(format!("tensor `{}` is listed in {} but that shard does not contain it", Printable(name), Printable(file)));
        }
        // Checked: remote headers may claim any sizes.
        let actual = headers
            .iter()
            .try_fold(0u64, |sum, h| sum.checked_add(h.data_len() as u64))
            .ok_or_else(|| "the shards' tensor bytes add up past 2^64".to_string())?;
        match self.total_size() {
            Some(declared) if declared != actual => {
                Err(format!("the index declares total_size {declared} but the shards hold {actual} bytes of tensors"))
            }
            _ => Ok(location),
        }
    }

    /// `metadata.total_size`, when present.
    pub fn total_size(&self) -> Option<u64> {
        self.metadata.get("total_size").and_then(|v| v.as_u64())
    }

    /// The index as transformers writes it: sorted keys, two-space indent, final newline.
    pub fn to_json(&self) -> String {
        let value = serde_json::json!({ "metadata": self.metadata, "weight_map": self.weight_map });
        // serde_json's `preserve_order` keeps insertion order; sort explicitly.
        let mut text = serde_json::to_string_pretty(&sort_keys(value)).expect("JSON values serialize");
        text.push('\n');
        text
    }
}

fn sort_keys(value: serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(map) => {
            let sorted: BTreeMap<String, serde_json::Value> = map.into_iter().map(|(k, v)| (k, sort_keys(v))).collect();
            serde_json::Value::Object(sorted.into_iter().collect())
        }
        other => other,
    }
}

/// Shard file names must stay inside the checkpoint directory.
fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('/') && !name.contains('\\') && name != "." && name != ".."
}

/// What a checkpoint needs of each of its files: the validated header.
/// Local files ([`PreadFile`]) are shards; so are remote ones (`tensafe-remote`).
pub trait ShardFile {
    /// The file's validated header.
    fn header(&self) -> &Header;
}

impl ShardFile for PreadFile {
    fn header(&self) -> &Header {
        PreadFile::header(self)
    }
}

/// The files of one checkpoint, and which of them holds each tensor, whatever
/// the files are: [`ShardedCheckpoint`] for local ones, and tensafe-remote's
/// `RemoteCheckpoint` builds on it for object storage.
#[derive(Debug)]
pub struct Checkpoint<F> {
    index: Option<ShardIndex>,
    shards: Vec<F>,
    /// Tensor name → shard position.
    location: HashMap<String, usize>,
}

impl<F: ShardFile> Checkpoint<F> {
    /// One safetensors file as a checkpoint of one shard.
    pub fn single(file: F) -> Self {
        let location = file.header().iter().map(|(name, _)| (name.to_owned(), 0)).collect();
        Checkpoint { index: None, shards: vec![file], location }
    }

    /// The shards an index lists, in its order, once they agree with it
    /// ([`ShardIndex::locate`]); the reason they do not otherwise.
    pub fn indexed(index: ShardIndex, shards: Vec<F>) -> std::result::Result<Self, String> {
        let headers: Vec<&Header> = shards.iter().map(ShardFile::header).collect();
        let location = index.locate(&headers)?;
        Ok(Checkpoint { index: Some(index), shards, location })
    }

    /// The index, for sharded checkpoints.
    pub fn index(&self) -> Option<&ShardIndex> {
        self.index.as_ref()
    }

    /// The shard files, in order.
    pub fn shards(&self) -> &[F] {
        &self.shards
    }

    /// The shard files, opened and checked, for callers that read them their own way.
    pub fn into_shards(self) -> Vec<F> {
        self.shards
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.location.len()
    }

    /// Whether there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.location.is_empty()
    }

    /// Bytes of tensor data over all shards (transformers' `total_size`).
    pub fn total_size(&self) -> u64 {
        self.shards.iter().map(|s| s.header().data_len() as u64).sum()
    }

    /// Tensor names, sorted.
    pub fn names_sorted(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.location.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// Every tensor in shard order then file order: (shard position, name, info).
    pub fn iter(&self) -> impl Iterator<Item = (usize, &str, &TensorInfo)> + '_ {
        self.shards.iter().enumerate().flat_map(|(i, s)| s.header().iter().map(move |(name, info)| (i, name, info)))
    }

    /// The position of the shard holding `name`, and the tensor's description;
    /// `None` when the checkpoint has no such tensor.
    pub fn find(&self, name: &str) -> Option<(usize, &TensorInfo)> {
        let shard = *self.location.get(name)?;
        self.shards[shard].header().info(name).ok().map(|info| (shard, info))
    }
}

/// One or several local safetensors files opened as a single checkpoint.
pub type ShardedCheckpoint = Checkpoint<PreadFile>;

/// Whether [`Checkpoint::open`] takes `path` for a checkpoint of several
/// files rather than one safetensors file: a directory, or an index, i.e. a
/// file named `*.json` that is not itself a safetensors file (whose first
/// eight bytes give a header length that fits in the file; read that way,
/// the first eight bytes of JSON text, which holds no NUL byte, give a
/// length of 2^56 or more, past any file's end).
pub fn is_checkpoint_path(path: &Path) -> bool {
    path.is_dir() || is_index_file(path)
}

/// The most bytes an index may have, local or remote: far above any real
/// one (an entry is a tensor name and a file name, ~100 bytes; the largest
/// checkpoints have ~100k tensors), and a bound on what a hostile index
/// can cost.
pub const MAX_INDEX_SIZE: u64 = 64 << 20;

/// A shard that cannot be opened for want of descriptors says what to do:
/// an open checkpoint holds all of its `shards` open at once.
fn with_descriptor_advice(error: Error, shards: usize) -> Error {
    // EMFILE, the same number on Linux, macOS and the BSDs.
    const TOO_MANY_OPEN_FILES: i32 = 24;
    match error {
        Error::InFile { path, source } => with_descriptor_advice(*source, shards).in_file(path),
        Error::Io { context, source } if source.raw_os_error() == Some(TOO_MANY_OPEN_FILES) => Error::Io {
            context: format!("{context}; the checkpoint's {shards} shards are held open together: raise the limit on open files (ulimit -n)"),
            source,
        },
        other => other,
    }
}

/// An index file's text, refused past [`MAX_INDEX_SIZE`] (by its size
/// first, and while reading, should it grow).
pub fn read_index_text(path: &Path) -> std::io::Result<String> {
    use std::io::Read;

    let too_large = |size: u64| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("the index has {size} bytes or more, more than the {MAX_INDEX_SIZE} an index may have"));
    let file = crate::fs::open_regular(path)?;
    let size = file.metadata()?.len();
    if size > MAX_INDEX_SIZE {
        return Err(too_large(size));
    }
    let mut text = String::new();
    file.take(MAX_INDEX_SIZE + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_INDEX_SIZE {
        return Err(too_large(text.len() as u64));
    }
    Ok(text)
}

fn is_index_file(path: &Path) -> bool {
    use std::io::Read;

    if !path.to_string_lossy().ends_with(".json") {
        return false;
    }
    let mut start = [0u8; 8];
    let safetensors = crate::fs::open_regular(path).and_then(|mut file| {
        let len = file.metadata()?.len();
        file.read_exact(&mut start)?;
        Ok(u64::from_le_bytes(start).checked_add(8).is_some_and(|end| end <= len))
    });
    // Unreadable: opened as an index, whose read then reports why.
    !safetensors.unwrap_or(false)
}

impl Checkpoint<PreadFile> {
    /// Opens a directory (its index, or its single `model.safetensors`), an
    /// index file, or one safetensors file. Reads headers only.
    pub fn open(path: impl AsRef<Path>) -> Result<ShardedCheckpoint> {
        let path = path.as_ref();
        let index_path = if path.is_dir() {
            // A file first (the index, then the model file); else one that is
            // there in another form (a FIFO, a folder, a broken link), opened
            // so that the error says what is wrong with it.
            let names = [INDEX_FILE, SINGLE_FILE];
            let chosen = names.into_iter().find(|name| path.join(name).is_file()).or_else(|| names.into_iter().find(|name| path.join(name).symlink_metadata().is_ok()));
            if chosen == Some(INDEX_FILE) {
                Some(path.join(INDEX_FILE))
            } else if chosen == Some(SINGLE_FILE) {
                return Ok(Checkpoint::single(PreadFile::open(path.join(SINGLE_FILE))?));
            } else {
                // Not found, like a missing file (and a remote "directory" with neither).
                let torch = ["pytorch_model.bin.index.json", "pytorch_model.bin"].into_iter().find(|name| path.join(name).is_file());
                let neither = match torch {
                    Some(name) => format!("it has neither {INDEX_FILE} nor {SINGLE_FILE}, but a torch checkpoint ({name}): `tensafe convert` converts it without unpickling it"),
                    None => format!("it has neither {INDEX_FILE} nor {SINGLE_FILE}"),
                };
                return Err(Error::io("opening the checkpoint in this folder", std::io::Error::new(std::io::ErrorKind::NotFound, neither)).in_file(path));
            }
        } else if is_index_file(path) {
            Some(path.to_path_buf())
        } else {
            None
        };
        match index_path {
            Some(index_path) => ShardedCheckpoint::open_index(&index_path),
            None => Ok(Checkpoint::single(PreadFile::open(path)?)),
        }
    }

    fn open_index(index_path: &Path) -> Result<ShardedCheckpoint> {
        let text = read_index_text(index_path).map_err(|e| Error::io("reading the index", e).in_file(index_path))?;
        let index = ShardIndex::parse(&text).map_err(|e| e.in_file(index_path))?;
        let dir = index_path.parent().unwrap_or(Path::new("."));
        let files = index.shard_files();
        let mut shards = Vec::new();
        for file in &files {
            let shard_path = dir.join(file);
            // Something there that is not a file is named for what it is (below).
            if !shard_path.exists() {
                return Err(Error::InvalidCheckpoint { reason: format!("missing shard {} (listed in the index)", Printable(file)) }
                    .in_file(index_path));
            }
            shards.push(PreadFile::open(&shard_path).map_err(|e| with_descriptor_advice(e, files.len()))?);
        }
        Checkpoint::indexed(index, shards).map_err(|reason| Error::InvalidCheckpoint { reason }.in_file(index_path))
    }

    /// The shard holding `name` and the tensor's description.
    pub fn locate(&self, name: &str) -> Result<(usize, &TensorInfo)> {
        self.find(name).ok_or_else(|| Error::TensorNotFound { name: name.to_owned() })
    }

    /// Reads one tensor's bytes.
    pub fn read_tensor(&self, name: &str) -> Result<Vec<u8>> {
        let (shard, _) = self.locate(name)?;
        self.shards[shard].read_tensor(name)
    }
}

/// Parses a size like `5GB` (10⁹), `500MiB` (2²⁰), `1.5GB` or a plain byte count.
pub fn parse_size(text: &str) -> Result<u64> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let factor: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        "KIB" => 1 << 10,
        "MIB" => 1 << 20,
        "GIB" => 1 << 30,
        "TIB" => 1 << 40,
        other => return Err(Error::InvalidOption { reason: format!("unknown size unit {other:?} in {text:?}") }),
    };
    let value: f64 = number.parse().map_err(|_| Error::InvalidOption { reason: format!("not a size: {text:?}") })?;
    // Fractions of a byte are dropped; what is left must be a byte at least.
    let bytes = value * factor as f64;
    if !(bytes.is_finite() && bytes >= 1.0) {
        return Err(Error::InvalidOption { reason: format!("sizes must be one byte or more: {text:?}") });
    }
    // 2^64 and up would saturate to u64::MAX: a size no file has.
    if bytes >= u64::MAX as f64 {
        return Err(Error::InvalidOption { reason: format!("size too large: {text:?}") });
    }
    Ok(bytes as u64)
}

/// How [`save_sharded`] splits tensors: the files to write, in order, each
/// with its tensors, and the index to write after them (`None` when
/// everything fits in one `model.safetensors`). Shared with writers to other
/// destinations (object storage), so every destination gets the same files.
pub struct ShardPlan<N, V> {
    /// (file name, tensors of that file), in the order to write them.
    pub files: Vec<(String, Vec<(N, V)>)>,
    /// The index, for more than one shard.
    pub index: Option<ShardIndex>,
}

/// Splits tensors, in the given order, into shards of at most
/// `max_shard_bytes` of tensor data (a larger tensor gets a shard of its
/// own), exactly as huggingface_hub's `split_torch_state_dict_into_shards`
/// does, named `model-0000i-of-0000n.safetensors`, with their index. A
/// single shard is named `model.safetensors` with no index, as transformers
/// does. Nothing is read or written.
pub fn plan_shards<N, V, I>(tensors: I, max_shard_bytes: u64) -> ShardPlan<N, V>
where
    N: AsRef<str>,
    V: View,
    I: IntoIterator<Item = (N, V)>,
{
    // The huggingface_hub / transformers split: in order, a new shard when the
    // next tensor would overflow the current one; a tensor larger than the
    // limit gets a shard of its own right away while the current one goes on.
    let mut shards: Vec<Vec<(N, V)>> = Vec::new();
    let mut current: Vec<(N, V)> = Vec::new();
    let mut current_bytes = 0u64;
    for (name, view) in tensors {
        let len = view.data_len() as u64;
        if len > max_shard_bytes {
            shards.push(vec![(name, view)]);
            continue;
        }
        if current_bytes + len > max_shard_bytes {
            shards.push(std::mem::take(&mut current));
            current_bytes = 0;
        }
        current.push((name, view));
        current_bytes += len;
    }
    if !current.is_empty() || shards.is_empty() {
        shards.push(current);
    }
    if shards.len() == 1 {
        return ShardPlan { files: vec![(SINGLE_FILE.to_owned(), shards.pop().expect("one shard"))], index: None };
    }
    let count = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut total = 0u64;
    let mut files = Vec::with_capacity(count);
    for (i, shard) in shards.into_iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, count);
        for (name, view) in &shard {
            weight_map.insert(name.as_ref().to_owned(), file.clone());
            total += view.data_len() as u64;
        }
        files.push((file, shard));
    }
    let mut index_metadata = serde_json::Map::new();
    index_metadata.insert("total_size".into(), total.into());
    ShardPlan { files, index: Some(ShardIndex { metadata: index_metadata, weight_map }) }
}

/// Splits tensors as [`plan_shards`] does and writes the shards plus
/// `model.safetensors.index.json` into `dir`; returns the index (`None` when
/// one `model.safetensors` was enough). Nothing is replaced until every file
/// is written (an error leaves the directory as it was, so a checkpoint can
/// be rewritten in place); then the shards are renamed into place, the index
/// last, and what remains there of an earlier checkpoint under the same
/// names is removed ([`remove_stale_files`]).
pub fn save_sharded<N, V, I>(tensors: I, dir: impl AsRef<Path>, max_shard_bytes: u64, metadata: Option<&Metadata>) -> Result<Option<ShardIndex>>
where
    N: AsRef<str>,
    V: View,
    I: IntoIterator<Item = (N, V)>,
{
    let dir = dir.as_ref();
    let plan = plan_shards(tensors, max_shard_bytes);
    let mut staged = StagedWrites::default();
    let written: Vec<String> = plan.files.iter().map(|(file, _)| file.clone()).collect();
    for (file, shard) in plan.files {
        let path = dir.join(&file);
        let prepared = prepare(shard, metadata, &WriteOptions::default()).map_err(|e| e.in_file(&path))?;
        staged.write(&path, |out| prepared.write_to(out)).map_err(|e| e.in_file(&path))?;
    }
    if let Some(index) = &plan.index {
        let index_path = dir.join(INDEX_FILE);
        let text = index.to_json();
        staged.write(&index_path, |out| out.write_all(text.as_bytes())).map_err(|e| e.in_file(&index_path))?;
    }
    staged.commit()?;
    remove_stale_files(dir, &written, plan.index.is_some())?;
    Ok(plan.index)
}

/// After a checkpoint was written into `dir` as the files `written`
/// (sharded: with an index), removes what remains there of an earlier
/// checkpoint saved under the same names, as transformers' `save_pretrained`
/// does: shards named `model-0000i-of-0000n.safetensors` that are not among
/// the new files, and the other form of a checkpoint (`model.safetensors`
/// beside a new index, an index beside a new `model.safetensors`), which
/// readers would otherwise find first (transformers takes
/// `model.safetensors` before an index, tensafe an index first). No other
/// file is touched.
pub fn remove_stale_files(dir: &Path, written: &[String], sharded: bool) -> Result<()> {
    let other_form = if sharded { SINGLE_FILE } else { INDEX_FILE };
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io("listing the checkpoint directory", e).in_file(dir))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("listing the checkpoint directory", e).in_file(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let stale = (name == other_form || is_shard_name(&name)) && !written.contains(&name);
        // A link is removed itself (as in the Hugging Face cache, where a
        // snapshot's files are links), never what it points to.
        if stale && entry.file_type().is_ok_and(|t| t.is_file() || t.is_symlink()) {
            std::fs::remove_file(entry.path()).map_err(|e| Error::io("removing a file of the previous checkpoint", e).in_file(entry.path()))?;
        }
    }
    Ok(())
}

/// Refuses to reshard one shard of a checkpoint into that checkpoint's own
/// directory: the new files would replace the checkpoint, and
/// [`remove_stale_files`] remove its other shards, leaving only this
/// shard's tensors. (A lone file named like a shard, with no other shard or
/// index beside it, is a checkpoint of its own.)
fn refuse_one_shard_in_place(input: &Path, out_dir: &Path) -> Result<()> {
    let name = input.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if is_checkpoint_path(input) || !is_shard_name(&name) {
        return Ok(());
    }
    let input_dir = match input.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let same = |a: &Path, b: &Path| matches!((a.canonicalize(), b.canonicalize()), (Ok(a), Ok(b)) if a == b);
    let others = std::fs::read_dir(input_dir).map(|entries| {
        entries.flatten().any(|e| {
            let other = e.file_name().to_string_lossy().into_owned();
            other != name && (other == INDEX_FILE || is_shard_name(&other))
        })
    });
    if same(input_dir, out_dir) && others.unwrap_or(true) {
        return Err(Error::InvalidCheckpoint {
            reason: format!(
                "{} is one shard of the checkpoint in {}, and resharding it there would replace that checkpoint with this shard's tensors alone: give the directory or its index as the input, or another output directory",
                input.display(),
                out_dir.display()
            ),
        });
    }
    Ok(())
}

/// Whether `name` is a shard's name as [`plan_shards`] (and transformers)
/// give them: `model-0000i-of-0000n.safetensors`.
fn is_shard_name(name: &str) -> bool {
    let numbers = name.strip_prefix("model-").and_then(|rest| rest.strip_suffix(".safetensors"));
    let five_digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    numbers.and_then(|n| n.split_once("-of-")).is_some_and(|(i, n)| five_digits(i) && five_digits(n))
}

/// Where a [`LazyTensor`] gets its bytes: a local file here, a remote one in
/// tensafe-remote.
pub trait TensorSource {
    /// What a failed read reports.
    type Error;
    /// The bytes of tensor `name`.
    fn read_tensor(&self, name: &str) -> std::result::Result<Vec<u8>, Self::Error>;
}

impl TensorSource for PreadFile {
    type Error = Error;
    fn read_tensor(&self, name: &str) -> Result<Vec<u8>> {
        PreadFile::read_tensor(self, name)
    }
}

/// A tensor of another checkpoint, read only when the writer asks for its
/// bytes: resharding holds one tensor in memory at a time.
pub struct LazyTensor<'a, S: TensorSource = PreadFile> {
    file: &'a S,
    name: &'a str,
    info: &'a TensorInfo,
    /// Where a failed read is kept: `View::data` cannot return an error, so the
    /// writer sees a short buffer (and refuses it) and the caller reports this.
    error: &'a Mutex<Option<S::Error>>,
}

impl<'a, S: TensorSource> LazyTensor<'a, S> {
    /// The tensor `name` of `file`; a read failure is stored in `error`.
    pub fn new(file: &'a S, name: &'a str, info: &'a TensorInfo, error: &'a Mutex<Option<S::Error>>) -> Self {
        LazyTensor { file, name, info, error }
    }
}

impl<S: TensorSource> View for LazyTensor<'_, S> {
    fn dtype(&self) -> Dtype {
        self.info.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.info.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        match self.file.read_tensor(self.name) {
            Ok(bytes) => Cow::Owned(bytes),
            Err(e) => {
                self.error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                Cow::Owned(Vec::new())
            }
        }
    }
    fn data_len(&self) -> usize {
        self.info.byte_len()
    }
}

/// Rewrites a checkpoint (directory, index or file) into `out_dir` with a new
/// shard size, keeping each shard's `__metadata__` of the first input shard.
pub fn reshard(input: impl AsRef<Path>, out_dir: impl AsRef<Path>, max_shard_bytes: u64) -> Result<Option<ShardIndex>> {
    refuse_one_shard_in_place(input.as_ref(), out_dir.as_ref())?;
    let checkpoint = ShardedCheckpoint::open(input)?;
    let metadata: Option<Metadata> = checkpoint.shards.first().and_then(|s| s.header().metadata()).map(|m| m.iter().cloned().collect());
    let read_error = Mutex::new(None);
    let tensors: Vec<(String, LazyTensor<'_, PreadFile>)> = checkpoint
        .iter()
        .map(|(shard, name, info)| (name.to_owned(), LazyTensor::new(&checkpoint.shards[shard], name, info, &read_error)))
        .collect();
    std::fs::create_dir_all(out_dir.as_ref()).map_err(|e| Error::io("creating the output directory", e).in_file(out_dir.as_ref()))?;
    let saved = save_sharded(tensors, out_dir, max_shard_bytes, metadata.as_ref());
    match read_error.into_inner().expect("error slot") {
        Some(read_failure) => Err(read_failure),
        None => saved,
    }
}


#[cfg(test)]
mod tests {
    use super::*;
    use crate::writer::serialize_to_file;
    use crate::RawTensor;

    fn tensors(data: &[Vec<u8>]) -> Vec<(String, RawTensor<'_>)> {
        data.iter()
            .enumerate()
            .map(|(i, d)| (format!("layer.{i}"), RawTensor { dtype: Dtype::U8, shape: std::slice::from_ref(&SHAPES[i]), data: d }))
            .collect()
    }
    const SHAPES: [usize; 5] = [100, 300, 50, 500, 10];

    fn sample() -> Vec<Vec<u8>> {
        SHAPES.iter().enumerate().map(|(i, &n)| vec![i as u8; n]).collect()
    }

    #[test]
    fn an_index_written_back_keeps_its_metadata_exactly() {
        // Found by the shard_index fuzz target: without exact float parsing
        // the last digit of a large number changed on the way back.
        let text = r#"{"metadata": {"total_size": 7777777772777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777, "note": 0.1}, "weight_map": {"a": "m.safetensors"}}"#;
        let index = ShardIndex::parse(text).unwrap();
        assert_eq!(ShardIndex::parse(&index.to_json()).unwrap(), index);
    }

    #[test]
    fn sizes_parse_like_transformers() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("500MiB").unwrap(), 500 << 20);
        assert_eq!(parse_size("1.5KB").unwrap(), 1500);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("-1GB").is_err());
        assert_eq!(parse_size("1.9").unwrap(), 1);
        for nothing in ["0.1", "0", "0.0000000001KB", ".", ""] {
            assert!(parse_size(nothing).is_err(), "{nothing}");
        }
        assert_eq!(parse_size("16000000TB").unwrap(), 16_000_000_000_000_000_000);
        for too_large in ["100000000TB", "18446744073709551616", "1e30"] {
            assert!(parse_size(too_large).is_err(), "{too_large}");
        }
    }

    #[test]
    fn save_open_and_reshard() {
        let dir = tempfile::tempdir().unwrap();
        let data = sample();
        let index = save_sharded(tensors(&data), dir.path(), 400, None).unwrap().unwrap();
        // 100+300 | 500 (over the limit: its own shard, at once) | 50+10
        assert_eq!(index.weight_map["layer.0"], "model-00001-of-00003.safetensors");
        assert_eq!(index.weight_map["layer.1"], "model-00001-of-00003.safetensors");
        assert_eq!(index.weight_map["layer.3"], "model-00002-of-00003.safetensors");
        assert_eq!(index.weight_map["layer.2"], "model-00003-of-00003.safetensors");
        assert_eq!(index.weight_map["layer.4"], "model-00003-of-00003.safetensors");
        assert_eq!(index.total_size(), Some(960));
        let text = std::fs::read_to_string(dir.path().join(INDEX_FILE)).unwrap();
        assert!(text.starts_with("{\n  \"metadata\": {\n    \"total_size\": 960\n  },\n  \"weight_map\": {"), "{text}");

        for path in [dir.path().to_path_buf(), dir.path().join(INDEX_FILE)] {
            let ckpt = ShardedCheckpoint::open(&path).unwrap();
            assert_eq!(ckpt.len(), 5);
            assert_eq!(ckpt.shards().len(), 3);
            for (i, d) in data.iter().enumerate() {
                assert_eq!(&ckpt.read_tensor(&format!("layer.{i}")).unwrap(), d);
            }
        }

        let out = dir.path().join("one");
        assert!(reshard(dir.path(), &out, 10_000).unwrap().is_none());
        let single = ShardedCheckpoint::open(&out).unwrap();
        assert_eq!(single.shards().len(), 1);
        assert_eq!(single.read_tensor("layer.3").unwrap(), data[3]);

        // In place: the input is read whole before anything of it is replaced.
        assert!(reshard(dir.path(), dir.path(), 600).unwrap().is_some());
        let again = ShardedCheckpoint::open(dir.path()).unwrap();
        assert_eq!(again.shards().len(), 2);
        for (i, d) in data.iter().enumerate() {
            assert_eq!(&again.read_tensor(&format!("layer.{i}")).unwrap(), d);
        }
    }

    /// A U8 tensor of the given shape whose bytes cannot be had (its view gives none).
    struct Unreadable([usize; 1]);

    impl View for Unreadable {
        fn dtype(&self) -> Dtype {
            Dtype::U8
        }
        fn shape(&self) -> &[usize] {
            &self.0
        }
        fn data(&self) -> Cow<'_, [u8]> {
            Cow::Borrowed(&[])
        }
        fn data_len(&self) -> usize {
            self.0[0]
        }
    }

    #[test]
    fn a_directory_with_no_checkpoint_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let err = ShardedCheckpoint::open(dir.path()).map(drop).unwrap_err();
        assert!(matches!(err.without_file(), Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound), "{err:?}");
        assert!(err.to_string().starts_with(&dir.path().display().to_string()), "the folder first: {err}");
        assert!(err.to_string().contains(&format!("neither {INDEX_FILE} nor {SINGLE_FILE}")), "{err}");
        // A folder holding a torch checkpoint says what converts it.
        std::fs::write(dir.path().join("pytorch_model.bin"), b"").unwrap();
        let err = ShardedCheckpoint::open(dir.path()).map(drop).unwrap_err().to_string();
        assert!(err.contains("a torch checkpoint (pytorch_model.bin): `tensafe convert` converts it"), "{err}");
        // An index or model file that is there but is no file: named as what it is.
        #[cfg(unix)]
        for name in [INDEX_FILE, SINGLE_FILE] {
            let dir = tempfile::tempdir().unwrap();
            let missing = dir.path().join("gone");
            std::os::unix::fs::symlink(&missing, dir.path().join(name)).unwrap();
            let err = ShardedCheckpoint::open(dir.path()).map(drop).unwrap_err().to_string();
            assert!(err.contains(name) && !err.contains("neither"), "{name}: {err}");
            std::fs::remove_file(dir.path().join(name)).unwrap();
            std::fs::create_dir(dir.path().join(name)).unwrap();
            let err = ShardedCheckpoint::open(dir.path()).map(drop).unwrap_err().to_string();
            assert!(err.contains(name) && err.contains("directory") && !err.contains("neither"), "{name}: {err}");
        }
        // A model file beside a broken index link opens, as transformers
        // (which looks for model.safetensors first) opens it.
        #[cfg(unix)]
        {
            let dir = tempfile::tempdir().unwrap();
            std::os::unix::fs::symlink(dir.path().join("gone"), dir.path().join(INDEX_FILE)).unwrap();
            let data = 1f32.to_le_bytes();
            crate::serialize_to_file([("w", crate::RawTensor { dtype: crate::Dtype::F32, shape: &[1], data: &data })], None, dir.path().join(SINGLE_FILE)).unwrap();
            assert!(ShardedCheckpoint::open(dir.path()).unwrap().index().is_none());
        }
    }

    #[test]
    fn a_failed_save_leaves_the_checkpoint_there_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let data = sample();
        save_sharded(tensors(&data), dir.path(), 400, None).unwrap();
        let before: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
        // Rewritten in place with new values and the same sizes, so the same
        // shard names: the first two shards are fine, the last fails while
        // being written (layer.4, beside layer.2).
        let new_data: Vec<Vec<u8>> = data.iter().map(|d| d.iter().map(|b| b + 100).collect()).collect();
        let mut failing: Vec<(String, Box<dyn View>)> = tensors(&new_data).into_iter().map(|(n, t)| (n, Box::new(t) as Box<dyn View>)).collect();
        failing[4].1 = Box::new(Unreadable([SHAPES[4]]));
        let error = save_sharded(failing.iter().map(|(n, v)| (n.as_str(), v.as_ref())), dir.path(), 400, None).unwrap_err();
        assert!(error.to_string().contains("the view gave 0 bytes but announced 10"), "{error}");
        let after: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
        assert_eq!(before, after, "no file replaced, none left behind");
        let ckpt = ShardedCheckpoint::open(dir.path()).unwrap();
        for (i, d) in data.iter().enumerate() {
            assert_eq!(&ckpt.read_tensor(&format!("layer.{i}")).unwrap(), d);
        }
    }

    #[test]
    fn a_save_removes_what_remains_of_the_checkpoint_it_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let data = sample();
        let files = || {
            let mut names: Vec<String> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
            names.sort();
            names
        };
        std::fs::write(dir.path().join("model-notes.txt"), "kept").unwrap();
        save_sharded(tensors(&data), dir.path(), 10_000, None).unwrap();
        assert_eq!(files(), ["model-notes.txt", SINGLE_FILE]);
        // Sharded: model.safetensors goes (transformers would take it before the index).
        save_sharded(tensors(&data), dir.path(), 400, None).unwrap();
        let three = ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"];
        assert_eq!(files(), [&three[..], &["model-notes.txt", INDEX_FILE]].concat());
        // Fewer shards: the old ones go.
        save_sharded(tensors(&data), dir.path(), 600, None).unwrap();
        assert_eq!(files(), ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model-notes.txt", INDEX_FILE]);
        // One file: the index and shards go (tensafe would take the index first).
        let fewer = &tensors(&data)[..2];
        save_sharded(fewer.iter().map(|(n, t)| (n.as_str(), t)), dir.path(), 10_000, None).unwrap();
        assert_eq!(files(), ["model-notes.txt", SINGLE_FILE]);
        assert_eq!(ShardedCheckpoint::open(dir.path()).unwrap().len(), 2);
    }

    #[test]
    fn stale_links_are_removed_and_what_they_name_kept() {
        // The Hugging Face cache's layout: a snapshot's files are links to blobs.
        let root = tempfile::tempdir().unwrap();
        let (blobs, snapshot) = (root.path().join("blobs"), root.path().join("snapshot"));
        std::fs::create_dir_all(&snapshot).unwrap();
        std::fs::create_dir_all(&blobs).unwrap();
        let data = sample();
        save_sharded(tensors(&data), &blobs, 400, None).unwrap();
        for entry in std::fs::read_dir(&blobs).unwrap() {
            let name = entry.unwrap().file_name();
            std::os::unix::fs::symlink(Path::new("../blobs").join(&name), snapshot.join(&name)).unwrap();
        }
        assert_eq!(ShardedCheckpoint::open(&snapshot).unwrap().shards().len(), 3);

        let fewer = &tensors(&data)[..2];
        save_sharded(fewer.iter().map(|(n, t)| (n.as_str(), t)), &snapshot, 10_000, None).unwrap();
        let names: Vec<_> = std::fs::read_dir(&snapshot).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, [SINGLE_FILE], "the old index and shards' links are gone");
        assert_eq!(ShardedCheckpoint::open(&snapshot).unwrap().len(), 2);
        assert_eq!(std::fs::read_dir(&blobs).unwrap().count(), 4, "the blobs are kept");
    }

    #[test]
    fn one_shard_is_not_resharded_into_its_own_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let data = sample();
        save_sharded(tensors(&data), dir.path(), 400, None).unwrap();
        let shard = dir.path().join("model-00002-of-00003.safetensors");
        let before: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();

        let message = reshard(&shard, dir.path(), 10_000).unwrap_err().to_string();
        assert!(message.contains("is one shard of the checkpoint in"), "{message}");
        // Also when named relative to the directory it is in.
        let relative = dir.path().join(".").join("model-00002-of-00003.safetensors");
        assert!(reshard(&relative, dir.path().join("."), 10_000).is_err());
        let after: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(after, before);
        assert_eq!(ShardedCheckpoint::open(dir.path()).unwrap().len(), 5);

        // Into another directory it is a checkpoint of its own.
        let out = dir.path().join("alone");
        reshard(&shard, &out, 10_000).unwrap();
        assert_eq!(ShardedCheckpoint::open(&out).unwrap().read_tensor("layer.3").unwrap(), data[3]);

        // So is a lone file named like a shard, with no other shard or index
        // beside it: resharded in place.
        let lone_dir = dir.path().join("lone");
        std::fs::create_dir(&lone_dir).unwrap();
        let lone = lone_dir.join("model-00001-of-00002.safetensors");
        std::fs::copy(&shard, &lone).unwrap();
        assert!(reshard(&lone, &lone_dir, 10_000).unwrap().is_none());
        assert_eq!(ShardedCheckpoint::open(&lone_dir).unwrap().read_tensor("layer.3").unwrap(), data[3]);
    }

    #[test]
    fn a_safetensors_file_named_json_is_a_file_not_an_index() {
        let dir = tempfile::tempdir().unwrap();
        let data = sample();
        save_sharded(tensors(&data), dir.path(), 400, None).unwrap();
        let file = dir.path().join("weights.json");
        serialize_to_file(tensors(&data), None, &file).unwrap();
        assert!(!is_checkpoint_path(&file));
        let opened = ShardedCheckpoint::open(&file).unwrap();
        assert_eq!((opened.shards().len(), opened.read_tensor("layer.4").unwrap()), (1, data[4].clone()));
        // Indexes, short ones and unreadable ones are opened as indexes, which say what is wrong.
        assert!(is_checkpoint_path(&dir.path().join(INDEX_FILE)) && is_checkpoint_path(dir.path()));
        // Whatever its header starts with (whitespace is valid JSON).
        let header = br#" {"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
        std::fs::write(&file, [&(header.len() as u64).to_le_bytes()[..], header, b"\x07"].concat()).unwrap();
        assert!(!is_checkpoint_path(&file));
        assert_eq!(ShardedCheckpoint::open(&file).unwrap().read_tensor("a").unwrap(), [7]);
        std::fs::write(&file, "{}").unwrap();
        assert!(is_checkpoint_path(&file));
        // An index past the limit is refused before it is read.
        std::fs::write(&file, "        {").unwrap();
        std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(MAX_INDEX_SIZE + 1).unwrap();
        assert!(is_checkpoint_path(&file));
        let error = ShardedCheckpoint::open(&file).unwrap_err().to_string();
        assert!(error.contains("more than the 67108864 an index may have"), "{error}");
        assert!(is_checkpoint_path(&dir.path().join("missing.json")));
        assert!(!is_checkpoint_path(&dir.path().join("model-00001-of-00003.safetensors")));
    }

    #[test]
    fn inconsistencies_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let data = sample();
        save_sharded(tensors(&data), dir.path(), 400, None).unwrap();
        let index_path = dir.path().join(INDEX_FILE);
        let original = std::fs::read_to_string(&index_path).unwrap();
        let check = |text: String, expected: &str| {
            std::fs::write(&index_path, text).unwrap();
            let err = ShardedCheckpoint::open(dir.path()).unwrap_err().to_string();
            assert!(err.contains(expected), "{err}");
        };
        check(original.replace("\"total_size\": 960", "\"total_size\": 961"), "declares total_size 961");
        check(original.replace("\"layer.0\": \"model-00001-of-00003.safetensors\"", "\"layer.0\": \"model-00002-of-00003.safetensors\""), "index lists it in");
        check(original.replace("\n    \"layer.1\": \"model-00001-of-00003.safetensors\",", ""), "is in shard model-00001-of-00003.safetensors but not in the index");
        check(original.replace("\"layer.0\": ", "\"ghost\": \"model-00001-of-00003.safetensors\",\n    \"layer.0\": "), "that shard does not contain it");
        check(original.replace("model-00002-of-00003", "model-00002-of-00009"), "missing shard model-00002-of-00009");
        check(original.replace("model-00002-of-00003.safetensors", "../evil.safetensors"), "outside the checkpoint directory");
        std::fs::write(&index_path, original).unwrap();
        std::fs::remove_file(dir.path().join("model-00002-of-00003.safetensors")).unwrap();
        assert!(ShardedCheckpoint::open(dir.path()).unwrap_err().to_string().contains("missing shard model-00002-of-00003"));
        std::fs::create_dir(dir.path().join("model-00002-of-00003.safetensors")).unwrap();
        let error = ShardedCheckpoint::open(dir.path()).unwrap_err().to_string();
        assert!(error.contains("model-00002-of-00003.safetensors") && error.contains("is a directory, not a regular file"), "{error}");
    }

    #[test]
    fn shards_unlike_the_index_in_number_are_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let data = sample();
        let index = save_sharded(tensors(&data), dir.path(), 400, None).unwrap().unwrap();
        let open = |name: &str| PreadFile::open(dir.path().join(name)).unwrap();
        let files = index.shard_files();
        let too_many: Vec<PreadFile> = files.iter().chain(files.first()).map(|f| open(f)).collect();
        let err = Checkpoint::indexed(index.clone(), too_many).unwrap_err();
        assert!(err.contains("lists 3 shard files but 4"), "{err}");
        let too_few: Vec<PreadFile> = files[..2].iter().map(|f| open(f)).collect();
        let err = Checkpoint::indexed(index.clone(), too_few).unwrap_err();
        assert!(err.contains("lists 3 shard files but 2"), "{err}");
        let all: Vec<PreadFile> = files.iter().map(|f| open(f)).collect();
        assert_eq!(Checkpoint::indexed(index, all).unwrap().len(), 5);
    }
}

//! [`RemoteCheckpoint`]: a sharded checkpoint (index + shards, transformers
//! convention) or a single file in object storage, opened as one.

use object_store::GetOptions;
use tensafe::{Checkpoint, Header, ShardFile, ShardIndex, TensorInfo, INDEX_FILE, SINGLE_FILE};

use crate::error::{RemoteError, Result};
use crate::fetch::{classify, Object};
use crate::store::{block_on, store_for, RemoteUrl};
use crate::traffic::{Counter, Probe, Traffic};
use crate::{RemoteFile, RemoteOptions};

/// One or several remote safetensors files opened as one checkpoint: a
/// [`Checkpoint`] of [`RemoteFile`]s (which it dereferences to, for the
/// shards, names, sizes and lookups) plus what reading the index cost.
#[derive(Debug)]
pub struct RemoteCheckpoint {
    files: Checkpoint<RemoteFile>,
    index_traffic: Traffic,
}

impl ShardFile for RemoteFile {
    fn header(&self) -> &Header {
        RemoteFile::header(self)
    }
}

impl std::ops::Deref for RemoteCheckpoint {
    type Target = Checkpoint<RemoteFile>;

    fn deref(&self) -> &Checkpoint<RemoteFile> {
        &self.files
    }
}

impl RemoteCheckpoint {
    /// Opens an index URL (`….json`; a safetensors file so named opens as
    /// one, as locally), a "directory" URL ending in `/` (its
    /// `model.safetensors.index.json`, else its `model.safetensors`), or one
    /// safetensors file. Reads the index and every shard's header, with the
    /// same consistency checks as a local checkpoint. The traffic counts the
    /// index requests too, a probe that found none included.
    pub fn open(url: &str, options: &RemoteOptions) -> Result<RemoteCheckpoint> {
        let index_requests = Counter::new();
        if url.ends_with('/') {
            let index_url = RemoteUrl::parse(&format!("{url}{INDEX_FILE}"))?;
            return match RemoteCheckpoint::from_index(&index_url, options, &index_requests) {
                Err(e) if e.is_not_found() => RemoteCheckpoint::single(&format!("{url}{SINGLE_FILE}"), options, &index_requests).map_err(|e| {
                    if e.is_not_found() {
                        // Not found, as a local directory with neither is.
                        RemoteError::NotFound { url: url.to_owned(), detail: format!("it has neither {INDEX_FILE} nor {SINGLE_FILE}") }
                    } else {
                        e
                    }
                }),
                other => other,
            };
        }
        let parsed = RemoteUrl::parse(url)?;
        if !parsed.object_path().as_ref().ends_with(".json") {
            return RemoteCheckpoint::single(url, options, &index_requests);
        }
        match RemoteCheckpoint::from_index(&parsed, options, &index_requests) {
            // Not an index: a safetensors file named `.json` opens as one
            // (no index is a valid safetensors file); else the index's error.
            Err(e) if !e.is_not_found() => RemoteCheckpoint::single(url, options, &index_requests).map_err(|_| e),
            opened => opened,
        }
    }

    /// One file; `index_requests` counted what looking for an index cost.
    fn single(url: &str, options: &RemoteOptions, index_requests: &Counter) -> Result<RemoteCheckpoint> {
        let file = RemoteFile::open_with(url, options)?;
        Ok(RemoteCheckpoint { files: Checkpoint::single(file), index_traffic: index_requests.traffic() })
    }

    fn from_index(index_url: &RemoteUrl, options: &RemoteOptions, counter: &Counter) -> Result<RemoteCheckpoint> {
        let text = read_small(index_url, options, counter)?;
        let url = index_url.as_str();
        let text = String::from_utf8(text).map_err(|_| invalid(url, "the index is not UTF-8 text".into()))?;
        let index = ShardIndex::parse(&text).map_err(|e| RemoteError::format(url, e))?;
        let urls = index.shard_files().iter().map(|f| index_url.join(f).map(|u| u.to_string())).collect::<Result<Vec<_>>>()?;
        let refs: Vec<&str> = urls.iter().map(String::as_str).collect();
        let shards = RemoteFile::open_many(&refs, options).map_err(|e| match e {
            RemoteError::NotFound { url: shard, .. } => invalid(url, format!("missing shard {} (listed in the index)", tensafe::Printable(&shard))),
            other => other,
        })?;
        let files = Checkpoint::indexed(index, shards).map_err(|reason| invalid(url, reason))?;
        Ok(RemoteCheckpoint { files, index_traffic: counter.traffic() })
    }

    /// The shard files, opened and checked, for callers that read them their own way.
    pub fn into_shards(self) -> Vec<RemoteFile> {
        self.files.into_shards()
    }

    /// The shard holding `name` and the tensor's description.
    pub fn locate(&self, name: &str) -> Result<(usize, &TensorInfo)> {
        let not_found = || RemoteError::format(self.url(), tensafe::Error::TensorNotFound { name: name.to_owned() });
        self.find(name).ok_or_else(not_found)
    }

    /// Reads one tensor's bytes.
    pub fn read_tensor(&self, name: &str) -> Result<Vec<u8>> {
        let (shard, _) = self.locate(name)?;
        self.shards()[shard].read_tensor(name)
    }

    /// Requests made and bytes received so far: index, headers and reads.
    pub fn traffic(&self) -> Traffic {
        self.shards().iter().fold(self.index_traffic, |t, s| t + s.traffic())
    }

    fn url(&self) -> &str {
        self.shards().first().map_or("", |s| s.url().as_str())
    }
}

fn invalid(url: &str, reason: String) -> RemoteError {
    RemoteError::format(url, tensafe::Error::InvalidCheckpoint { reason })
}

/// Reads a whole small object (an index) in one request.
fn read_small(url: &RemoteUrl, options: &RemoteOptions, counter: &Counter) -> Result<Vec<u8>> {
    let store = store_for(url, options)?;
    let counters = [counter.clone(), options.counter.clone()];
    let object = Object { url: url.as_str(), store: store.as_ref(), path: url.object_path(), size: 0, version: None, counters: &counters };
    block_on(async {
        let probe = Probe::new(counters.to_vec(), options.max_retry_after);
        let get = GetOptions { extensions: probe.extensions(), ..GetOptions::default() };
        let result = store.get_opts(url.object_path(), get).await.map_err(|e| classify(e, &probe, &object, 0..0))?;
        let size = result.meta.size;
        if size > tensafe::MAX_INDEX_SIZE {
            return Err(invalid(url.as_str(), format!("the index has {size} bytes, more than the {} an index may have", tensafe::MAX_INDEX_SIZE)));
        }
        let bytes = result.bytes().await.map_err(|e| classify(e, &probe, &object, 0..size))?;
        if bytes.len() as u64 != size {
            return Err(RemoteError::WrongLength { url: url.to_string(), range: 0..size, received: bytes.len() as u64, attempts: 1 });
        }
        Ok(bytes.to_vec())
    })?
}

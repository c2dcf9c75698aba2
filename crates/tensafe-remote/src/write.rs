//! Writing safetensors files and sharded checkpoints to object storage.
//!
//! The bytes are the local writer's ([`tensafe::prepare`] and
//! [`tensafe::Prepared::write_to`]), streamed from the caller's borrowed
//! tensors: a file up to [`RemoteOptions::part_bytes`] goes in one PUT,
//! anything larger as a multipart upload whose parts are cut from the stream
//! as it is produced, with at most [`RemoteOptions::concurrency`] parts in
//! flight. Memory stays below `(concurrency + 1) × part_bytes` whatever the
//! file size; no copy of the whole file is made.
//!
//! Nothing partial becomes visible: a PUT replaces the object at once, and a
//! multipart upload only when it is completed; a failed one is aborted, and
//! aborted again once the parts it had in flight are answered (an upload cut
//! short by a crash is never completed, so it stays invisible
//! until the store's lifecycle rules drop its parts). Uploads in progress are
//! listed, so that a program stopped by a signal can abort them first
//! ([`abort_unfinished_uploads`]).

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, Weak};
use std::time::Duration;

use object_store::{MultipartUpload, ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult, UploadPart, WriteMultipart};
use tensafe::{Metadata, Prepared, ShardIndex, ShardedCheckpoint, View, INDEX_FILE};

use crate::error::{RemoteError, Result};
use crate::fetch::classify_status;
use crate::store::{block_on, runtime, store_for, RemoteUrl, Scheme};
use crate::traffic::Probe;
use crate::{RemoteCheckpoint, RemoteFile, RemoteOptions};

/// S3 and GCS take at most 10 000 parts per upload: larger files get larger parts.
const MAX_PARTS: u64 = 10_000;

/// Writes tensors and metadata as one safetensors file at `url` (`s3://`,
/// `gs://`, `az://`), byte-identical to [`tensafe::serialize_to_file`].
/// Returns the size of the file.
pub fn serialize_to_url<N, V, I>(tensors: I, metadata: Option<&Metadata>, url: &str, options: &RemoteOptions) -> Result<u64>
where
    N: AsRef<str>,
    V: View,
    I: IntoIterator<Item = (N, V)>,
{
    let prepared = tensafe::prepare(tensors, metadata, &tensafe::WriteOptions::default()).map_err(|e| RemoteError::format(url, e))?;
    upload_prepared(url, &prepared, options)
}

/// Uploads a prepared file: its header, then each tensor's bytes as
/// [`View::data`] gives them (called on this thread, in file order).
/// Returns the size of the file.
pub fn upload_prepared<N: AsRef<str>, V: View>(url: &str, prepared: &Prepared<N, V>, options: &RemoteOptions) -> Result<u64> {
    let url = writable(url)?;
    let len = prepared.file_len();
    if len <= options.part_bytes as u64 {
        let mut bytes = Vec::with_capacity(len as usize);
        prepared.write_to(&mut bytes).map_err(|e| produce_error(&url, e))?;
        put(&url, bytes, options)?;
    } else {
        let part = (options.part_bytes as u64).max(len.div_ceil(MAX_PARTS)) as usize;
        upload_multipart(&url, part, options, |out| prepared.write_to(out))?;
    }
    Ok(len)
}

/// Uploads a small object (an index) with one PUT.
pub fn put_bytes(url: &str, bytes: Vec<u8>, options: &RemoteOptions) -> Result<()> {
    put(&writable(url)?, bytes, options)
}

/// Splits tensors into shards of at most `max_shard_bytes` exactly as
/// [`tensafe::save_sharded`] does and uploads them under `prefix` (a
/// "directory" URL such as `s3://bucket/model/`), then the index, last, so a
/// reader never finds an index whose shards are not all there. Returns the
/// index, or `None` when one `model.safetensors` was enough.
pub fn save_sharded_to_url<N, V, I>(tensors: I, prefix: &str, max_shard_bytes: u64, metadata: Option<&Metadata>, options: &RemoteOptions) -> Result<Option<ShardIndex>>
where
    N: AsRef<str>,
    V: View,
    I: IntoIterator<Item = (N, V)>,
{
    let inside = |name: &str| format!("{}/{name}", prefix.trim_end_matches('/'));
    writable(&inside(INDEX_FILE))?;
    let plan = tensafe::plan_shards(tensors, max_shard_bytes);
    for (file, shard) in plan.files {
        serialize_to_url(shard, metadata, &inside(&file), options)?;
    }
    if let Some(index) = &plan.index {
        put_bytes(&inside(INDEX_FILE), index.to_json().into_bytes(), options)?;
    }
    Ok(plan.index)
}

/// Remote files feed [`tensafe::LazyTensor`]: a reshard from a URL holds
/// one tensor in memory at a time.
impl tensafe::TensorSource for RemoteFile {
    type Error = RemoteError;
    fn read_tensor(&self, name: &str) -> Result<Vec<u8>> {
        RemoteFile::read_tensor(self, name)
    }
}

/// Rewrites a checkpoint (file, directory or index) into shards of at most
/// `max_shard_bytes`, keeping the `__metadata__` of its first shard. The
/// input and the output may each be a local path or a URL (the output a
/// "directory": a local one is created if needed). Tensors are read one at a
/// time, when the writer reaches them.
pub fn reshard(input: &str, output: &str, max_shard_bytes: u64, options: &RemoteOptions) -> Result<Option<ShardIndex>> {
    if RemoteUrl::is_remote(input) {
        let checkpoint = RemoteCheckpoint::open(input, options)?;
        let metadata = first_metadata(checkpoint.shards().first().map(RemoteFile::header));
        let failed = Mutex::new(None);
        let tensors = checkpoint.iter().map(|(shard, name, info)| (name, tensafe::LazyTensor::new(&checkpoint.shards()[shard], name, info, &failed)));
        let saved = save_checkpoint(tensors, output, max_shard_bytes, metadata.as_ref(), options);
        failed.into_inner().unwrap_or_else(|p| p.into_inner()).map_or(saved, Err)
    } else {
        let checkpoint = ShardedCheckpoint::open(input).map_err(|e| RemoteError::format(input, e))?;
        let metadata = first_metadata(checkpoint.shards().first().map(tensafe::PreadFile::header));
        let failed = Mutex::new(None);
        let tensors = checkpoint.iter().map(|(shard, name, info)| (name, tensafe::LazyTensor::new(&checkpoint.shards()[shard], name, info, &failed)));
        let saved = save_checkpoint(tensors, output, max_shard_bytes, metadata.as_ref(), options);
        failed.into_inner().unwrap_or_else(|p| p.into_inner()).map_or(saved, |e| Err(RemoteError::format(input, e)))
    }
}

fn first_metadata(header: Option<&tensafe::Header>) -> Option<Metadata> {
    header.and_then(tensafe::Header::metadata).map(|m| m.iter().cloned().collect())
}

/// [`tensafe::save_sharded`] into a local directory or [`save_sharded_to_url`].
fn save_checkpoint<N, V, I>(tensors: I, output: &str, max_shard_bytes: u64, metadata: Option<&Metadata>, options: &RemoteOptions) -> Result<Option<ShardIndex>>
where
    N: AsRef<str>,
    V: View,
    I: IntoIterator<Item = (N, V)>,
{
    if RemoteUrl::is_remote(output) {
        return save_sharded_to_url(tensors, output, max_shard_bytes, metadata, options);
    }
    let local = |e| RemoteError::format(output, e);
    std::fs::create_dir_all(output).map_err(|e| local(tensafe::Error::Io { context: "creating the output directory".into(), source: e }))?;
    tensafe::save_sharded(tensors, output, max_shard_bytes, metadata).map_err(local)
}

/// The URL, if an object can be written there.
fn writable(url: &str) -> Result<RemoteUrl> {
    let parsed = RemoteUrl::parse(url)?;
    if parsed.scheme() == Scheme::Http {
        return Err(RemoteError::ReadOnly { url: url.to_owned() });
    }
    if url.ends_with('/') {
        // The store would drop the slash and write an object named like the "directory".
        return Err(RemoteError::InvalidUrl { url: url.to_owned(), reason: "a file URL cannot end in `/`".into() });
    }
    Ok(parsed)
}

fn put(url: &RemoteUrl, bytes: Vec<u8>, options: &RemoteOptions) -> Result<()> {
    let store = store_for(url, options)?;
    let probe = Probe::new(vec![options.counter.clone()], options.max_retry_after);
    let put = PutOptions { extensions: probe.extensions(), ..PutOptions::default() };
    block_on(store.put_opts(url.object_path(), PutPayload::from(bytes), put))?
        .map(|_| ())
        .map_err(|e| classify_status(url.to_string(), e, Some(&probe)))
}

/// A failure while producing the bytes (a view that gave the wrong length).
fn produce_error(url: &RemoteUrl, e: std::io::Error) -> RemoteError {
    RemoteError::format(url.as_str(), tensafe::Error::Io { context: "serializing".into(), source: e })
}

/// Runs `produce` against a sink that cuts what it writes into parts of
/// `part` bytes and uploads them, completing the upload when `produce`
/// succeeds and aborting it otherwise.
fn upload_multipart(url: &RemoteUrl, part: usize, options: &RemoteOptions, produce: impl FnOnce(&mut Parts<'_>) -> std::io::Result<()>) -> Result<()> {
    let store: Arc<dyn ObjectStore> = store_for(url, options)?;
    let probe = Probe::new(vec![options.counter.clone()], options.max_retry_after);
    let start = PutMultipartOptions { extensions: probe.extensions(), ..PutMultipartOptions::default() };
    let upload = block_on(store.put_multipart_opts(url.object_path(), start))?.map_err(|e| classify_status(url.to_string(), e, Some(&probe)))?;
    let upload = Listed::new(upload);
    let mut parts = Parts { upload: WriteMultipart::new_with_chunk_size(Box::new(upload), part), part, in_flight: options.concurrency.max(1), url, failure: None };
    match produce(&mut parts) {
        Ok(()) => block_on(parts.upload.finish())?.map(|_| ()).map_err(|e| classify_status(url.to_string(), e, None)),
        Err(e) => {
            // The parts sent so far are dropped. A failed abort only leaves
            // invisible parts behind, so the first error is the one to tell.
            let _ = block_on(parts.upload.abort());
            Err(parts.failure.take().unwrap_or_else(|| produce_error(url, e)))
        }
    }
}

/// A multipart upload, shared with the list of uploads in progress (which
/// holds it weakly, for [`abort_unfinished_uploads`]). Once taken from it, by
/// completion or an abort, the upload is over for everyone: after
/// `abort_unfinished_uploads`, its writer's next part or completion waits
/// for good (the process is ending), so that the parts in flight are not
/// cancelled halfway but answered, and then aborted.
#[derive(Debug)]
struct Listed(Arc<UploadSlot>);

#[derive(Debug)]
struct UploadSlot {
    upload: Mutex<Option<Box<dyn MultipartUpload>>>,
    /// Parts sent and not yet answered: an abort waits for them, as parts
    /// that land after an abort may be kept.
    parts_in_flight: AtomicUsize,
    /// Whether its writer is aborting it (after a failure): the upload is
    /// out of the slot meanwhile, and a signal's abort waits for that one.
    writer_aborting: AtomicBool,
}

impl UploadSlot {
    fn upload(&self) -> MutexGuard<'_, Option<Box<dyn MultipartUpload>>> {
        self.upload.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Aborts `upload` (taken from this slot) at once, and again once the
    /// parts that were in flight are answered: a part that lands after an
    /// abort may be kept (S3 says to abort again), and a slow store must not
    /// hold up the first abort. Ok if either abort was.
    async fn abort(&self, mut upload: Box<dyn MultipartUpload>) -> object_store::Result<()> {
        // Counted before the first abort: a part answered while it runs may
        // still have been stored after it. (No part starts once the upload
        // is out of its slot.)
        let parts_were_in_flight = self.parts_in_flight.load(Ordering::SeqCst) > 0;
        let first = upload.abort().await;
        if !parts_were_in_flight {
            return first;
        }
        wait_until(|| self.parts_in_flight.load(Ordering::SeqCst) == 0).await;
        upload.abort().await.or(first)
    }
}

/// Waits until `done` says so (asked every 10 ms: what it waits for is
/// another task's, or another thread's, with no event to wait on).
async fn wait_until(done: impl Fn() -> bool) {
    while !done() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Multipart uploads in progress in this process.
static UNFINISHED_UPLOADS: LazyLock<Mutex<Vec<Weak<UploadSlot>>>> = LazyLock::new(Default::default);

impl Listed {
    fn new(upload: Box<dyn MultipartUpload>) -> Listed {
        let slot = Arc::new(UploadSlot { upload: Mutex::new(Some(upload)), parts_in_flight: AtomicUsize::new(0), writer_aborting: AtomicBool::new(false) });
        let mut list = UNFINISHED_UPLOADS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        list.retain(|upload| upload.strong_count() > 0);
        list.push(Arc::downgrade(&slot));
        Listed(slot)
    }
}

/// One part in its upload's count of parts in flight, while it lives.
struct InFlight(Arc<UploadSlot>);

impl InFlight {
    fn new(slot: &Arc<UploadSlot>) -> InFlight {
        slot.parts_in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(slot.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.parts_in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait::async_trait]
impl MultipartUpload for Listed {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        let Some(upload) = self.0.upload().as_mut().map(|upload| upload.put_part(data)) else {
            return Box::pin(std::future::pending());
        };
        // A task of its own, counted until answered: WriteMultipart drops the
        // parts in flight when its writer fails, and a request dropped after
        // its body was sent may still be stored, after the abort that was
        // meant to follow it. Dropping the handle leaves the part going.
        let in_flight = InFlight::new(&self.0);
        let part = runtime().spawn(async move {
            let answered = upload.await;
            drop(in_flight);
            answered
        });
        Box::pin(async move { part.await.unwrap_or_else(|e| Err(object_store::Error::Generic { store: "tensafe", source: Box::new(e) })) })
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        let Some(mut upload) = self.0.upload().take() else { return std::future::pending().await };
        let completed = upload.complete().await;
        if completed.is_err() {
            // Back in its place, for the abort that follows a failure.
            *self.0.upload() = Some(upload);
        }
        completed
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        let taken = {
            let mut slot = self.0.upload();
            // Marked under the lock: a signal's abort sees the upload or the mark.
            self.0.writer_aborting.store(slot.is_some(), Ordering::SeqCst);
            slot.take()
        };
        let Some(upload) = taken else { return Ok(()) };
        let aborted = self.0.abort(upload).await;
        self.0.writer_aborting.store(false, Ordering::SeqCst);
        aborted
    }
}

/// Aborts every multipart upload of this process still in progress, so that
/// the store drops their parts (S3 and GCS keep them, billed, until a
/// lifecycle rule removes them); returns how many it aborted (or, where a
/// writer was aborting its upload already, waited for). For a program
/// about to end on a signal: the uploads' writers wait for good from then
/// on, and the process must exit. Waits at most `wait` in all. An upload
/// whose creation is still unanswered is not known yet, and not aborted.
pub fn abort_unfinished_uploads(wait: Duration) -> usize {
    let slots: Vec<Arc<UploadSlot>> = UNFINISHED_UPLOADS.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).iter().filter_map(Weak::upgrade).collect();
    let mut uploads: Vec<(Box<dyn MultipartUpload>, Arc<UploadSlot>)> = Vec::new();
    // Uploads their writers are aborting already: waited for, so that the
    // process does not end between their two aborts.
    let mut aborting: Vec<Arc<UploadSlot>> = Vec::new();
    for slot in slots {
        let taken = slot.upload().take();
        match taken {
            Some(upload) => uploads.push((upload, slot)),
            None if slot.writer_aborting.load(Ordering::SeqCst) => aborting.push(slot),
            None => {}
        }
    }
    let count = uploads.len() + aborting.len();
    if count == 0 {
        return 0;
    }
    let aborts = futures::future::join_all(uploads.into_iter().map(|(upload, slot)| async move { slot.abort(upload).await }));
    let writers = futures::future::join_all(aborting.into_iter().map(|slot| async move {
        wait_until(|| !slot.writer_aborting.load(Ordering::SeqCst)).await;
    }));
    // The timer is made inside the runtime, which drives it.
    let _ = block_on(async move { tokio::time::timeout(wait, futures::future::join(aborts, writers)).await });
    count
}

/// The sink of a multipart upload: bytes are copied into the current part;
/// each full part starts uploading at once, after waiting for a free slot.
struct Parts<'a> {
    upload: WriteMultipart,
    part: usize,
    in_flight: usize,
    url: &'a RemoteUrl,
    /// The upload's own failure, kept for the caller (the writer only
    /// passes an io::Error on).
    failure: Option<RemoteError>,
}

impl Write for Parts<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // A part at a time, so that a large tensor never queues more than
        // `in_flight` parts of memory.
        for piece in buf.chunks(self.part) {
            let Parts { upload, in_flight, .. } = self;
            let sent = block_on(async {
                upload.wait_for_capacity(*in_flight).await?;
                // Inside the runtime: `write` spawns the upload of a full part.
                upload.write(piece);
                Ok::<(), object_store::Error>(())
            });
            let failure = match sent {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => classify_status(self.url.to_string(), e, None),
                Err(e) => e,
            };
            let message = failure.to_string();
            self.failure = Some(failure);
            return Err(std::io::Error::other(message));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upload that records what is done with it, in order.
    #[derive(Debug, Clone, Default)]
    struct Recorder {
        events: Arc<Mutex<Vec<&'static str>>>,
        /// How long each part may take to be answered: it is answered as
        /// soon as the upload is aborted, or when this time is up.
        part_time: Duration,
        /// How long each abort takes to be answered.
        abort_time: Duration,
        fail_completion: bool,
    }

    impl Recorder {
        fn events(&self) -> Vec<&'static str> {
            self.events.lock().unwrap().clone()
        }
    }

    #[async_trait::async_trait]
    impl MultipartUpload for Recorder {
        fn put_part(&mut self, _data: PutPayload) -> UploadPart {
            let (events, time) = (self.events.clone(), self.part_time);
            Box::pin(async move {
                // Waiting for the abort, not for a fixed time: an abort always
                // finds the part in flight, however slow the machine.
                let start = tokio::time::Instant::now();
                while start.elapsed() < time && !events.lock().unwrap().contains(&"abort") {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                events.lock().unwrap().push("part");
                Ok(())
            })
        }
        async fn complete(&mut self) -> object_store::Result<PutResult> {
            self.events.lock().unwrap().push("complete");
            if self.fail_completion {
                return Err(object_store::Error::Generic { store: "test", source: "refused".into() });
            }
            Ok(PutResult { e_tag: None, version: None })
        }
        async fn abort(&mut self) -> object_store::Result<()> {
            self.events.lock().unwrap().push("abort");
            tokio::time::sleep(self.abort_time).await;
            Ok(())
        }
    }

    /// One test: `abort_unfinished_uploads` takes every upload of the process.
    #[test]
    fn unfinished_uploads_are_aborted_again_after_their_parts_and_then_refuse_parts() {
        // An upload whose completion fails can still be aborted by its writer.
        let refused = Recorder { fail_completion: true, ..Recorder::default() };
        let mut upload = Listed::new(Box::new(refused.clone()));
        assert!(block_on(upload.complete()).unwrap().is_err());
        block_on(upload.abort()).unwrap().unwrap();
        assert_eq!(refused.events(), ["complete", "abort"]);

        let going = Recorder { part_time: Duration::from_secs(20), ..Recorder::default() };
        let done = Recorder::default();
        let mut upload = Listed::new(Box::new(going.clone()));
        let mut finished = Listed::new(Box::new(done.clone()));
        block_on(finished.complete()).unwrap().unwrap();
        // A part in flight when the abort comes: aborted at once, and again
        // once the part is answered.
        let part = upload.put_part(PutPayload::from(vec![1u8]));
        let sender = std::thread::spawn(move || block_on(part).unwrap().unwrap());
        assert!(abort_unfinished_uploads(Duration::from_secs(5)) >= 1);
        sender.join().unwrap();
        assert_eq!(going.events(), ["abort", "part", "abort"]);
        assert_eq!(done.events(), ["complete"], "a completed upload was aborted");
        // A part whose writer dropped it (WriteMultipart does when the writer
        // fails) is still sent, and the abort still waits for it.
        let dropped = Recorder { part_time: Duration::from_secs(20), ..Recorder::default() };
        let mut cancelled = Listed::new(Box::new(dropped.clone()));
        drop(cancelled.put_part(PutPayload::from(vec![3u8])));
        assert!(abort_unfinished_uploads(Duration::from_secs(5)) >= 1);
        assert_eq!(dropped.events(), ["abort", "part", "abort"]);
        // Its writer waits for good from then on; its own abort has nothing left to do.
        let waits = |future| block_on(async { tokio::time::timeout(Duration::from_millis(100), future).await.is_err() }).unwrap();
        assert!(waits(upload.put_part(PutPayload::from(vec![2u8]))));
        assert!(waits(Box::pin(async { upload.complete().await.map(drop) })));
        block_on(upload.abort()).unwrap().unwrap();
        assert_eq!(going.events(), ["abort", "part", "abort"]);

        // A writer's own abort (after a failure) also comes again after its
        // parts in flight, dropped or not.
        let failing = Recorder { part_time: Duration::from_secs(20), ..Recorder::default() };
        let mut upload = Listed::new(Box::new(failing.clone()));
        drop(upload.put_part(PutPayload::from(vec![4u8])));
        block_on(upload.abort()).unwrap().unwrap();
        assert_eq!(failing.events(), ["abort", "part", "abort"]);

        // A signal while a writer aborts its upload waits for both aborts.
        let slow = Recorder { part_time: Duration::from_secs(20), abort_time: Duration::from_millis(300), ..Recorder::default() };
        let mut upload = Listed::new(Box::new(slow.clone()));
        drop(upload.put_part(PutPayload::from(vec![5u8])));
        let slot = upload.0.clone();
        let writer = std::thread::spawn(move || block_on(upload.abort()).unwrap().unwrap());
        while !slot.writer_aborting.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(abort_unfinished_uploads(Duration::from_secs(5)) >= 1);
        assert_eq!(slow.events(), ["abort", "part", "abort"], "the signal's abort returned before the writer's second abort");
        writer.join().unwrap();
    }

    #[test]
    fn refuses_urls_it_cannot_write() {
        assert!(matches!(writable("https://host/x.safetensors"), Err(RemoteError::ReadOnly { .. })));
        assert!(matches!(writable("s3://bucket/dir/"), Err(RemoteError::InvalidUrl { .. })));
        assert!(matches!(writable("/tmp/x.safetensors"), Err(RemoteError::InvalidUrl { .. })));
        assert_eq!(writable("gs://bucket/dir/x.safetensors").unwrap().object_path().as_ref(), "dir/x.safetensors");
        // A sharded save names files inside the prefix, with or without its slash.
        let error = save_sharded_to_url(Vec::<(&str, tensafe::RawTensor<'_>)>::new(), "http://host/ckpt/", 1, None, &RemoteOptions::default());
        assert!(matches!(error, Err(RemoteError::ReadOnly { url }) if url == "http://host/ckpt/model.safetensors.index.json"));
    }
}

//! S3 against a real SeaweedFS (`weed mini`, SigV4 enforced) on 127.0.0.1:
//! a sharded checkpoint written by tensafe is uploaded and read back through
//! tensafe-remote.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};

use common::{Seaweed, Tensor};
use tensafe::{Dtype, ShardedCheckpoint, Split, TensorParallelPlan};
use tensafe_remote::{read_into, Counter, RemoteCheckpoint, RemoteError, RemoteFile, RemoteOptions, RemoteRange};

/// Tensors for a checkpoint of a few shards.
fn checkpoint_tensors() -> Vec<Tensor> {
    let mut tensors = common::mixed_tensors();
    for layer in 0..6 {
        tensors.push(Tensor::new(&format!("layers.{layer}.mlp.weight"), Dtype::BF16, &[256, 300], 100 + layer));
        tensors.push(Tensor::new(&format!("layers.{layer}.norm"), Dtype::F32, &[300], 200 + layer));
    }
    tensors
}

#[test]
fn seaweedfs_serves_a_sharded_checkpoint() {
    let Some(weed) = Seaweed::start("tensafe") else { return };
    let options = weed.options();

    // A sharded checkpoint written by tensafe, uploaded as is.
    let dir = tempfile::tempdir().unwrap();
    let tensors = checkpoint_tensors();
    let index = tensafe::save_sharded(tensors.iter().map(Tensor::raw), dir.path(), 400_000, None).unwrap().expect("several shards");
    let shard_names: BTreeSet<&String> = index.weight_map.values().collect();
    assert!(shard_names.len() >= 3, "{shard_names:?}");
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        common::put(&options, &weed.url(&format!("ckpt/{name}")), std::fs::read(&path).unwrap()).unwrap();
    }
    let local = ShardedCheckpoint::open(dir.path()).unwrap();

    // Header-only inspection of every shard: one request each, ≤ 64 KiB.
    let urls: Vec<String> = shard_names.iter().map(|n| weed.url(&format!("ckpt/{n}"))).collect();
    let url_refs: Vec<&str> = urls.iter().map(String::as_str).collect();
    let shards = RemoteFile::open_many(&url_refs, &options).unwrap();
    for shard in &shards {
        let t = shard.traffic();
        assert!(t.requests == 1 && t.bytes <= 64 << 10, "{}: {t:?}", shard.url());
    }

    // Every tensor, bit-exact.
    for (position, name, info) in local.iter() {
        let remote = &shards[position];
        assert_eq!(remote.header().info(name).unwrap(), info);
        assert_eq!(remote.read_tensor(name).unwrap(), local.read_tensor(name).unwrap(), "{name}");
    }

    // The whole checkpoint into one buffer: small requests, many in flight.
    let total: usize = shards.iter().map(|s| s.header().data_len()).sum();
    let mut ranges: Vec<RemoteRange<'_>> = Vec::new();
    let mut at = 0;
    for shard in &shards {
        ranges.push(shard.range(shard.header().data_start(), at, shard.header().data_len()));
        at += shard.header().data_len();
    }
    let mut all = vec![0u8; total];
    let concurrent = RemoteOptions { concurrency: 16, chunk_bytes: 32 << 10, ..options.clone() };
    let progress = AtomicU64::new(0);
    let spent = read_into(&ranges, &mut all, &concurrent, Some(&|n| {
        progress.fetch_max(n, Ordering::Relaxed);
    }))
    .unwrap();
    let expected: Vec<u8> = local
        .shards()
        .iter()
        .flat_map(|s| {
            let bytes = std::fs::read(s.path()).unwrap();
            bytes[s.header().data_start() as usize..].to_vec()
        })
        .collect();
    assert!(all == expected, "whole-checkpoint load differs");
    let chunks: u64 = shards.iter().map(|s| (s.header().data_len() as u64).div_ceil(32 << 10)).sum();
    assert_eq!(spent.requests, chunks);
    assert_eq!(spent.bytes, total as u64);
    assert_eq!(progress.into_inner(), total as u64);

    // A 4-rank tensor-parallel load (dim 0 of every matrix): each rank
    // fetches its quarter of the split tensors plus the replicated ones.
    let split_bytes: u64 = local.iter().filter(|(_, n, _)| n.ends_with("mlp.weight")).map(|(_, _, i)| i.byte_len() as u64).sum();
    let replicated: u64 = local.total_size() - split_bytes;
    let mut rank_bytes = Vec::new();
    for rank in 0..4 {
        let plan = TensorParallelPlan::new(rank, 4, &[("*.mlp.weight", Split::Dim(0))]).unwrap();
        let counter = Counter::new();
        let rank_options = RemoteOptions { counter: counter.clone(), ..options.clone() };
        let rank_shards = RemoteFile::open_many(&url_refs, &rank_options).unwrap();
        let mut ranges = Vec::new();
        let mut at = 0;
        let mut wanted = Vec::new();
        for (position, name, info) in local.iter() {
            let slice = plan.plan(name, info).unwrap();
            rank_shards[position].slice_ranges(name, &slice, at, &mut ranges).unwrap();
            let mut expected = vec![0u8; slice.byte_len()];
            slice.copy_into(&local.read_tensor(name).unwrap(), &mut expected).unwrap();
            wanted.extend(expected);
            at += slice.byte_len();
        }
        let mut got = vec![0u8; at];
        let no_gaps = RemoteOptions { merge_gap: 0, ..rank_options.clone() };
        read_into(&ranges, &mut got, &no_gaps, None).unwrap();
        assert!(got == wanted, "rank {rank} got other bytes");
        let t = counter.traffic();
        let headers: u64 = rank_shards.iter().map(|s| s.traffic().bytes.min(64 << 10)).sum();
        assert_eq!(t.bytes - headers, split_bytes / 4 + replicated, "rank {rank}: {t:?}");
        rank_bytes.push(t.bytes);
    }
    eprintln!("bytes fetched per rank (headers included): {rank_bytes:?}; whole checkpoint {total}");

    // The checkpoint as one, by its index or its "directory".
    for url in [weed.url("ckpt/model.safetensors.index.json"), weed.url("ckpt/")] {
        let checkpoint = RemoteCheckpoint::open(&url, &options).unwrap();
        assert_eq!(checkpoint.len(), tensors.len());
        assert_eq!(checkpoint.shards().len(), shard_names.len());
        assert_eq!(checkpoint.total_size(), local.total_size());
        let opened = checkpoint.traffic();
        assert_eq!(opened.requests as usize, 1 + shard_names.len(), "{opened:?}");
        for t in &tensors {
            assert_eq!(checkpoint.read_tensor(&t.name).unwrap(), t.data, "{}", t.name);
        }
    }
    // A single file is a checkpoint too, and a "directory" with one.
    common::put(&options, &weed.url("single/model.safetensors"), std::fs::read(local.shards()[0].path()).unwrap()).unwrap();
    let single = RemoteCheckpoint::open(&weed.url("single/"), &options).unwrap();
    assert!(single.index().is_none() && single.len() == local.shards()[0].header().len());
    let nothing = RemoteCheckpoint::open(&weed.url("nothing/"), &options).unwrap_err();
    assert!(nothing.is_not_found() && nothing.to_string().contains("has neither model.safetensors.index.json nor model.safetensors"), "{nothing}");
    // An index naming a shard that is not there.
    let mut broken = index.clone();
    broken.weight_map.insert("ghost".into(), "model-00009-of-00009.safetensors".into());
    common::put(&options, &weed.url("ckpt/broken.index.json"), broken.to_json().into_bytes()).unwrap();
    let ghost = RemoteCheckpoint::open(&weed.url("ckpt/broken.index.json"), &options).unwrap_err().to_string();
    assert!(ghost.contains("missing shard") && ghost.contains("model-00009-of-00009.safetensors"), "{ghost}");

    // A header longer than the first read: two requests.
    let big = dir.path().join("big-header.safetensors");
    common::write_big_header_file(&big);
    common::put(&options, &weed.url("big-header.safetensors"), std::fs::read(&big).unwrap()).unwrap();
    let file = RemoteFile::open_with(&weed.url("big-header.safetensors"), &options).unwrap();
    assert_eq!(file.traffic().requests, 2);
    assert_eq!(file.header().len(), 1500);

    // Errors.
    let missing = RemoteFile::open_with(&weed.url("ckpt/missing.safetensors"), &options).unwrap_err();
    assert!(missing.is_not_found(), "{missing}");
    let no_bucket = RemoteFile::open_with("s3://no-such-bucket/x.safetensors", &options).unwrap_err();
    assert!(no_bucket.is_not_found(), "{no_bucket}");
    let mut wrong = options.clone();
    wrong.storage_options.retain(|(k, _)| k != "aws_secret_access_key");
    wrong.storage_options.push(("aws_secret_access_key".into(), "not-the-secret".into()));
    let denied = RemoteFile::open_with(&urls[0], &wrong).unwrap_err();
    assert!(matches!(denied, RemoteError::Forbidden { status: 403, .. }), "{denied}");
    assert!(denied.to_string().contains("AWS_SECRET_ACCESS_KEY"), "{denied}");
    common::put(&options, &weed.url("empty.safetensors"), Vec::new()).unwrap();
    let empty = RemoteFile::open_with(&weed.url("empty.safetensors"), &options).unwrap_err().to_string();
    assert!(empty.contains("header too small"), "{empty}");

    // A shard replaced after it was opened: refused, not mixed.
    let first = &shards[0];
    let (name, _) = first.header().iter().next().unwrap();
    let name = name.to_owned();
    let mut replaced = std::fs::read(local.shards()[0].path()).unwrap();
    let last = replaced.len() - 1;
    replaced[last] ^= 0xff;
    common::put(&options, &urls[0], replaced).unwrap();
    let changed = first.read_tensor(&name).unwrap_err();
    assert!(matches!(changed, RemoteError::Changed { .. }), "{changed}");
}

/// The reference writer's bytes for `tensors`.
fn reference_bytes(tensors: &[Tensor], metadata: Option<&tensafe::Metadata>) -> Vec<u8> {
    let views: Vec<(&str, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|t| {
            let dtype: safetensors::Dtype = serde_json::from_str(&format!("\"{}\"", t.dtype.code())).unwrap();
            (t.name.as_str(), safetensors::tensor::TensorView::new(dtype, t.shape.clone(), &t.data).unwrap())
        })
        .collect();
    safetensors::serialize(views, metadata.map(|m| m.clone().into_iter().collect())).unwrap()
}

/// A tensor whose bytes are not what its shape announces: the writer
/// refuses it when it gets there, after the tensors before it were sent.
struct Broken;

impl tensafe::View for Broken {
    fn dtype(&self) -> Dtype {
        Dtype::U8
    }
    fn shape(&self) -> &[usize] {
        &[16]
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Owned(vec![0; 3])
    }
    fn data_len(&self) -> usize {
        16
    }
}

#[test]
fn seaweedfs_takes_uploads_byte_identical_to_local_saves() {
    let Some(weed) = Seaweed::start("uploads") else { return };
    // 5 MiB parts (the S3 minimum), 3 in flight.
    let options = RemoteOptions { part_bytes: 5 << 20, concurrency: 3, ..weed.options() };
    let metadata: tensafe::Metadata = [("format".to_owned(), "pt".to_owned())].into();

    // One PUT (a small file) and a multipart upload (12 MiB: 3 parts), each
    // equal to the local writer's and the reference's bytes.
    let small = common::mixed_tensors();
    let mut large = common::mixed_tensors();
    large.push(Tensor::new("big.weight", Dtype::F32, &[3 << 20], 9));
    for (key, tensors) in [("small.safetensors", &small), ("large.safetensors", &large)] {
        let url = weed.url(key);
        let before = tensafe_remote::global_traffic();
        let size = tensafe_remote::serialize_to_url(tensors.iter().map(Tensor::raw), Some(&metadata), &url, &options).unwrap();
        // Every byte of the file was counted going out (the process-wide
        // counter: the parts of a multipart upload carry no per-call probe;
        // other tests running meanwhile may add to it).
        let sent = (tensafe_remote::global_traffic() - before).sent;
        assert!(sent >= size, "{key}: {sent} bytes sent for a {size}-byte file");
        let uploaded = common::get(&options, &url).unwrap();
        let local = tensafe::serialize(tensors.iter().map(Tensor::raw), Some(&metadata)).unwrap();
        assert_eq!(uploaded.len() as u64, size);
        assert!(uploaded == local, "{key}: uploaded bytes differ from the local save");
        assert!(uploaded == reference_bytes(tensors, Some(&metadata)), "{key}: uploaded bytes differ from the reference");
        // S3 gives a multipart object the ETag `"md5-of-part-md5s-PARTS"`.
        let etag = RemoteFile::open_with(&url, &options).unwrap().etag().unwrap_or_default().to_owned();
        let parts = size.div_ceil(5 << 20);
        assert_eq!(etag.trim_matches('"').ends_with(&format!("-{parts}")), parts > 1, "{key}: ETag {etag}");
    }

    // A sharded save to a URL prefix: the same files as a local sharded save.
    let dir = tempfile::tempdir().unwrap();
    let tensors = checkpoint_tensors();
    let local_index = tensafe::save_sharded(tensors.iter().map(Tensor::raw), dir.path(), 400_000, Some(&metadata)).unwrap();
    let index = tensafe_remote::save_sharded_to_url(tensors.iter().map(Tensor::raw), &weed.url("sharded/"), 400_000, Some(&metadata), &options).unwrap();
    assert!(index.is_some() && index == local_index);
    let mut names: Vec<String> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert!(names.len() >= 4, "{names:?}");
    for name in &names {
        let uploaded = common::get(&options, &weed.url(&format!("sharded/{name}"))).unwrap();
        assert!(uploaded == std::fs::read(dir.path().join(name)).unwrap(), "{name} differs");
    }
    let checkpoint = RemoteCheckpoint::open(&weed.url("sharded/"), &options).unwrap();
    for t in &tensors {
        assert_eq!(checkpoint.read_tensor(&t.name).unwrap(), t.data, "{}", t.name);
    }

    // Resharding from and to URLs gives what a local reshard gives.
    let local_one = tempfile::tempdir().unwrap();
    tensafe::reshard(dir.path(), local_one.path(), u64::MAX).unwrap();
    let expected = std::fs::read(local_one.path().join("model.safetensors")).unwrap();
    tensafe_remote::reshard(&weed.url("sharded/"), &weed.url("one/"), u64::MAX, &options).unwrap();
    assert!(common::get(&options, &weed.url("one/model.safetensors")).unwrap() == expected);
    let downloaded = tempfile::tempdir().unwrap();
    let out = downloaded.path().join("out");
    tensafe_remote::reshard(&weed.url("sharded/model.safetensors.index.json"), out.to_str().unwrap(), u64::MAX, &options).unwrap();
    assert!(std::fs::read(out.join("model.safetensors")).unwrap() == expected);
    // (From one file, tensors come in file order: other shards than the first save's.)
    let local_again = tempfile::tempdir().unwrap();
    let again = tensafe::reshard(local_one.path(), local_again.path(), 400_000).unwrap().expect("shards");
    let remote_again = tensafe_remote::reshard(local_one.path().to_str().unwrap(), &weed.url("resharded"), 400_000, &options).unwrap();
    assert_eq!(remote_again.as_ref(), Some(&again));
    for entry in std::fs::read_dir(local_again.path()).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        let uploaded = common::get(&options, &weed.url(&format!("resharded/{name}"))).unwrap();
        assert!(uploaded == std::fs::read(local_again.path().join(&name)).unwrap(), "resharded {name} differs");
    }

    // A multipart upload that fails after two parts were sent leaves nothing
    // visible: no new object, and an existing one unchanged.
    let mut failing: Vec<(String, Box<dyn tensafe::View>)> = Vec::new();
    for t in &large {
        failing.push((t.name.clone(), Box::new(tensafe::RawTensor { dtype: t.dtype, shape: &t.shape, data: &t.data })));
    }
    failing.push(("zzz.broken".into(), Box::new(Broken)));
    let views = || failing.iter().map(|(n, v)| (n.as_str(), v.as_ref()));
    let prepared = tensafe::prepare(views(), None, &Default::default()).unwrap();
    assert!(prepared.file_len() > 2 * (5 << 20));
    let error = tensafe_remote::upload_prepared(&weed.url("failed.safetensors"), &prepared, &options).unwrap_err();
    assert!(error.to_string().contains("the view gave 3 bytes but announced 16"), "{error}");
    assert!(matches!(common::get(&options, &weed.url("failed.safetensors")), Err(object_store::Error::NotFound { .. })));
    let before = common::get(&options, &weed.url("large.safetensors")).unwrap();
    tensafe_remote::upload_prepared(&weed.url("large.safetensors"), &prepared, &options).unwrap_err();
    assert!(common::get(&options, &weed.url("large.safetensors")).unwrap() == before);

    // Errors: wrong credentials (SeaweedFS creates missing buckets for an
    // admin, so there is no 404 to test), a read-only URL.
    let mut wrong = options.clone();
    wrong.storage_options.retain(|(k, _)| k != "aws_secret_access_key");
    wrong.storage_options.push(("aws_secret_access_key".into(), "not-the-secret".into()));
    let denied = tensafe_remote::serialize_to_url(small.iter().map(Tensor::raw), None, &weed.url("denied.safetensors"), &wrong).unwrap_err();
    assert!(matches!(denied, RemoteError::Forbidden { status: 403, .. }), "{denied}");
    let denied = tensafe_remote::serialize_to_url(large.iter().map(Tensor::raw), None, &weed.url("denied.safetensors"), &wrong).unwrap_err();
    assert!(matches!(denied, RemoteError::Forbidden { status: 403, .. }), "{denied}");
    assert!(matches!(common::get(&options, &weed.url("denied.safetensors")), Err(object_store::Error::NotFound { .. })));
    let read_only = tensafe_remote::serialize_to_url(small.iter().map(Tensor::raw), None, "http://127.0.0.1:1/x.safetensors", &options).unwrap_err();
    assert!(matches!(read_only, RemoteError::ReadOnly { .. }), "{read_only}");
}

/// An endpoint that answers every request with `200 OK` and a body of
/// `len` bytes (zeros), whatever was asked; returns its port. The
/// requests it answered are counted in the returned counter.
fn answering_everything_with(len: u64) -> (u16, std::sync::Arc<AtomicU64>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let answered = std::sync::Arc::new(AtomicU64::new(0));
    let count = answered.clone();
    std::thread::spawn(move || {
        for mut client in listener.incoming().flatten() {
            count.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                // The request head (a small body may follow; it is not needed).
                let mut head = [0u8; 64 << 10];
                let _ = client.read(&mut head);
                let _ = write!(client, "HTTP/1.1 200 OK\r\nETag: \"v1\"\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n");
                let block = vec![b' '; 1 << 20];
                let mut left = len;
                while left > 0 {
                    let n = left.min(block.len() as u64);
                    if client.write_all(&block[..n as usize]).is_err() {
                        return; // the client stopped reading
                    }
                    left -= n;
                }
            });
        }
    });
    (port, answered)
}

// object_store reads the answers to upload requests (the XML of
// CreateMultipartUpload and CompleteMultipartUpload) whole into memory: a
// hostile endpoint answering with gigabytes took gigabytes. An answer to a
// request that is not a GET is refused past 1 MiB.
#[test]
fn an_upload_answer_is_bounded() {
    let (port, answered) = answering_everything_with(256 << 20);
    let options = RemoteOptions {
        storage_options: vec![
            ("aws_endpoint".into(), format!("http://127.0.0.1:{port}")),
            ("aws_access_key_id".into(), "key".into()),
            ("aws_secret_access_key".into(), "secret".into()),
            ("aws_region".into(), "us-east-1".into()),
            ("aws_allow_http".into(), "true".into()),
        ],
        part_bytes: 5 << 20,
        retry: object_store::RetryConfig { max_retries: 1, ..Default::default() },
        ..RemoteOptions::default()
    };
    // 8 MiB: a multipart upload, whose first request's answer is read.
    let mut large = common::mixed_tensors();
    large.push(Tensor::new("big.weight", Dtype::F32, &[2 << 20], 9));
    let error = tensafe_remote::serialize_to_url(large.iter().map(Tensor::raw), None, "s3://bucket/x.safetensors", &options).unwrap_err();
    assert!(error.to_string().contains("more than 1048576 bytes"), "{error}");
    assert!(answered.load(Ordering::SeqCst) >= 1);
}

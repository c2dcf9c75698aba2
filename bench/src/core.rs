//! Core benchmark: header parsing and file writing, tensafe next to the
//! reference crate and `dd`, interleaved in one run; prints medians and ratios.
//!
//!     cargo run --release -p tensafe-bench --bin core-bench [-- WRITE_MIB [REPS]]

use std::borrow::Cow;
use std::process::Command;
use std::time::{Duration, Instant};

use tensafe::{Dtype, RawTensor};

struct Ref<'a>(&'a [u8], Vec<usize>);

impl safetensors::View for &Ref<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.1
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.0)
    }
    fn data_len(&self) -> usize {
        self.0.len()
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time<F: FnMut()>(mut f: F) -> Duration {
    let start = Instant::now();
    f();
    start.elapsed()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let write_mib: usize = args.next().map(|a| a.parse().expect("WRITE_MIB")).unwrap_or(1024);
    let reps: usize = args.next().map(|a| a.parse().expect("REPS")).unwrap_or(5);

    // 1. Parsing a header of 50k tensors.
    let count = 50_000;
    let data = vec![0u8; 16];
    let names: Vec<String> = (0..count).map(|i| format!("model.layers.{}.experts.{}.weight", i / 128, i % 128)).collect();
    let file = tensafe::serialize(names.iter().map(|n| (n.as_str(), RawTensor { dtype: Dtype::F32, shape: &[2, 2], data: &data })), None).unwrap();
    let (mut ours, mut theirs) = (vec![], vec![]);
    for _ in 0..reps.max(5) {
        ours.push(time(|| {
            let parsed = tensafe::SafeTensors::deserialize(&file).unwrap();
            assert_eq!(parsed.header().len(), count);
        }));
        theirs.push(time(|| {
            let parsed = safetensors::SafeTensors::deserialize(&file).unwrap();
            assert_eq!(parsed.len(), count);
        }));
    }
    let (o, t) = (median(ours), median(theirs));
    println!("header parse, {count} tensors ({} KiB header), median of {}:", (file.len() - count * 16) / 1024, reps.max(5));
    println!("  tensafe    {:>9.2} ms", o.as_secs_f64() * 1e3);
    println!("  reference  {:>9.2} ms   (tensafe is {:.2}x the reference's speed)", t.as_secs_f64() * 1e3, t.as_secs_f64() / o.as_secs_f64());

    // 2. Writing WRITE_MIB MiB to a file, against dd writing the same amount.
    let dir = tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| ".".into())).unwrap();
    let chunk = 64usize << 20;
    let buffers: Vec<Vec<u8>> = (0..write_mib.div_ceil(64)).map(|i| vec![i as u8 + 1; chunk.min((write_mib << 20) - i * chunk)]).collect();
    let shapes: Vec<Vec<usize>> = buffers.iter().map(|b| vec![b.len() / 4]).collect();
    let bytes = buffers.iter().map(Vec::len).sum::<usize>() as f64;
    let mut results: [Vec<Duration>; 3] = [vec![], vec![], vec![]];
    for rep in 0..reps {
        // Rotate the order every repetition so no contender always runs
        // right after another one's 1 GiB file was deleted.
        for k in 0..3 {
            let which = (rep + k) % 3;
            let target = dir.path().join(format!("out{rep}-{which}"));
            let elapsed = match which {
                0 => time(|| {
                    let tensors = buffers.iter().zip(&shapes).enumerate().map(|(i, (b, s))| (format!("t{i}"), RawTensor { dtype: Dtype::F32, shape: s, data: b }));
                    tensafe::serialize_to_file(tensors, None, &target).unwrap();
                }),
                1 => {
                    let views: Vec<Ref> = buffers.iter().zip(&shapes).map(|(b, s)| Ref(b, s.clone())).collect();
                    time(|| {
                        safetensors::serialize_to_file(views.iter().enumerate().map(|(i, v)| (format!("t{i}"), v)), None, &target).unwrap();
                        // The reference does not fsync; do it so both pay for durability.
                        std::fs::File::open(&target).unwrap().sync_all().unwrap();
                    })
                }
                _ => time(|| {
                    let status = Command::new("dd")
                        .args(["if=/dev/zero", &format!("of={}", target.display()), "bs=1M", &format!("count={write_mib}"), "conv=fsync", "status=none"])
                        .status()
                        .unwrap();
                    assert!(status.success());
                }),
            };
            results[which].push(elapsed);
            std::fs::remove_file(&target).unwrap();
        }
    }
    let [ours, theirs, dd] = results;
    let gbps = |d: Duration| bytes / d.as_secs_f64() / 1e9;
    let (o, t, d) = (median(ours), median(theirs), median(dd));
    println!("write {write_mib} MiB with fsync, median of {reps}:");
    println!("  tensafe    {:>6.3} s  {:>5.2} GB/s", o.as_secs_f64(), gbps(o));
    println!("  reference  {:>6.3} s  {:>5.2} GB/s", t.as_secs_f64(), gbps(t));
    println!("  dd         {:>6.3} s  {:>5.2} GB/s", d.as_secs_f64(), gbps(d));
    println!("  tensafe/dd throughput {:.2}, tensafe/reference {:.2}", gbps(o) / gbps(d), gbps(o) / gbps(t));
}

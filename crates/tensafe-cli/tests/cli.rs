//! End-to-end tests of the `tensafe` binary.

use std::path::Path;
use std::process::{Command, Output};

use tensafe::{Dtype, RawTensor};

fn tensafe(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tensafe")).args(args).output().expect("the binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn write_file(path: &Path, count: usize) {
    let data: Vec<Vec<u8>> = (0..count).map(|i| vec![i as u8; 4 * (i % 7 + 1)]).collect();
    let shapes: Vec<[usize; 1]> = (0..count).map(|i| [i % 7 + 1]).collect();
    let tensors = (0..count).map(|i| (format!("layers.{i}.weight"), RawTensor { dtype: Dtype::F32, shape: &shapes[i], data: &data[i] }));
    tensafe::serialize_to_file(tensors, None, path).unwrap();
}

#[test]
fn inspect_small_file_table() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("five.safetensors");
    write_file(&path, 5);
    let out = tensafe(&["inspect", path.to_str().unwrap()]);
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(text.contains("5 tensors, 15 parameters"), "{text}");
    let rows: Vec<&str> = text.lines().filter(|l| l.starts_with("layers.")).collect();
    assert_eq!(rows.len(), 5, "{text}");
    // Columns line up: every row has its dtype at the same position.
    let col = rows[0].find("F32").unwrap();
    assert!(rows.iter().all(|r| r.find("F32") == Some(col)), "{text}");
    assert!(text.lines().any(|l| l.starts_with("F32 ") && l.contains(" 5 ")), "{text}");
}

#[test]
fn json_output_escapes_what_could_drive_a_terminal() {
    // An 8-bit CSI and a right-to-left override in a tensor name and in
    // metadata: JSON writers leave both as they are.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hostile.safetensors");
    let name = "w\u{9b}2J\u{202e}";
    let metadata = std::collections::BTreeMap::from([("k\u{7f}".to_owned(), "\u{9b}v".to_owned())]);
    let tensor = RawTensor { dtype: Dtype::U8, shape: &[1], data: &[0] };
    tensafe::serialize_to_file([(name, tensor)], Some(&metadata), &path).unwrap();
    let other = dir.path().join("other.safetensors");
    tensafe::serialize_to_file([("x", tensor)], None, &other).unwrap();
    let (file, other) = (path.to_str().unwrap(), other.to_str().unwrap());
    for args in [&["inspect", "--json", file][..], &["diff", "--json", file, other]] {
        let out = tensafe(args);
        let text = stdout(&out);
        assert!(!text.contains(['\u{9b}', '\u{202e}', '\u{7f}']), "{args:?}: {text}");
        assert!(text.contains(r"w\u009b2J\u202e"), "{args:?}: {text}");
        // Read back, the same name.
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(json.to_string().contains(name), "{args:?}: {json}");
    }
}

#[test]
fn counts_of_one_are_singular() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("one.safetensors");
    write_file(&path, 1);
    let file = path.to_str().unwrap();
    assert!(stdout(&tensafe(&["inspect", file])).contains("1 tensor, 1 parameter, 4 B of data"));
    assert!(stdout(&tensafe(&["verify", file])).contains(": 1 tensor, "));
    assert!(stdout(&tensafe(&["diff", file, file])).contains("1 identical tensor, 0 differences"));
}

#[test]
fn inspect_json_of_5000_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("many.safetensors");
    write_file(&path, 5000);
    let out = tensafe(&["inspect", "--json", path.to_str().unwrap()]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tensors"].as_array().unwrap().len(), 5000);
    assert_eq!(v["totals"]["tensors"], 5000);
    let params: u64 = (0..5000u64).map(|i| i % 7 + 1).sum();
    assert_eq!(v["totals"]["parameters"], params);
    assert_eq!(v["totals"]["by_dtype"]["F32"]["bytes"], params * 4);
    let table = stdout(&tensafe(&["inspect", path.to_str().unwrap()]));
    assert_eq!(table.lines().filter(|l| l.starts_with("layers.")).count(), 5000);
}

#[test]
fn verify_reports_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.safetensors");
    write_file(&good, 3);
    let out = tensafe(&["verify", good.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(stdout(&out).starts_with("OK"));

    let bytes = std::fs::read(&good).unwrap();
    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() - 5]).unwrap();
    let out = tensafe(&["verify", good.to_str().unwrap(), truncated.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(text.contains("FAIL") && text.contains("truncated") && text.contains("5 bytes missing"), "{text}");

    let lfs = dir.path().join("lfs.safetensors");
    std::fs::write(&lfs, "version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 4242\n").unwrap();
    let text = stdout(&tensafe(&["verify", lfs.to_str().unwrap()]));
    assert!(text.contains("Git LFS pointer") && text.contains("4242 bytes"), "{text}");

    let html = dir.path().join("page.safetensors");
    std::fs::write(&html, "<!DOCTYPE html><html><body>Access denied</body></html>").unwrap();
    assert!(stdout(&tensafe(&["verify", html.to_str().unwrap()])).contains("HTML page"));

    let empty = dir.path().join("empty.safetensors");
    std::fs::write(&empty, "").unwrap();
    assert!(stdout(&tensafe(&["verify", empty.to_str().unwrap()])).contains("empty"));

    let bad_bool = dir.path().join("bool.safetensors");
    tensafe::serialize_to_file([("m", RawTensor { dtype: Dtype::Bool, shape: &[3], data: &[0, 1, 2] })], None, &bad_bool).unwrap();
    let text = stdout(&tensafe(&["verify", bad_bool.to_str().unwrap()]));
    assert!(text.contains("BOOL tensor `m` holds the byte 2 at element 2"), "{text}");

    let missing = tensafe(&["inspect", dir.path().join("nope").to_str().unwrap()]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("No such file"));

    // A checkpoint, by its folder or index: the index against the shards, then every shard.
    let ckpt = dir.path().join("ckpt");
    std::fs::create_dir(&ckpt).unwrap();
    std::fs::copy(&good, ckpt.join("model-00001-of-00002.safetensors")).unwrap();
    std::fs::copy(&bad_bool, ckpt.join("model-00002-of-00002.safetensors")).unwrap();
    let index = ckpt.join(tensafe::INDEX_FILE);
    let names: Vec<String> = tensafe::PreadFile::open(&good).unwrap().header().iter().map(|(n, _)| n.to_owned()).collect();
    let map: Vec<String> = names.iter().map(|n| format!("\"{n}\": \"model-00001-of-00002.safetensors\"")).collect();
    let write_index = |second: &str| std::fs::write(&index, format!("{{\"weight_map\": {{{}, \"m\": \"{second}\"}}}}", map.join(", "))).unwrap();
    write_index("model-00002-of-00002.safetensors");
    for path in [&ckpt, &index] {
        let text = stdout(&tensafe(&["verify", path.to_str().unwrap()]));
        assert!(text.starts_with("FAIL") && text.contains("model-00002-of-00002.safetensors: BOOL tensor `m` holds the byte 2"), "{text}");
    }
    std::fs::copy(&good, ckpt.join("model-00002-of-00002.safetensors")).unwrap();
    write_index("model-00001-of-00002.safetensors");
    let text = stdout(&tensafe(&["verify", ckpt.to_str().unwrap()]));
    assert!(text.starts_with("FAIL") && text.contains("tensor `m`"), "the index names a shard without it: {text}");
}

#[test]
fn inspect_and_reshard_a_sharded_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let single = dir.path().join("model.safetensors");
    write_file(&single, 40);
    let sharded = dir.path().join("sharded");
    let out = tensafe(&["reshard", single.to_str().unwrap(), sharded.to_str().unwrap(), "--max-shard-size", "300B"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shard_count = std::fs::read_dir(&sharded).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".safetensors")).count();
    assert!(shard_count > 1);
    assert!(stdout(&out).contains(&format!("wrote {shard_count} shards")));

    for target in [sharded.clone(), sharded.join("model.safetensors.index.json")] {
        let json: serde_json::Value = serde_json::from_slice(&tensafe(&["inspect", "--json", target.to_str().unwrap()]).stdout).unwrap();
        assert_eq!(json["tensors"].as_array().unwrap().len(), 40);
        assert_eq!(json["shards"].as_array().unwrap().len(), shard_count);
        assert_eq!(json["tensors"][0]["shard"], "model-00001-of-0000".to_string() + &shard_count.to_string() + ".safetensors");
    }
    let table = stdout(&tensafe(&["inspect", sharded.to_str().unwrap()]));
    assert!(table.contains(&format!("40 tensors in {shard_count} shards")), "{table}");

    // Back to one file: byte-identical to the original.
    let back = dir.path().join("back");
    assert!(tensafe(&["reshard", sharded.to_str().unwrap(), back.to_str().unwrap()]).status.success());
    assert_eq!(std::fs::read(back.join("model.safetensors")).unwrap(), std::fs::read(&single).unwrap());

    // A missing shard is named.
    std::fs::remove_file(sharded.join(format!("model-00002-of-{shard_count:05}.safetensors"))).unwrap();
    let out = tensafe(&["inspect", sharded.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing shard model-00002"));
}

#[test]
fn names_with_control_characters_are_read_and_shown_escaped() {
    // Valid files (the reference writes and reads such names); a listing must
    // not let them drive the terminal or forge lines.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ctrl.safetensors");
    let data = [1u8, 2];
    let name = "evil\u{1b}[2J\nOK    forged";
    tensafe::serialize_to_file([(name, RawTensor { dtype: Dtype::U8, shape: &[2], data: &data })], None, &path).unwrap();
    let out = tensafe(&["inspect", path.to_str().unwrap()]);
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(!text.contains('\u{1b}'), "{text:?}");
    assert!(text.contains("evil\\u{1b}[2J\\nOK    forged"), "{text}");
    assert!(!text.lines().any(|l| l.starts_with("OK")), "{text}");
    // diff lists the name as removed against a file without it.
    let other = dir.path().join("other.safetensors");
    tensafe::serialize_to_file([("w", RawTensor { dtype: Dtype::U8, shape: &[2], data: &data })], None, &other).unwrap();
    let diff = tensafe(&["diff", path.to_str().unwrap(), other.to_str().unwrap()]);
    let text = stdout(&diff);
    assert!(text.contains("evil\\u{1b}[2J\\nOK    forged"), "{text}");
    assert!(!text.contains('\u{1b}') && !text.lines().any(|l| l.starts_with("OK")), "{text:?}");
    // So is the file's own name, at the head of the table.
    let named = dir.path().join("x\nFAKE\u{1b}[31m");
    std::fs::copy(&other, &named).unwrap();
    let text = stdout(&tensafe(&["inspect", named.to_str().unwrap()]));
    assert!(text.contains("x\\nFAKE\\u{1b}[31m:") && !text.contains('\u{1b}') && !text.lines().any(|l| l.starts_with("FAKE")), "{text:?}");
}

#[test]
fn diff_compares_metadata_exact_integers_and_local_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let save = |name: &str, big: i64, format: &str| {
        let (ints, floats) = (big.to_le_bytes(), [0u8; 4096]);
        let tensors = [
            ("big", RawTensor { dtype: Dtype::I64, shape: &[1], data: &ints }),
            ("w", RawTensor { dtype: Dtype::F32, shape: &[1024], data: &floats }),
        ];
        let metadata = std::collections::BTreeMap::from([("format".to_owned(), format.to_owned()), ("path".to_owned(), format!("{format}\\dir"))]);
        tensafe::serialize_to_file(tensors, Some(&metadata), dir.path().join(name)).unwrap();
    };
    save("a.safetensors", 1 << 62, "pt");
    save("b.safetensors", (1 << 62) + 1, "pt");
    save("np.safetensors", 1 << 62, "np");

    // An f64 cannot tell 2^62 from 2^62 + 1: the difference is exact.
    let out = tensafe(&["diff", &path("a.safetensors"), &path("b.safetensors")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("1 of 1 elements differ, max abs difference 1"), "{}", stdout(&out));

    // Metadata is compared, between safetensors sides.
    let out = tensafe(&["diff", &path("a.safetensors"), &path("np.safetensors")]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stdout(&out).contains(r#"~ metadata format  "pt" → "np""#), "{}", stdout(&out));
    // Values are quoted and escaped once.
    assert!(stdout(&out).contains(r#"~ metadata path  "pt\\dir" → "np\\dir""#), "{}", stdout(&out));
    let out = tensafe(&["diff", &path("a.safetensors"), &path("np.safetensors"), "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["changes"][0]["change"], "metadata");

    // A local sharded checkpoint, by its directory or its index.
    let reshard = tensafe(&["reshard", &path("a.safetensors"), &path("sharded"), "--max-shard-size", "2KB"]);
    assert!(reshard.status.success(), "{}", String::from_utf8_lossy(&reshard.stderr));
    assert!(dir.path().join("sharded/model.safetensors.index.json").exists());
    for checkpoint in [path("sharded"), path("sharded/model.safetensors.index.json")] {
        let out = tensafe(&["diff", &checkpoint, &path("a.safetensors")]);
        assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
        assert!(stdout(&out).contains("2 identical tensors, 0 differences"), "{}", stdout(&out));
    }
}

#[test]
fn messages_escape_what_they_quote_once() {
    let dir = tempfile::tempdir().unwrap();
    // verify's error quotes the tensor's name, escaped by the core.
    let bad_bool = dir.path().join("bool.safetensors");
    tensafe::serialize_to_file([("b\nOK\\x", RawTensor { dtype: Dtype::Bool, shape: &[1], data: &[2] })], None, &bad_bool).unwrap();
    let out = tensafe(&["verify", bad_bool.to_str().unwrap()]);
    let text = format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("BOOL tensor `b\\nOK\\\\x`"), "{text}");
    // An error quoting a path with a newline (escaped by the core, then the line as a whole).
    let named = dir.path().join("p\nOK.bin");
    std::fs::write(&named, b"PK\x03\x04 not safetensors").unwrap();
    let out = tensafe(&["inspect", named.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("p\\nOK.bin:") && !stderr.contains("p\\\\nOK") && !stderr.lines().any(|l| l.starts_with("OK")), "{stderr}");
}

#[test]
fn output_that_cannot_be_written_is_an_error_not_a_panic() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::ExitStatusExt;
    use std::process::Stdio;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("many.safetensors");
    write_file(&path, 5000);
    // A full disk: reported, status 74.
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tensafe")).args(["inspect"]).arg(&path).stdout(full).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(74), "{stderr}");
    assert!(stderr.contains("cannot write the output: No space left on device") && !stderr.contains("panicked"), "{stderr}");
    // A reader that stops early (`| head -1`): the program ends quietly, by SIGPIPE.
    let mut child = Command::new(env!("CARGO_BIN_EXE_tensafe")).args(["inspect"]).arg(&path).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(first.contains("5000 tensors"), "{first}");
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE));
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn an_interrupted_reshard_leaves_the_destination_as_it_was_and_no_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    // 664 MiB of zeros in 664 tensors, a shard each: a sparse file, quick
    // to make and slow enough to rewrite (every shard is flushed to disk).
    // On Linux the first shards are staged with no name, and those past
    // tensafe::MAX_UNNAMED_STAGED_FILES get a temporary name once written:
    // the signal comes when both kinds are there, with 600 shards (600
    // flushes, a second or more) still to write.
    let (count, each) = (tensafe::MAX_UNNAMED_STAGED_FILES + 600, 1usize << 20);
    let entries: Vec<String> =
        (0..count).map(|i| format!("\"t{i}\":{{\"dtype\":\"U8\",\"shape\":[{each}],\"data_offsets\":[{},{}]}}", i * each, (i + 1) * each)).collect();
    let mut header = format!("{{{}}}", entries.join(","));
    header.extend(std::iter::repeat_n(' ', (8 - header.len() % 8) % 8));
    let input = dir.path().join("big.safetensors");
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    std::fs::write(&input, &bytes).unwrap();
    std::fs::File::options().write(true).open(&input).unwrap().set_len((bytes.len() + count * each) as u64).unwrap();
    let output = dir.path().join("out");
    std::fs::create_dir(&output).unwrap();
    write_file(&output.join("model.safetensors"), 3);
    let before = std::fs::read(output.join("model.safetensors")).unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_tensafe"))
        .args(["reshard", input.to_str().unwrap(), output.to_str().unwrap(), "--max-shard-size", "2MB"])
        .spawn()
        .unwrap();
    let temporary = |output: &Path| {
        std::fs::read_dir(output).unwrap().filter_map(Result::ok).filter(|e| e.file_name().to_string_lossy().ends_with(".tmp")).count()
    };
    // Interrupted while its files are being written.
    let start = std::time::Instant::now();
    while temporary(&output) == 0 {
        assert!(child.try_wait().unwrap().is_none(), "the reshard ended before it could be interrupted");
        assert!(start.elapsed() < std::time::Duration::from_secs(60), "no temporary file appeared");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGINT), "{status:?}");
    let left: Vec<String> = std::fs::read_dir(&output).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(left, ["model.safetensors"], "a temporary file or a new shard was left");
    assert_eq!(std::fs::read(output.join("model.safetensors")).unwrap(), before);
}

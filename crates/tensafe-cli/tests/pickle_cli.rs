//! Exit codes and output of `tensafe scan`, `convert` and `diff` on small
//! hand-made inputs (the torch-made corpus is in python/tests/test_convert.py).

use std::path::Path;
use std::process::{Command, Output};

use tensafe::{Dtype, RawTensor};

fn run(args: &[&str], paths: &[&Path]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tensafe")).args(args).args(paths).output().expect("the binary runs")
}

/// The legacy stream torch writes for `{'w': tensor([1., 2.])}`.
fn legacy_checkpoint() -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.");
    out.extend_from_slice(b"\x80\x02M\xe9\x03.");
    out.extend_from_slice(b"\x80\x02}(X\x10\x00\x00\x00protocol_versionM\xe9\x03X\x0d\x00\x00\x00little_endian\x88X\x0a\x00\x00\x00type_sizes}(X\x05\x00\x00\x00shortK\x02X\x03\x00\x00\x00intK\x04X\x04\x00\x00\x00longK\x04uu.");
    out.extend_from_slice(b"\x80\x02}(X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x007X\x03\x00\x00\x00cpuK\x02NtQK\x00K\x02\x85K\x01\x85\x89}tRu.");
    out.extend_from_slice(b"\x80\x02]X\x01\x00\x00\x007a.");
    out.extend_from_slice(&2u64.to_le_bytes());
    out.extend_from_slice(&1f32.to_le_bytes());
    out.extend_from_slice(&2f32.to_le_bytes());
    out
}

#[test]
fn scan_exit_codes_are_0_safe_1_flagged_2_unscannable_3_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    let safe = dir.path().join("model.bin");
    std::fs::write(&safe, legacy_checkpoint()).unwrap();
    let evil = dir.path().join("innocent.safetensors");
    std::fs::write(&evil, b"\x80\x02cposix\nsystem\nX\x02\x00\x00\x00idq\x00\x85R.").unwrap();
    let bz = dir.path().join("model.pt.bz2");
    std::fs::write(&bz, b"BZh91AY&SY\x00\x00").unwrap();
    let gz = dir.path().join("model.pt.gz");
    std::fs::write(&gz, b"\x1f\x8b\x08\x00\x00\x00\x00\x00").unwrap();

    let out = run(&["scan"], &[&safe]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("SAFE"));

    let out = run(&["scan"], &[&safe, &evil]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("DANGEROUS") && text.contains("posix.system"), "{text}");

    // A bzip2 wrapper is not opened: unsupported container.
    let out = run(&["scan"], &[&safe, &bz]);
    assert_eq!(out.status.code(), Some(3));
    // A gzip wrapper is opened: this one is truncated, so it cannot be scanned.
    let out = run(&["scan"], &[&safe, &gz]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stdout));
    // A malformed pickle outranks an unsupported container; a finding outranks both.
    let broken = dir.path().join("broken.pkl");
    std::fs::write(&broken, b"\x80\x02}q\x00").unwrap();
    let out = run(&["scan"], &[&bz, &broken]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["scan", "--json"], &[dir.path()]);
    assert_eq!(out.status.code(), Some(1));
    let reports: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reports.as_array().unwrap().len(), 5);
}

#[test]
fn convert_writes_or_refuses_and_diff_proves_it() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("model.bin");
    std::fs::write(&input, legacy_checkpoint()).unwrap();
    let output = dir.path().join("model.safetensors");
    let out = run(&["convert"], &[&input, &output]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bytes = std::fs::read(&output).unwrap();
    let st = tensafe::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("w").unwrap().data(), [1f32.to_le_bytes(), 2f32.to_le_bytes()].concat());

    // The checkpoint and its conversion hold the same tensors.
    assert_eq!(run(&["diff"], &[&input, &output]).status.code(), Some(0));
    let other = dir.path().join("other.safetensors");
    let data = [1f32.to_le_bytes(), 4f32.to_le_bytes()].concat();
    tensafe::serialize_to_file([("w", RawTensor { dtype: Dtype::F32, shape: &[2], data: &data })], None, &other).unwrap();
    let out = run(&["diff"], &[&output, &other]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("max abs difference 2"));
    assert_eq!(run(&["diff"], &[&output, &dir.path().join("missing")]).status.code(), Some(2));

    // An output that cannot be written is said to be that, not a refusal of the input.
    let out = run(&["convert"], &[&input, &dir.path().join("missing").join("m.safetensors")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("tensafe convert: writing the output:") && !stderr.contains("refused"), "{stderr}");

    // A hostile file is refused and nothing is written.
    let evil = dir.path().join("evil.pt");
    std::fs::write(&evil, b"\x80\x02cposix\nsystem\nX\x02\x00\x00\x00idq\x00\x85R.").unwrap();
    let target = dir.path().join("evil.safetensors");
    let out = run(&["convert"], &[&evil, &target]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("posix.system"));
    assert!(!target.exists());
}

#[test]
fn scan_reports_escape_what_a_hostile_pickle_names() {
    // GLOBAL names carrying terminal escapes and a newline: the report shows
    // them escaped, on one line each.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("escape.pkl");
    std::fs::write(&path, b"\x80\x02cos\x1b[2J\nsys\x1b]0;pwned\x07\n)R.").unwrap();
    let out = run(&["scan"], &[&path]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("os\\u{1b}[2J.sys\\u{1b}]0;pwned\\u{7}"), "{text}");
    assert!(!text.contains('\u{1b}') && !text.contains('\u{7}'), "{text:?}");
}

#[test]
fn convert_never_overwrites_its_input_nor_leaves_part_of_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("model.bin");
    std::fs::write(&input, legacy_checkpoint()).unwrap();
    let out = run(&["convert"], &[&input, &input]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is the input itself"));
    assert_eq!(std::fs::read(&input).unwrap(), legacy_checkpoint());
    let converted = dir.path().join("model.safetensors");
    assert!(run(&["convert"], &[&input, &converted]).status.success());
    let out = run(&["convert"], &[&converted, &dir.path().join("again.safetensors")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is already a safetensors checkpoint"));

    // Into a folder that holds an index: the index would hide the new file.
    let folder = dir.path().join("folder");
    std::fs::create_dir(&folder).unwrap();
    std::fs::write(folder.join(tensafe::INDEX_FILE), "{\"weight_map\": {\"old\": \"gone.safetensors\"}}").unwrap();
    assert!(run(&["convert"], &[&input, &folder]).status.success());
    assert!(!folder.join(tensafe::INDEX_FILE).exists());
    assert_eq!(tensafe::ShardedCheckpoint::open(&folder).unwrap().names_sorted(), ["w"]);

    // A sharded checkpoint whose second shard is refused: nothing is written.
    let sharded = dir.path().join("sharded");
    std::fs::create_dir(&sharded).unwrap();
    std::fs::write(sharded.join("a.bin"), legacy_checkpoint()).unwrap();
    std::fs::write(sharded.join("b.bin"), b"\x80\x02cposix\nsystem\nX\x02\x00\x00\x00idq\x00\x85R.").unwrap();
    let index = sharded.join("pytorch_model.bin.index.json");
    std::fs::write(&index, "{\"weight_map\": {\"w\": \"a.bin\", \"v\": \"b.bin\"}}").unwrap();
    let target = dir.path().join("converted");
    let out = run(&["convert"], &[&index, &target]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!target.exists(), "no shard, no temporary file, no folder: {:?}", std::fs::read_dir(&target).map(|d| d.count()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("b.bin") && stderr.contains("posix.system"), "the refused shard is named: {stderr}");
}

#[test]
fn scan_follows_what_it_is_given_and_never_calls_nothing_safe() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real");
    std::fs::create_dir(&real).unwrap();
    std::fs::write(real.join("e.pkl"), b"\x80\x02cposix\nsystem\nX\x02\x00\x00\x00idq\x00\x85R.").unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    // A link given on the command line is scanned.
    assert_eq!(run(&["scan"], &[&link]).status.code(), Some(1));
    // Inside a walk it is not followed, and says so.
    let outer = dir.path().join("outer");
    std::fs::create_dir(&outer).unwrap();
    std::os::unix::fs::symlink(&real, outer.join("inner")).unwrap();
    let out = run(&["scan"], &[&outer]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not following"), "{}", String::from_utf8_lossy(&out.stderr));
    // What was not scanned is not "safe", beside a safe file or alone.
    assert_eq!(out.status.code(), Some(2));
    std::fs::write(outer.join("model.bin"), legacy_checkpoint()).unwrap();
    assert_eq!(run(&["scan"], &[&outer]).status.code(), Some(2));
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = run(&["scan", "--json"], &[&empty]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no file to scan"));
}

#[test]
fn convert_and_scan_say_what_a_wrong_input_is() {
    let dir = tempfile::tempdir().unwrap();
    let lfs = dir.path().join("lfs.bin");
    std::fs::write(&lfs, "version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\nsize 438019\n").unwrap();
    let html = dir.path().join("html.bin");
    std::fs::write(&html, "<!DOCTYPE html><html><body>Access denied</body></html>").unwrap();
    let output = dir.path().join("out.safetensors");
    for (input, what) in [(&lfs, "Git LFS pointer file"), (&html, "HTML page")] {
        let out = run(&["convert"], &[input, &output]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("not a torch checkpoint; this is a") && err.contains(what) && !err.contains("opcode"), "{err}");
        let out = run(&["scan"], &[input]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(out.status.code(), Some(2), "{text}");
        assert!(text.contains("(not a pickle)") && text.contains(what), "{text}");
        assert!(!text.contains("stopped"), "the error is said once: {text}");
    }
    assert!(!output.exists());

    // A sharded safetensors checkpoint, by its index or its folder.
    let sharded = dir.path().join("sharded");
    std::fs::create_dir(&sharded).unwrap();
    let data = 1f32.to_le_bytes().repeat(2);
    tensafe::serialize_to_file([("w", RawTensor { dtype: Dtype::F32, shape: &[2], data: &data })], None, sharded.join("model-00001-of-00001.safetensors")).unwrap();
    std::fs::write(sharded.join(tensafe::INDEX_FILE), "{\"weight_map\": {\"w\": \"model-00001-of-00001.safetensors\"}}").unwrap();
    for input in [sharded.clone(), sharded.join(tensafe::INDEX_FILE)] {
        let out = run(&["convert"], &[&input, &dir.path().join("again")]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.code() == Some(1) && err.contains("is already a safetensors checkpoint: nothing to convert"), "{err}");
    }
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = run(&["convert"], &[&empty, &dir.path().join("again")]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("a folder with no torch checkpoint in it"), "{out:?}");
    assert!(!dir.path().join("again").exists());
}

#[test]
fn a_sharded_conversion_into_a_file_is_the_outputs_fault() {
    let dir = tempfile::tempdir().unwrap();
    let torch = dir.path().join("torch");
    std::fs::create_dir(&torch).unwrap();
    std::fs::write(torch.join("pytorch_model-00001-of-00001.bin"), legacy_checkpoint()).unwrap();
    std::fs::write(torch.join("pytorch_model.bin.index.json"), "{\"weight_map\": {\"w\": \"pytorch_model-00001-of-00001.bin\"}}").unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"mine").unwrap();
    let out = run(&["convert"], &[&torch, &file]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("writing the output:") && err.contains("it exists and is not a folder") && !err.contains("refused"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"mine");
}

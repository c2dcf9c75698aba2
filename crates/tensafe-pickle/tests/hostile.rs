//! The hostile corpus: one test per class of hostile input, built by
//! assembling opcodes and zip records here. For each: conversion refuses
//! (and writes nothing), the scanner flags it, and the canary payload —
//! `posix.system("touch <marker>")`, which any real unpickler would run —
//! leaves no marker behind.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use tensafe_pickle::{scan_bytes, ConvertOptions, ExtractOptions, LoadOptions, ScanOptions, ScanReport, Severity, Verdict};

struct Canary {
    dir: tempfile::TempDir,
}

impl Canary {
    fn new() -> Canary {
        Canary { dir: tempfile::tempdir().unwrap() }
    }
    fn marker(&self) -> PathBuf {
        self.dir.path().join("executed")
    }
    fn out(&self) -> PathBuf {
        self.dir.path().join("out.safetensors")
    }
}

impl Drop for Canary {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            assert!(!self.marker().exists(), "the payload ran");
        }
    }
}

/// With `TENSAFE_WRITE_CORPUS=DIR`, every hostile input is also written to
/// DIR (named after its test), e.g. to compare other scanners' verdicts.
fn dump(bytes: &[u8]) {
    if let Some(dir) = std::env::var_os("TENSAFE_WRITE_CORPUS") {
        let test = std::thread::current().name().unwrap_or("unnamed").to_owned();
        let path = PathBuf::from(dir).join(format!("{test}-{:08x}.bin", crc32fast::hash(bytes)));
        std::fs::write(path, bytes).unwrap();
    }
}

/// Converts `bytes`; asserts it fails without writing, returns the message.
fn refused_with(bytes: &[u8], options: &ConvertOptions) -> String {
    dump(bytes);
    let c = Canary::new();
    let input = c.dir.path().join("input.bin");
    std::fs::write(&input, bytes).unwrap();
    let err = tensafe_pickle::convert_file(&input, &c.out(), options).expect_err("conversion must refuse");
    assert!(!c.out().exists(), "nothing may be written on refusal");
    err.to_string()
}

fn refused(bytes: &[u8]) -> String {
    refused_with(bytes, &ConvertOptions::default())
}

fn scan(bytes: &[u8]) -> ScanReport {
    dump(bytes);
    let r = scan_bytes(bytes, "input", &ScanOptions::default());
    serde_json::to_string(&r).expect("reports serialize");
    r
}

fn dangerous(bytes: &[u8]) -> ScanReport {
    let r = scan(bytes);
    assert_eq!(r.verdict, Verdict::Dangerous, "{}", serde_json::to_string_pretty(&r).unwrap());
    r
}

fn flagged(bytes: &[u8]) -> ScanReport {
    let r = scan(bytes);
    assert!(matches!(r.verdict, Verdict::Suspicious | Verdict::Dangerous), "{}", serde_json::to_string_pretty(&r).unwrap());
    r
}

fn imports(r: &ScanReport) -> Vec<String> {
    r.pickles.iter().flat_map(|p| p.report.imports.iter().map(|i| i.global.clone())).collect()
}

/// A state dict whose tensor sits next to `payload` (pushed, then popped or kept).
fn with_payload(payload: impl FnOnce(Asm) -> Asm) -> Vec<u8> {
    let pkl = payload(Asm::new().proto(2).global("collections", "OrderedDict").empty_tuple().reduce().mark().str("w"))
        .tensor_v2("FloatStorage", "0", 12, 0, &[3, 4], &[4, 1])
        .setitems()
        .stop()
        .finish();
    torch_zip(&pkl, &[("0", &floats12())])
}

#[test]
fn baseline_the_builders_make_a_convertible_checkpoint() {
    let c = Canary::new();
    let input = c.dir.path().join("ok.pt");
    std::fs::write(&input, torch_zip(&state_dict_pickle(), &[("0", &floats12())])).unwrap();
    let report = tensafe_pickle::convert_file(&input, &c.out(), &ConvertOptions::default()).unwrap();
    assert_eq!(report.tensors.len(), 1);
    let bytes = std::fs::read(c.out()).unwrap();
    let st = tensafe::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("w").unwrap().data(), floats12());
    assert_eq!(scan(&std::fs::read(&input).unwrap()).verdict, Verdict::Safe);
}

// 1. Imports of globals that are not allowlisted.
#[test]
fn class01_non_allowlisted_globals() {
    let c = Canary::new();
    for (module, name) in [
        ("posix", "system"),
        ("os", "system"),
        ("nt", "system"),
        ("subprocess", "Popen"),
        ("builtins", "eval"),
        ("builtins", "exec"),
        ("builtins", "getattr"),
        ("builtins", "__import__"),
        ("importlib", "import_module"),
        ("runpy", "_run_code"),
        ("socket", "create_connection"),
        ("webbrowser", "open"),
        ("pdb", "run"),
        ("torch", "load"),
        ("shutil", "rmtree"),
    ] {
        let marker = c.marker();
        let bytes = with_payload(|a| {
            a.global(module, name).str(&format!("touch {}", marker.display())).tuple1().reduce().pop()
        });
        let msg = refused(&bytes);
        assert!(msg.contains(&format!("`{module}.{name}` is not allowlisted")), "{msg}");
        assert!(msg.contains("archive/data.pkl: offset 36 (GLOBAL)") && msg.ends_with("[while building ['w']]"), "{msg}");
        let r = dangerous(&bytes);
        assert!(imports(&r).contains(&format!("{module}.{name}")));
        assert!(r.would_execute.iter().any(|w| w.contains(name)), "{:?}", r.would_execute);
    }
}

// 2. One global, several spellings: Python 2 names, GLOBAL vs STACK_GLOBAL vs INST.
#[test]
fn class02_aliased_spellings() {
    let c = Canary::new();
    let py2 = Asm::new().proto(2).global("__builtin__", "eval").str("1").tuple1().reduce().stop().finish();
    let msg = refused(&torch_zip(&py2, &[]));
    assert!(msg.contains("builtins.eval"), "{msg}");
    let r = dangerous(&torch_zip(&py2, &[]));
    let import = &r.pickles[0].report.imports[0];
    assert_eq!((import.global.as_str(), import.raw.as_deref()), ("builtins.eval", Some("__builtin__.eval")));
    // Protocol 0 INST of the same function, and STACK_GLOBAL of posix.system.
    let inst = Asm::new().mark().str("1").inst("__builtin__", "eval").stop().finish();
    assert!(refused(&torch_zip(&inst, &[])).contains("builtins.eval"));
    dangerous(&inst);
    let stack = Asm::new().proto(4).short_str("posix").short_str("system").stack_global().str("x").tuple1().reduce().stop().finish();
    assert!(refused(&torch_zip(&stack, &[])).contains("posix.system"));
    let _ = c.marker();
    dangerous(&stack);
}

// 3. STACK_GLOBAL operands that arrive through the memo.
#[test]
fn class03_indirect_stack_global_operands() {
    let c = Canary::new();
    let pkl = Asm::new()
        .proto(4)
        .short_str("po")
        .memoize()
        .pop()
        .short_str("system")
        .memoize()
        .pop()
        .short_str("posix")
        .memoize()
        .pop()
        .binget(2)
        .binget(1)
        .stack_global()
        .str(&format!("touch {}", c.marker().display()))
        .tuple1()
        .reduce()
        .stop()
        .finish();
    assert!(refused(&torch_zip(&pkl, &[])).contains("posix.system"));
    let r = dangerous(&pkl);
    assert!(imports(&r).contains(&"posix.system".to_string()));
    // Non-str operands are an anomaly, never a lexical guess.
    let bad = Asm::new().proto(4).int(1).short_str("system").stack_global().stop().finish();
    assert!(refused(&torch_zip(&bad, &[])).contains("must be str"));
    dangerous(&bad);
}

// 4. Attribute paths in the name half.
#[test]
fn class04_dotted_names() {
    let pkl = Asm::new()
        .proto(4)
        .short_str("torch")
        .short_str("serialization.os.system")
        .stack_global()
        .str("id")
        .tuple1()
        .reduce()
        .stop()
        .finish();
    let msg = refused(&torch_zip(&pkl, &[]));
    assert!(msg.contains("torch.serialization.os.system"), "{msg}");
    let r = dangerous(&pkl);
    assert!(r.pickles[0].report.anomalies.iter().any(|a| a.kind == "attribute-walk"));
    // An allowlisted module with an attribute walk off an allowlisted name.
    let pkl = Asm::new().proto(2).global("torch._utils", "_rebuild_tensor_v2.__globals__").stop().finish();
    assert!(refused(&torch_zip(&pkl, &[])).contains("not allowlisted"));
}

// 5. Other call and construct opcodes.
#[test]
fn class05_other_call_opcodes() {
    let c = Canary::new();
    let touch = format!("touch {}", c.marker().display());
    // OBJ with an allowlisted class is still refused: OBJ and INST never are accepted.
    let obj = Asm::new().proto(2).mark().global("collections", "OrderedDict").op(b'o').stop().finish();
    assert!(refused(&torch_zip(&obj, &[])).contains("OBJ"));
    flagged(&obj);
    let obj = Asm::new().proto(2).mark().global("posix", "system").str(&touch).op(b'o').stop().finish();
    dangerous(&obj);
    // NEWOBJ and NEWOBJ_EX of a non-allowlisted class, then a BUILD (setstate).
    let newobj = Asm::new().proto(2).global("subprocess", "Popen").str(&touch).tuple1().op(0x81).empty_dict().build().stop().finish();
    assert!(refused(&torch_zip(&newobj, &[])).contains("subprocess.Popen"));
    let r = dangerous(&newobj);
    assert!(r.pickles[0].report.calls.iter().any(|c| c.opcode == "NEWOBJ" && c.callee == "subprocess.Popen"));
    assert!(r.pickles[0].report.calls.iter().any(|c| c.opcode == "BUILD"));
    let newobj_ex = Asm::new().proto(4).global("subprocess", "Popen").empty_tuple().empty_dict().op(0x92).stop().finish();
    dangerous(&newobj_ex);
    // Extension registry codes: refused in both modes.
    let ext = Asm::new().proto(2).op(0x82).raw(&[1]).stop().finish();
    assert!(refused(&torch_zip(&ext, &[])).contains("EXT"));
    let r = scan(&ext);
    assert!(r.pickles[0].report.error.as_deref().unwrap().contains("EXT"));
}

// 6. Calls whose results are discarded or kept only in the memo.
#[test]
fn class06_unreachable_calls() {
    let c = Canary::new();
    let bytes = with_payload(|a| a.system_call(&c.marker()).binput(9).pop());
    assert!(refused(&bytes).contains("posix.system"));
    let r = dangerous(&bytes);
    let call = r.pickles[0].report.calls.iter().find(|c| c.callee == "posix.system").unwrap();
    assert!(!call.reachable);
    let bytes = with_payload(|a| a.system_call(&c.marker()));
    let r = scan(&bytes);
    assert_eq!(r.verdict, Verdict::Dangerous);
}

// 7. Content after STOP; several pickles.
#[test]
fn class07_trailing_pickles() {
    let c = Canary::new();
    let mut pkl = state_dict_pickle();
    pkl.extend(Asm::new().proto(2).system_call(&c.marker()).stop().finish());
    let bytes = torch_zip(&pkl, &[("0", &floats12())]);
    let msg = refused(&bytes);
    assert!(msg.contains("bytes after STOP"), "{msg}");
    let r = dangerous(&bytes);
    assert!(imports(&r).contains(&"posix.system".to_string()));
    // A plain stream of pickles: every one is scanned.
    let mut stream = Asm::new().proto(2).int(1).stop().finish();
    stream.extend(Asm::new().proto(2).system_call(&c.marker()).stop().finish());
    let r = dangerous(&stream);
    assert!(r.findings.iter().any(|f| f.kind == "trailing-pickle"));
    assert!(refused(&stream).contains("not a torch checkpoint"));
}

// 8. A payload, then a stream that turns corrupt.
#[test]
fn class08_broken_pickle_after_payload() {
    let c = Canary::new();
    let pkl = Asm::new().proto(2).system_call(&c.marker()).pop().raw(&[0xff, 0xfe]).finish();
    assert!(refused(&torch_zip(&pkl, &[])).contains("posix.system"));
    let r = dangerous(&pkl);
    assert!(r.pickles[0].report.error.as_deref().unwrap().contains("invalid opcode 0xff"));
    assert!(r.pickles[0].report.calls.iter().any(|c| c.callee == "posix.system"));
}

// 9. Frame violations.
#[test]
fn class09_frames() {
    // An opcode whose argument crosses the frame end.
    let crossing = Asm::new().proto(4).frame(3).short_str("posix").stop().finish();
    assert!(refused(&torch_zip(&crossing, &[])).contains("crosses the frame end"));
    let r = dangerous(&crossing);
    assert!(r.pickles[0].report.anomalies.iter().any(|a| a.kind == "frame"));
    // A new frame before the old one is used up.
    let early = Asm::new().proto(4).frame(11).none().frame(1).stop().finish();
    assert!(refused(&torch_zip(&early, &[])).contains("new FRAME before"));
    dangerous(&early);
    // A frame longer than the input.
    let long = Asm::new().proto(4).frame(1 << 40).none().stop().finish();
    assert!(refused(&torch_zip(&long, &[])).contains("FRAME of"));
    assert_eq!(scan(&long).verdict, Verdict::Error);
    // Frames used correctly are fine, including unframed stretches.
    let ok = Asm::new().proto(4).frame(2).none().pop().none().stop().finish();
    assert_eq!(scan(&ok).verdict, Verdict::Safe);
}

// 10. Protocol header anomalies.
#[test]
fn class10_protocol_anomalies() {
    let late = Asm::new().none().proto(2).stop().finish();
    assert!(refused(&torch_zip(&late, &[])).contains("PROTO is not the first opcode"));
    flagged(&late);
    let repeated = Asm::new().proto(2).proto(4).none().stop().finish();
    assert!(refused(&torch_zip(&repeated, &[])).contains("PROTO"));
    flagged(&repeated);
    let six = Asm::new().proto(6).none().stop().finish();
    assert!(refused(&torch_zip(&six, &[])).contains("unsupported protocol 6"));
    assert_eq!(scan(&six).verdict, Verdict::Error);
}

fn zip_with(f: impl FnOnce(&mut Zip)) -> Vec<u8> {
    let mut z = Zip::new(torch_entries("archive", &state_dict_pickle(), &[("0", &floats12())]));
    f(&mut z);
    z.build()
}

// 11. Zip differentials.
#[test]
fn class11_zip_differentials() {
    let c = Canary::new();
    let evil = Asm::new().proto(2).system_call(&c.marker()).stop().finish();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("CRC-32", zip_with(|z| z.entries[0].crc = Some(0x1234_5678))),
        ("flags 0x0001", zip_with(|z| z.entries[0].flags = 1)),
        ("flags 0x0020", zip_with(|z| z.entries[2].flags = 0x20)),
        ("names it differently", zip_with(|z| z.entries[0].local_name = Some("archive/data.pkx".into()))),
        ("duplicate entry name", zip_with(|z| z.entries.push(Entry::new("archive/data.pkl", &evil)))),
        ("overlaps", zip_with(|z| z.overlap = true)),
        ("several end-of-central-directory records", zip_with(|z| z.second_eocd = true)),
        ("compression method 12", zip_with(|z| z.entries[1].method = 12)),
        ("zip comment", zip_with(|z| z.comment = evil.clone())),
    ];
    for (needle, bytes) in cases {
        let msg = refused(&bytes);
        assert!(msg.contains(needle), "{needle}: {msg}");
        let r = dangerous(&bytes);
        assert!(r.findings.iter().any(|f| f.kind == "zip"), "{needle}");
    }
    // With a duplicate, the scanner scans both copies, and the last is torch's.
    let r = dangerous(&zip_with(|z| z.entries.push(Entry::new("archive/data.pkl", &evil))));
    assert!(imports(&r).contains(&"posix.system".to_string()));
    assert!(r.pickles.iter().any(|p| p.torch_would_run && p.report.imports.iter().any(|i| i.global == "posix.system")));
}

// 12. Several trees, entries outside the torch prefix.
#[test]
fn class12_several_trees() {
    let c = Canary::new();
    let evil = Asm::new().proto(2).system_call(&c.marker()).stop().finish();
    let mut entries = torch_entries("archive", &state_dict_pickle(), &[("0", &floats12())]);
    entries.extend(torch_entries("other", &evil, &[]));
    let bytes = Zip::new(entries).build();
    assert!(refused(&bytes).contains("outside the archive folder"));
    let r = dangerous(&bytes);
    assert!(imports(&r).contains(&"posix.system".to_string()));
}

// 13. Pickles under non-pickle names; misleading extensions.
#[test]
fn class13_pickles_found_by_content() {
    let c = Canary::new();
    let evil = Asm::new().proto(2).system_call(&c.marker()).stop().finish();
    // A zip without the torch records is not a torch archive, whatever its members.
    let bytes = Zip::new(vec![Entry::new("weights/model.bin", &evil)]).build();
    assert!(refused(&bytes).contains("not a torch.save archive"));
    let r = dangerous(&bytes);
    assert!(imports(&r).contains(&"posix.system".to_string()));
    // An extra member inside a torch archive, named like data, holding a pickle.
    let bytes = zip_with(|z| z.entries.push(Entry::new("archive/data/notes.txt", &evil)));
    dangerous(&bytes);
    // A protocol-0 pickle (no PROTO byte) under an innocent name.
    let p0 = Asm::new().global("posix", "system").mark().str("x").tuple().reduce().stop().finish();
    let bytes = zip_with(|z| z.entries.push(Entry::new("archive/readme", &p0)));
    dangerous(&bytes);
}

// 14. Polyglots.
#[test]
fn class14_polyglots() {
    let c = Canary::new();
    let mut bytes = Asm::new().proto(2).system_call(&c.marker()).stop().finish();
    bytes.extend(torch_zip(&state_dict_pickle(), &[("0", &floats12())]));
    let msg = refused(&bytes);
    assert!(msg.contains("polyglot"), "{msg}");
    let r = dangerous(&bytes);
    assert!(r.findings.iter().any(|f| f.kind == "polyglot"));
    assert!(r.pickles.iter().any(|p| p.torch_would_run && p.report.imports.iter().any(|i| i.global == "posix.system")));
    // Bytes before a zip: torch reads a stream, zip tools an archive.
    let mut z = Zip::new(torch_entries("archive", &state_dict_pickle(), &[("0", &floats12())]));
    z.before = b"junk".to_vec();
    let bytes = z.build();
    assert!(refused(&bytes).contains("polyglot"));
    flagged(&bytes);
    // A pickle hidden between the entries of a zip that starts correctly.
    let mut z = Zip::new(torch_entries("archive", &state_dict_pickle(), &[("0", &floats12())]));
    z.gap = Asm::new().proto(2).system_call(&c.marker()).stop().finish();
    let bytes = z.build();
    assert!(refused(&bytes).contains("unaccounted bytes"));
    dangerous(&bytes);
}

// 15. Wrappers torch cannot open directly.
#[test]
fn class15_wrappers() {
    for (magic, name) in [(&b"\x1f\x8b\x08\x00"[..], "gzip"), (b"7z\xbc\xaf\x27\x1c", "7z"), (b"BZh91AY&SY", "bzip2"), (b"\xfd7zXZ\x00", "xz")] {
        let mut bytes = magic.to_vec();
        bytes.extend_from_slice(&[0u8; 64]);
        assert!(refused(&bytes).contains(name));
        let r = scan(&bytes);
        assert_eq!(r.verdict, Verdict::Error, "{name}: never reported clean");
    }
    // `BZh` without a bzip2 block after it is no bzip2 file, but can be a
    // pickle: BINBYTES (`B`) of 0x685a bytes, POP, then the call.
    let c = Canary::new();
    let mut bytes = b"BZh\0\0".to_vec();
    bytes.extend_from_slice(&[b'A'; 0x685a]);
    bytes.extend(Asm::new().op(b'0').proto(2).system_call(&c.marker()).stop().finish());
    let r = dangerous(&bytes);
    assert!(r.would_execute.iter().any(|w| w.contains("posix.system")), "{:?}", r.would_execute);
}

// 16. Legacy side pickles carrying code.
#[test]
fn class16_legacy_side_pickles() {
    let c = Canary::new();
    let evil = || Asm::new().proto(2).system_call(&c.marker()).stop().finish();
    let good = legacy_stream(legacy_magic(), legacy_sys_info(), legacy_object("1"), legacy_keys(&["1"]), &[(12, &floats12())]);
    {
        let c2 = Canary::new();
        let input = c2.dir.path().join("legacy.bin");
        std::fs::write(&input, &good).unwrap();
        tensafe_pickle::convert_file(&input, &c2.out(), &ConvertOptions::default()).unwrap();
        assert_eq!(scan(&good).verdict, Verdict::Safe);
    }
    let variants = [
        legacy_stream(evil(), legacy_sys_info(), legacy_object("1"), legacy_keys(&["1"]), &[(12, &floats12())]),
        legacy_stream(legacy_magic(), evil(), legacy_object("1"), legacy_keys(&["1"]), &[(12, &floats12())]),
        legacy_stream(legacy_magic(), legacy_sys_info(), legacy_object("1"), evil(), &[(12, &floats12())]),
    ];
    for bytes in variants {
        assert!(refused(&bytes).contains("posix.system"));
        let r = dangerous(&bytes);
        assert!(r.pickles.iter().any(|p| p.torch_would_run && p.report.imports.iter().any(|i| i.global == "posix.system")));
    }
    // Side pickles must be pure data: even an allowlisted global is refused there.
    let sys = Asm::new().proto(2).global("collections", "OrderedDict").empty_tuple().reduce().stop().finish();
    let bytes = legacy_stream(legacy_magic(), sys, legacy_object("1"), legacy_keys(&["1"]), &[(12, &floats12())]);
    assert!(refused(&bytes).contains("plain data only"));
    flagged(&bytes);
}

// 17. Archives routed to a more powerful loader.
#[test]
fn class17_torchscript_and_friends() {
    for extra in ["archive/constants.pkl", "archive/code/__torch__.py", "archive/bytecode.pkl", "archive/.data/extern_modules", "archive/attributes.pkl"] {
        let bytes = zip_with(|z| z.entries.push(Entry::new(extra, &Asm::new().proto(2).none().stop().finish())));
        let msg = refused(&bytes);
        assert!(msg.contains("runs") || msg.contains("imports"), "{extra}: {msg}");
        let r = dangerous(&bytes);
        assert!(r.findings.iter().any(|f| f.kind == "code"));
    }
    let pt2 = zip_with(|z| z.entries.push(Entry::new("archive/archive_format", b"pt2")));
    assert!(refused(&pt2).contains("torch.export"));
}

// 18. Shared-reference explosions through the memo.
#[test]
fn class18_billion_laughs() {
    // level0 = [tensor]; level(i+1) = [level i, level i]: 2^60 paths.
    let mut a = Asm::new().proto(2).empty_list().mark().tensor_v2("FloatStorage", "0", 12, 0, &[12], &[1]).op(b'e').binput(0);
    for i in 0..60u8 {
        a = a.pop().empty_list().mark().binget(i).binget(i).op(b'e').binput(i + 1);
    }
    let pkl = a.stop().finish();
    let bytes = torch_zip(&pkl, &[("0", &floats12())]);
    let start = Instant::now();
    let c = Canary::new();
    let input = c.dir.path().join("bomb.pt");
    std::fs::write(&input, &bytes).unwrap();
    let options = ConvertOptions { extract: ExtractOptions { flatten: true, ..Default::default() }, ..Default::default() };
    let report = tensafe_pickle::convert_file(&input, &c.out(), &options).unwrap();
    assert_eq!(report.tensors.len(), 1);
    assert!(report.skipped.iter().any(|(_, why)| why.contains("shared reference")));
    let r = scan(&bytes);
    let shared = r.findings.iter().find(|f| f.kind == "shared-references").expect("the sharing is reported");
    assert!(shared.detail.starts_with("60 containers are reached more than once"), "{}", shared.detail);
    assert!(start.elapsed() < Duration::from_secs(5));
}

// 19. Declared lengths larger than the input.
#[test]
fn class19_lying_lengths() {
    let cases = [
        Asm::new().proto(2).op(b'X').raw(&u32::MAX.to_le_bytes()).raw(b"abc").stop().finish(),
        Asm::new().proto(4).op(0x8e).raw(&u64::MAX.to_le_bytes()).stop().finish(),
        Asm::new().proto(4).op(0x8d).raw(&(1u64 << 50).to_le_bytes()).stop().finish(),
        Asm::new().proto(2).op(b'T').raw(&(-5i32).to_le_bytes()).stop().finish(),
        Asm::new().proto(2).op(0x8b).raw(&(1i32 << 30).to_le_bytes()).stop().finish(),
    ];
    for pkl in cases {
        let msg = refused(&torch_zip(&pkl, &[]));
        assert!(msg.contains("remain") || msg.contains("negative"), "{msg}");
        assert_eq!(scan(&pkl).verdict, Verdict::Error);
    }
    // A LONG longer than 64 bytes (but present) is refused too.
    let long = Asm::new().proto(2).op(0x8a).raw(&[100]).raw(&[1; 100]).stop().finish();
    assert!(refused(&torch_zip(&long, &[])).contains("100-byte int"));
}

// 20. Depth and volume floods.
#[test]
fn class20_floods() {
    let marks = Asm::new().proto(2).raw(&vec![b'('; 100_001]).stop().finish();
    assert!(refused(&torch_zip(&marks, &[])).contains("MARKs"));
    let stack = Asm::new().proto(2).raw(&vec![b'N'; 1_000_001]).stop().finish();
    assert!(refused(&torch_zip(&stack, &[])).contains("value stack deeper"));
    let mut memo = Asm::new().proto(2).none();
    for i in 0..1_001u32 {
        memo = memo.op(b'r').raw(&i.to_le_bytes());
    }
    let memo = memo.stop().finish();
    let few = ConvertOptions { load: LoadOptions { limits: tensafe_pickle::Limits { max_memo: 1_000, ..Default::default() }, ..Default::default() }, ..Default::default() };
    assert!(refused_with(&torch_zip(&memo, &[]), &few).contains("more than 1000 memo entries"));
    // Deep nesting: the VM is iterative, extraction stops at the limit.
    let mut nested = Asm::new().proto(2).empty_dict().str("x");
    for _ in 0..2000 {
        nested = nested.empty_list();
    }
    nested = nested.tensor_v2("FloatStorage", "0", 12, 0, &[12], &[1]);
    for _ in 0..2000 {
        nested = nested.append();
    }
    let nested = nested.setitem().stop().finish();
    let options = ConvertOptions { extract: ExtractOptions { flatten: true, ..Default::default() }, ..Default::default() };
    let msg = refused_with(&torch_zip(&nested, &[("0", &floats12())]), &options);
    assert!(msg.contains("nested deeper than 1000"), "{msg}");
    scan(&nested);
}

// 21. Storage size lies.
#[test]
fn class21_storage_sizes() {
    // Declared 12 floats, record holds 8.
    let msg = refused(&torch_zip(&state_dict_pickle(), &[("0", &floats12()[..32])]));
    assert!(msg.contains("holds 32 bytes but the pickle declares"), "{msg}");
    flagged(&torch_zip(&state_dict_pickle(), &[("0", &floats12()[..32])]));
    // numel × element size overflows.
    let pkl = Asm::new().proto(2).tensor_v2("DoubleStorage", "0", i64::MAX, 0, &[1], &[1]).stop().finish();
    assert!(refused(&torch_zip(&pkl, &[("0", &[0; 8])])).contains("overflows"));
    // One key declared with two sizes, or two element types.
    let declared_twice = |second: &str, numel: i64| {
        let pkl = Asm::new()
            .proto(2)
            .empty_dict()
            .mark()
            .str("a")
            .tensor_v2("FloatStorage", "0", 12, 0, &[12], &[1])
            .str("b")
            .tensor_v2(second, "0", numel, 0, &[numel], &[1])
            .setitems()
            .stop()
            .finish();
        torch_zip(&pkl, &[("0", &floats12())])
    };
    let bytes = declared_twice("FloatStorage", 1000);
    let msg = refused(&bytes);
    assert!(msg.contains("storage `0` declared twice with different sizes (48 and 4000 bytes)"), "{msg}");
    dangerous(&bytes);
    let msg = refused(&declared_twice("IntStorage", 12));
    assert!(msg.contains("storage `0` declared twice with different element types (float32 and int32)"), "{msg}");
}

// 22. Tensor geometry outside its storage.
#[test]
fn class22_geometry() {
    let geometry = |offset: i64, size: &[i64], stride: &[i64]| {
        let pkl = Asm::new().proto(2).empty_dict().mark().str("w").tensor_v2("FloatStorage", "0", 12, offset, size, stride).setitems().stop().finish();
        torch_zip(&pkl, &[("0", &floats12())])
    };
    assert!(refused(&geometry(0, &[4, 4], &[4, 1])).contains("extent"));
    assert!(refused(&geometry(11, &[2], &[1])).contains("extent"));
    assert!(refused(&geometry(0, &[3, 4], &[1, 4])).contains("extent"));
    assert!(refused(&geometry(-1, &[2], &[1])).contains("negative"));
    assert!(refused(&geometry(0, &[-2], &[1])).contains("negative"));
    assert!(refused(&geometry(0, &[2], &[-1])).contains("negative"));
    assert!(refused(&geometry(0, &[1; 65], &[1; 65])).contains("dimensions"));
    assert!(refused(&geometry(0, &[2, 2], &[1])).contains("dimensions"));
    flagged(&geometry(0, &[4, 4], &[4, 1]));
}

// 23. Materialisation bombs.
#[test]
fn class23_stride_zero_bomb() {
    let pkl = Asm::new()
        .proto(2)
        .empty_dict()
        .mark()
        .str("w")
        .tensor_v2("FloatStorage", "0", 1, 0, &[1 << 20, 1 << 20], &[0, 0])
        .setitems()
        .stop()
        .finish();
    let bomb = torch_zip(&pkl, &[("0", &[0; 4])]);
    let msg = refused(&bomb);
    assert!(msg.contains("stride-0 or view bomb"), "{msg}");
    // torch.load would build the expanded view without copying; the scanner
    // reports what a conversion would have to write.
    let r = flagged(&bomb);
    let finding = r.findings.iter().find(|f| f.kind == "materialisation-bomb").expect("a materialisation finding");
    assert!(finding.detail.contains("declare 4398046511104 bytes from 4 bytes of storage"), "{}", finding.detail);
    // A modest expansion is fine.
    let ok = Asm::new().proto(2).empty_dict().mark().str("w").tensor_v2("FloatStorage", "0", 1, 0, &[100, 3], &[0, 0]).setitems().stop().finish();
    let c = Canary::new();
    let input = c.dir.path().join("ok.pt");
    std::fs::write(&input, torch_zip(&ok, &[("0", &1f32.to_le_bytes())])).unwrap();
    tensafe_pickle::convert_file(&input, &c.out(), &ConvertOptions::default()).unwrap();
    assert_eq!(scan(&std::fs::read(&input).unwrap()).verdict, Verdict::Safe);
}

// 24. Container operations on the wrong type.
#[test]
fn class24_type_confusion() {
    let tensor = |a: Asm| a.tensor_v2("FloatStorage", "0", 12, 0, &[12], &[1]);
    let cases = [
        // Item assignment on a tensor (CVE-2026-24747's class).
        tensor(Asm::new().proto(2)).str("k").int(1).setitem().stop().finish(),
        // APPEND on a dict, ADDITEMS on a list, BUILD on a list and on a plain dict.
        Asm::new().proto(2).empty_dict().int(1).append().stop().finish(),
        Asm::new().proto(4).empty_list().mark().int(1).op(0x90).stop().finish(),
        Asm::new().proto(2).empty_list().empty_dict().build().stop().finish(),
        Asm::new().proto(2).empty_dict().empty_dict().build().stop().finish(),
        // BUILD on a tensor with a dict state {other tensor: None}: torch's
        // loader would run `w.set_(other)`, so `w` would hold other bytes.
        tensor(Asm::new().proto(2)).empty_dict().tensor_v2("FloatStorage", "0", 12, 0, &[3], &[1]).none().setitem().build().stop().finish(),
    ];
    for pkl in cases {
        let msg = refused(&torch_zip(&pkl, &[("0", &floats12())]));
        assert!(msg.contains("on a"), "{msg}");
        dangerous(&pkl);
    }
}

// 25. Rebuild-function abuse.
#[test]
fn class25_rebuild_abuse() {
    let storage = |a: Asm| a.storage("FloatStorage", "0", 12);
    // _rebuild_from_type_v2 with a non-rebuild func, and with an arbitrary class.
    let from_type = |func: (&str, &str), new_type: (&str, &str)| {
        let a = Asm::new().proto(2).global("torch._tensor", "_rebuild_from_type_v2").mark().global(func.0, func.1).global(new_type.0, new_type.1);
        let a = storage(a.mark()).int(0).ints_tuple(&[12]).ints_tuple(&[1]).newfalse().global("collections", "OrderedDict").empty_tuple().reduce().tuple();
        a.empty_dict().tuple().reduce().stop().finish()
    };
    let msg = refused(&torch_zip(&from_type(("collections", "OrderedDict"), ("torch", "Tensor")), &[("0", &floats12())]));
    assert!(msg.contains("func must be a torch rebuild function"), "{msg}");
    let msg = refused(&torch_zip(&from_type(("torch._utils", "_rebuild_tensor"), ("torch", "FloatStorage")), &[("0", &floats12())]));
    assert!(msg.contains("new_type"), "{msg}");
    assert!(refused(&torch_zip(&from_type(("builtins", "eval"), ("torch", "Tensor")), &[])).contains("builtins.eval"));
    // Non-empty backward hooks.
    let hooks = storage(Asm::new().proto(2).global("torch._utils", "_rebuild_tensor_v2").mark())
        .int(0)
        .ints_tuple(&[12])
        .ints_tuple(&[1])
        .newfalse()
        .empty_dict()
        .int(1)
        .int(2)
        .setitem()
        .tuple()
        .reduce()
        .stop()
        .finish();
    assert!(refused(&torch_zip(&hooks, &[("0", &floats12())])).contains("backward hooks"));
    flagged(&hooks);
    // Per-channel quantized tensor with an axis outside the tensor.
    let q = storage(Asm::new().proto(2).global("torch._utils", "_rebuild_qtensor").mark())
        .int(0)
        .ints_tuple(&[12])
        .ints_tuple(&[1])
        .mark()
        .global("torch", "per_channel_affine")
        .none()
        .none()
        .int(5)
        .tuple()
        .newfalse()
        .empty_dict()
        .tuple()
        .reduce()
        .stop()
        .finish();
    assert!(refused(&torch_zip(&q, &[("0", &floats12())])).contains("axis 5"));
    // Unsupported tensor kinds.
    let nested = Asm::new().proto(2).global("torch._utils", "_rebuild_nested_tensor").mark().none().none().none().none().tuple().reduce().stop().finish();
    assert!(refused(&torch_zip(&nested, &[])).contains("nested tensors"));
}

// 26. Persistent-id abuse.
#[test]
fn class26_persistent_ids() {
    let pid = |pid: Asm| {
        let a = Asm::new().proto(2).empty_dict().mark().str("w").global("torch._utils", "_rebuild_tensor_v2").mark();
        let a = Asm(a.0.into_iter().chain(pid.0).collect());
        let pkl = a.binpersid().int(0).ints_tuple(&[12]).ints_tuple(&[1]).newfalse().empty_dict().tuple().reduce().setitems().stop().finish();
        torch_zip(&pkl, &[("0", &floats12())])
    };
    let cases = [
        (Asm::new().mark().str("module").global("torch", "FloatStorage").str("0").str("cpu").int(12).tuple(), "whole-module"),
        (Asm::new().mark().str("storage").global("torch", "FloatStorage").str("0").str("cpu").tuple(), "persistent id must be"),
        (Asm::new().int(3), "must be a tuple"),
        (Asm::new().mark().str("storage").global("torch", "FloatStorage").str("../version").str("cpu").int(12).tuple(), "is not a decimal number"),
        (Asm::new().mark().str("storage").global("torch", "FloatStorage").str("7").str("cpu").int(12).tuple(), "is missing"),
        (Asm::new().mark().str("storage").global("torch", "float32").str("0").str("cpu").int(12).tuple(), "storage type"),
    ];
    for (p, needle) in cases {
        let bytes = pid(p);
        let msg = refused(&bytes);
        assert!(msg.contains(needle), "{needle}: {msg}");
        flagged(&bytes);
    }
}

// 27. Text anomalies.
#[test]
fn class27_text() {
    let bad_utf8 = Asm::new().proto(2).op(b'X').raw(&3u32.to_le_bytes()).raw(&[0xff, 0xfe, 0x41]).stop().finish();
    assert!(refused(&torch_zip(&bad_utf8, &[])).contains("UTF-8"));
    flagged(&bad_utf8);
    let surrogate = Asm::new().proto(2).op(b'X').raw(&3u32.to_le_bytes()).raw(&[0xed, 0xa0, 0x80]).stop().finish();
    assert!(refused(&torch_zip(&surrogate, &[])).contains("surrogate"));
    let hex_int = Asm::new().op(b'I').raw(b"0x10\n").stop().finish();
    assert!(refused(&torch_zip(&hex_int, &[])).contains("not plain decimal"));
    flagged(&hex_int);
    // Names that collide after flattening.
    let pkl = Asm::new()
        .proto(2)
        .empty_dict()
        .mark()
        .str("a.b")
        .tensor_v2("FloatStorage", "0", 12, 0, &[12], &[1])
        .str("a")
        .empty_dict()
        .str("b")
        .tensor_v2("FloatStorage", "0", 12, 0, &[12], &[1])
        .setitem()
        .setitems()
        .stop()
        .finish();
    let options = ConvertOptions { extract: ExtractOptions { flatten: true, ..Default::default() }, ..Default::default() };
    assert!(refused_with(&torch_zip(&pkl, &[("0", &floats12())]), &options).contains("two tensors get this name"));
}

// 28. Compression bombs.
#[test]
fn class28_compression_bombs() {
    // A deflated storage that inflates past its declared size.
    let big = vec![0u8; 1 << 20];
    let bytes = zip_with(|z| {
        z.entries[2].data = big.clone();
        z.entries[2].method = 8;
        z.entries[2].declared_size = Some(48);
        z.entries[2].crc = Some(0);
    });
    let msg = refused(&bytes);
    assert!(msg.contains("inflat"), "{msg}");
    flagged(&bytes);
    // More inflated bytes than the budget.
    let options = ConvertOptions { load: LoadOptions { limits: tensafe_pickle::Limits { max_inflate: 100, ..Default::default() }, ..Default::default() }, ..Default::default() };
    let bytes = zip_with(|z| z.entries[0].method = 8);
    assert!(refused_with(&bytes, &options).contains("inflate budget"));
    // The scan says it could not read the entry: an error, not a danger (a
    // large checkpoint zipped again is one).
    let mut scan_options = ScanOptions::default();
    scan_options.limits.max_inflate = 100;
    let r = scan_bytes(&bytes, "input", &scan_options);
    assert_eq!(r.verdict, Verdict::Error, "{:?}", r.findings);
    assert!(r.error.as_deref().unwrap_or_default().contains("was not scanned: it inflates to more than"), "{:?}", r.error);
    assert!(r.findings.iter().all(|f| f.severity < Severity::Dangerous), "{:?}", r.findings);
    // A size claimed past the budget is not taken on trust: a small payload
    // that claims more (Python's zipfile reads its real bytes) is scanned.
    let c = Canary::new();
    let payload = Asm::new().proto(2).system_call(&c.marker()).stop().finish();
    let lying = Zip::new(vec![Entry { method: 8, declared_size: Some(1_000_000), crc: Some(0), ..Entry::new("payload.pkl", &payload) }]).build();
    scan_options.limits.max_inflate = 1000;
    let r = scan_bytes(&lying, "input", &scan_options);
    assert_eq!(r.verdict, Verdict::Dangerous, "{:?} {:?}", r.findings, r.error);
    assert!(imports(&r).iter().any(|g| g == "posix.system"), "{:?}", imports(&r));
    assert!(r.findings.iter().any(|f| f.detail.contains("declares 1000000 inflated bytes but inflates to")), "{:?}", r.findings);
}

// 29. Legacy tar with links and traversal.
#[test]
fn class29_tar() {
    fn member(name: &str, kind: u8, data: &[u8]) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[124..135].copy_from_slice(format!("{:011o}", data.len()).as_bytes());
        h[156] = kind;
        h[257..263].copy_from_slice(b"ustar\0");
        h[148..156].fill(b' ');
        let checksum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..156].copy_from_slice(format!("{checksum:06o}\0 ").as_bytes());
        let mut out = h;
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
        out
    }
    let c = Canary::new();
    let evil = Asm::new().proto(2).system_call(&c.marker()).stop().finish();
    let mut tar = member("sys_info", b'0', &Asm::new().proto(2).empty_dict().stop().finish());
    tar.extend(member("../escape", b'0', b"x"));
    tar.extend(member("link", b'2', b""));
    tar.extend(member("pickle", b'0', &evil));
    tar.extend(vec![0; 1024]);
    assert!(refused(&tar).contains("tar"));
    let r = dangerous(&tar);
    assert!(r.findings.iter().any(|f| f.detail.contains("link")));
    assert!(r.findings.iter().any(|f| f.detail.contains("escapes")));
    assert!(imports(&r).contains(&"posix.system".to_string()));

    // Members tarfile reads otherwise than a plain walk: an unknown type
    // (extracted as a regular file), a directory with a size (tarfile reads
    // the next header right after it), a PAX header (it sets the next
    // member's size), a base-256 size. Each is dangerous; a benign archive
    // of regular members and an empty directory is not.
    let benign = || {
        let mut tar = member("archive", b'5', b"");
        tar.extend(member("sys_info", b'0', &Asm::new().proto(2).empty_dict().stop().finish()));
        tar
    };
    let mut plain = benign();
    plain.extend(vec![0; 1024]);
    assert!(scan(&plain).findings.iter().all(|f| f.severity < Severity::Dangerous), "{:?}", scan(&plain).findings);
    for (kind, data) in [(b'7', &b"x"[..]), (b'Z', b"x"), (b'5', b"hidden"), (b'x', b"30 size=1000\n"), (b'L', b"longname")] {
        let mut tar = benign();
        tar.extend(member("odd", kind, data));
        tar.extend(vec![0; 1024]);
        let r = dangerous(&tar);
        assert!(r.findings.iter().any(|f| f.detail.contains("does not read as Python's tarfile does")), "{}: {:?}", kind as char, r.findings);
    }
    // A tar header whose name starts with another loader's magic: joblib
    // and numpy read the file as theirs.
    for magic in [&b"ZF0x10               "[..], b"\x93NUMPY\x01\x00"] {
        let mut tar = member(std::str::from_utf8(magic).unwrap_or("\u{93}NUMPY"), b'0', b"x");
        tar[..magic.len()].copy_from_slice(magic);
        tar[148..156].fill(b' ');
        let checksum: u32 = tar[..512].iter().map(|&b| u32::from(b)).sum();
        tar[148..156].copy_from_slice(format!("{checksum:06o}\0 ").as_bytes());
        tar.extend(vec![0; 1024]);
        assert_eq!(tensafe_pickle::detect(&tar), tensafe_pickle::Kind::Tar);
        let r = dangerous(&tar);
        assert!(r.findings.iter().any(|f| f.kind == "polyglot" && f.detail.contains("whose first bytes also make it")), "{:?}", r.findings);
    }
    let mut base256 = member("storages", b'0', b"");
    base256[124] = 0x80;
    base256[148..156].fill(b' ');
    let checksum: u32 = base256[..512].iter().map(|&b| u32::from(b)).sum();
    base256[148..156].copy_from_slice(format!("{checksum:06o}\0 ").as_bytes());
    let mut tar = benign();
    tar.extend(base256);
    tar.extend(vec![0; 1024]);
    assert!(dangerous(&tar).findings.iter().any(|f| f.detail.contains("size field")));

    // Tar's magic with a wrong checksum: tarfile refuses the header and torch
    // unpickles the file from its first byte, so that is what is scanned.
    let mut posing = evil.clone();
    posing.resize(1536, 0);
    posing[257..263].copy_from_slice(b"ustar\0");
    posing[148..156].copy_from_slice(b"0000000\0");
    let r = dangerous(&posing);
    assert!(imports(&r).contains(&"posix.system".to_string()));

    // A tar header that is also a pickle from its first byte (a BINSTRING
    // swallows the header's fields): torch unpickles it when tarfile refuses
    // a field, or when any later step of the tar path fails. Both readings
    // are scanned, whichever tarfile would take.
    for mode in [&b"0000644\0"[..], b"zzzzzzz\0"] {
        let evil = Asm::new().proto(2).system_call(&c.marker()).finish();
        let mut block = vec![0u8; 512];
        block[..evil.len()].copy_from_slice(&evil);
        block[evil.len()] = b'T';
        block[evil.len() + 1..evil.len() + 5].copy_from_slice(&((510 - evil.len() - 5) as u32).to_le_bytes());
        block[510..512].copy_from_slice(b"0.");
        block[100..108].copy_from_slice(mode);
        block[124..136].copy_from_slice(b"00000000000\0");
        block[156] = b'0';
        block[257..263].copy_from_slice(b"ustar\0");
        block[148..156].fill(b' ');
        let checksum: u32 = block.iter().map(|&b| u32::from(b)).sum();
        block[148..156].copy_from_slice(format!("{checksum:06o}\0 ").as_bytes());
        block.resize(1536, 0);
        assert!(evil.len() < 95, "the pickle must end before the header's fields");
        let tar = mode.starts_with(b"0");
        assert_eq!(tensafe_pickle::detect(&block) == tensafe_pickle::Kind::Tar, tar);
        let r = dangerous(&block);
        assert!(imports(&r).contains(&"posix.system".to_string()), "{}", String::from_utf8_lossy(mode));
    }
}

// 30. Cycles.
#[test]
fn class30_cycles() {
    // d = {'w': tensor, 'self': d}; l = [l].
    let pkl = Asm::new()
        .proto(2)
        .empty_dict()
        .binput(0)
        .mark()
        .str("w")
        .tensor_v2("FloatStorage", "0", 12, 0, &[12], &[1])
        .str("loop")
        .empty_list()
        .binput(1)
        .binget(1)
        .append()
        .str("self")
        .binget(0)
        .setitems()
        .stop()
        .finish();
    let bytes = torch_zip(&pkl, &[("0", &floats12())]);
    let c = Canary::new();
    let input = c.dir.path().join("cycle.pt");
    std::fs::write(&input, &bytes).unwrap();
    let options = ConvertOptions { extract: ExtractOptions { flatten: true, ..Default::default() }, ..Default::default() };
    let report = tensafe_pickle::convert_file(&input, &c.out(), &options).unwrap();
    assert_eq!(report.tensors.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["w"]);
    assert_eq!(scan(&bytes).verdict, Verdict::Safe);
}

#[test]
fn scan_reports_every_event_with_severity() {
    let c = Canary::new();
    let bytes = with_payload(|a| a.system_call(&c.marker()).pop());
    let r = dangerous(&bytes);
    let p = &r.pickles[0].report;
    assert_eq!(p.protocol, Some(2));
    assert!(p.opcodes["REDUCE"] >= 3);
    assert!(p.imports.iter().any(|i| i.global == "collections.OrderedDict" && i.severity == Severity::Safe));
    assert_eq!(r.tensors.len(), 1);
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["verdict"], "dangerous");
}

/// A joblib-shaped stream: `{'w': <float64 array of 3>, 'x': <payload>}`,
/// with the array's raw bytes (padding length, padding, 24 data bytes that
/// include a STOP byte) between the wrapper's BUILD and the next opcode, as
/// joblib writes them. `declared` is the array length in the wrapper state.
fn joblib_stream(declared: i64, payload: impl FnOnce(Asm) -> Asm) -> Vec<u8> {
    joblib_stream_typed("f8", 0, declared, payload)
}

/// [`joblib_stream`] with the array's dtype code and the flags of its state.
fn joblib_stream_typed(code: &str, flags: i64, declared: i64, payload: impl FnOnce(Asm) -> Asm) -> Vec<u8> {
    let asm = array_wrapper(Asm::new().proto(2).empty_dict().mark().str("w"), declared, code)
        .mark()
        .int(3)
        .str("<")
        .none()
        .none()
        .none()
        .int(-1)
        .int(-1)
        .int(flags)
        .tuple()
        .build()
        .str("numpy_array_alignment_bytes")
        .int(16)
        .setitems()
        .build()
        .raw(&[2, 0xff, 0xff])
        .raw(b".\x00\x00\x00\x00\x00\x00\x00")
        .raw(&1.5f64.to_le_bytes())
        .raw(&2.5f64.to_le_bytes())
        .str("x");
    payload(asm).setitems().stop().finish()
}

/// A joblib `NumpyArrayWrapper` (NEWOBJ) and its state dict up to its
/// `dtype` entry: `numpy.dtype(dtype, False, True)` for an array of `len`
/// elements. The caller adds the dtype's own state, if any, then closes the
/// dict (SETITEMS) and BUILDs.
fn array_wrapper(asm: Asm, len: i64, dtype: &str) -> Asm {
    asm.global("joblib.numpy_pickle", "NumpyArrayWrapper")
        .empty_tuple()
        .op(0x81)
        .empty_dict()
        .mark()
        .str("shape")
        .ints_tuple(&[len])
        .str("dtype")
        .global("numpy", "dtype")
        .mark()
        .str(dtype)
        .newfalse()
        .op(0x88)
        .tuple()
        .reduce()
}

// numpy takes many spellings of a dtype (`uint8`, `object`, `d`); joblib
// steps over `count × itemsize` bytes as numpy sizes them. A code read
// wrongly here would step over the wrong bytes (`uint8` read as 8 bytes an
// element hid a payload joblib ran), so only the codes numpy's pickling
// writes are read, and an array flagged as holding objects is one.
#[test]
fn joblib_dtypes_numpy_would_size_otherwise_are_dangerous() {
    let c = Canary::new();
    for (code, flags) in [("uint8", 0), ("d", 0), ("object", 0), ("f8", 63), ("<i3", 0)] {
        let bytes = joblib_stream_typed(code, flags, 3, |a| a.system_call(&c.marker()));
        let r = dangerous(&bytes);
        assert!(r.pickles.iter().any(|p| p.report.anomalies.iter().any(|a| a.kind == "joblib")), "{code}: {:?}", r.pickles[0].report.anomalies);
    }
    // What numpy writes is read (8-byte elements: the stream holds 24 bytes): decoded to the end.
    for code in ["f8", "<f8", "i8", "u8", "c8", "M8", "m8"] {
        let r = scan(&joblib_stream_typed(code, 0, 3, |a| a.int(1)));
        assert!(r.pickles.iter().all(|p| p.report.error.is_none()), "{code}: {:?}", r.pickles[0].report.error);
    }
}

// joblib: raw array bytes inside the stream must not end the
// scan (a payload after them would go unreported) nor hide a payload.
#[test]
fn joblib_array_bytes_do_not_hide_what_follows() {
    let c = Canary::new();
    let marker = c.marker();
    let bytes = joblib_stream(3, |a| a.system_call(&marker));
    let r = dangerous(&bytes);
    assert!(r.error.is_none() && r.pickles.iter().all(|p| p.report.error.is_none()), "{:?}", r.error);
    assert!(imports(&r).contains(&"posix.system".to_owned()), "{:?}", imports(&r));
    assert!(r.would_execute.iter().any(|w| w.contains("posix.system")), "{:?}", r.would_execute);
    let msg = refused(&bytes);
    assert!(msg.contains("global `joblib.numpy_pickle.NumpyArrayWrapper` in a pickle that must hold plain data only"), "{msg}");
    // Without a payload the stream decodes to the end.
    let benign = joblib_stream(3, |a| a.int(1));
    let r = scan(&benign);
    assert!(r.error.is_none() && r.pickles[0].report.error.is_none(), "{:?}", r.pickles[0].report.error);
    assert_eq!(r.pickles[0].report.end as usize, benign.len());
    // An array that claims more bytes than the file holds is an error, never "safe".
    let r = scan(&joblib_stream(1 << 40, |a| a.int(1)));
    let error = r.pickles[0].report.error.as_deref().unwrap_or_default();
    assert!(error.contains("joblib array of 1099511627776 × 8 bytes runs past the end"), "{error}");
    assert_ne!(r.verdict, Verdict::Safe);
}

/// A joblib stream of `arrays` object arrays, each a nested pickle made of
/// `each` operations by `op(asm, array, i)`.
fn nested_joblib(arrays: usize, each: usize, op: impl Fn(Asm, usize, usize) -> Asm) -> Vec<u8> {
    let mut asm = Asm::new().proto(2);
    for array in 0..arrays {
        asm = array_wrapper(asm, 1, "O").setitems().build();
        let mut nested = Asm::new().proto(2);
        for i in 0..each {
            nested = op(nested, array, i);
        }
        asm = asm.raw(&nested.none().stop().finish()).op(b'0');
    }
    asm.none().stop().finish()
}

// Nested object-array pickles share their parent's limits: their events count
// against the same cap, and their work against the same budget.
#[test]
fn nested_joblib_pickles_stay_within_the_event_cap() {
    let r = scan(&nested_joblib(3, 4000, |nested, array, i| nested.global(&format!("m{array}"), &format!("f{i}")).op(b'0')));
    let report = &r.pickles[0].report;
    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!(report.imports.len(), 10_000, "3 × 4000 nested imports, capped");
    assert!(report.dropped_events >= 2000, "{}", report.dropped_events);
}

#[test]
fn nested_joblib_pickles_share_one_work_budget() {
    // No work per input byte: the budget is the fixed 1 Mi units, and each
    // recorded call costs 400. One array's 1000 calls fit it, and so would
    // each of three arrays' on a budget of its own; together they do not.
    let options = ScanOptions { limits: tensafe_pickle::Limits { work_per_byte: 0, ..Default::default() }, ..Default::default() };
    let calls = |arrays| nested_joblib(arrays, 1000, |nested, array, i| nested.global(&format!("m{array}"), &format!("f{i}")).empty_tuple().reduce().op(b'0'));
    let error = |bytes: &[u8]| scan_bytes(bytes, "input", &options).pickles[0].report.error.clone();
    assert_eq!(error(&calls(2)), None, "2000 calls fit the budget");
    let over = error(&calls(3)).expect("3000 calls are over the shared budget");
    assert!(over.contains("work limit reached"), "{over}");
}

/// `payload` gzip-wrapped as a single member (what `joblib.dump(..., compress=("gzip", n))` writes).
fn gzip(payload: &[u8], name: Option<&str>) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, if name.is_some() { 8 } else { 0 }, 0, 0, 0, 0, 0, 255];
    if let Some(name) = name {
        out.extend_from_slice(name.as_bytes());
        out.push(0);
    }
    out.extend(miniz_oxide::deflate::compress_to_vec(payload, 6));
    out.extend(crc32fast::hash(payload).to_le_bytes());
    out.extend((payload.len() as u32).to_le_bytes());
    out
}

// joblib's compressed files (`compress=3` is zlib): the
// scanner inflates zlib and gzip wrappers within its budget and scans the
// stream inside, so a payload cannot hide behind compression.
#[test]
fn payloads_inside_zlib_and_gzip_wrappers_are_found() {
    let c = Canary::new();
    let marker = c.marker();
    let inner = joblib_stream(3, |a| a.system_call(&marker));
    for (kind, wrapped) in [
        ("zlib", miniz_oxide::deflate::compress_to_vec_zlib(&inner, 6)),
        ("gzip", gzip(&inner, None)),
        ("gzip", gzip(&inner, Some("model.pkl"))),
    ] {
        let r = dangerous(&wrapped);
        assert_eq!(r.container, format!("{kind}-compressed pickle stream"));
        assert!(!r.unsupported && r.error.is_none(), "{kind}: {:?}", r.error);
        assert!(imports(&r).contains(&"posix.system".to_owned()), "{kind}: {:?}", imports(&r));
    }
    // A benign stream inside stays benign apart from joblib's wrapper class.
    let benign = scan(&miniz_oxide::deflate::compress_to_vec_zlib(&joblib_stream(3, |a| a.int(1)), 6));
    assert_eq!(benign.verdict, Verdict::Suspicious, "{:?}", benign.findings);

    // A damaged wrapper is an error, never "safe".
    let mut corrupt = gzip(&inner, None);
    let at = corrupt.len() - 6;
    corrupt[at] ^= 0xff; // the length in the trailer
    let r = scan(&corrupt);
    assert!(r.error.as_deref().unwrap_or_default().contains("gzip trailer does not match"), "{:?}", r.error);
    assert_ne!(r.verdict, Verdict::Safe);
    let truncated = miniz_oxide::deflate::compress_to_vec_zlib(&inner, 6);
    let r = scan(&truncated[..truncated.len() / 2]);
    assert!(r.error.as_deref().unwrap_or_default().contains("corrupt compressed data"), "{:?}", r.error);

    // A compression bomb stops at the inflate budget.
    let bomb = miniz_oxide::deflate::compress_to_vec_zlib(&vec![0u8; 8 << 20], 9);
    let mut options = ScanOptions::default();
    options.limits.max_inflate = 1 << 20;
    let r = scan_bytes(&bomb, "bomb", &options);
    assert!(r.error.as_deref().unwrap_or_default().contains("inflates past the limit of 1048576 bytes"), "{:?}", r.error);
    assert_ne!(r.verdict, Verdict::Safe);
}

// A compressed file is scanned as what it holds: a torch checkpoint
// (torch.load reads one through `gzip.open`), a safetensors file, a
// payload-carrying archive; a wrapper inside a wrapper is not opened.
#[test]
fn what_a_wrapper_holds_is_scanned_as_a_file() {
    let benign = torch_zip(&state_dict_pickle(), &[("0", &[0u8; 48])]);
    let r = scan(&gzip(&benign, Some("model.pt")));
    assert_eq!((r.verdict, r.container.as_str()), (Verdict::Safe, "gzip-compressed torch zip"), "{:?} {:?}", r.findings, r.error);

    let data = 1f32.to_le_bytes();
    let safetensors = tensafe::serialize([("w", tensafe::RawTensor { dtype: tensafe::Dtype::F32, shape: &[1], data: &data })], None).unwrap();
    let r = scan(&miniz_oxide::deflate::compress_to_vec_zlib(&safetensors, 6));
    assert_eq!(r.verdict, Verdict::Safe, "{:?} {:?}", r.findings, r.error);
    assert_eq!(r.container, "zlib-compressed safetensors (1 tensors, no pickle)");

    let c = Canary::new();
    let hostile = torch_zip(&Asm::new().proto(2).system_call(&c.marker()).stop().finish(), &[]);
    let r = dangerous(&gzip(&hostile, None));
    assert!(imports(&r).contains(&"posix.system".to_owned()), "{:?}", imports(&r));

    let twice = gzip(&gzip(&benign, None), None);
    let r = scan(&twice);
    assert!(r.unsupported && r.container == "gzip-compressed gzip (compressed)", "{} {:?}", r.container, r.error);
    assert_ne!(r.verdict, Verdict::Safe);
}

/// A valid safetensors file that is also a gzip file of a pickle: its
/// header length, 0x88b1f, starts `1f 8b 08 00`, gzip's magic with no flags;
/// the deflate stream is stored blocks whose headers and lengths sit inside
/// the JSON's first key, written with bytes a JSON string may hold (the
/// length's complement as a UTF-8 lead and continuation byte). Inflated:
/// `V` and the rest of the header up to its newline (one str), then the
/// tensor bytes, `payload`, then gzip's CRC and size as the file's last
/// tensor bytes.
fn safetensors_gzip_polyglot(payload: &[u8]) -> Vec<u8> {
    const N: usize = 0x8_8b1f;
    const STORED: u8 = b'H'; // BFINAL 0, BTYPE 00
    const STORED_FINAL: u8 = b'a'; // BFINAL 1, BTYPE 00
    let json_safe = |len: usize| {
        let (low, high) = (len & 0xff, len >> 8);
        (0x20..=0x3d).contains(&low) && low != 0x22 && (0x40..=0x7f).contains(&high) && high != 0x5c
    };
    let lengths: Vec<usize> = (0x4020..0x8000).filter(|&l| json_safe(l)).collect();
    let size = payload.len() + 8;
    let tail = format!("\":{{\"dtype\":\"U8\",\"shape\":[{size}],\"data_offsets\":[0,{size}]}}}}\n");
    // The final block runs from its header to the end of the payload.
    let final_len = |at: usize| N - (at + 5) + payload.len();
    let final_fits = |at: usize| lengths.contains(&final_len(at)) && N - (at + 5) >= tail.len() + 8;
    let mut blocks = Vec::new(); // (header offset, length, final)
    let mut at = 2;
    while N - at > 3 * 0x7f3d {
        blocks.push((at, 0x7f3d, false));
        at += 5 + 0x7f3d;
    }
    // Up to two more middle blocks, so that the final one's length fits.
    let splits = std::iter::once(vec![])
        .chain(lengths.iter().map(|&a| vec![a]))
        .chain(lengths.iter().flat_map(|&a| lengths.iter().step_by(7).map(move |&b| vec![a, b])));
    let (middle, from) = splits
        .map(|middle| {
            let from = middle.iter().fold(at, |from, len| from + 5 + len);
            (middle, from)
        })
        .find(|&(_, from)| final_fits(from))
        .expect("a split into stored blocks");
    for len in middle {
        blocks.push((at, len, false));
        at += 5 + len;
    }
    blocks.push((from, final_len(from), true));
    let mut header = vec![b'a'; N];
    header[..2].copy_from_slice(b"{\"");
    for &(at, len, last) in &blocks {
        header[at] = if last { STORED_FINAL } else { STORED };
        header[at + 1..at + 5].copy_from_slice(&[len as u8, (len >> 8) as u8, !(len as u8), !((len >> 8) as u8)]);
    }
    header[7] = b'V';
    header[N - tail.len()..].copy_from_slice(tail.as_bytes());
    let stream = [&header[..], payload].concat();
    let inflated: Vec<u8> = blocks.iter().flat_map(|&(at, len, _)| stream[at + 5..at + 5 + len].iter().copied()).collect();
    let mut bytes = (N as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&stream);
    bytes.extend_from_slice(&crc32fast::hash(&inflated).to_le_bytes());
    bytes.extend_from_slice(&(inflated.len() as u32).to_le_bytes());
    bytes
}

// A safetensors file is what its header says, but joblib.load goes by the
// magic of its first bytes: its gzip reading is scanned too.
#[test]
fn a_safetensors_file_that_is_also_a_gzip_pickle_is_flagged() {
    let c = Canary::new();
    let payload = Asm::new().op(b'0').system_call(&c.marker()).stop().finish();
    let bytes = safetensors_gzip_polyglot(&payload);
    assert!(tensafe::Header::parse_file_bytes(&bytes, &Default::default()).is_ok());
    assert_eq!(tensafe_pickle::detect(&bytes), tensafe_pickle::Kind::Wrapper("gzip"));
    let r = dangerous(&bytes);
    assert!(r.container.starts_with("safetensors"), "{}", r.container);
    assert!(imports(&r).contains(&"posix.system".to_owned()), "{:?}", r.findings);
}

// torch checks the legacy protocol with `!=`, so 1001.0 passes and it goes
// on to run the next pickles: they are scanned as torch runs them. joblib
// takes any file starting `]\x00` for lzma (its dictionary size varies).
#[test]
fn legacy_float_protocols_and_small_lzma_dictionaries_are_read_as_loaders_read_them() {
    let c = Canary::new();
    let mut stream = legacy_magic();
    stream.extend(Asm::new().proto(2).op(b'G').raw(&1001f64.to_be_bytes()).stop().finish());
    stream.extend(Asm::new().proto(2).system_call(&c.marker()).stop().finish());
    let r = dangerous(&stream);
    assert!(r.would_execute.iter().any(|w| w.contains("posix.system")), "{:?}", r.would_execute);
    let lzma = [&b"\x5d\x00\x10\x00\x00"[..], &[0xff; 8], &[0; 16]].concat();
    let r = scan(&lzma);
    assert!(r.unsupported && r.container.starts_with("lzma"), "{} {:?}", r.container, r.error);
}

// Zip readers (Python's zipfile for numpy, miniz for torch) take the last
// end record with a whole record after it, whatever its comment says, and
// an archive after other data: a torch zip with bytes after its end record,
// and a file that starts `PK\x05\x06` (numpy reads it as an npz) with the
// archive after a few bytes, are read as archives and their payloads found.
#[test]
fn zips_as_zip_readers_find_them_are_scanned() {
    let c = Canary::new();
    let archive = torch_zip(&Asm::new().proto(2).system_call(&c.marker()).stop().finish(), &[]);
    // Up to zipfile's window: 64 KiB + 22 bytes from the end.
    for tail in [4, 65_536] {
        let mut trailing = archive.clone();
        trailing.extend(std::iter::repeat_n(b'X', tail));
        let r = dangerous(&trailing);
        assert!(imports(&r).contains(&"posix.system".to_owned()), "{tail}: {:?} {:?}", r.error, r.findings);
        assert!(r.findings.iter().any(|f| f.detail.contains("not at the end of the")), "{:?}", r.findings);
    }

    let mut prepended = b"PK\x05\x06\n0B".to_vec();
    prepended.extend_from_slice(&(archive.len() as u32).to_le_bytes());
    prepended.extend_from_slice(&archive);
    prepended.push(b'.');
    let r = dangerous(&prepended);
    assert!(imports(&r).contains(&"posix.system".to_owned()), "{:?} {:?}", r.error, r.findings);
    assert!(r.findings.iter().any(|f| f.detail.contains("starts 11 bytes into the file")), "{:?}", r.findings);
}

// Fields of the end record that Python's zipfile ignores or reads its own
// way (disk numbers, the entry count, declared offsets it shifts back) are
// problems, and the archive is still read: np.load ran each payload.
#[test]
fn zips_python_reads_despite_their_fields_are_scanned() {
    let c = Canary::new();
    let archive = torch_zip(&Asm::new().proto(2).system_call(&c.marker()).stop().finish(), &[]);
    let eocd = archive.len() - 22;
    let patched = |patch: &dyn Fn(&mut Vec<u8>)| {
        let mut bytes = archive.clone();
        patch(&mut bytes);
        bytes
    };
    let put_u16 = |b: &mut Vec<u8>, at: usize, v: u16| b[at..at + 2].copy_from_slice(&v.to_le_bytes());
    let disks = patched(&|b| put_u16(b, eocd + 4, 1));
    let count = patched(&|b| {
        put_u16(b, eocd + 8, 2);
        put_u16(b, eocd + 10, 2);
    });
    // Every declared offset 100 bytes too far: the directory's and each entry's.
    let past = patched(&|b| {
        let cd = u32::from_le_bytes(b[eocd + 16..eocd + 20].try_into().unwrap()) as usize;
        b[eocd + 16..eocd + 20].copy_from_slice(&((cd + 100) as u32).to_le_bytes());
        let mut at = cd;
        while b[at..at + 4] == [0x50, 0x4b, 1, 2] {
            let local = u32::from_le_bytes(b[at + 42..at + 46].try_into().unwrap());
            b[at + 42..at + 46].copy_from_slice(&(local + 100).to_le_bytes());
            let lengths: usize = [28, 30, 32].iter().map(|&o| u16::from_le_bytes([b[at + o], b[at + o + 1]]) as usize).sum();
            at += 46 + lengths;
        }
    });
    for (what, bytes, says) in [("disks", disks, "other disks"), ("count", count, "declares 2 entries"), ("past", past, "declared 100 bytes past")] {
        let r = dangerous(&bytes);
        assert!(imports(&r).contains(&"posix.system".to_owned()), "{what}: {:?} {:?}", r.error, r.findings);
        assert!(r.findings.iter().any(|f| f.detail.contains(says)), "{what}: {:?}", r.findings);
    }
}

// A Zip64 extra field can give a local header offset near 2^64: an error,
// never an overflow.
#[test]
fn huge_zip64_local_offsets_are_errors_not_panics() {
    let zip = Zip::new(vec![Entry::new("a.npy", b"x")]).build();
    let eocd = zip.len() - 22;
    let u32_at = |at: usize| u32::from_le_bytes(zip[at..at + 4].try_into().unwrap()) as usize;
    let (cd, cd_size) = (u32_at(eocd + 16), u32_at(eocd + 12));
    let mut central = zip[cd..cd + cd_size].to_vec();
    let name_len = u16::from_le_bytes([central[28], central[29]]) as usize;
    central[42..46].copy_from_slice(&u32::MAX.to_le_bytes());
    central[30..32].copy_from_slice(&12u16.to_le_bytes());
    let extra = [&[1u8, 0, 8, 0][..], &(u64::MAX - 15).to_le_bytes()].concat();
    central.splice(46 + name_len..46 + name_len, extra);
    let mut end = zip[eocd..].to_vec();
    end[12..16].copy_from_slice(&((cd_size + 12) as u32).to_le_bytes());
    let bytes = [&zip[..cd], &central[..], &end[..]].concat();
    let r = scan(&bytes);
    assert_ne!(r.verdict, Verdict::Safe);
    assert!(r.error.as_deref().is_some_and(|e| e.contains("outside the file")), "{:?}", r.error);
}

// What CPython's unpickler takes that a stricter reading would stop at: a
// memo index written as Python's int() reads it, READONLY_BUFFER on
// in-band bytes, a legacy protocol number given as a float (torch compares
// with `!=`). The payload after each is found.
#[test]
fn what_cpython_accepts_does_not_stop_the_scan() {
    let c = Canary::new();
    let payload = || Asm::new().system_call(&c.marker()).stop().finish();
    for index in [&b" 1"[..], b"1_0", b"\t1", b"1\r", b"+1"] {
        let bytes = Asm::new().none().op(b'p').raw(index).raw(b"\n").op(b'0').raw(&payload()).finish();
        let r = dangerous(&bytes);
        assert!(imports(&r).contains(&"posix.system".to_owned()), "{:?}: {:?}", String::from_utf8_lossy(index), r.error);
    }
    let readonly = Asm::new().proto(5).op(b'C').raw(&[1, b'a']).op(0x98).op(b'0').raw(&payload()).finish();
    assert!(imports(&dangerous(&readonly)).contains(&"posix.system".to_owned()));
}

// joblib inflates as it reads: a payload before a damaged checksum or a
// broken stream runs before the damage is seen. Its old `ZF` format too.
#[test]
fn compressed_payloads_are_found_before_damage_and_in_joblib_zfiles() {
    let c = Canary::new();
    let evil = Asm::new().proto(2).system_call(&c.marker()).stop().finish();
    let mut bad_checksum = miniz_oxide::deflate::compress_to_vec_zlib(&evil, 6);
    *bad_checksum.last_mut().unwrap() ^= 0xff;
    let r = dangerous(&bad_checksum);
    assert!(r.error.as_deref().is_some_and(|e| e.contains("Adler32Mismatch")), "{:?}", r.error);
    let mut zfile = b"ZF".to_vec();
    zfile.extend_from_slice(format!("{:<19}", format!("0x{:x}", evil.len())).as_bytes());
    zfile.extend_from_slice(&miniz_oxide::deflate::compress_to_vec_zlib(&evil, 6));
    let r = dangerous(&zfile);
    assert_eq!(r.container, "joblib zfile-compressed pickle stream");
    assert!(imports(&r).contains(&"posix.system".to_owned()));
}

// A valid safetensors file can be a pickle too: a header length whose bytes
// start `\x80\x02V` (PROTO 2, UNICODE) makes its whole header one str up
// to the newline before the closing brace (EMPTY_DICT), and the tensor
// bytes after it opcodes. pickle.load runs them (checked with CPython).
#[test]
fn a_safetensors_file_that_is_also_a_pickle_is_flagged() {
    let c = Canary::new();
    let payload = Asm::new().system_call(&c.marker()).stop().finish();
    let header_len = u64::from_le_bytes([0x80, 0x02, b'V', 0, 0, 0, 0, 0]) as usize;
    let json = format!(r#"{{"x":{{"dtype":"U8","shape":[{0}],"data_offsets":[0,{0}]}}"#, payload.len());
    let mut bytes = header_len.to_le_bytes().to_vec();
    bytes.extend_from_slice(json.as_bytes());
    bytes.resize(8 + header_len - 2, b' ');
    bytes.extend_from_slice(b"\n}");
    bytes.extend_from_slice(&payload);
    let (header, _) = tensafe::Header::parse_file_bytes(&bytes, &Default::default()).expect("a valid safetensors file");
    assert_eq!(header.len(), 1);

    let r = dangerous(&bytes);
    assert!(r.container.starts_with("safetensors"), "{}", r.container);
    assert!(r.findings.iter().any(|f| f.kind == "polyglot"), "{:?}", r.findings);
    assert!(imports(&r).contains(&"posix.system".to_owned()), "{:?}", imports(&r));
}

// A user's allow pattern (`scan --allow-class 'numpy.*'`) admits the data
// classes it names, never a denylisted function that runs code.
#[test]
fn allow_patterns_never_admit_what_runs_code() {
    let allow = ScanOptions { allow_opaque: vec!["numpy.*".into()], ..Default::default() };
    let data_class = Asm::new().proto(2).global("numpy.somewhere", "Record").stop().finish();
    assert_eq!(scan(&data_class).verdict, Verdict::Suspicious);
    assert_eq!(scan_bytes(&data_class, "input", &allow).verdict, Verdict::Safe);
    let runs_code = Asm::new().proto(2).global("numpy.testing._private.utils", "runstring").stop().finish();
    assert_eq!(scan_bytes(&runs_code, "input", &allow).verdict, Verdict::Dangerous);
    // numpy's file I/O, under its numpy 1 and 2 names.
    for (module, name) in [("numpy", "savetxt"), ("numpy", "memmap"), ("numpy.lib._npyio_impl", "load"), ("numpy.ctypeslib", "load_library")] {
        let io = Asm::new().proto(2).global(module, name).stop().finish();
        assert_eq!(scan_bytes(&io, "input", &allow).verdict, Verdict::Dangerous, "{module}.{name}");
    }
    let exact = ScanOptions { allow_opaque: vec!["numpy.testing._private.utils.runstring".into()], ..Default::default() };
    assert_eq!(scan_bytes(&runs_code, "input", &exact).verdict, Verdict::Dangerous);
}

// A large key set again and again: each SETITEM hashes (and compares) the
// whole key, so that work is charged, and the scan stops at the work limit
// instead of hashing 100 GB.
#[test]
fn a_large_key_set_many_times_runs_out_of_work() {
    let key = "k".repeat(1 << 20);
    let mut asm = Asm::new().proto(2).empty_dict().str(&key).binput(0).none().setitem();
    for _ in 0..100_000 {
        asm = asm.binget(0).none().setitem();
    }
    let bytes = asm.stop().finish();
    let start = Instant::now();
    let report = scan(&bytes);
    let error = report.pickles[0].report.error.clone().expect("the scan stops");
    assert!(error.contains("work limit reached"), "{error}");
    assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
}

// torch finds `data.pkl` (and every record) by name in any ASCII case: an
// upper-case `DATA.PKL` is what it unpickles, however large and whatever its
// first byte, so the scanner parses it as the torch pickle; two names that
// differ only in case are duplicates.
#[test]
fn an_upper_case_data_pkl_is_the_pickle_torch_runs() {
    let c = Canary::new();
    // Protocol 0 (no PROTO byte first), padded past 1 MB so that only the name says "pickle".
    let payload = Asm::new().op(b'N').op(b'0').str(&" ".repeat(1_100_000)).op(b'0').system_call(&c.marker()).op(b'.').finish();
    let archive = |entries: Vec<Entry>| Zip::new(entries).build();
    let version = Entry::new("archive/version", b"3\n");
    let upper = archive(vec![Entry::new("archive/DATA.PKL", &payload), version.clone()]);
    let r = dangerous(&upper);
    assert_eq!(r.container, "torch zip");
    assert!(r.pickles.iter().any(|p| p.torch_would_run), "{:?}", r.pickles.iter().map(|p| &p.report.name).collect::<Vec<_>>());
    assert!(r.would_execute.iter().any(|w| w.contains("posix.system")), "{:?}", r.would_execute);
    // The converter reads it too, and refuses its call.
    let refusal = refused(&upper);
    assert!(refusal.contains("posix.system") || refusal.contains("posix"), "{refusal}");

    let both = archive(vec![Entry::new("archive/data.pkl", &state_dict_pickle()), Entry::new("archive/DATA.PKL", &payload), version]);
    let r = dangerous(&both);
    assert!(r.findings.iter().any(|f| f.detail.contains("differ only in case")), "{:?}", r.findings);
    assert!(refused(&both).contains("differ only in case"));
}

/// `zip` (one entry, no comment) with its central record repeated `copies`
/// more times: entries that all share the first one's bytes.
fn with_central_copies(zip: &[u8], copies: usize) -> Vec<u8> {
    let end = zip.len() - 22;
    assert_eq!(&zip[end..end + 4], b"PK\x05\x06");
    let field = |at: usize| u32::from_le_bytes(zip[end + at..end + at + 4].try_into().unwrap()) as usize;
    let (cd_size, cd_offset) = (field(12), field(16));
    let mut out = zip[..cd_offset].to_vec();
    for _ in 0..=copies {
        out.extend_from_slice(&zip[cd_offset..cd_offset + cd_size]);
    }
    let count = (copies + 1) as u16;
    out.extend_from_slice(b"PK\x05\x06\0\0\0\0");
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&(((copies + 1) * cd_size) as u32).to_le_bytes());
    out.extend_from_slice(&(cd_offset as u32).to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

// Entries that share their bytes are parsed once: 2000 central records of
// one 1 MB pickle cost one parse, not 2000.
#[test]
fn entries_sharing_their_bytes_are_parsed_once() {
    let mut asm = Asm::new().proto(2);
    for _ in 0..500_000 {
        asm = asm.none().pop();
    }
    let pickle = asm.none().stop().finish();
    let shared = with_central_copies(&Zip::new(vec![Entry::new("x.pkl", &pickle)]).build(), 2000);
    let start = Instant::now();
    let r = scan(&shared);
    assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
    assert_eq!(r.verdict, Verdict::Dangerous, "duplicate names are a zip problem");
    assert_eq!(r.pickles.len(), 1, "parsed once");
}

// Long keys nested deep: every path repeats its parents', so the names the
// walk builds would grow with the square of the input (400 levels of 20 KB
// keys, 8 MB: 1.6 GB of names); they are counted and refused past the limit.
#[test]
fn long_keys_nested_deep_stop_at_the_path_limit() {
    let depth = 400;
    let key = |level: usize| format!("{level:03}{}", "k".repeat(20_000));
    let mut asm = Asm::new().proto(2).empty_dict().str(&key(0));
    for level in 1..depth {
        asm = asm.empty_dict().str(&key(level));
    }
    asm = asm.empty_dict().short_str("w").tensor_v2("FloatStorage", "0", 12, 0, &[12], &[1]).setitem();
    for _ in 0..depth {
        asm = asm.setitem();
    }
    let pkl = asm.stop().finish();
    let start = Instant::now();
    let flatten = ConvertOptions { extract: ExtractOptions { flatten: true, ..Default::default() }, ..Default::default() };
    let msg = refused_with(&torch_zip(&pkl, &[("0", &floats12())]), &flatten);
    assert!(msg.contains("paths of the values take more than"), "{msg}");
    assert!(msg.len() < 1000, "the message shows the start of the path only: {} bytes", msg.len());
    let r = scan(&torch_zip(&pkl, &[("0", &floats12())]));
    assert!(r.findings.iter().any(|f| f.detail.contains("paths of the values")), "{:?}", r.findings);
    assert!(start.elapsed() < Duration::from_secs(10), "{:?}", start.elapsed());
}

// Millions of tiny pickles: each would add a report (5 million took
// gigabytes); the scan stops after 10,000 in a file, wherever they are (one
// stream, or the members of a zip), and says so.
#[test]
fn a_file_of_a_million_pickles_is_cut_short() {
    let members: Vec<Entry> = (0..20).map(|i| Entry::new(&format!("m{i}.pkl"), &b"N.".repeat(600))).collect();
    for bytes in [b"N.".repeat(1_000_000), Zip::new(members).build()] {
        let start = Instant::now();
        let r = scan(&bytes);
        assert_eq!(r.verdict, Verdict::Suspicious, "trailing pickles are suspicious");
        assert_eq!(r.pickles.len(), 10_000);
        assert!(r.error.as_deref().is_some_and(|e| e.contains("more than 10000 pickles in the file")), "{:?}", r.error);
        assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
    }
}

// A pickle can make an object per byte (TUPLE1 on the last one: 170 bytes
// of memory each, 30 MB of input took 4 GB): their number is bounded.
#[test]
fn objects_are_bounded() {
    let pickle = |tuples: usize| Asm::new().proto(2).none().raw(&vec![0x85; tuples]).stop().finish();
    let options = ScanOptions { limits: tensafe_pickle::Limits { max_objects: 10_000, ..Default::default() }, ..Default::default() };
    let error = |bytes: &[u8]| scan_bytes(bytes, "input", &options).pickles[0].report.error.clone();
    assert_eq!(error(&pickle(9_000)), None);
    let over = error(&pickle(20_000)).expect("over the limit");
    assert!(over.contains("more than 10000 objects"), "{over}");
    assert_eq!(tensafe_pickle::Limits::default().max_objects, 16_000_000);
}

// Memo entries are bounded in number, whatever their indices; setting one
// index again adds nothing. (torch puts about 8 per tensor: the default
// admits a checkpoint of `max_tensors` tensors, python/tests/test_convert.py.)
#[test]
fn memo_entries_are_bounded() {
    let fresh = |puts: usize| Asm::new().proto(4).raw(&[b'N', 0x94, b'0'].repeat(puts)).none().stop().finish();
    let same = |puts: usize| Asm::new().proto(2).raw(&[b'N', b'q', 0, b'0'].repeat(puts)).none().stop().finish();
    let options = ScanOptions { limits: tensafe_pickle::Limits { max_memo: 1_000, ..Default::default() }, ..Default::default() };
    let error = |bytes: &[u8]| scan_bytes(bytes, "input", &options).pickles[0].report.error.clone();
    assert_eq!(error(&fresh(1_000)), None);
    let over = error(&fresh(1_001)).expect("over the limit");
    assert!(over.contains("more than 1000 memo entries"), "{over}");
    assert_eq!(error(&same(5_000)), None, "one index set again");
}

// A non-tensor value that refers to one long str many times: its JSON (in
// the report, and the metadata when kept) is bounded in bytes, not only in
// values (4000 references to 1 MB took 4 GB before).
#[test]
fn non_tensor_values_render_to_bounded_json() {
    let mut asm = Asm::new().proto(2).empty_dict().short_str("state_dict").empty_dict();
    asm = asm.short_str("w").tensor_v2("FloatStorage", "0", 12, 0, &[12], &[1]).setitem().setitem();
    asm = asm.short_str("x").empty_list().str(&"A".repeat(1 << 20)).binput(0).append();
    for _ in 1..4000 {
        asm = asm.binget(0).append();
    }
    let pkl = asm.setitem().stop().finish();
    let c = Canary::new();
    let input = c.dir.path().join("input.pt");
    std::fs::write(&input, torch_zip(&pkl, &[("0", &floats12())])).unwrap();
    let start = Instant::now();
    let report = tensafe_pickle::convert_file(&input, &c.out(), &ConvertOptions::default()).unwrap();
    let (path, text) = &report.non_tensors[0];
    assert_eq!(path, "x");
    assert!(text.len() < 65 << 20 && text.len() > 60 << 20, "{} bytes", text.len());
    assert!(text.ends_with("\"…\"]"), "the rest shown as …");
    assert!(start.elapsed() < Duration::from_secs(20), "{:?}", start.elapsed());
}

// A value that refers to a wide list through many paths, below the depth
// JSON is rendered to: every value rendered, a cut-off one too, spends the
// budget (the items past the depth limit were free, and a 6 KB pickle took
// minutes and gigabytes).
#[test]
fn values_cut_off_from_non_tensor_json_spend_its_budget() {
    use tensafe_pickle::extract::{JSON_DEPTH, JSON_NODE_UNITS};
    const WIDE: usize = 100;
    // Memo 0: a short str; 1: a list of WIDE references to it; then five
    // levels of ten references each to the level below (10^5 paths to it).
    let mut asm = Asm::new().proto(2).empty_dict().short_str("w").tensor_v2("FloatStorage", "0", 12, 0, &[12], &[1]).setitem();
    asm = asm.short_str("hp").short_str("x").binput(0).pop().empty_list().mark();
    for _ in 0..WIDE {
        asm = asm.binget(0);
    }
    asm = asm.op(b'e').binput(1).pop();
    let mut memo = 1;
    for _ in 0..5 {
        asm = asm.empty_list().mark();
        for _ in 0..10 {
            asm = asm.binget(memo);
        }
        memo += 1;
        asm = asm.op(b'e').binput(memo).pop();
    }
    // Wrapped in lists of one, so that the wide list lies at the depth limit.
    for _ in 0..JSON_DEPTH - 5 {
        asm = asm.empty_list().binget(memo).append();
        memo += 1;
        asm = asm.binput(memo).pop();
    }
    let pkl = asm.binget(memo).setitem().stop().finish();
    let c = Canary::new();
    let input = c.dir.path().join("input.pt");
    std::fs::write(&input, torch_zip(&pkl, &[("0", &floats12())])).unwrap();
    let report = tensafe_pickle::convert_file(&input, &c.out(), &ConvertOptions::default()).unwrap();
    let (path, text) = &report.non_tensors[0];
    assert_eq!(path, "hp");
    let values: serde_json::Value = serde_json::from_str(text).unwrap();
    fn count(v: &serde_json::Value) -> usize {
        1 + v.as_array().map_or(0, |items| items.iter().map(count).sum())
    }
    // Without the charge: 10^5 visits of the wide list, 10^7 values.
    let most = tensafe_pickle::convert::NON_TENSOR_JSON_BYTES / JSON_NODE_UNITS + JSON_DEPTH + 1;
    assert!(count(&values) <= most, "{} values rendered, at most {most} expected", count(&values));
    assert!(text.trim_end_matches(']').ends_with("\"…\""), "the rest cut off: …{}", &text[text.len() - 50..]);
}

// The file's error says where the pickle stopped and why, not only that it
// was "malformed" somewhere after the failing opcode.
#[test]
fn a_stopped_scan_says_where_and_why() {
    let bytes = Asm::new().proto(2).mark().mark().op(b'X').raw(&u32::MAX.to_le_bytes()).finish();
    let error = scan(&bytes).error.expect("an error");
    assert!(error.contains("offset 4 (BINUNICODE): str declares 4294967295 bytes"), "{error}");
    assert!(error.ends_with("the bytes after it were not scanned"), "{error}");
}

// One long key over many entries: every entry's path holds it, so the paths
// are counted before each is made (2000 copies of a 1 MB key: 2 GB).
#[test]
fn a_long_key_over_many_entries_stops_at_the_path_limit() {
    let mut asm = Asm::new().proto(2).empty_dict().str(&"k".repeat(1 << 20)).empty_dict().mark();
    for i in 0..2000 {
        asm = asm.int(i).none();
    }
    let pkl = asm.setitems().setitem().stop().finish();
    let flatten = ConvertOptions { extract: ExtractOptions { flatten: true, ..Default::default() }, ..Default::default() };
    let start = Instant::now();
    let msg = refused_with(&torch_zip(&pkl, &[]), &flatten);
    assert!(msg.contains("paths of the values take more than"), "{msg}");
    assert!(start.elapsed() < Duration::from_secs(10), "{:?}", start.elapsed());
}

// A plain pickle (not a torch checkpoint) that imports: the refusal says
// the pickle may be a plain one, not only torch's magic-number pickle.
#[test]
fn a_plain_pickle_refusal_names_it_as_possibly_plain() {
    let c = Canary::new();
    let msg = refused(&Asm::new().proto(2).system_call(&c.marker()).stop().finish());
    assert!(msg.contains("in a plain pickle, its object") && msg.contains("posix.system"), "{msg}");
}

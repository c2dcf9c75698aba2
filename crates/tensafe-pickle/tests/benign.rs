//! Benign inputs torch no longer writes (or that need hand assembly):
//! Python 2-era strings, legacy storage views, big-endian legacy streams,
//! NumPy files, and the geometry and byte-order paths checked against a
//! naive index loop.

mod common;

use common::*;
use tensafe::SafeTensors;
use tensafe_pickle::{scan_bytes, ConvertOptions, ScanOptions, Verdict};

fn convert(bytes: &[u8]) -> Vec<(String, tensafe::Dtype, Vec<usize>, Vec<u8>)> {
    let dir = tempfile::tempdir().unwrap();
    let (input, out) = (dir.path().join("in.bin"), dir.path().join("out.safetensors"));
    std::fs::write(&input, bytes).unwrap();
    tensafe_pickle::convert_file(&input, &out, &ConvertOptions::default()).unwrap();
    let data = std::fs::read(&out).unwrap();
    let st = SafeTensors::deserialize(&data).unwrap();
    let mut tensors: Vec<_> = st.tensors().map(|(n, v)| (n.to_owned(), v.dtype(), v.shape().to_vec(), v.data().to_vec())).collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors
}

#[test]
fn python2_short_binstring_keys() {
    let pkl = Asm::new()
        .proto(2)
        .global("collections", "OrderedDict")
        .empty_tuple()
        .reduce()
        .mark()
        .op(b'U')
        .raw(&[6])
        .raw(b"weight")
        .tensor_v2("FloatStorage", "0", 12, 0, &[12], &[1])
        .setitems()
        .stop()
        .finish();
    let t = convert(&torch_zip(&pkl, &[("0", &floats12())]));
    assert_eq!(t[0].0, "weight");
    assert_eq!(t[0].3, floats12());
}

#[test]
fn protocol0_text_opcodes_build_the_same_state_dict() {
    // (dict) 'w' → _rebuild_tensor_v2 with every argument in text form.
    let pkl = Asm::new()
        .op(b'(')
        .op(b'd')
        .raw(b"p0\n")
        .raw(b"S'w'\np1\n")
        .global("torch._utils", "_rebuild_tensor_v2")
        .mark()
        .mark()
        .raw(b"S'storage'\n")
        .global("torch", "FloatStorage")
        .raw(b"S'0'\nS'cpu'\nI12\n")
        .tuple()
        .binpersid()
        .raw(b"I0\n")
        .mark()
        .raw(b"L3L\nI4\n")
        .tuple()
        .mark()
        .raw(b"I4\nI1\n")
        .tuple()
        .raw(b"I00\n")
        .global("collections", "OrderedDict")
        .mark()
        .tuple()
        .reduce()
        .tuple()
        .reduce()
        .setitem()
        .stop()
        .finish();
    let t = convert(&torch_zip(&pkl, &[("0", &floats12())]));
    assert_eq!((t[0].0.as_str(), t[0].2.clone()), ("w", vec![3, 4]));
    assert_eq!(t[0].3, floats12());
}

#[test]
fn legacy_storage_views_and_big_endian_streams() {
    // A legacy pid with view metadata: view '5' = elements [4, 10) of root '1'.
    let object = Asm::new()
        .proto(2)
        .empty_dict()
        .mark()
        .str("v")
        .global("torch._utils", "_rebuild_tensor_v2")
        .mark()
        .mark()
        .str("storage")
        .global("torch", "FloatStorage")
        .str("1")
        .str("cpu")
        .int(12)
        .str("5")
        .int(4)
        .int(6)
        .op(0x87)
        .tuple()
        .binpersid()
        .int(1)
        .ints_tuple(&[2, 2])
        .ints_tuple(&[1, 2])
        .newfalse()
        .empty_dict()
        .tuple()
        .reduce()
        .setitems()
        .stop()
        .finish();
    let little = legacy_stream(legacy_magic(), legacy_sys_info(), object.clone(), legacy_keys(&["1"]), &[(12, &floats12())]);
    let t = convert(&little);
    // View elements 4..10 = [4..10]; offset 1 → 5; shape (2,2) stride (1,2): [[5,7],[6,8]].
    let expect: Vec<u8> = [5f32, 7., 6., 8.].iter().flat_map(|f| f.to_le_bytes()).collect();
    assert_eq!(t[0].3, expect);
    // The same data written by a big-endian machine: torch writes the bytes
    // little-endian there too (sys_info only says what the machine was), and
    // the element count little-endian, or (older torch) big-endian.
    let sys_be = legacy_sys_info().into_iter().map(|b| if b == 0x88 { 0x89 } else { b }).collect::<Vec<u8>>();
    let with_count = |sys_info: &[u8], count: [u8; 8]| {
        let mut file = legacy_stream(legacy_magic(), sys_info.to_vec(), object.clone(), legacy_keys(&["1"]), &[(12, &floats12())]);
        let at = file.len() - floats12().len() - 8;
        file[at..at + 8].copy_from_slice(&count);
        file
    };
    for count in [12u64.to_le_bytes(), 12u64.to_be_bytes()] {
        let big = with_count(&sys_be, count);
        assert_eq!(convert(&big), t);
        assert_eq!(scan_bytes(&big, "big", &ScanOptions::default()).verdict, Verdict::Safe);
    }
    // A little-endian machine's count is read as little-endian only.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.bin"), with_count(&legacy_sys_info(), 12u64.to_be_bytes())).unwrap();
    let error = tensafe_pickle::convert_file(&dir.path().join("in.bin"), &dir.path().join("out.safetensors"), &ConvertOptions::default()).unwrap_err();
    assert!(error.to_string().contains("holds 864691128455135232 elements but the pickle declares 12"), "{error}");
}

#[test]
fn strided_views_match_a_naive_index_loop() {
    // Storage of 60 int16; views with assorted offsets, sizes and strides.
    let storage: Vec<u8> = (0..60i16).flat_map(|i| (i * 3 - 7).to_le_bytes()).collect();
    let cases: &[(i64, &[i64], &[i64])] = &[
        (0, &[60], &[1]),
        (5, &[3, 4], &[4, 1]),
        (1, &[4, 3], &[1, 4]),
        (2, &[2, 3, 4], &[1, 8, 2]),
        (0, &[5, 2], &[0, 1]),
        (3, &[2, 1, 3], &[10, 7, 2]),
        (59, &[], &[]),
        (0, &[0, 7], &[1, 1]),
        (0, &[3, 3, 3], &[20, 6, 2]),
    ];
    for (offset, size, stride) in cases {
        let pkl = Asm::new()
            .proto(2)
            .empty_dict()
            .mark()
            .str("x")
            .tensor_v2("ShortStorage", "0", 60, *offset, size, stride)
            .setitems()
            .stop()
            .finish();
        let t = convert(&torch_zip(&pkl, &[("0", &storage)]));
        // Naive: every index of the output in row-major order.
        let mut expect = Vec::new();
        let n: i64 = size.iter().product();
        for flat in 0..n {
            let mut rem = flat;
            let mut at = *offset;
            for d in (0..size.len()).rev() {
                at += (rem % size[d]) * stride[d];
                rem /= size[d];
            }
            expect.extend_from_slice(&storage[at as usize * 2..at as usize * 2 + 2]);
        }
        assert_eq!(t[0].3, expect, "offset {offset} size {size:?} stride {stride:?}");
        assert_eq!(t[0].2, size.iter().map(|&s| s as usize).collect::<Vec<_>>());
    }
}

#[test]
fn numpy_files_are_scanned_by_content() {
    fn npy(descr: &str, payload: &[u8]) -> Vec<u8> {
        // `descr` as Python writes it: a quoted type string, or a list of fields.
        npy_with_header(&format!("{{'descr': {descr}, 'fortran_order': False, 'shape': (1,), }}"), payload)
    }
    /// A version 1.0 `.npy` file: `dict` padded as numpy pads it, then `payload`.
    fn npy_with_header(dict: &str, payload: &[u8]) -> Vec<u8> {
        let mut header = dict.to_owned();
        while !(10 + header.len() + 1).is_multiple_of(64) {
            header.push(' ');
        }
        header.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(payload);
        out
    }
    let plain = npy("'<f4'", &1f32.to_le_bytes());
    assert_eq!(scan_bytes(&plain, "a.npy", &ScanOptions::default()).verdict, Verdict::Safe);
    let fields = npy("[('x', '<f4'), ('y', '<i8', (2,))]", &[0; 20]);
    assert_eq!(scan_bytes(&fields, "f.npy", &ScanOptions::default()).verdict, Verdict::Safe);
    // Fields of raw types, nested, titled, padded: raw data, whatever the
    // bytes would say as a pickle (text `cats\ndogs\n` reads as a GLOBAL).
    let mut text = b"ccats\ndogs\n".to_vec();
    text.resize(20, 0);
    for descr in ["[('note', '|S16'), ('v', '<f4')]", "[('a', '<i4'), ('', '|V4'), ('b', [('x', '<f8'), ('y', '|u1', (2, 3))]), (('title', 't'), '>f2')]"] {
        let r = scan_bytes(&npy(descr, &text), "s.npy", &ScanOptions::default());
        assert_eq!(r.verdict, Verdict::Safe, "{descr}: {:?}", r.findings);
    }
    let evil = Asm::new().proto(2).global("posix", "system").str("id").tuple1().reduce().stop().finish();
    // Every spelling numpy reads as an object dtype, a field of one
    // included: anything but a plain type string has its payload scanned.
    let spellings = ["'|O'", "\"|O\"", "'O'", "'<O8'", "'|O8'", "'object'", "'i4,O'", "'(2,)O'", "'\\x4f'", "'ob' 'ject'"];
    let fields = ["[('f', 'O')]", "[('x', '<f4'), ('f', '>O', (2,))]", "[('\\'', 'O')]"];
    for descr in spellings.iter().chain(&fields) {
        let r = scan_bytes(&npy(descr, &evil), "b.npy", &ScanOptions::default());
        assert_eq!(r.verdict, Verdict::Dangerous, "{descr}");
    }
    // numpy reads the header with ast.literal_eval: adjacent literals join
    // into the key `descr`, and a comment may hold a decoy for a reader of
    // the text. Only numpy's own layout is read; any other has its payload
    // scanned.
    let commented = npy_with_header("{'de' 'scr': '|O', 'fortran_order': False, 'shape': (), } # 'descr': '<f4',", &evil);
    assert_eq!(scan_bytes(&commented, "c.npy", &ScanOptions::default()).verdict, Verdict::Dangerous);
    // numpy's layouts for 0-d, 1-d and n-d arrays and Fortran order are read as plain data.
    for (order, shape) in [("False", "()"), ("False", "(3,)"), ("True", "(2, 3)"), ("False", "(0, 5, 1)")] {
        // The payload is raw bytes to numpy: never unpickled.
        let file = npy_with_header(&format!("{{'descr': '<f4', 'fortran_order': {order}, 'shape': {shape}, }}"), &evil);
        let r = scan_bytes(&file, "p.npy", &ScanOptions::default());
        assert_eq!(r.verdict, Verdict::Safe, "{shape}: {:?}", r.findings);
    }
    // numpy's npz reader goes by the magic: an object array under another name.
    let hidden = Zip::new(vec![Entry::new("a.npy", &plain), Entry::new("x.bin", &npy("'|O'", &evil))]).build();
    assert_eq!(scan_bytes(&hidden, "x.npz", &ScanOptions::default()).verdict, Verdict::Dangerous);
    // Names that differ only in case are distinct arrays to numpy (no
    // problem outside torch archives), and a compressed npz whose arrays
    // inflate far past the file's size is scanned whole.
    let both = Zip::new(vec![Entry::new("a.npy", &plain), Entry::new("A.npy", &plain)]).build();
    assert_eq!(scan_bytes(&both, "x.npz", &ScanOptions::default()).verdict, Verdict::Safe);
    let zeros = npy("'<f4'", &vec![0; 8 << 20]);
    let compressed = Zip::new(vec![Entry { method: 8, ..Entry::new("z.npy", &zeros) }, Entry::new("a.npy", &plain)]).build();
    assert!(compressed.len() < 1 << 20);
    let r = scan_bytes(&compressed, "x.npz", &ScanOptions::default());
    assert_eq!((r.verdict, r.error.clone()), (Verdict::Safe, None));
    let object = npy("'|O'", &evil);
    // The same inside an .npz (a zip of .npy members), in any case.
    for member in ["b.npy", "B.NPY"] {
        let npz = Zip::new(vec![Entry::new("a.npy", &plain), Entry::new(member, &object)]).build();
        let r = scan_bytes(&npz, "x.npz", &ScanOptions::default());
        assert_eq!(r.verdict, Verdict::Dangerous, "{member}");
    }
    // joblib's array wrapper is not allowlisted, but it is data that joblib's
    // loader consumes, not code: suspicious, unlike the rest of joblib.
    let joblib = Asm::new().proto(2).global("joblib.numpy_pickle", "NumpyArrayWrapper").empty_tuple().op(0x81).stop().finish();
    assert_eq!(scan_bytes(&joblib, "m.joblib", &ScanOptions::default()).verdict, Verdict::Suspicious);
    let loader = Asm::new().proto(2).global("joblib.numpy_pickle", "load").empty_tuple().op(0x81).stop().finish();
    assert_eq!(scan_bytes(&loader, "m.joblib", &ScanOptions::default()).verdict, Verdict::Dangerous);
}

/// A safetensors file whose header is `json` padded with spaces to `len`
/// bytes, its one U8 tensor `data`.
fn safetensors_with_header_len(len: usize, data: &[u8]) -> Vec<u8> {
    let mut json = format!(r#"{{"w":{{"dtype":"U8","shape":[{0}],"data_offsets":[0,{0}]}}}}"#, data.len());
    assert!(json.len() <= len);
    json.extend(std::iter::repeat_n(' ', len - json.len()));
    let mut bytes = (len as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(json.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

// Header lengths whose first byte is an opcode (`P`: 0x50 = 80, 336…; `c`:
// 99) or whose first bytes are zlib's magic (376: `78 01`) belong to valid
// files: pickle.load fails on them at once (no persistent_load; a module
// name of NULs and braces), joblib's zlib reader on their bytes.
#[test]
fn safetensors_files_whose_length_reads_as_something_else_scan_as_safe() {
    for len in [80, 336, 99, 376] {
        let bytes = safetensors_with_header_len(len, b"ab\ncd\n.");
        assert!(tensafe::Header::parse_file_bytes(&bytes, &Default::default()).is_ok(), "{len}");
        let r = scan_bytes(&bytes, "m.safetensors", &ScanOptions::default());
        assert_eq!((r.verdict, r.container.as_str()), (Verdict::Safe, "safetensors (1 tensors, no pickle)"), "{len}: {:?} {:?}", r.findings, r.error);
    }
}

// A plain pickle that holds the bytes of a zip file is a pickle: the zip's
// end record is inside it, not at its end. An empty npz (its end record
// alone) is an empty archive.
#[test]
fn a_pickle_holding_a_zip_and_an_empty_npz_are_not_polyglots() {
    let archive = Zip::new(vec![Entry::new("a.txt", b"hello")]).build();
    let with_archive = Asm::new().proto(4).empty_dict().mark().str("doc").op(b'B').raw(&(archive.len() as u32).to_le_bytes()).raw(&archive);
    let pickle = with_archive.str("n").int(1).op(b'u').stop().finish();
    let r = scan_bytes(&pickle, "p.pkl", &ScanOptions::default());
    assert_eq!(r.verdict, Verdict::Safe, "{:?} {:?}", r.findings, r.error);
    let mut empty = b"PK\x05\x06".to_vec();
    empty.extend_from_slice(&[0; 18]);
    let r = scan_bytes(&empty, "e.npz", &ScanOptions::default());
    assert_eq!(r.verdict, Verdict::Safe, "{:?} {:?}", r.findings, r.error);
}

#[test]
fn safetensors_files_scan_as_safe() {
    let data = 1f32.to_le_bytes();
    let bytes = tensafe::serialize([("w", tensafe::RawTensor { dtype: tensafe::Dtype::F32, shape: &[1], data: &data })], None).unwrap();
    let r = scan_bytes(&bytes, "model.safetensors", &ScanOptions::default());
    assert_eq!(r.verdict, Verdict::Safe);
    assert!(r.container.starts_with("safetensors"));
    // A truncated one is not: it is scanned as a pickle stream and fails.
    assert_eq!(scan_bytes(&bytes[..bytes.len() - 1], "cut.safetensors", &ScanOptions::default()).verdict, Verdict::Error);
}

/// Tensors large enough to be copied file to file (≥ 256 KiB): whole
/// storages, a view at an offset, a transposed view (gathered), a small one
/// (buffered), in zip (stored and deflated) and legacy containers. The file
/// path must write exactly what the in-memory path writes, and both what a
/// naive reading of the storages gives.
#[test]
fn large_tensors_copied_file_to_file_match_the_in_memory_path() {
    let a: Vec<u8> = (0..200_000u32).flat_map(|i| (i as f32 * 0.5).to_le_bytes()).collect();
    let b: Vec<u8> = (0..131_072u32).flat_map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes()).collect();
    // name, storage type, key, numel, offset, size, stride
    type Case<'a> = (&'a str, &'a str, &'a str, i64, i64, &'a [i64], &'a [i64]);
    let tensors: &[Case] = &[
        ("whole", "FloatStorage", "0", 200_000, 0, &[200_000], &[1]),
        ("tail", "FloatStorage", "0", 200_000, 1_000, &[150_000], &[1]),
        ("m", "IntStorage", "1", 131_072, 0, &[512, 256], &[256, 1]),
        ("mt", "IntStorage", "1", 131_072, 0, &[256, 512], &[1, 256]),
        ("small", "IntStorage", "1", 131_072, 5, &[10], &[1]),
    ];
    let expected = |name: &str| -> Vec<u8> {
        let storage = |key: &str| if key == "0" { &a } else { &b };
        let (_, _, key, _, offset, size, stride) = tensors.iter().find(|t| t.0 == name).unwrap();
        let n: i64 = size.iter().product();
        (0..n)
            .flat_map(|flat| {
                let (mut rem, mut at) = (flat, *offset);
                for d in (0..size.len()).rev() {
                    at += (rem % size[d]) * stride[d];
                    rem /= size[d];
                }
                storage(key)[at as usize * 4..at as usize * 4 + 4].to_vec()
            })
            .collect()
    };
    let zip_pickle = {
        let mut asm = Asm::new().proto(2).empty_dict().mark();
        for (name, stype, key, numel, offset, size, stride) in tensors {
            asm = asm.str(name).tensor_v2(stype, key, *numel, *offset, size, stride);
        }
        asm.setitems().stop().finish()
    };
    let legacy_pickle = {
        let mut asm = Asm::new().proto(2).empty_dict().mark();
        for (name, stype, key, numel, offset, size, stride) in tensors {
            asm = asm
                .str(name)
                .global("torch._utils", "_rebuild_tensor_v2")
                .mark()
                .mark()
                .str("storage")
                .global("torch", stype)
                .str(key)
                .str("cpu")
                .int(*numel)
                .none()
                .tuple()
                .binpersid()
                .int(*offset)
                .ints_tuple(size)
                .ints_tuple(stride)
                .newfalse()
                .empty_dict()
                .tuple()
                .reduce();
        }
        asm.setitems().stop().finish()
    };
    let stored = torch_zip(&zip_pickle, &[("0", &a), ("1", &b)]);
    let mut entries = torch_entries("archive", &zip_pickle, &[("0", &a), ("1", &b)]);
    entries.iter_mut().filter(|e| e.name.contains("/data/")).for_each(|e| e.method = 8);
    let deflated = Zip::new(entries).build();
    let legacy = legacy_stream(legacy_magic(), legacy_sys_info(), legacy_pickle, legacy_keys(&["0", "1"]), &[(200_000, &a), (131_072, &b)]);

    for (what, input) in [("stored zip", stored), ("deflated zip", deflated), ("legacy", legacy)] {
        let dir = tempfile::tempdir().unwrap();
        let (src, from_file, from_memory) =
            (dir.path().join("in.bin"), dir.path().join("file.safetensors"), dir.path().join("memory.safetensors"));
        std::fs::write(&src, &input).unwrap();
        let options = ConvertOptions::default();
        let report = tensafe_pickle::convert_file(&src, &from_file, &options).unwrap();
        let ck = tensafe_pickle::load(&input, &options.load).unwrap();
        tensafe_pickle::convert_checkpoint(&ck, &from_memory, &options).unwrap();
        let written = std::fs::read(&from_file).unwrap();
        assert_eq!(written, std::fs::read(&from_memory).unwrap(), "{what}");
        let st = SafeTensors::deserialize(&written).unwrap();
        for (name, ..) in tensors {
            assert_eq!(st.tensor(name).unwrap().data(), &expected(name)[..], "{what}: {name}");
        }
        let copied: Vec<&str> = report.tensors.iter().filter(|t| t.copied).map(|t| t.name.as_str()).collect();
        assert_eq!(copied, ["mt"], "{what}");
        // Stored as they are and ≥ 256 KiB: copied file to file by the kernel
        // (not from a deflated entry, which is inflated in memory).
        let kernel: u64 = if what == "deflated zip" { 0 } else { (200_000 + 150_000 + 131_072) * 4 };
        assert_eq!(report.file_copied_bytes, kernel, "{what}");
    }
}

/// A tensor larger than one copy step (32 MiB) is copied in several steps,
/// from an odd offset in its storage; the result is the same bytes.
#[test]
fn a_tensor_larger_than_one_copy_step() {
    let n = (33 << 20) + 11;
    let storage: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
    let pkl = Asm::new()
        .proto(2)
        .empty_dict()
        .mark()
        .str("x")
        .tensor_v2("ByteStorage", "0", n as i64, 5, &[n as i64 - 5], &[1])
        .setitems()
        .stop()
        .finish();
    let t = convert(&torch_zip(&pkl, &[("0", &storage)]));
    assert_eq!(t[0].2, [n - 5]);
    assert!(t[0].3 == storage[5..], "the copied bytes differ");
}

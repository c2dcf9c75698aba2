//! Differential tests against the reference implementation (the `safetensors`
//! crate, pinned to 0.8.0 as a dev-dependency): same bytes written, same
//! tensors read, and every file it rejects rejected by us too.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;
use tensafe::{Dtype, Error, RawTensor, SafeTensors};

/// A tensor owned by the test, viewable by both implementations.
#[derive(Debug, Clone)]
struct Owned {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn reference_dtype(dtype: Dtype) -> safetensors::Dtype {
    serde_json::from_str(&format!("\"{}\"", dtype.code())).expect("the reference knows every dtype")
}

impl safetensors::View for &Owned {
    fn dtype(&self) -> safetensors::Dtype {
        reference_dtype(self.dtype)
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn ours(tensors: &[(String, Owned)], metadata: Option<&BTreeMap<String, String>>) -> tensafe::Result<Vec<u8>> {
    tensafe::serialize(
        tensors.iter().map(|(n, t)| (n.as_str(), RawTensor { dtype: t.dtype, shape: &t.shape, data: &t.data })),
        metadata,
    )
}

fn reference(tensors: &[(String, Owned)], metadata: Option<&BTreeMap<String, String>>) -> Result<Vec<u8>, String> {
    let meta: Option<HashMap<String, String>> = metadata.map(|m| m.clone().into_iter().collect());
    safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), meta).map_err(|e| e.to_string())
}

fn dtype_strategy() -> impl Strategy<Value = Dtype> {
    prop::sample::select(Dtype::ALL.to_vec())
}

/// Shapes whose element count fills whole bytes for every dtype (a multiple of
/// 4 handles F4 and F6), including empty and scalar shapes.
fn tensor_strategy() -> impl Strategy<Value = Owned> {
    (dtype_strategy(), prop::collection::vec(0usize..5, 0..4)).prop_flat_map(|(dtype, mut shape)| {
        if dtype.bits() < 8 {
            shape.push(4);
        }
        let len = dtype.byte_len(shape.iter().product()).unwrap();
        prop::collection::vec(any::<u8>(), len).prop_map(move |data| Owned { dtype, shape: shape.clone(), data })
    })
}

fn name_strategy() -> impl Strategy<Value = String> {
    // ASCII, punctuation that needs escaping, and non-ASCII (kept raw).
    "[a-zA-Z0-9_.\"\\\\/é漢😀 ]{0,12}"
}

fn tensors_strategy() -> impl Strategy<Value = Vec<(String, Owned)>> {
    prop::collection::btree_map(name_strategy(), tensor_strategy(), 0..8)
        .prop_map(|m| m.into_iter().filter(|(name, _)| name != "__metadata__").collect())
}

fn metadata_strategy() -> impl Strategy<Value = Option<BTreeMap<String, String>>> {
    // At most one key: the reference writes several keys in random order.
    prop::option::of(prop::collection::btree_map(name_strategy(), "[a-z\"\\\\\u{0}-\u{1f}é]{0,8}", 0..2))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn writes_the_reference_bytes(tensors in tensors_strategy(), metadata in metadata_strategy()) {
        let expected = reference(&tensors, metadata.as_ref()).unwrap();
        let got = ours(&tensors, metadata.as_ref()).unwrap();
        if tensors.is_empty() && metadata.as_ref().is_some_and(BTreeMap::is_empty) {
            // Covered by `empty_metadata_without_tensors`: the reference's bytes are broken.
            prop_assert!(safetensors::SafeTensors::deserialize(&expected).is_err());
        } else {
            prop_assert_eq!(got, expected);
        }
    }

    #[test]
    fn reads_what_the_reference_writes(tensors in tensors_strategy(), metadata in metadata_strategy()) {
        prop_assume!(!(tensors.is_empty() && metadata.as_ref().is_some_and(BTreeMap::is_empty)));
        let bytes = reference(&tensors, metadata.as_ref()).unwrap();
        let file = SafeTensors::deserialize(&bytes).unwrap();
        let theirs = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        prop_assert_eq!(file.header().len(), theirs.len());
        let their_order: Vec<String> = safetensors::SafeTensors::read_metadata(&bytes).unwrap().1.offset_keys();
        // Zero-size tensors share offsets; the reference orders those by hash.
        let nonempty = |names: Vec<&str>| -> Vec<String> {
            names.into_iter().filter(|n| file.tensor(n).unwrap().info().byte_len() > 0).map(String::from).collect()
        };
        prop_assert_eq!(nonempty(file.header().names_in_file_order()), nonempty(their_order.iter().map(String::as_str).collect()));
        for (name, view) in file.tensors() {
            let t = theirs.tensor(name).unwrap();
            prop_assert_eq!(view.dtype().code(), format!("{:?}", t.dtype()));
            prop_assert_eq!(view.shape(), t.shape());
            prop_assert_eq!(view.data(), t.data());
        }
        let meta: Option<BTreeMap<String, String>> = file.header().metadata().map(|m| m.iter().cloned().collect());
        prop_assert_eq!(meta.as_ref(), metadata.as_ref());
    }

    #[test]
    fn rejects_every_mutation_the_reference_rejects(
        tensors in tensors_strategy(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..4),
    ) {
        let mut bytes = reference(&tensors, None).unwrap();
        for (at, value, kind) in edits {
            if bytes.is_empty() { break; }
            let i = at.index(bytes.len());
            match kind {
                0 => bytes[i] = value,                 // overwrite a byte
                1 => bytes.truncate(i),                // truncate
                2 => bytes.insert(i, value),           // insert a byte
                _ => { bytes.remove(i); }              // delete a byte
            }
        }
        check_agreement(&bytes)?;
    }
}

/// We must reject whatever the reference rejects; where we reject more, it
/// must be one of the documented stricter rules.
fn check_agreement(bytes: &[u8]) -> Result<(), TestCaseError> {
    let theirs = safetensors::SafeTensors::deserialize(bytes);
    let ours = SafeTensors::deserialize(bytes);
    match (&theirs, &ours) {
        (Err(e), Ok(_)) => prop_assert!(false, "the reference rejects ({e}) but tensafe accepts {bytes:?}"),
        (Ok(_), Err(e)) => prop_assert!(is_intended_strictness(e), "tensafe rejects a file the reference accepts: {e}"),
        (Ok(t), Ok(o)) => {
            for (name, view) in o.tensors() {
                prop_assert_eq!(view.data(), t.tensor(name).unwrap().data());
            }
        }
        (Err(_), Err(_)) => {}
    }
    Ok(())
}

fn is_intended_strictness(e: &Error) -> bool {
    let text = e.to_string();
    text.contains("duplicate tensor name") || text.contains("duplicate metadata key")
}

/// Builds a file around a hand-written header.
fn file(json: &str, data: usize) -> Vec<u8> {
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(json.as_bytes());
    out.resize(out.len() + data, 0);
    out
}

#[test]
fn hand_written_edge_cases_agree_with_the_reference() {
    let cases: &[(&str, usize)] = &[
        ("{}", 0),
        ("  {}\t\n", 0),
        ("{}\0", 0),
        ("", 0),
        ("[]", 0),
        (r#"{"__metadata__":null}"#, 0),
        (r#"{"__metadata__":{"x":1}}"#, 0),
        (r#"{"__metadata__":{},"__metadata__":{}}"#, 0),
        (r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"extra":1}}"#, 4),
        (r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4,4]}}"#, 4),
        (r#"{"a":{"dtype":"f32","shape":[1],"data_offsets":[0,4]}}"#, 4),
        (r#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#, 4),
        (r#"{"a":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}}"#, 4),
        (r#"{"a":{"dtype":"F32","shape":[1]}}"#, 4),
        (r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#, 4),
        (r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#, 8),
        (r#"{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"b":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}"#, 0),
        (r#"{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}"#, 2),
        (r#"{"a":{"dtype":"F6_E2M3","shape":[4],"data_offsets":[0,3]}}"#, 3),
        (r#"{"a":{"dtype":"U8","shape":[18446744073709551615,2],"data_offsets":[0,1]}}"#, 1),
        (r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[1,0]}}"#, 1),
        (r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#, 2),
        ("{\"\\u0000\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1),
        (r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#, 0),
        (r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#, 2),
    ];
    for (json, data) in cases {
        check_agreement(&file(json, *data)).unwrap_or_else(|e| panic!("{json}: {e}"));
    }
    // Invalid UTF-8 and a header length past the end.
    check_agreement(&file("{\"\u{e9}\":{}}", 0).iter().map(|&b| if b == 0xc3 { 0xff } else { b }).collect::<Vec<_>>()).unwrap();
    check_agreement(&[16, 0, 0, 0, 0, 0, 0, 0, b'{', b'}']).unwrap();
    check_agreement(&[1, 2, 3]).unwrap();
}

#[test]
fn format_sheet_byte_examples() {
    let i32_zeros = Owned { dtype: Dtype::I32, shape: vec![2, 2], data: vec![0; 16] };
    let f16 = Owned { dtype: Dtype::F16, shape: vec![2, 2], data: vec![0; 8] };
    let meta: BTreeMap<String, String> = [("framework".to_string(), "pt".to_string())].into();
    let header = |bytes: &[u8]| String::from_utf8(bytes[8..8 + bytes[0] as usize].to_vec()).unwrap();

    assert_eq!(ours(&[], None).unwrap(), b"\x08\0\0\0\0\0\0\0{}      ");
    let h = header(&ours(&[], Some(&meta)).unwrap());
    assert_eq!(h, "{\"__metadata__\":{\"framework\":\"pt\"}}     ");
    let bytes = ours(&[("test".into(), i32_zeros.clone())], Some(&meta)).unwrap();
    assert_eq!(bytes[0], 96);
    assert_eq!(
        header(&bytes),
        "{\"__metadata__\":{\"framework\":\"pt\"},\"test\":{\"dtype\":\"I32\",\"shape\":[2,2],\"data_offsets\":[0,16]}}  "
    );
    let bytes = ours(&[("test2".into(), f16), ("test1".into(), i32_zeros)], None).unwrap();
    assert_eq!(
        header(&bytes).trim_end(),
        "{\"test1\":{\"dtype\":\"I32\",\"shape\":[2,2],\"data_offsets\":[0,16]},\"test2\":{\"dtype\":\"F16\",\"shape\":[2,2],\"data_offsets\":[16,24]}}"
    );
}

/// With no tensor and an empty metadata map the reference writes
/// `{},"__metadata__":{}}`, which is not JSON and which it cannot read back.
/// tensafe writes the valid `{"__metadata__":{}}` instead.
#[test]
fn empty_metadata_without_tensors() {
    let empty = BTreeMap::new();
    let theirs = reference(&[], Some(&empty)).unwrap();
    assert_eq!(&theirs[8..], b"{},\"__metadata__\":{}}   ");
    assert!(safetensors::SafeTensors::deserialize(&theirs).is_err());
    let bytes = ours(&[], Some(&empty)).unwrap();
    assert_eq!(&bytes[8..], b"{\"__metadata__\":{}}     ");
    assert!(safetensors::SafeTensors::deserialize(&bytes).is_ok());
    // With a tensor, both agree on `"__metadata__":{}` first.
    let t = [("a".to_string(), Owned { dtype: Dtype::U8, shape: vec![1], data: vec![7] })];
    assert_eq!(ours(&t, Some(&empty)).unwrap(), reference(&t, Some(&empty)).unwrap());
}

#[test]
fn writer_errors_match_the_reference_rules() {
    let bad_len = [("a".to_string(), Owned { dtype: Dtype::F32, shape: vec![2], data: vec![0; 4] })];
    assert!(reference(&bad_len, None).is_err());
    assert!(matches!(ours(&bad_len, None), Err(Error::TensorInvalidInfo { .. })));
    let odd_f4 = [("a".to_string(), Owned { dtype: Dtype::F4, shape: vec![3], data: vec![0; 2] })];
    assert!(reference(&odd_f4, None).is_err());
    assert!(matches!(ours(&odd_f4, None), Err(Error::Misaligned { .. })));
    // Stricter: the reference writes a tensor named `__metadata__`, giving a
    // file nobody can read back. Names with control characters are written
    // as the reference writes them.
    let reserved = [("__metadata__".to_string(), Owned { dtype: Dtype::U8, shape: vec![1], data: vec![0] })];
    let written = reference(&reserved, None).unwrap();
    assert!(safetensors::SafeTensors::deserialize(&written).is_err(), "the reference cannot read its own file");
    assert!(matches!(ours(&reserved, None), Err(Error::InvalidName { .. })));
    let escape = [("\u{1b}[2J\n\0".to_string(), Owned { dtype: Dtype::U8, shape: vec![1], data: vec![0] })];
    assert_eq!(ours(&escape, None).unwrap(), reference(&escape, None).unwrap());
}

#[test]
fn aligned_header_is_readable_by_the_reference() {
    let t = Owned { dtype: Dtype::BF16, shape: vec![3], data: vec![1, 2, 3, 4, 5, 6] };
    let prepared = tensafe::prepare(
        [("x", RawTensor { dtype: t.dtype, shape: &t.shape, data: &t.data })],
        None,
        &tensafe::WriteOptions { data_alignment: 4096, ..Default::default() },
    )
    .unwrap();
    let mut bytes = Vec::new();
    prepared.write_to(&mut bytes).unwrap();
    assert_eq!(prepared.header.len(), 4096);
    let theirs = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(theirs.tensor("x").unwrap().data(), &t.data[..]);
}

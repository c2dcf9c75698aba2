//! Fuzzes the reader with arbitrary bytes, and the writer with whatever the
//! reader accepts.
//!
//! For every input:
//! * [`SafeTensors::deserialize`] must return, never panic;
//! * when it accepts the input, every tensor's bytes must be exactly
//!   `info.byte_len()` long, lie inside the data section, and be reachable by
//!   name;
//! * the accepted file, written back with [`tensafe::serialize`], must parse
//!   again to the same tensors (names, dtypes, shapes, bytes) and metadata, and
//!   writing that second parse must give the very same bytes (the writer's
//!   output is canonical).

#![no_main]

use libfuzzer_sys::fuzz_target;
use tensafe::{Metadata, SafeTensors};

/// Everything that must survive a round trip: metadata (as a sorted map, or
/// `None` when absent) and each tensor's name, dtype, shape and bytes.
#[derive(Debug, PartialEq, Eq)]
struct Contents {
    metadata: Option<Metadata>,
    tensors: Vec<(String, tensafe::Dtype, Vec<usize>, Vec<u8>)>,
}

/// Collects a parsed file's contents, sorted by name, checking the invariants
/// of every view on the way.
fn contents(file: &SafeTensors<'_>, input_len: usize) -> Contents {
    let header = file.header();
    assert_eq!(file.tensors().len(), header.len());
    assert!(header.data_start() + header.data_len() as u64 == input_len as u64, "the data section must end the input");

    let mut tensors = Vec::with_capacity(header.len());
    let mut next_offset = 0;
    for (name, view) in file.tensors() {
        let info = view.info();
        assert_eq!(view.data().len(), info.byte_len(), "tensor `{name}`: view length != byte_len");
        assert_eq!(info.data_offsets.0, next_offset, "tensor `{name}`: tensors must tile the data section");
        next_offset = info.data_offsets.1;
        assert_eq!(view.shape(), info.shape.as_slice());
        assert_eq!(view.dtype().byte_len(info.num_elements()), Some(info.byte_len()));

        let by_name = file.tensor(name).expect("a listed tensor must be found by name");
        assert_eq!(by_name, view);
        tensors.push((name.to_owned(), view.dtype(), view.shape().to_vec(), view.data().to_vec()));
    }
    assert_eq!(next_offset, header.data_len());
    assert_eq!(header.names_sorted().len(), header.len());
    tensors.sort_by(|a, b| a.0.cmp(&b.0));

    let metadata = header.metadata().map(|entries| {
        let map: Metadata = entries.iter().cloned().collect();
        assert_eq!(map.len(), entries.len(), "the reader must refuse duplicate metadata keys");
        map
    });
    Contents { metadata, tensors }
}

fuzz_target!(|data: &[u8]| {
    let Ok(file) = SafeTensors::deserialize(data) else {
        return;
    };
    let original = contents(&file, data.len());

    // Everything the reader accepts, the writer must be able to write back.
    let written = tensafe::serialize(file.tensors(), original.metadata.as_ref())
        .unwrap_or_else(|e| panic!("re-serializing an accepted file failed: {e}"));
    let reparsed =
        SafeTensors::deserialize(&written).unwrap_or_else(|e| panic!("the writer's output does not parse: {e}"));
    assert_eq!(contents(&reparsed, written.len()), original, "the round trip changed the contents");

    // The writer's output is canonical: writing it again changes nothing.
    let rewritten = tensafe::serialize(reparsed.tensors(), original.metadata.as_ref())
        .unwrap_or_else(|e| panic!("re-serializing the writer's output failed: {e}"));
    assert!(rewritten == written, "serialize is not idempotent");
});

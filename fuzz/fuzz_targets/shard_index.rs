//! Fuzzes the index of a sharded checkpoint (`model.safetensors.index.json`,
//! read from local directories and from remote stores, whose bytes anyone
//! may have written) and its check against the shards' headers.
//!
//! The input is the index text, then the shards' files, each after a
//! [`SHARD`] separator. For every input:
//! * [`ShardIndex::parse`] must return, never panic;
//! * an index it accepts names only plain files of its own directory, and
//!   its JSON ([`ShardIndex::to_json`]) parses back to the same index;
//! * [`ShardIndex::locate`], given the headers of the shard files that
//!   parse, must return, never panic; when it accepts them, every tensor of
//!   every header is located in the shard that holds it, and nothing else is.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tensafe::{SafeTensors, ShardIndex};

/// Separates the index text from each shard file in an input.
const SHARD: &[u8] = b"\n--shard--\n";

fn split(data: &[u8]) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    let mut rest = data;
    while let Some(at) = rest.windows(SHARD.len()).position(|w| w == SHARD) {
        parts.push(&rest[..at]);
        rest = &rest[at + SHARD.len()..];
    }
    parts.push(rest);
    parts
}

fuzz_target!(|data: &[u8]| {
    let parts = split(data);
    let Ok(text) = std::str::from_utf8(parts[0]) else {
        return;
    };
    let Ok(index) = ShardIndex::parse(text) else {
        return;
    };
    for file in index.shard_files() {
        assert!(!file.is_empty() && !file.contains(['/', '\\']) && file != "." && file != "..", "{file:?} leaves the directory");
    }
    assert_eq!(ShardIndex::parse(&index.to_json()).expect("the index's own JSON parses"), index);

    let files: Vec<SafeTensors<'_>> = parts[1..].iter().filter_map(|part| SafeTensors::deserialize(part).ok()).collect();
    let headers: Vec<_> = files.iter().map(|file| file.header()).collect();
    if let Ok(location) = index.locate(&headers) {
        let held: usize = headers.iter().map(|header| header.len()).sum();
        assert_eq!(location.len(), held, "every tensor located once");
        for (shard, header) in headers.iter().enumerate() {
            for (name, _) in header.iter() {
                assert_eq!(location.get(name), Some(&shard), "`{name}` located in the wrong shard");
            }
        }
    }
});

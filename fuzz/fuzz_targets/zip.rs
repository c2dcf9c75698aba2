//! Fuzzes the strict zip reader of tensafe-pickle on its own.
//!
//! For every input, `zip::read` returns an archive or a reason, never panics;
//! for an archive, every entry lies inside the input (its data range is
//! addressable), `get` finds each name, and reading every entry's data within
//! a small inflate budget returns bytes of exactly the declared size or an
//! error.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tensafe_pickle::{zip, Limits};

fuzz_target!(|data: &[u8]| {
    let limits = Limits { max_inflate: 8 << 20, ..Default::default() };
    let Ok(archive) = zip::read(data, &limits) else { return };
    let mut budget = 8u64 << 20;
    for entry in &archive.entries {
        assert!(entry.data_offset.checked_add(entry.compressed_size).is_some_and(|end| end <= data.len() as u64));
        assert!(archive.get(&entry.name).is_some());
        if let Ok(bytes) = archive.data(data, entry, &mut budget) {
            assert_eq!(bytes.len() as u64, entry.size, "entry `{}`", entry.name);
        }
    }
});

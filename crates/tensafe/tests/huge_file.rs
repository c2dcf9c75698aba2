//! Header-only inspection of a 50 GB file reads only the header.

use std::io::Write;

/// Bytes this process has read through read-family syscalls (`rchar`).
fn bytes_read() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").expect("/proc/self/io is readable on Linux");
    io.lines().find_map(|l| l.strip_prefix("rchar: ")).unwrap().trim().parse().unwrap()
}

#[test]
fn inspecting_a_50_gb_file_reads_only_its_header() {
    const SIZE: u64 = 50_000_000_000;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.safetensors");
    let json = format!(r#"{{"__metadata__":{{"format":"pt"}},"embed":{{"dtype":"BF16","shape":[1000000,25000],"data_offsets":[0,{SIZE}]}}}}"#);
    let mut file = std::fs::File::create(&path).unwrap();
    file.write_all(&(json.len() as u64).to_le_bytes()).unwrap();
    file.write_all(json.as_bytes()).unwrap();
    // Sparse: the 50 GB of data take no disk space.
    file.set_len(8 + json.len() as u64 + SIZE).unwrap();
    drop(file);

    let before = bytes_read();
    let opened = tensafe::PreadFile::open(&path).unwrap();
    let read = bytes_read() - before;
    assert_eq!(opened.header().info("embed").unwrap().byte_len() as u64, SIZE);
    assert!(read < 64 * 1024 + 4096, "read {read} bytes to inspect the header");
    // The mapped reader validates the same way without touching the data.
    let mapped = tensafe::MmapFile::open(&path).unwrap();
    assert_eq!(mapped.tensor("embed").unwrap().shape(), [1_000_000, 25_000]);
}

//! A strict zip reader for torch archives.
//!
//! It resolves entries as torch's reader does (central directory only) and
//! also checks everything another zip reader could interpret differently:
//! one end record, Zip64 records that agree with the classic one, local
//! names equal to central names, no duplicate names, no overlapping entries,
//! no bytes unaccounted for (which is where a polyglot hides its second
//! view), allowed flags and methods, clean names, and CRC-32 when non-zero.
//!
//! Structural damage (no end record, directory outside the file) is an
//! error; strictness violations are collected in [`Archive::problems`] so the
//! converter can refuse and the scanner can report them.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use crate::limits::Limits;

const EOCD_SIG: &[u8; 4] = b"PK\x05\x06";
const EOCD64_SIG: &[u8; 4] = b"PK\x06\x06";
const LOCATOR_SIG: &[u8; 4] = b"PK\x06\x07";
const CENTRAL_SIG: &[u8; 4] = b"PK\x01\x02";
const LOCAL_SIG: &[u8; 4] = b"PK\x03\x04";
const DESCRIPTOR_SIG: &[u8; 4] = b"PK\x07\x08";

/// One central-directory entry, with its data located through the local header.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Name (from the central directory).
    pub name: String,
    /// 0 (stored) or 8 (deflate).
    pub method: u16,
    /// General-purpose flags.
    pub flags: u16,
    /// CRC-32 of the uncompressed data (0: not recorded).
    pub crc: u32,
    /// Bytes in the file.
    pub compressed_size: u64,
    /// Bytes once inflated.
    pub size: u64,
    /// Offset of the local header.
    pub local_offset: u64,
    /// Offset of the data.
    pub data_offset: u64,
}

/// A parsed archive.
#[derive(Debug, Default)]
pub struct Archive {
    /// Entries in central-directory order.
    pub entries: Vec<Entry>,
    /// Strictness violations (empty for a clean torch archive).
    pub problems: Vec<String>,
    /// Names that differ only in ASCII case: a problem in a torch archive,
    /// whose reader looks records up ignoring case ([`Archive::get`]).
    pub case_collisions: Vec<String>,
    /// Name in lower case → index of its last entry.
    by_name: HashMap<String, usize>,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Whether the bytes contain an end-of-central-directory record whose
/// comment reaches exactly the end: a zip any tool would open.
pub fn has_end_record(bytes: &[u8]) -> bool {
    find_eocds(bytes).next().is_some()
}

/// The end-of-central-directory record as Python's `zipfile` (numpy's npz
/// reader) and miniz (torch's) find it: a comment-less record in the last 22
/// bytes, else the last signature in the last 64 KiB + 22 bytes (zipfile's
/// window: one byte more than the longest comment needs) that has a whole
/// record after it, whatever its comment length says.
fn end_record(bytes: &[u8]) -> Option<usize> {
    let last = bytes.len().checked_sub(22)?;
    if bytes[last..].starts_with(EOCD_SIG) && bytes[last + 20..] == [0, 0] {
        return Some(last);
    }
    let start = bytes.len().saturating_sub(22 + 0x10000);
    // Windows that start at `last` or before: a whole record after each.
    bytes[start..last + 4].windows(4).rposition(|w| w == EOCD_SIG).map(|i| start + i)
}

fn find_eocds(bytes: &[u8]) -> impl Iterator<Item = usize> + '_ {
    let start = bytes.len().saturating_sub(22 + 0xffff);
    let window = &bytes[start..];
    window
        .windows(4)
        .enumerate()
        .rev()
        .filter(|(_, w)| *w == EOCD_SIG)
        .map(move |(i, _)| start + i)
        .filter(move |&pos| u16_at(bytes, pos + 20).is_some_and(|c| pos + 22 + c as usize == bytes.len()))
}

/// Parses the archive. `Err` when it cannot be read at all.
pub fn read(bytes: &[u8], limits: &Limits) -> Result<Archive, String> {
    let mut problems = Vec::new();
    let eocd = end_record(bytes).ok_or("no end-of-central-directory record (not a zip, or truncated)")?;
    if let Some(other) = find_eocds(bytes).find(|&other| other != eocd) {
        problems.push(format!("several end-of-central-directory records (at offsets {other} and {eocd})"));
    }
    let comment_len = u16_at(bytes, eocd + 20).unwrap_or(0);
    if comment_len > 0 {
        problems.push(format!("zip comment of {comment_len} bytes (torch writes none)"));
    }
    let comment_end = eocd + 22 + comment_len as usize;
    if comment_end != bytes.len() {
        // Python's zipfile and miniz take the record all the same.
        problems.push(format!(
            "the end record's {comment_len}-byte comment ends at {comment_end}, not at the end of the {}-byte file (zip readers take the archive anyway)",
            bytes.len()
        ));
    }
    let disk = u16_at(bytes, eocd + 4).ok_or("truncated end record")?;
    let cd_disk = u16_at(bytes, eocd + 6).ok_or("truncated end record")?;
    let count_disk = u16_at(bytes, eocd + 8).ok_or("truncated end record")?;
    let mut count = u16_at(bytes, eocd + 10).ok_or("truncated end record")? as u64;
    let mut cd_size = u32_at(bytes, eocd + 12).ok_or("truncated end record")? as u64;
    let mut cd_offset = u32_at(bytes, eocd + 16).ok_or("truncated end record")? as u64;
    if disk != 0 || cd_disk != 0 || count_disk as u64 != count {
        // Python's zipfile ignores these fields of a classic end record.
        problems.push(format!("the end record names other disks (disk {disk}, directory on disk {cd_disk}, {count_disk} of {count} entries on this one)"));
    }
    // Structures after the last entry: [zip64 end record] [locator] end record.
    let mut tail_start = eocd as u64;
    if eocd >= 20 && &bytes[eocd - 20..eocd - 16] == LOCATOR_SIG {
        let locator = eocd - 20;
        let e64 = u64_at(bytes, locator + 8).ok_or("truncated Zip64 locator")?;
        if u32_at(bytes, locator + 4) != Some(0) || u32_at(bytes, locator + 16) != Some(1) {
            return Err("multi-disk Zip64 archives are not supported".into());
        }
        let e64 = usize::try_from(e64).ok().filter(|&o| o < locator).ok_or("Zip64 end record offset is past its locator")?;
        if bytes.get(e64..e64 + 4) != Some(EOCD64_SIG) {
            return Err(format!("Zip64 locator points at offset {e64}, which holds no Zip64 end record"));
        }
        let record_size = u64_at(bytes, e64 + 4).ok_or("truncated Zip64 end record")?;
        if (e64 as u64 + 12).checked_add(record_size) != Some(locator as u64) {
            problems.push(format!(
                "Zip64 end record at {e64} ({} bytes) does not end where the locator starts ({locator})",
                record_size.saturating_add(12)
            ));
        }
        let fields = (u64_at(bytes, e64 + 32), u64_at(bytes, e64 + 40), u64_at(bytes, e64 + 48));
        let (Some(c64), Some(size64), Some(off64)) = fields else { return Err("truncated Zip64 end record".into()) };
        if u32_at(bytes, e64 + 16) != Some(0) || u32_at(bytes, e64 + 20) != Some(0) || u64_at(bytes, e64 + 24) != Some(c64) {
            return Err("multi-disk Zip64 archives are not supported".into());
        }
        let agree = |classic: u64, sentinel: u64, wide: u64| classic == sentinel || classic == wide;
        if !agree(count, 0xffff, c64) || !agree(cd_size, 0xffff_ffff, size64) || !agree(cd_offset, 0xffff_ffff, off64) {
            problems.push(format!(
                "Zip64 end record (entries {c64}, directory {size64} bytes at {off64}) disagrees with the classic one (entries {count}, {cd_size} bytes at {cd_offset})"
            ));
        }
        count = c64;
        cd_size = size64;
        cd_offset = off64;
        tail_start = e64 as u64;
    } else if count == 0xffff || cd_size == 0xffff_ffff || cd_offset == 0xffff_ffff {
        // Python's zipfile takes the values as they are.
        problems.push("the end record has Zip64 sentinel values but there is no Zip64 locator".into());
    }
    if count > limits.max_zip_entries as u64 {
        return Err(format!("{count} entries (limit {})", limits.max_zip_entries));
    }
    let mut cd_end = cd_offset.checked_add(cd_size).ok_or("central directory overflows")?;
    // Python's zipfile reads the directory where it ends at the end records
    // (`cd_size` before them) and shifts every declared offset by the
    // difference: data before the archive (a zip appended to another file),
    // or declared offsets past where things are. Where the declared offset
    // holds no directory, do as it does.
    let mut shift = 0i64;
    let holds_directory = |offset: u64| usize::try_from(offset).ok().and_then(|o| bytes.get(o..o.checked_add(4)?)) == Some(CENTRAL_SIG);
    let moved = tail_start.checked_sub(cd_size).filter(|&found| found != cd_offset && !holds_directory(cd_offset) && holds_directory(found));
    // (An offset too large for an i64 is no directory Python finds either.)
    if let Some((found, by)) = moved.and_then(|found| Some((found, i64::try_from(found).ok()?.checked_sub(i64::try_from(cd_offset).ok()?)?))) {
        shift = by;
        cd_offset = found;
        cd_end = tail_start;
        problems.push(match shift {
            s if s > 0 => format!("the archive starts {s} bytes into the file, after other data (zip readers shift its offsets and take it)"),
            s => format!("the archive's offsets are declared {} bytes past where its records are (zip readers shift them back and take it)", -s),
        });
    }
    if cd_end > tail_start {
        return Err(format!("central directory [{cd_offset}, {cd_end}) runs past the end records at {tail_start}"));
    }
    if cd_end != tail_start {
        problems.push(format!("{} unaccounted bytes between the central directory and the end records", tail_start - cd_end));
    }

    // The directory is walked by its size, as Python's zipfile walks it; the
    // count in the end record is checked against what it holds.
    let mut entries = Vec::with_capacity(count.min(1 << 16) as usize);
    let mut at = cd_offset as usize;
    while (at as u64) < cd_end {
        let i = entries.len();
        if i >= limits.max_zip_entries {
            return Err(format!("more than {} entries", limits.max_zip_entries));
        }
        if bytes.get(at..at + 4) != Some(CENTRAL_SIG) {
            return Err(format!("central directory entry {i} at offset {at} has no signature"));
        }
        let h = bytes.get(at..at + 46).ok_or("truncated central directory")?;
        let flags = u16_at(h, 8).unwrap_or(0);
        let method = u16_at(h, 10).unwrap_or(0);
        let crc = u32_at(h, 16).unwrap_or(0);
        let mut csize = u32_at(h, 20).unwrap_or(0) as u64;
        let mut usize_ = u32_at(h, 24).unwrap_or(0) as u64;
        let name_len = u16_at(h, 28).unwrap_or(0) as usize;
        let extra_len = u16_at(h, 30).unwrap_or(0) as usize;
        let comment_len = u16_at(h, 32).unwrap_or(0) as usize;
        let disk_start = u16_at(h, 34).unwrap_or(0);
        let mut local = u32_at(h, 42).unwrap_or(0) as u64;
        let name_bytes = bytes.get(at + 46..at + 46 + name_len).ok_or("truncated central directory name")?;
        let extra = bytes.get(at + 46 + name_len..at + 46 + name_len + extra_len).ok_or("truncated central directory extra field")?;
        if disk_start != 0 && disk_start != 0xffff {
            // Python's zipfile ignores it.
            problems.push(format!("entry {i} starts on disk {disk_start}"));
        }
        // Zip64 extended information: the fields that overflowed, in order.
        let mut e = 0;
        while e + 4 <= extra.len() {
            let id = u16_at(extra, e).unwrap_or(0);
            let len = u16_at(extra, e + 2).unwrap_or(0) as usize;
            let body = extra.get(e + 4..e + 4 + len).ok_or("truncated extra field")?;
            if id == 1 {
                let mut p = 0;
                for field in [&mut usize_, &mut csize, &mut local] {
                    if *field == 0xffff_ffff {
                        *field = u64_at(body, p).ok_or("truncated Zip64 extra field")?;
                        p += 8;
                    }
                }
            }
            e += 4 + len;
        }
        let name = match std::str::from_utf8(name_bytes) {
            Ok(n) => n.to_owned(),
            Err(_) => {
                problems.push(format!("entry {i}: name is not UTF-8"));
                String::from_utf8_lossy(name_bytes).into_owned()
            }
        };
        if let Some(why) = name_problem(&name, limits) {
            problems.push(format!("entry `{}`: {why}", name.escape_debug()));
        }
        let allowed = 0x0008 | 0x0800 | if method == 8 { 0x0006 } else { 0 };
        if flags & !allowed != 0 {
            problems.push(format!(
                "entry `{name}`: general-purpose flags 0x{flags:04x} (encrypted, patched or otherwise unsupported bits)"
            ));
        }
        if method != 0 && method != 8 {
            problems.push(format!("entry `{name}`: compression method {method} (only stored and deflate)"));
        }
        if method == 0 && csize != usize_ {
            problems.push(format!("entry `{name}`: stored with {csize} bytes but declares {usize_}"));
        }
        local = local.checked_add_signed(shift).ok_or_else(|| format!("entry `{name}`: its local header offset, shifted, is before the file"))?;
        // The local header: same name, same method; data follows it.
        let lh = usize::try_from(local).ok().and_then(|lo| bytes.get(lo..lo.checked_add(30)?)).ok_or_else(|| format!("entry `{name}`: local header at {local} is outside the file"))?;
        if local >= cd_offset {
            // Python's zipfile reads it there all the same.
            problems.push(format!("entry `{name}`: local header at {local} is outside the entries area"));
        }
        let lo = local as usize;
        if &lh[..4] != LOCAL_SIG {
            return Err(format!("entry `{name}`: no local header at offset {lo}"));
        }
        let lname_len = u16_at(lh, 26).unwrap_or(0) as usize;
        let lextra_len = u16_at(lh, 28).unwrap_or(0) as usize;
        if bytes.get(lo + 30..lo + 30 + lname_len) != Some(name_bytes) {
            problems.push(format!("entry `{name}`: the local header names it differently"));
        }
        if u16_at(lh, 8) != Some(method) {
            problems.push(format!("entry `{name}`: local and central compression methods differ"));
        }
        if u16_at(lh, 6) != Some(flags) {
            problems.push(format!("entry `{name}`: local and central flags differ"));
        }
        let data_offset = local + 30 + lname_len as u64 + lextra_len as u64;
        let data_end = data_offset.checked_add(csize).ok_or("entry size overflows")?;
        if data_end > bytes.len() as u64 {
            return Err(format!("entry `{name}`: data [{data_offset}, {data_end}) runs past the end of the file"));
        }
        entries.push(Entry { name, method, flags, crc, compressed_size: csize, size: usize_, local_offset: local, data_offset });
        at += 46 + name_len + extra_len + comment_len;
    }
    if at as u64 != cd_end {
        problems.push(format!("central directory declares {cd_size} bytes but its entries take {}", at as u64 - cd_offset));
    }
    if entries.len() as u64 != count {
        problems.push(format!("the end record declares {count} entries, the central directory holds {}", entries.len()));
    }

    // torch looks records up ignoring ASCII case: names that differ only in
    // case are duplicates to it (and only to it: numpy's npz reader tells
    // `a.npy` from `A.npy`).
    let mut exact = HashSet::with_capacity(entries.len());
    let mut by_name: HashMap<String, usize> = HashMap::with_capacity(entries.len());
    let mut case_collisions = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let lower = e.name.to_ascii_lowercase();
        if !exact.insert(e.name.as_str()) {
            problems.push(format!("duplicate entry name `{}`", e.name));
        } else if let Some(&other) = by_name.get(&lower) {
            case_collisions.push(format!(
                "entries `{}` and `{}` differ only in case (torch's zip reader does not tell them apart)",
                entries[other].name, e.name
            ));
        }
        by_name.insert(lower, i);
    }
    // Entries, in file order, must tile [shift, cd_offset): header, data,
    // optional descriptor.
    let mut order: Vec<&Entry> = entries.iter().collect();
    order.sort_by_key(|e| e.local_offset);
    let mut cursor = shift.max(0) as u64;
    for e in order {
        if e.local_offset < cursor {
            problems.push(format!("entry `{}` overlaps the previous entry", e.name));
        } else if e.local_offset > cursor {
            problems.push(format!("{} unaccounted bytes at offset {cursor} (before entry `{}`)", e.local_offset - cursor, e.name));
        }
        let data_end = e.data_offset + e.compressed_size;
        cursor = cursor.max(data_end + descriptor_len(bytes, e, data_end));
    }
    if cursor < cd_offset {
        problems.push(format!("{} unaccounted bytes at offset {cursor} (before the central directory)", cd_offset - cursor));
    } else if cursor > cd_offset {
        problems.push("the last entry overlaps the central directory".to_string());
    }
    Ok(Archive { entries, problems, case_collisions, by_name })
}

/// Length of the data descriptor after an entry (0 without flag 0x0008).
fn descriptor_len(bytes: &[u8], e: &Entry, at: u64) -> u64 {
    if e.flags & 0x0008 == 0 {
        return 0;
    }
    let at = at as usize;
    let sig = bytes.get(at..at + 4) == Some(DESCRIPTOR_SIG);
    let base = if sig { at + 4 } else { at };
    // 32-bit sizes, then 64-bit sizes; pick the layout whose values match.
    if u32_at(bytes, base) == Some(e.crc)
        && u32_at(bytes, base + 4).map(u64::from) == Some(e.compressed_size)
        && u32_at(bytes, base + 8).map(u64::from) == Some(e.size)
    {
        return (base + 12 - at) as u64;
    }
    if u32_at(bytes, base) == Some(e.crc) && u64_at(bytes, base + 4) == Some(e.compressed_size) && u64_at(bytes, base + 12) == Some(e.size) {
        return (base + 20 - at) as u64;
    }
    0
}

fn name_problem(name: &str, limits: &Limits) -> Option<&'static str> {
    if name.is_empty() {
        Some("empty name")
    } else if name.len() > limits.max_name_len {
        Some("name too long")
    } else if name.contains('\0') {
        Some("NUL in name")
    } else if name.starts_with('/') || name.starts_with('\\') {
        Some("absolute name")
    } else if name.split(['/', '\\']).any(|c| c == "..") {
        Some("`..` component in name")
    } else {
        None
    }
}

impl Archive {
    /// The entry with this name in any ASCII case, as torch's reader finds
    /// records (the last one, if several: the archive then has a problem).
    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.position(name).map(|i| &self.entries[i])
    }

    /// The index in [`Archive::entries`] of the entry [`Archive::get`] finds.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.by_name.get(&name.to_ascii_lowercase()).copied()
    }

    /// An entry's uncompressed bytes: borrowed when stored, inflated (to
    /// exactly the declared size, within `budget`) when deflated. The CRC is
    /// checked when non-zero.
    pub fn data<'a>(&self, bytes: &'a [u8], e: &Entry, budget: &mut u64) -> Result<Cow<'a, [u8]>, String> {
        let raw = &bytes[e.data_offset as usize..(e.data_offset + e.compressed_size) as usize];
        let data = match e.method {
            // Stored: the bytes are the data, so both sizes must agree.
            0 if e.compressed_size != e.size => {
                return Err(format!(
                    "stored entry `{}` declares {} bytes but holds {}",
                    e.name, e.size, e.compressed_size
                ));
            }
            0 => Cow::Borrowed(raw),
            8 => {
                if e.size > *budget {
                    return Err(format!(
                        "entry `{}` declares {} inflated bytes, over the remaining inflate budget of {}",
                        e.name, e.size, budget
                    ));
                }
                *budget -= e.size;
                let out = miniz_oxide::inflate::decompress_to_vec_with_limit(raw, e.size as usize)
                    .map_err(|err| format!("entry `{}`: inflating failed or exceeded its declared {} bytes ({err:?})", e.name, e.size))?;
                if out.len() as u64 != e.size {
                    return Err(format!("entry `{}` inflates to {} bytes but declares {}", e.name, out.len(), e.size));
                }
                Cow::Owned(out)
            }
            m => return Err(format!("entry `{}`: compression method {m} is not supported", e.name)),
        };
        if e.crc != 0 {
            let crc = crc32fast::hash(&data);
            if crc != e.crc {
                return Err(format!("entry `{}`: CRC-32 is {crc:08x} but the directory says {:08x}", e.name, e.crc));
            }
        }
        Ok(data)
    }
}

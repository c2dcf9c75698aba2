//! Parsing and validating the header: the 8-byte length, the JSON text, and the
//! layout rules that tie the tensors to the data section.
//!
//! The checks run in the reference implementation's order, so a bad file gets
//! the same kind of error from both; on top of them tensafe rejects duplicate
//! tensor names, which the reference lets through (the last one silently
//! wins). Names may hold any JSON string, control characters included, as in
//! the reference; [`Printable`] shows them safely.

use std::collections::HashMap;
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::error::{Diagnosis, Error, Result};
use crate::Dtype;

/// The header size limit of the reference implementation (100 MB).
pub const DEFAULT_MAX_HEADER_SIZE: u64 = 100_000_000;

/// The key under which the header keeps free-form string metadata.
pub const METADATA_KEY: &str = "__metadata__";

/// Options for reading a file.
#[derive(Debug, Clone)]
pub struct ReadOptions {
    /// Largest accepted header, in bytes (`N == max_header_size` is accepted).
    pub max_header_size: u64,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions { max_header_size: DEFAULT_MAX_HEADER_SIZE }
    }
}

/// Where one tensor lives and how to interpret its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TensorInfo {
    /// Element type.
    pub dtype: Dtype,
    /// Logical shape (for sub-byte dtypes, a count of 4- or 6-bit values).
    pub shape: Vec<usize>,
    /// `[begin, end)` relative to the start of the data section.
    pub data_offsets: (usize, usize),
}

impl TensorInfo {
    /// Number of elements (1 for a scalar).
    pub fn num_elements(&self) -> usize {
        // Validated at parse time not to overflow.
        self.shape.iter().product()
    }

    /// Size of the tensor's data in bytes.
    pub fn byte_len(&self) -> usize {
        self.data_offsets.1 - self.data_offsets.0
    }
}

/// A validated header: metadata, and every tensor in file order.
#[derive(Debug, Clone)]
pub struct Header {
    header_len: usize,
    metadata: Option<Vec<(String, String)>>,
    /// Tensors in data-offset order; ties (zero-size tensors) in header order.
    tensors: Vec<(String, TensorInfo)>,
    by_name: HashMap<String, usize>,
}

impl Header {
    /// Reads the header length from the first 8 bytes of a file of `file_len`
    /// bytes and checks it against the limit and the file size.
    ///
    /// `prefix` is whatever the caller has of the file's start (at least 8 bytes
    /// when the file has them); it is also used to diagnose files that are not
    /// safetensors at all.
    pub fn header_len(prefix: &[u8], file_len: u64, options: &ReadOptions) -> Result<usize> {
        if file_len < 8 || prefix.len() < 8 {
            return Err(Error::HeaderTooSmall { file_len, hint: Diagnosis::sniff(prefix) });
        }
        let declared = u64::from_le_bytes(prefix[..8].try_into().expect("8 bytes"));
        if declared > options.max_header_size {
            let hint = match Diagnosis::sniff(prefix) {
                // No real file declares such a header, whole or cut short:
                // the length is damaged, or the file is not safetensors.
                Diagnosis::TruncatedHeader => Diagnosis::Unknown,
                hint => hint,
            };
            return Err(Error::HeaderTooLarge { declared, limit: options.max_header_size, hint });
        }
        let available = file_len - 8;
        if declared > available || usize::try_from(declared).is_err() {
            return Err(Error::InvalidHeaderLength { declared, available, hint: Diagnosis::sniff(prefix) });
        }
        Ok(declared as usize)
    }

    /// Parses and validates the header JSON of a file of `file_len` bytes.
    ///
    /// `json` is the `header_len` bytes after the 8-byte prefix.
    pub fn parse(json: &[u8], file_len: u64) -> Result<Header> {
        let header_len = json.len();
        let text = std::str::from_utf8(json).map_err(|source| Error::InvalidUtf8 {
            offset: 8 + source.valid_up_to() as u64,
            source,
            hint: Diagnosis::Unknown,
        })?;
        let raw = parse_json(text).map_err(|source| {
            // A document that is not an object at all is probably not ours.
            // (The header is whole here: whatever it is, it is not cut short.)
            let hint = match Diagnosis::sniff(json) {
                _ if text.trim_start().starts_with('{') => Diagnosis::Unknown,
                Diagnosis::TruncatedHeader => Diagnosis::Unknown,
                hint => hint,
            };
            Error::InvalidJson { source, hint }
        })?;
        let data_len = file_len - 8 - header_len as u64;
        let tensors = layout(raw.tensors, 8 + header_len as u64, data_len)?;
        let by_name = tensors.iter().enumerate().map(|(i, (name, _))| (name.clone(), i)).collect();
        Ok(Header { header_len, metadata: raw.metadata, tensors, by_name })
    }

    /// Parses a complete file held in memory; returns the header and the data section.
    pub fn parse_file_bytes<'a>(bytes: &'a [u8], options: &ReadOptions) -> Result<(Header, &'a [u8])> {
        let n = Header::header_len(bytes, bytes.len() as u64, options)?;
        let header = Header::parse(&bytes[8..8 + n], bytes.len() as u64)?;
        Ok((header, &bytes[8 + n..]))
    }

    /// Length of the JSON header in bytes (`N`, padding included).
    pub fn header_len_bytes(&self) -> usize {
        self.header_len
    }

    /// File offset where the data section starts (`8 + N`).
    pub fn data_start(&self) -> u64 {
        8 + self.header_len as u64
    }

    /// Size of the data section in bytes.
    pub fn data_len(&self) -> usize {
        self.tensors.last().map_or(0, |(_, info)| info.data_offsets.1)
    }

    /// Free-form metadata in header order; `None` when absent or `null`.
    pub fn metadata(&self) -> Option<&[(String, String)]> {
        self.metadata.as_deref()
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether the file holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Looks a tensor up by name.
    pub fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.by_name
            .get(name)
            .map(|&i| &self.tensors[i].1)
            .ok_or_else(|| Error::TensorNotFound { name: name.to_owned() })
    }

    /// Tensors in file (data-offset) order, without allocating.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &TensorInfo)> + '_ {
        self.tensors.iter().map(|(name, info)| (name.as_str(), info))
    }

    /// Tensor names in file order.
    pub fn names_in_file_order(&self) -> Vec<&str> {
        self.tensors.iter().map(|(name, _)| name.as_str()).collect()
    }

    /// Tensor names sorted by byte-wise comparison.
    pub fn names_sorted(&self) -> Vec<&str> {
        let mut names = self.names_in_file_order();
        names.sort_unstable();
        names
    }
}

/// The header as written, before the layout checks.
struct RawHeader {
    metadata: Option<Vec<(String, String)>>,
    tensors: Vec<(String, TensorInfo)>,
}

fn parse_json(text: &str) -> serde_json::Result<RawHeader> {
    let mut de = serde_json::Deserializer::from_str(text);
    let raw = de.deserialize_map(HeaderVisitor)?;
    de.end()?;
    Ok(raw)
}

struct HeaderVisitor;

impl<'de> Visitor<'de> for HeaderVisitor {
    type Value = RawHeader;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object mapping tensor names (and optionally `__metadata__`) to their descriptions")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawHeader, A::Error> {
        let mut metadata: Option<Option<Vec<(String, String)>>> = None;
        let mut tensors: Vec<(String, TensorInfo)> = Vec::new();
        let mut seen: HashMap<String, ()> = HashMap::new();
        while let Some(key) = map.next_key::<String>()? {
            if key == METADATA_KEY {
                if metadata.is_some() {
                    return Err(de::Error::duplicate_field(METADATA_KEY));
                }
                metadata = Some(map.next_value_seed(OptionalStringMap)?);
                continue;
            }
            if seen.insert(key.clone(), ()).is_some() {
                return Err(de::Error::custom(format_args!(
                    "duplicate tensor name `{}` (the format forbids it; the reference keeps the last one silently)",
                    Printable(&key)
                )));
            }
            let raw: RawTensorInfo = map.next_value()?;
            tensors.push((key, raw.into_info()?));
        }
        Ok(RawHeader { metadata: metadata.flatten(), tensors })
    }
}

/// A name from a file (tensor name, metadata key) as shown in messages and
/// listings: control characters — which could clear a terminal, move its
/// cursor or forge log lines — and the invisible characters that reorder,
/// break or hide parts of displayed text (bidirectional overrides, line and
/// paragraph separators, zero-width and other invisible format characters)
/// escaped (`\n`, `\u{1b}`, `\u{202e}`, `\u{200b}`), the rest as is.
#[derive(Debug, Clone, Copy)]
pub struct Printable<'a>(pub &'a str);

impl Printable<'_> {
    /// Whether `c` is shown escaped; the backslash too if `backslash`.
    fn escapes(c: char, backslash: bool) -> bool {
        c.is_control()
            // The escape character itself, so that no name can show as
            // another's escaped form (`a\u{202e}` typed out).
            || (backslash && c == '\\')
            || matches!(c,
                // Unicode's format characters (general category Cf, 15.1):
                // soft hyphen, bidirectional controls, zero-width characters,
                // invisible operators, tags, musical and other format marks.
                '\u{00ad}' | '\u{0600}'..='\u{0605}' | '\u{061c}' | '\u{06dd}' | '\u{070f}' | '\u{0890}'..='\u{0891}'
                | '\u{08e2}' | '\u{180e}' | '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{206f}'
                | '\u{feff}' | '\u{fff0}'..='\u{fffb}' | '\u{110bd}' | '\u{110cd}' | '\u{13430}'..='\u{1343f}'
                | '\u{1bca0}'..='\u{1bca3}' | '\u{1d173}'..='\u{1d17a}'
                // Line and paragraph separators (which break a line).
                | '\u{2028}'..='\u{2029}'
                // Other characters that show as nothing (default ignorable):
                // the combining grapheme joiner, Khmer inherent vowels,
                // variation selectors, Hangul fillers, the tag and
                // variation-selector supplement block.
                | '\u{034f}' | '\u{17b4}'..='\u{17b5}' | '\u{180b}'..='\u{180d}' | '\u{180f}' | '\u{fe00}'..='\u{fe0f}'
                | '\u{115f}'..='\u{1160}' | '\u{3164}' | '\u{ffa0}' | '\u{e0000}'..='\u{e0fff}')
    }
}

impl fmt::Display for Printable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_escaped(f, self.0, true)
    }
}

/// A line of output whose names from files were already shown through
/// [`Printable`], escaped once more as a whole, so that nothing else in it
/// (a path, an OS message) can control the terminal either. The backslash
/// is left as is: the names' own escapes are not escaped a second time.
#[derive(Debug, Clone, Copy)]
pub struct PrintableLine<'a>(pub &'a str);

impl fmt::Display for PrintableLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_escaped(f, self.0, false)
    }
}

/// JSON text (such as serde_json writes) in which every character that
/// [`Printable`] escapes and JSON writers leave as they are (DEL, the C1
/// controls, the invisible format characters) is a `\uXXXX` escape, which
/// any JSON reader reads back as the same character: what a hostile name
/// holds cannot drive a terminal through JSON output either. (Such
/// characters can only be inside strings: JSON's own syntax is ASCII.)
#[derive(Debug, Clone, Copy)]
pub struct PrintableJson<'a>(pub &'a str);

impl fmt::Display for PrintableJson<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use fmt::Write;
        for c in self.0.chars() {
            // The ASCII controls but DEL are escaped by any JSON writer,
            // and line breaks between tokens must stay.
            if (c == '\u{7f}' || !c.is_ascii()) && Printable::escapes(c, false) {
                for unit in c.encode_utf16(&mut [0; 2]) {
                    write!(f, "\\u{unit:04x}")?;
                }
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

fn write_escaped(f: &mut fmt::Formatter<'_>, text: &str, backslash: bool) -> fmt::Result {
    use fmt::Write;
    for c in text.chars() {
        if Printable::escapes(c, backslash) {
            // `\n`, `\t`… where Rust has a short form; `\u{…}` for the
            // rest, including what `escape_debug` would leave as is.
            match c.escape_debug() {
                short if short.len() > 1 => write!(f, "{short}")?,
                _ => write!(f, "{}", c.escape_unicode())?,
            }
        } else {
            f.write_char(c)?;
        }
    }
    Ok(())
}

#[derive(Deserialize)]
struct RawTensorInfo {
    dtype: DtypeCode,
    shape: Vec<usize>,
    data_offsets: Vec<usize>,
    /// Unknown fields are allowed, as by the reference. Parsing them into values
    /// (rather than skipping) applies serde_json's nesting limit to them too,
    /// so deeply nested junk is rejected like the reference rejects it.
    #[serde(flatten)]
    _unknown: HashMap<String, serde::de::IgnoredAny>,
}

impl RawTensorInfo {
    fn into_info<E: de::Error>(self) -> Result<TensorInfo, E> {
        match self.data_offsets[..] {
            [begin, end] => Ok(TensorInfo { dtype: self.dtype.0, shape: self.shape, data_offsets: (begin, end) }),
            _ => Err(E::invalid_length(self.data_offsets.len(), &"2 elements in sequence")),
        }
    }
}

struct DtypeCode(Dtype);

impl<'de> Deserialize<'de> for DtypeCode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CodeVisitor;
        impl<'de> Visitor<'de> for CodeVisitor {
            type Value = DtypeCode;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a dtype code")
            }
            fn visit_str<E: de::Error>(self, code: &str) -> Result<DtypeCode, E> {
                Dtype::from_code(code).map(DtypeCode).ok_or_else(|| E::unknown_variant(code, Dtype::CODES))
            }
        }
        deserializer.deserialize_str(CodeVisitor)
    }
}

/// `null` or an object of string values, kept in header order; duplicate keys refused.
struct OptionalStringMap;

impl<'de> DeserializeSeed<'de> for OptionalStringMap {
    type Value = Option<Vec<(String, String)>>;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for OptionalStringMap {
    type Value = Option<Vec<(String, String)>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("null or an object of string values")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut entries: Vec<(String, String)> = Vec::new();
        let mut seen: HashMap<String, ()> = HashMap::new();
        while let Some(key) = map.next_key::<String>()? {
            let value: String = map.next_value()?;
            if seen.insert(key.clone(), ()).is_some() {
                return Err(de::Error::custom(format_args!("duplicate metadata key `{}`", Printable(&key))));
            }
            entries.push((key, value));
        }
        Ok(Some(entries))
    }
}

/// Orders tensors by their data offsets and checks that they tile the data
/// section exactly, in the reference's order of checks.
fn layout(mut tensors: Vec<(String, TensorInfo)>, data_start: u64, data_len: u64) -> Result<Vec<(String, TensorInfo)>> {
    // Stable: zero-size tensors sharing an offset keep their header order.
    tensors.sort_by_key(|(_, info)| info.data_offsets);
    let mut expected = 0usize;
    for (name, info) in &tensors {
        let (begin, end) = info.data_offsets;
        if begin != expected || end < begin {
            return Err(Error::InvalidOffset {
                name: name.clone(),
                begin: begin as u64,
                end: end as u64,
                expected: expected as u64,
                file_offset: data_start.saturating_add(begin as u64),
            });
        }
        let needed = expected_byte_len(name, info.dtype, &info.shape)?;
        if end - begin != needed {
            return Err(Error::TensorInvalidInfo {
                name: name.clone(),
                dtype: info.dtype,
                shape: info.shape.clone(),
                expected: needed as u64,
                actual: (end - begin) as u64,
            });
        }
        expected = end;
    }
    if expected as u64 != data_len {
        return Err(Error::MetadataIncompleteBuffer { expected: data_start + expected as u64, actual: data_start + data_len });
    }
    Ok(tensors)
}

/// Bytes needed by a tensor, with the overflow and sub-byte checks of the format.
pub(crate) fn expected_byte_len(name: &str, dtype: Dtype, shape: &[usize]) -> Result<usize> {
    let overflow = || Error::Overflow { name: name.to_owned(), shape: shape.to_vec() };
    let elements = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).ok_or_else(overflow)?;
    let bits = elements.checked_mul(dtype.bits()).ok_or_else(overflow)?;
    if bits % 8 != 0 {
        return Err(Error::Misaligned { name: Some(name.to_owned()) });
    }
    Ok(bits / 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(json: &str, data_len: usize) -> Vec<u8> {
        let mut out = (json.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(json.as_bytes());
        out.resize(out.len() + data_len, 0);
        out
    }

    fn parse(bytes: &[u8]) -> Result<Header> {
        Header::parse_file_bytes(bytes, &ReadOptions::default()).map(|(h, _)| h)
    }

    #[test]
    fn orders_by_offset_and_keeps_metadata_order() {
        let json = r#"{"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]},"__metadata__":{"z":"1","a":"2"},"a":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}"#;
        let h = parse(&file(json, 8)).unwrap();
        assert_eq!(h.names_in_file_order(), ["a", "b"]);
        assert_eq!(h.metadata().unwrap(), [("z".to_string(), "1".to_string()), ("a".into(), "2".into())]);
        assert_eq!(h.info("b").unwrap().data_offsets, (4, 8));
    }

    #[test]
    fn reference_check_order() {
        assert!(matches!(parse(b""), Err(Error::HeaderTooSmall { file_len: 0, .. })));
        assert!(matches!(parse(&u64::MAX.to_le_bytes()), Err(Error::HeaderTooLarge { .. })));
        // Over the limit: never called truncated, whether the file ends
        // before the declared header does or not (no real file has one).
        let mut large = 150_000_000u64.to_le_bytes().to_vec();
        large.extend_from_slice(b"{}");
        let message = |file_len| Header::header_len(&large, file_len, &ReadOptions::default()).unwrap_err().to_string();
        for file_len in [300_000_000, 1_000] {
            assert!(message(file_len).contains("header too large") && !message(file_len).contains("truncated"), "{}", message(file_len));
        }
        // Under it, a file that ends inside its header is.
        let mut cut = 5_000u64.to_le_bytes().to_vec();
        cut.extend_from_slice(b"{\"a\":");
        assert!(Header::header_len(&cut, 14, &ReadOptions::default()).unwrap_err().to_string().contains("truncated"));
        assert!(matches!(parse(&100u64.to_le_bytes()), Err(Error::InvalidHeaderLength { .. })));
        assert!(matches!(parse(&file("{\"a\":1}\0", 0)), Err(Error::InvalidJson { .. })));
        let hole = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
        assert!(matches!(parse(&file(hole, 8)), Err(Error::InvalidOffset { .. })));
        let size = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#;
        assert!(matches!(parse(&file(size, 4)), Err(Error::TensorInvalidInfo { .. })));
        let f4 = r#"{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}"#;
        assert!(matches!(parse(&file(f4, 2)), Err(Error::Misaligned { .. })));
        let big = r#"{"a":{"dtype":"F32","shape":[18446744073709551615,2],"data_offsets":[0,4]}}"#;
        assert!(matches!(parse(&file(big, 4)), Err(Error::Overflow { .. })));
        let ok = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
        assert!(matches!(parse(&file(ok, 5)), Err(Error::MetadataIncompleteBuffer { .. })));
        assert!(matches!(parse(&file(ok, 3)), Err(Error::MetadataIncompleteBuffer { .. })));
        assert!(parse(&file(ok, 4)).is_ok());
    }

    #[test]
    fn stricter_than_the_reference() {
        let dup = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#;
        let err = parse(&file(dup, 2)).unwrap_err().to_string();
        assert!(err.contains("duplicate tensor name `a`"), "{err}");
        // Control characters are valid JSON in names, as in the reference;
        // messages show them escaped.
        let ctrl = "{\"a\\u001b[31m\\n\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}";
        let header = parse(&file(ctrl, 1)).unwrap();
        assert_eq!(header.iter().map(|(name, _)| name).collect::<Vec<_>>(), ["a\u{1b}[31m\n"]);
        assert_eq!(Printable("a\u{1b}[31m\n\té\u{202e}fdp.exe\u{301}").to_string(), "a\\u{1b}[31m\\n\\té\\u{202e}fdp.exe\u{301}");
        assert_eq!(Printable("w\u{200b}eight\u{feff}").to_string(), "w\\u{200b}eight\\u{feff}");
        // Other invisible characters that could pass one name off as another.
        for hidden in ['\u{ad}', '\u{180e}', '\u{e0041}', '\u{1d173}', '\u{fe0f}', '\u{3164}', '\u{2029}', '\u{17b4}', '\u{2065}', '\u{e0fff}'] {
            let shown = Printable(&format!("w{hidden}")).to_string();
            assert_eq!(shown, format!("w{}", hidden.escape_unicode()), "{hidden:?}");
        }
        // A backslash is escaped too: typed-out escapes cannot pose as real ones.
        assert_eq!(Printable("a\\u{202e}").to_string(), "a\\\\u{202e}");
        assert_ne!(Printable("a\\u{202e}").to_string(), Printable("a\u{202e}").to_string());
        let dup_meta = r#"{"__metadata__":{"k":"1","k":"2"}}"#;
        assert!(parse(&file(dup_meta, 0)).unwrap_err().to_string().contains("duplicate metadata key"));
        let top = "[]";
        assert!(matches!(parse(&file(top, 0)), Err(Error::InvalidJson { .. })));
    }

    #[test]
    fn deep_json_is_an_error_not_a_crash() {
        let deep = format!(r#"{{"a":{{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":{}{}}}}}"#, "[".repeat(100_000), "]".repeat(100_000));
        let err = parse(&file(&deep, 1)).unwrap_err().to_string();
        assert!(err.contains("recursion limit"), "{err}");
    }

    #[test]
    fn a_whole_header_that_is_not_json_is_not_called_truncated() {
        // A byte-order mark before the object: byte 8 of the text is a `{`,
        // as byte 8 of a file cut short in its header is.
        let bom = "\u{feff}{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}";
        let err = parse(&file(bom, 4)).unwrap_err().to_string();
        assert!(err.starts_with("invalid JSON in header: expected value at line 1 column 1"), "{err}");
        assert!(!err.contains("truncated"), "{err}");
    }

    #[test]
    fn printable_json_escapes_what_json_writers_leave_and_reads_back_the_same() {
        let names = ["w\u{9b}2J\u{202e}", "del\u{7f}", "tag\u{e0041}", "plain é ü 名", "esc\u{1b}[2J\nnewline"];
        let value = serde_json::json!({ "names": names });
        let text = PrintableJson(&serde_json::to_string_pretty(&value).unwrap()).to_string();
        assert!(text.contains(r"w\u009b2J\u202e") && text.contains(r"del\u007f") && text.contains(r"tag\udb40\udc41"), "{text}");
        assert!(text.contains("plain é ü 名") && text.contains(r"esc\u001b[2J\nnewline"), "{text}");
        assert!(text.chars().all(|c| (c != '\u{7f}' && c.is_ascii()) || !Printable::escapes(c, false)), "{text}");
        assert_eq!(text.lines().count(), 9, "the layout's line breaks stay: {text}");
        assert_eq!(serde_json::from_str::<serde_json::Value>(&text).unwrap(), value);
    }

    #[test]
    fn metadata_null_and_empty() {
        assert!(parse(&file(r#"{"__metadata__":null}"#, 0)).unwrap().metadata().is_none());
        assert_eq!(parse(&file(r#"{"__metadata__":{}}"#, 0)).unwrap().metadata().unwrap().len(), 0);
        let err = parse(&file(r#"{"__metadata__":{"x":1}}"#, 0)).unwrap_err().to_string();
        assert!(err.starts_with("invalid JSON in header: invalid type: integer `1`, expected a string"), "{err}");
    }
}

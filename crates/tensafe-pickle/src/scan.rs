//! The scanner: what a file would do if it were loaded with pickle.
//!
//! It runs the VM in [`Mode::Scan`] over every pickle it can find — by
//! content, never by file name: all pickles of a legacy stream, every zip
//! member that is or parses as a pickle (every copy of a duplicated name
//! too), tar members, object-dtype `.npy` payloads — and reports every
//! import, call, persistent id and anomaly with a verdict.

use std::collections::HashMap;
use std::path::Path;

use serde::Serialize;

use crate::container::{self, Kind, LEGACY_MAGIC, LEGACY_PROTOCOL};
use crate::extract;
use crate::limits::Limits;
use crate::names::Severity;
use crate::value::{Heap, Object, Value};
use crate::vm::{Mode, PickleReport, PidSchema, StorageTable, Vm, VmOptions};
use crate::zip;

/// The overall verdict for a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Only allowlisted globals and no anomaly.
    Safe,
    /// Something not allowlisted, or an anomaly.
    Suspicious,
    /// Code execution, a disguised name, or an evasion technique.
    Dangerous,
    /// The file could not be scanned completely and nothing worse was found.
    Error,
}

/// A container-level finding.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// Short kind.
    pub kind: &'static str,
    /// Details.
    pub detail: String,
    /// Severity.
    pub severity: Severity,
}

/// One scanned pickle.
#[derive(Debug, Clone, Serialize)]
pub struct PickleScan {
    /// The VM's report.
    #[serde(flatten)]
    pub report: PickleReport,
    /// Where the pickle starts in its member or file.
    pub start: u64,
    /// Whether `torch.load` (without `weights_only`) would unpickle it.
    pub torch_would_run: bool,
}

/// A tensor seen while scanning a torch checkpoint.
#[derive(Debug, Clone, Serialize)]
pub struct TensorRow {
    /// Flattened name.
    pub name: String,
    /// torch dtype.
    pub dtype: &'static str,
    /// Shape.
    pub shape: Vec<u64>,
    /// Strides.
    pub stride: Vec<u64>,
    /// Storage key.
    pub storage: String,
    /// Storage offset (elements).
    pub offset: u64,
}

/// Everything the scanner found in one file.
#[derive(Debug, Clone, Serialize)]
pub struct ScanReport {
    /// The file.
    pub path: String,
    /// What the container is.
    pub container: String,
    /// The verdict.
    pub verdict: Verdict,
    /// Why scanning was incomplete, if it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The container is one the scanner does not open (a compressed
    /// wrapper): nothing inside it was scanned.
    pub unsupported: bool,
    /// Container-level findings.
    pub findings: Vec<Finding>,
    /// Pickles scanned.
    pub pickles: Vec<PickleScan>,
    /// Non-allowlisted imports and calls a pickle-based load would execute.
    pub would_execute: Vec<String>,
    /// Tensors of a torch checkpoint (from the pickle torch would load).
    pub tensors: Vec<TensorRow>,
}

impl ScanReport {
    fn new(path: &str) -> ScanReport {
        ScanReport {
            path: path.to_owned(),
            container: String::new(),
            verdict: Verdict::Safe,
            error: None,
            unsupported: false,
            findings: vec![],
            pickles: vec![],
            would_execute: vec![],
            tensors: vec![],
        }
    }

    fn finding(&mut self, severity: Severity, kind: &'static str, detail: impl Into<String>) {
        self.findings.push(Finding { kind, detail: detail.into(), severity });
    }

    /// Whether a pickle of this report imports a name a module could
    /// answer. Code runs only through an import: a call needs a callable,
    /// which only an import gives (a persistent id is the loader's own
    /// lookup, and plain pickle.load has none), and an import of a name no
    /// module can have (bytes of a header, with NULs and braces) fails.
    fn imports_code(&self) -> bool {
        self.pickles.iter().any(|p| p.report.imports.iter().any(|i| importable(&i.global)))
    }

    /// Takes in `view`, another loader's reading of the same file, as a
    /// dangerous polyglot (`detail`); hands back the view's error, if any.
    fn absorb_polyglot(&mut self, detail: String, view: ScanReport) -> Option<String> {
        self.finding(Severity::Dangerous, "polyglot", detail);
        self.findings.extend(view.findings);
        self.pickles.extend(view.pickles);
        view.error
    }

    fn fail(&mut self, message: impl Into<String>) {
        let message = message.into();
        self.error = Some(match self.error.take() {
            Some(first) => format!("{first}; {message}"),
            None => message,
        });
    }

    /// The worst severity found.
    pub fn severity(&self) -> Severity {
        let pickles = self.pickles.iter().map(|p| p.report.severity());
        self.findings.iter().map(|f| f.severity).chain(pickles).max().unwrap_or(Severity::Safe)
    }

    fn finish(mut self) -> ScanReport {
        for p in &self.pickles {
            if p.torch_would_run || has_extension(&p.report.name, ".pkl") || self.container == "pickle" {
                for i in &p.report.imports {
                    if i.severity > Severity::Safe {
                        self.would_execute.push(format!("{}: import {} (opcode at {})", p.report.name, i.global, i.offset));
                    }
                }
                for c in &p.report.calls {
                    if c.severity > Severity::Safe {
                        self.would_execute.push(format!("{}: {} {}{} (opcode at {})", p.report.name, c.opcode, c.callee, c.args, c.offset));
                    }
                }
            }
        }
        self.verdict = match self.severity() {
            Severity::Dangerous => Verdict::Dangerous,
            Severity::Suspicious => Verdict::Suspicious,
            Severity::Safe if self.error.is_some() || self.pickles.iter().any(|p| p.report.error.is_some()) => Verdict::Error,
            Severity::Safe => Verdict::Safe,
        };
        self
    }
}

/// Scanner options.
#[derive(Debug, Clone, Default)]
pub struct ScanOptions {
    /// Limits.
    pub limits: Limits,
    /// Classes the user accepts (not a finding). Never executed.
    pub allow_opaque: Vec<String>,
}

/// Scans a file.
pub fn scan_file(path: &Path, options: &ScanOptions) -> ScanReport {
    match crate::convert::map_file(path) {
        Ok(bytes) => scan_bytes(&bytes, &path.display().to_string(), options),
        Err(e) => {
            let mut r = ScanReport::new(&path.display().to_string());
            r.container = "unreadable".into();
            r.fail(e.to_string());
            r.finish()
        }
    }
}

/// Scans bytes (`name` is used in the report).
pub fn scan_bytes(bytes: &[u8], name: &str, options: &ScanOptions) -> ScanReport {
    let mut r = ScanReport::new(name);
    let mut s = Scanner { options, heap: Heap::default(), pickles_left: MAX_PICKLES_PER_FILE };
    s.container(bytes, name, true, &mut r);
    r.finish()
}

/// What a compressed wrapper inflated to.
struct Inflated {
    /// The bytes, whole or as far as they inflated.
    bytes: Vec<u8>,
    /// Why they are not the whole, checked contents: a damaged stream or
    /// checksum, or the inflate limit. A loader that inflates as it reads
    /// (joblib) unpickles what came before, so that is scanned too.
    problem: Option<String>,
}

/// The bytes inside a zlib stream, a single-member gzip file or joblib's
/// old `ZF` file (`ZF`, the length in hex padded to 19 bytes, then zlib),
/// inflating at most `limit` bytes and checking the wrapper's checksum.
fn inflate_wrapper(kind: &str, bytes: &[u8], limit: u64) -> Inflated {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let inflated = |result: Result<Vec<u8>, miniz_oxide::inflate::DecompressError>| match result {
        Ok(bytes) => Inflated { bytes, problem: None },
        Err(e) => {
            let problem = match e.status {
                miniz_oxide::inflate::TINFLStatus::HasMoreOutput => format!("inflates past the limit of {limit} bytes"),
                status => format!("corrupt compressed data ({status:?})"),
            };
            Inflated { bytes: e.output, problem: Some(problem) }
        }
    };
    let broken = |problem: &str| Inflated { bytes: Vec::new(), problem: Some(problem.to_owned()) };
    match kind {
        // Verifies the Adler-32 trailer; joblib's reader skips one more
        // space after the header when there is one.
        "zlib" => return inflated(miniz_oxide::inflate::decompress_to_vec_zlib_with_limit(bytes, limit)),
        "joblib zfile" => {
            let at = if bytes.get(21) == Some(&b' ') { 22 } else { 21 };
            return match bytes.get(at..) {
                Some(body) => inflated(miniz_oxide::inflate::decompress_to_vec_zlib_with_limit(body, limit)),
                None => broken("truncated ZF header"),
            };
        }
        _ => {}
    }
    // RFC 1952: a 10-byte header, optional fields, raw deflate, then CRC-32
    // and the length mod 2^32 of the inflated bytes.
    const FHCRC: u8 = 2;
    const FEXTRA: u8 = 4;
    const FNAME: u8 = 8;
    const FCOMMENT: u8 = 16;
    if bytes.len() < 18 || bytes[2] != 8 {
        return broken("not a deflate gzip member");
    }
    let flags = bytes[3];
    let mut at = 10usize;
    if flags & FEXTRA != 0 {
        let Some(len) = bytes.get(at..at + 2) else { return broken("truncated gzip header") };
        at += 2 + u16::from_le_bytes([len[0], len[1]]) as usize;
    }
    for flag in [FNAME, FCOMMENT] {
        if flags & flag != 0 {
            match bytes.get(at..).and_then(|rest| rest.iter().position(|&b| b == 0)) {
                Some(end) => at += end + 1,
                None => return broken("truncated gzip header"),
            }
        }
    }
    if flags & FHCRC != 0 {
        at += 2;
    }
    let Some(body) = bytes.get(at..bytes.len() - 8) else { return broken("truncated gzip header") };
    let mut out = inflated(miniz_oxide::inflate::decompress_to_vec_with_limit(body, limit));
    let trailer = &bytes[bytes.len() - 8..];
    let (crc, size) = (u32::from_le_bytes(trailer[..4].try_into().expect("4 bytes")), u32::from_le_bytes(trailer[4..].try_into().expect("4 bytes")));
    if out.problem.is_none() && (crc32fast::hash(&out.bytes) != crc || out.bytes.len() as u32 != size) {
        out.problem = Some("the gzip trailer does not match the inflated bytes (corrupt, or more than one member)".into());
    }
    out
}

/// How to run one pickle in scan mode.
struct Run<'n> {
    /// Name in the report.
    name: &'n str,
    /// Offset of the pickle in its file or member.
    start: u64,
    /// Accepted persistent ids.
    pids: PidSchema,
    /// A pure-data pickle (legacy side pickles).
    data_only: bool,
    /// Whether torch.load would unpickle it.
    torch_would_run: bool,
}

impl<'n> Run<'n> {
    fn new(name: &'n str, start: u64, pids: PidSchema, torch_would_run: bool) -> Run<'n> {
        Run { name, start, pids, data_only: false, torch_would_run }
    }
}

struct Scanner<'o> {
    options: &'o ScanOptions,
    heap: Heap,
    /// Pickles this file may still have scanned ([`MAX_PICKLES_PER_FILE`]).
    pickles_left: usize,
}

impl<'o> Scanner<'o> {
    /// Scans `bytes` as what their content says they are (torch's
    /// detection order), into `r`; `unwrap`: whether a zlib or gzip wrapper
    /// is inflated and what it holds scanned.
    fn container(&mut self, bytes: &[u8], name: &str, unwrap: bool, r: &mut ScanReport) {
        if bytes.starts_with(b"PK\x05\x06") {
            // numpy's npz reader takes a file that starts with an end record
            // (an empty archive, or one after a few bytes) for a zip; torch
            // and pickle.load read a pickle stream, which stops at once at
            // its PERSID (`P`). Both readings are scanned.
            self.zip(bytes, r, true);
            self.as_pickle_too(bytes, name, FROM_THE_FIRST_BYTE, "a zip end record", "what torch.load and pickle.load run", r);
            return;
        }
        let kind = container::detect(bytes);
        if let Kind::Wrapper(wrapper) = kind
            && tensafe::Header::parse_file_bytes(bytes, &tensafe::ReadOptions::default()).is_ok()
        {
            // A safetensors header length can start with a compressed
            // file's magic (376 is `78 01`, zlib's): the file is what its
            // header says. joblib.load goes by the magic, though, and a
            // header can hold a valid gzip stream (stored blocks inside a
            // JSON string): that reading is scanned too, and a polyglot
            // when it imports.
            self.scan_as(Kind::Stream, bytes, name, unwrap, r);
            if unwrap {
                let mut view = ScanReport::new(name);
                self.scan_as(kind, bytes, name, true, &mut view);
                if view.imports_code() {
                    // Its inflation is no error of a safetensors file.
                    let _ = r.absorb_polyglot(format!("a safetensors file that is also a {wrapper}-compressed pickle, which joblib.load unpacks and unpickles"), view);
                }
            }
            return;
        }
        self.scan_as(kind, bytes, name, unwrap, r);
    }

    /// Scans `bytes` as a file of kind `kind`, into `r` ([`Scanner::container`]).
    fn scan_as(&mut self, kind: Kind, bytes: &[u8], name: &str, unwrap: bool, r: &mut ScanReport) {
        match kind {
            Kind::Zip => self.zip(bytes, r, true),
            Kind::Tar => {
                self.tar(bytes, r);
                // When any step of its tar path fails (a later header, a short or
                // missing member), torch unpickles the file from its first byte.
                // A real tar file is no pickle there (its first byte is a member name's).
                self.as_pickle_too(bytes, name, FROM_THE_FIRST_BYTE, "a tar archive", "what torch.load runs when the tar path fails", r);
                // numpy.load and joblib.load go by magics of their own, which
                // a tar header's first bytes (a member's name) can hold too.
                let other = match container::wrapper_kind(bytes) {
                    _ if bytes.starts_with(b"\x93NUMPY") => Some(("an .npy array, which np.load reads", Kind::Npy)),
                    Some(wrapper) => Some(("a compressed file, which joblib.load unpacks and unpickles", Kind::Wrapper(wrapper))),
                    None => None,
                };
                if let Some((what, kind)) = other {
                    let mut view = ScanReport::new(name);
                    self.scan_as(kind, bytes, name, unwrap, &mut view);
                    let detail = format!("a tar archive whose first bytes also make it {what} ({})", view.container);
                    if let Some(e) = r.absorb_polyglot(detail, view) {
                        r.fail(format!("its other reading: {e}"));
                    }
                }
            }
            Kind::Npy => {
                r.container = "npy".into();
                self.npy(bytes, name, r);
            }
            Kind::Wrapper(w @ ("zlib" | "gzip" | "joblib zfile")) if unwrap => {
                // joblib's compressed files (`compress=3` is zlib), and anything
                // else compressed whole (torch.load reads a checkpoint through
                // `gzip.open` too): inflate within the inflate budget and scan
                // what is inside as a file of its own, once (a wrapper inside is
                // not opened).
                let inflated = inflate_wrapper(w, bytes, self.options.limits.max_inflate);
                if let Some(problem) = &inflated.problem {
                    r.fail(format!("{w} wrapper: {problem}"));
                }
                if inflated.bytes.is_empty() {
                    r.container = format!("{w}-compressed file");
                } else {
                    // A damaged or cut stream too: joblib unpickles what it
                    // inflated before it reaches the damage.
                    self.container(&inflated.bytes, name, false, r);
                    let inside = if r.container == "pickle" { "pickle stream" } else { &r.container };
                    r.container = format!("{w}-compressed {inside}");
                }
            }
            Kind::Wrapper(w) => {
                r.container = format!("{w} (compressed)");
                r.unsupported = true;
                r.fail(format!(
                    "a {w}-compressed file (torch.load cannot open it directly; joblib.load would decompress and unpickle it) was not unpacked; decompress it and scan the result"
                ));
                // torch.load and pickle.load read it from its first byte: a file
                // whose magic is also a pickle opcode (bzip2's `B`) can be both.
                self.as_pickle_too(bytes, name, FROM_THE_FIRST_BYTE, &format!("{w}-compressed"), "what torch.load and pickle.load run", r);
            }
            Kind::Stream => {
                if bytes.is_empty() {
                    r.container = "empty".into();
                    r.fail("empty file");
                } else if let Ok((header, _)) = tensafe::Header::parse_file_bytes(bytes, &tensafe::ReadOptions::default()) {
                    r.container = format!("safetensors ({} tensors, no pickle)", header.len());
                    // pickle.load (and torch.load where it does not know
                    // safetensors) reads it from its first byte, which fails
                    // at once for a plain safetensors file; but a header
                    // length whose bytes start `\x80\x02V` makes the header
                    // one UNICODE line, and the tensors' bytes opcodes.
                    self.as_pickle_too(bytes, name, FROM_THE_FIRST_BYTE, "a safetensors file", "what pickle.load runs", r);
                } else {
                    self.stream(bytes, name, r);
                    if zip::has_end_record(bytes) {
                        let mut zr = ScanReport::new(name);
                        self.zip(bytes, &mut zr, false);
                        let detail = "the file starts as a pickle stream (what torch.load runs) but also ends with a zip directory (what zip-first tools read)";
                        if let Some(e) = r.absorb_polyglot(detail.into(), zr) {
                            r.fail(format!("zip view: {e}"));
                        }
                    }
                }
            }
        }
    }

    fn vm_options(&self, pids: PidSchema, data_only: bool) -> VmOptions<'o> {
        let options: &'o ScanOptions = self.options;
        VmOptions { mode: Mode::Scan, pids, data_only, allow_opaque: &options.allow_opaque, limits: &options.limits, no_trailing: false }
    }

    /// Runs one pickle in scan mode and records it.
    fn pickle(&mut self, run: Run<'_>, data: &[u8], r: &mut ScanReport) -> (Option<Value>, usize, StorageTable) {
        let mut storages = StorageTable::default();
        if self.pickles_left == 0 {
            // Each adds a report: five million `N.` pairs took gigabytes.
            // Taken as the whole input, so that a stream stops here.
            if r.error.is_none() {
                r.fail(format!("more than {MAX_PICKLES_PER_FILE} pickles in the file; `{}` and those after it were not scanned", run.name));
            }
            return (None, data.len(), storages);
        }
        self.pickles_left -= 1;
        let opts = self.vm_options(run.pids, run.data_only);
        let (outcome, mut report) = Vm::new(run.name, data, &mut self.heap, &mut storages, opts).run();
        report.name = run.name.to_owned();
        let value = outcome.result.ok();
        r.pickles.push(PickleScan { report, start: run.start, torch_would_run: run.torch_would_run });
        (value, outcome.end, storages)
    }

    /// A stream of pickles: the legacy torch format, or plain pickle(s).
    fn stream(&mut self, bytes: &[u8], name: &str, r: &mut ScanReport) {
        let mut pos = 0usize;
        let mut index = 0usize;
        let mut legacy_ok = true;
        let mut declared = StorageTable::default();
        let mut keys: Vec<String> = Vec::new();
        let mut little = true;
        let labels = ["magic number", "protocol", "sys_info", "object", "storage keys"];
        while pos < bytes.len() {
            if index == 5 && legacy_ok {
                // The legacy raw storage section follows the key list.
                match raw_section(bytes, pos, &keys, &declared, little) {
                    Ok(end) => {
                        pos = end;
                        if pos == bytes.len() {
                            break;
                        }
                        r.finding(Severity::Suspicious, "trailing-data", format!("{} bytes after the legacy storage section (offset {pos})", bytes.len() - pos));
                    }
                    Err(e) => r.finding(Severity::Suspicious, "legacy", format!("storage section: {e}")),
                }
            }
            let label = if index < 5 && index > 0 && legacy_ok {
                format!("{name} pickle {} ({}) from byte {pos}", index + 1, labels[index])
            } else {
                format!("{name} pickle {} from byte {pos}", index + 1)
            };
            let pids = if index == 3 && legacy_ok { PidSchema::Legacy } else { PidSchema::Any };
            let runs = index == 0 || (legacy_ok && index < 5);
            let data_only = index != 3 && legacy_ok && index < 5 && index > 0;
            let run = Run { data_only, ..Run::new(&label, pos as u64, pids, runs) };
            let (value, end, storages) = self.pickle(run, &bytes[pos..], r);
            let failed = r.pickles.last().is_some_and(|p| p.report.error.is_some());
            if index > 0 && !(legacy_ok && index < 5) {
                r.finding(
                    Severity::Suspicious,
                    "trailing-pickle",
                    format!("pickle at offset {pos} after the {}", if index == 1 && !legacy_ok { "first pickle" } else { "expected pickles" }),
                );
            }
            // Follow the legacy layout while it holds.
            if legacy_ok {
                legacy_ok = match (index, &value) {
                    (0, Some(Value::BigInt(b))) => **b == LEGACY_MAGIC,
                    // torch compares with `!=`: 1001.0 passes too.
                    (1, Some(Value::Int(LEGACY_PROTOCOL))) => true,
                    (1, Some(Value::Float(f))) => *f == LEGACY_PROTOCOL as f64,
                    (2, Some(v)) => {
                        little = sys_info_little(&self.heap, v).unwrap_or(true);
                        true
                    }
                    (3, Some(v)) => {
                        declared = storages;
                        self.tensor_rows(v, r);
                        true
                    }
                    (4, Some(v)) => match self.heap.object(v) {
                        Some(Object::List(items)) => {
                            keys = items.iter().filter_map(|k| k.as_str().map(str::to_owned)).collect();
                            true
                        }
                        _ => false,
                    },
                    _ => false,
                };
                if index == 0 {
                    r.container = if legacy_ok { "torch legacy stream".into() } else { "pickle".into() };
                }
            }
            index += 1;
            if failed {
                // Its report says where and why (a malformed opcode, or a limit).
                let mut why = r.pickles.last().and_then(|p| p.report.error.clone()).unwrap_or_else(|| format!("the pickle at offset {pos} failed"));
                if let Some(what) = (pos == 0).then(|| crate::container::text_not_a_pickle(bytes)).flatten() {
                    r.container = "not a pickle".into();
                    why = format!("{why}{what}");
                }
                r.fail(format!("{why}; the bytes after it were not scanned"));
                return;
            }
            pos += end;
        }
        if legacy_ok && index < 5 {
            r.finding(Severity::Suspicious, "legacy", format!("the legacy stream ends after {index} of its 5 pickles"));
        }
    }

    /// The tensor table, plus what a conversion would run into: output far
    /// larger than the storages (stride-0 or view bombs, refused by the
    /// converter's output budget) and containers shared many times.
    fn tensor_rows(&mut self, root: &Value, r: &mut ScanReport) {
        let limits = &self.options.limits;
        let options = extract::ExtractOptions { flatten: true, include_optimizer: true, ..Default::default() };
        let ex = match extract::extract(&self.heap, root, &options, limits) {
            Ok(ex) => ex,
            // Informational: quantized or sparse tensors, the table's limits.
            Err(e) => return r.finding(Severity::Safe, "tensors", format!("no tensor table: {e}")),
        };
        let mut output = 0u128;
        let mut storages: HashMap<&str, u64> = HashMap::new();
        for (name, id) in &ex.tensors {
            if let Object::Tensor(t) = self.heap.get(*id)
                && let Object::Storage(st) = self.heap.get(t.storage)
            {
                let numel = t.size.iter().fold(1u128, |n, &s| n.saturating_mul(s as u128));
                output = output.saturating_add(numel.saturating_mul(t.dtype.itemsize as u128));
                storages.insert(&st.key, st.byte_len().unwrap_or(u64::MAX));
                if r.tensors.len() < 100_000 {
                    r.tensors.push(TensorRow {
                        name: name.clone(),
                        dtype: t.dtype.name,
                        shape: t.size.clone(),
                        stride: t.stride.clone(),
                        storage: st.key.to_string(),
                        offset: t.offset,
                    });
                }
            }
        }
        let unique = storages.values().fold(0u64, |a, &b| a.saturating_add(b));
        let budget = limits.output_budget(unique);
        if output > budget as u128 {
            r.finding(
                Severity::Suspicious,
                "materialisation-bomb",
                format!(
                    "the tensors declare {output} bytes from {unique} bytes of storage (ratio {:.1}×; stride-0 or overlapping views): over the conversion budget of {budget} bytes",
                    output as f64 / unique.max(1) as f64
                ),
            );
        }
        let shared = ex.shared_references;
        if shared > 0 {
            r.finding(
                Severity::Safe,
                "shared-references",
                format!("{shared} containers are reached more than once (each is walked once; a pickle can share one object many times)"),
            );
        }
    }

    /// Scans a file of another kind (`kind`) from its first byte as a pickle
    /// too: one that imports or calls is a polyglot, its findings reported
    /// (`runs`: who would run it). A file that is no pickle adds nothing.
    fn as_pickle_too(&mut self, bytes: &[u8], name: &str, label: &str, kind: &str, runs: &str, r: &mut ScanReport) {
        let from_start = self.loaded_stream(bytes, name, label);
        if from_start.imports_code() {
            // A pickle that fails on its first bytes says nothing more.
            let _ = r.absorb_polyglot(format!("{label}: {kind}, and a pickle that imports or calls ({runs})"), from_start);
        }
    }

    /// Scans `bytes` inside a file (`name`) as a stream of pickles that a
    /// loader would run (a tar member, an object array's payload), into a
    /// report of its own for the caller to merge.
    fn loaded_stream(&mut self, bytes: &[u8], name: &str, label: &str) -> ScanReport {
        let mut inner = ScanReport::new(name);
        self.stream(bytes, label, &mut inner);
        for p in &mut inner.pickles {
            p.torch_would_run = true;
        }
        inner
    }

    fn zip(&mut self, bytes: &[u8], r: &mut ScanReport, zip_first: bool) {
        r.container = "zip".into();
        let archive = match zip::read(bytes, &self.options.limits) {
            Ok(a) => a,
            Err(e) => {
                r.fail(format!("zip: {e}"));
                return;
            }
        };
        if !zip_first {
            r.container = "zip (not at offset 0)".into();
        }
        for p in &archive.problems {
            r.finding(Severity::Dangerous, "zip", p.clone());
        }
        let names: Vec<&str> = archive.entries.iter().map(|e| e.name.as_str()).collect();
        let prefix = names.first().and_then(|n| n.split_once('/')).map(|(p, _)| p.to_owned()).unwrap_or_default();
        let foreign = container::foreign_archive_kind(&names);
        // The data.pkl torch resolves (the last of that name, in any ASCII
        // case: miniz's lookup), as `Archive::position` finds records.
        let torch_pkl = archive.position(&format!("{prefix}/data.pkl"));
        let is_torch = foreign.is_none() && torch_pkl.is_some();
        let is_npz = !names.is_empty() && names.iter().all(|n| has_extension(n, ".npy"));
        if is_torch {
            for c in &archive.case_collisions {
                r.finding(Severity::Dangerous, "zip", c.clone());
            }
        }
        r.container = match (foreign, is_torch, is_npz) {
            (Some(kind), _, _) => {
                r.finding(Severity::Dangerous, "code", format!("{kind}; code files: {}", code_files(&names)));
                "torch archive that runs code".into()
            }
            (None, true, _) => "torch zip".into(),
            (None, false, true) => "npz".into(),
            _ => "zip".into(),
        };
        if is_torch {
            let outside: Vec<&&str> = names.iter().filter(|n| !n.starts_with(&format!("{prefix}/"))).collect();
            if !outside.is_empty() {
                r.finding(
                    Severity::Dangerous,
                    "zip",
                    format!("{} entries outside the folder `{prefix}/` torch reads, e.g. `{}`", outside.len(), outside[0]),
                );
            }
        }
        // The entries torch reads as the storages' raw bytes (by index).
        let mut storage_records: std::collections::HashSet<usize> = std::collections::HashSet::new();
        let mut order: Vec<usize> = (0..archive.entries.len()).collect();
        if let Some(i) = torch_pkl {
            order.retain(|&j| j != i);
            order.insert(0, i);
        }
        let mut budget = self.options.limits.max_inflate;
        // Entries that share their bytes (central records copied, or
        // overlapping entries: both already reported) are parsed once, and
        // all parsing stops past a few times the file's size.
        let mut parsed_at = std::collections::HashSet::new();
        let mut parse_left = (bytes.len() as u64).saturating_mul(ZIP_PARSE_FACTOR).saturating_add(1 << 20);
        for i in order {
            let e = &archive.entries[i];
            if !parsed_at.insert((e.data_offset, e.method, e.compressed_size)) {
                continue;
            }
            let declared_past_budget = e.method == 8 && e.size > budget;
            let data = match archive.data(bytes, e, &mut budget) {
                Ok(d) => d,
                // The declared size is only a claim, which other readers
                // (Python's zipfile) ignore: what the entry really inflates
                // to decides. Past the budget, it is an entry the scan could
                // not read (a large checkpoint zipped again is not a sign of
                // danger); within it, the claim was false, and what it holds
                // is scanned.
                Err(_) if declared_past_budget => {
                    let raw = &bytes[e.data_offset as usize..(e.data_offset + e.compressed_size) as usize];
                    match miniz_oxide::inflate::decompress_to_vec_with_limit(raw, budget as usize) {
                        Ok(real) => {
                            r.finding(Severity::Dangerous, "zip", format!("entry `{}` declares {} inflated bytes but inflates to {}", e.name, e.size, real.len()));
                            budget -= real.len() as u64;
                            std::borrow::Cow::Owned(real)
                        }
                        Err(error) if error.status == miniz_oxide::inflate::TINFLStatus::HasMoreOutput => {
                            r.fail(format!("entry `{}` was not scanned: it inflates to more than the {budget} bytes left of the inflate limit", e.name));
                            continue;
                        }
                        Err(error) => {
                            r.finding(Severity::Dangerous, "zip", format!("entry `{}`: inflating failed ({:?})", e.name, error.status));
                            continue;
                        }
                    }
                }
                Err(msg) => {
                    r.finding(Severity::Dangerous, "zip", msg);
                    if e.method == 0 {
                        std::borrow::Cow::Borrowed(&bytes[e.data_offset as usize..(e.data_offset + e.compressed_size) as usize])
                    } else {
                        continue;
                    }
                }
            };
            if storage_records.contains(&i) {
                // Declared raw storage: checked (size, CRC, inflation), not
                // parsed; unless it is an .npy, which numpy's npz reader
                // (any zip is an npz to np.load) reads as one.
                if data.starts_with(b"\x93NUMPY") {
                    self.npy(&data, &e.name, r);
                }
                continue;
            }
            // The stored bytes: inflation has its own budget.
            match parse_left.checked_sub(e.compressed_size) {
                Some(left) => parse_left = left,
                None => {
                    r.fail(format!(
                        "the zip's entries hold more than {ZIP_PARSE_FACTOR} times the file's bytes (entries that overlap): stopped at `{}`",
                        e.name
                    ));
                    break;
                }
            }
            // numpy's npz reader goes by the magic, not the name.
            if data.starts_with(b"\x93NUMPY") {
                self.npy(&data, &e.name, r);
                continue;
            }
            let looks_like_pickle = data.first() == Some(&0x80) || has_extension(&e.name, ".pkl") || has_extension(&e.name, ".pickle");
            if !looks_like_pickle && !parses_as_pickle(&data, &self.options.limits) {
                continue;
            }
            let is_torch_pkl = Some(i) == torch_pkl;
            let pids = if is_torch_pkl || has_extension(&e.name, ".pkl") { PidSchema::Zip } else { PidSchema::None };
            let (value, end, storages) = self.pickle(Run::new(&e.name, 0, pids, is_torch_pkl || foreign.is_some()), &data, r);
            if end < data.len() && r.pickles.last().is_some_and(|p| p.report.error.is_none()) {
                r.finding(Severity::Suspicious, "trailing-data", format!("{} bytes after STOP in `{}`", data.len() - end, e.name));
                let rest = &data[end..];
                let mut tr = ScanReport::new(&e.name);
                self.stream(rest, &format!("{} (after STOP)", e.name), &mut tr);
                r.pickles.extend(tr.pickles);
            }
            if is_torch_pkl {
                for key in &storages.order {
                    let record = archive.position(&format!("{prefix}/data/{key}"));
                    storage_records.extend(record);
                    let decl = &storages.by_key[key];
                    match record.map(|at| &archive.entries[at]) {
                        None => r.finding(Severity::Suspicious, "storage", format!("storage `{key}` has no record")),
                        // torch.load refuses it: a damaged file, not a way to run code.
                        Some(rec) if Some(rec.size) != decl.byte_len() => r.finding(
                            Severity::Suspicious,
                            "storage",
                            format!("record `{}` holds {} bytes but the pickle declares {} elements of {} bytes", rec.name, rec.size, decl.numel, decl.storage_type.element_size()),
                        ),
                        Some(_) => {}
                    }
                }
                if let Some(v) = value {
                    self.tensor_rows(&v, r);
                }
            }
        }
    }

    fn tar(&mut self, bytes: &[u8], r: &mut ScanReport) {
        r.container = "legacy tar (torch < 0.1.10)".into();
        r.finding(Severity::Suspicious, "tar", "legacy tar checkpoint: torch extracts its members to a temporary directory by name");
        let mut at = 0usize;
        while at + 512 <= bytes.len() {
            let h = &bytes[at..at + 512];
            if h.iter().all(|&b| b == 0) {
                break;
            }
            let name_end = h[..100].iter().position(|&b| b == 0).unwrap_or(100);
            let prefix_end = h[345..500].iter().position(|&b| b == 0).unwrap_or(155);
            let mut name = String::from_utf8_lossy(&h[..name_end]).into_owned();
            if &h[257..262] == b"ustar" && prefix_end > 0 {
                name = format!("{}/{name}", String::from_utf8_lossy(&h[345..345 + prefix_end]));
            }
            let size_text = String::from_utf8_lossy(&h[124..136]);
            let Ok(size) = u64::from_str_radix(size_text.trim_matches(|c: char| c == '\0' || c == ' '), 8) else {
                // Base-256 and other forms tarfile reads: where the next
                // header is, and so what torch extracts, is not known here.
                r.finding(Severity::Dangerous, "tar", format!("member `{name}` at offset {at} has a size field this does not read as Python's tarfile does; the rest was not scanned"));
                return;
            };
            let kind = h[156];
            // tarfile extracts unknown types as regular files, takes a
            // directory's data to be none whatever its size says, and lets
            // PAX and GNU headers change the next member's name and size:
            // only regular members and empty directories are walked as
            // tarfile walks them.
            let walked = matches!(kind, b'0' | 0 | b'1' | b'2') || (kind == b'5' && size == 0);
            if !walked {
                r.finding(
                    Severity::Dangerous,
                    "tar",
                    format!("member `{name}` at offset {at} is of type {:?} (size {size}), which this does not read as Python's tarfile does: what torch extracts may differ from what was scanned", kind as char),
                );
            }
            let data_start = at + 512;
            let Some(data_end) = (data_start as u64).checked_add(size).filter(|&e| e <= bytes.len() as u64) else {
                r.fail(format!("tar: member `{name}` runs past the end of the file"));
                return;
            };
            let data = &bytes[data_start..data_end as usize];
            if kind == b'1' || kind == b'2' {
                r.finding(Severity::Dangerous, "tar", format!("member `{name}` is a link (torch would extract it)"));
            }
            if name.starts_with('/') || name.split('/').any(|c| c == "..") {
                r.finding(Severity::Dangerous, "tar", format!("member `{name}` escapes the extraction directory"));
            }
            if matches!(kind, b'0' | 0) && !data.is_empty() {
                let base = name.rsplit('/').next().unwrap_or(&name).to_owned();
                match base.as_str() {
                    "storages" | "tensors" => self.tar_records(data, &name, base == "storages", r),
                    _ => {
                        let tr = self.loaded_stream(data, &name, &format!("tar member `{name}`"));
                        r.pickles.extend(tr.pickles);
                        r.findings.extend(tr.findings.into_iter().filter(|f| f.kind != "legacy"));
                        if let Some(e) = tr.error {
                            r.fail(e);
                        }
                    }
                }
            }
            at = data_start + (size as usize).div_ceil(512) * 512;
        }
    }

    /// The tar `storages` / `tensors` members: a count pickle, then per
    /// record a pickle followed by raw bytes.
    fn tar_records(&mut self, data: &[u8], name: &str, storages: bool, r: &mut ScanReport) {
        let label = format!("tar member `{name}` count");
        let (count, end, _) = self.pickle(Run { data_only: true, ..Run::new(&label, 0, PidSchema::None, true) }, data, r);
        let Some(count) = count.and_then(|c| c.as_int()).filter(|&c| c >= 0) else {
            r.fail(format!("tar member `{name}`: no record count; rest not scanned"));
            return;
        };
        let mut pos = end;
        for i in 0..count {
            let label = format!("tar member `{name}` record {i}");
            let (record, end, _) = self.pickle(Run::new(&label, pos as u64, PidSchema::None, true), &data[pos..], r);
            pos += end;
            let skip = if storages {
                // (key, location, storage_type) then int64 numel and the data.
                let elsize = record
                    .as_ref()
                    .and_then(|v| self.heap.tuple(v))
                    .and_then(|t| t.get(2))
                    .and_then(|s| self.heap.global(s))
                    .and_then(|g| match g.known {
                        Some(crate::names::Known::Storage(st)) => Some(st.element_size()),
                        _ => None,
                    });
                let numel = data.get(pos..pos + 8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
                match (elsize, numel) {
                    (Some(es), Some(n)) => n.checked_mul(es).and_then(|b| b.checked_add(8)),
                    _ => None,
                }
            } else {
                // int32 ndim, 4 pad bytes, ndim sizes, ndim strides, offset.
                data.get(pos..pos + 4).map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes"))).filter(|&n| (0..=64).contains(&n)).map(|n| 8 + 16 * n as u64 + 8)
            };
            match skip.filter(|&s| (pos as u64).checked_add(s).is_some_and(|end| end <= data.len() as u64)) {
                Some(s) => pos += s as usize,
                None => {
                    r.fail(format!("tar member `{name}`: cannot follow record {i}; rest not scanned"));
                    return;
                }
            }
        }
        if storages && pos < data.len() {
            let label = format!("tar member `{name}` views");
            self.pickle(Run::new(&label, pos as u64, PidSchema::None, true), &data[pos..], r);
        }
    }

    fn npy(&mut self, bytes: &[u8], name: &str, r: &mut ScanReport) {
        let Some((header, data_start)) = npy_header(bytes) else {
            r.fail(format!("{name}: malformed .npy header"));
            return;
        };
        let payload = &bytes[data_start..];
        let objects = match canonical_npy_descr(&header) {
            // Raw elements: np.load unpickles nothing.
            Some(NpyDescr::Type(descr)) if is_plain_npy_type(descr) => return,
            Some(NpyDescr::Fields { objects: false }) => return,
            Some(NpyDescr::Fields { objects: true }) => Some("structured array with object fields"),
            Some(NpyDescr::Type(descr)) if is_object_npy_type(descr) => Some("object-dtype array"),
            _ => None,
        };
        match objects {
            Some(what) => {
                r.finding(Severity::Suspicious, "npy", format!("{name}: {what}; its payload is a pickle"));
                let tr = self.loaded_stream(payload, name, &format!("{name} payload"));
                r.pickles.extend(tr.pickles);
                if let Some(e) = tr.error {
                    r.fail(e);
                }
            }
            // A dtype not read for sure here (another spelling of one, a
            // header not in numpy's layout): numpy unpickles the payload
            // when it holds objects.
            None => self.as_pickle_too(
                payload,
                name,
                &format!("{name}'s payload read as a pickle"),
                "a .npy array whose dtype this does not read for sure",
                "what np.load(allow_pickle=True) runs when the dtype holds objects",
                r,
            ),
        }
    }
}

/// The `descr` of a `.npy` header written as numpy writes it, and nothing
/// else: `{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }`,
/// padded with spaces, ending with a newline. numpy reads the header with
/// `ast.literal_eval`, so any other text (adjacent literals that join into
/// the key, a comment holding a decoy `descr`, escapes, a key given twice)
/// may say something else to it than to a reader of the text: `None`, and
/// the caller does not take the payload for plain data.
fn canonical_npy_descr(header: &str) -> Option<NpyDescr<'_>> {
    let body = header.strip_suffix('\n')?.trim_end_matches(' ');
    let rest = body.strip_prefix("{'descr': ")?;
    let (descr, rest) = match rest.strip_prefix('[') {
        Some(_) => {
            let (objects, rest) = npy_fields(rest)?;
            (NpyDescr::Fields { objects }, rest)
        }
        None => {
            let (text, rest) = quoted(rest)?;
            (NpyDescr::Type(text), rest)
        }
    };
    let rest = rest.strip_prefix(", 'fortran_order': ")?;
    let rest = rest.strip_prefix("False").or_else(|| rest.strip_prefix("True"))?;
    let (dims, rest) = rest.strip_prefix(", 'shape': (")?.split_once(')')?;
    (npy_dims(dims) && rest == ", }").then_some(descr)
}

/// Whether `dims` is the inside of a tuple of ints as Python writes it:
/// ``, `3,`, `2, 3`.
fn npy_dims(dims: &str) -> bool {
    let number = |d: &str| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit());
    match dims.strip_suffix(',') {
        Some(one) => number(one),
        None => dims.is_empty() || dims.split(", ").all(number),
    }
}

/// What a `.npy` header's `descr` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NpyDescr<'a> {
    /// One type string.
    Type(&'a str),
    /// A list of fields (a structured array), as `dtype.descr` writes it;
    /// `objects` when a field, at any depth, holds Python objects.
    Fields { objects: bool },
}

/// A string literal in single quotes with no quote or backslash inside,
/// at the start of `text`, and the text after it.
fn quoted(text: &str) -> Option<(&str, &str)> {
    let (inside, rest) = text.strip_prefix('\'')?.split_once('\'')?;
    (!inside.contains('\\')).then_some((inside, rest))
}

/// numpy's list of fields at the start of `text` (as `repr(dtype.descr)`
/// writes it: `[('x', '<f4'), ('y', '<i8', (2,)), ('s', [...])]`, a name
/// or a `(title, name)` pair, a type or a nested list, an optional shape),
/// and the text after it; `None` for anything else, or a type not read
/// for sure.
fn npy_fields(text: &str) -> Option<(bool, &str)> {
    let mut rest = text.strip_prefix('[')?;
    let mut objects = false;
    loop {
        rest = rest.strip_prefix('(')?;
        rest = match rest.strip_prefix('(') {
            Some(pair) => {
                let (_, after) = quoted(pair)?;
                quoted(after.strip_prefix(", ")?)?.1.strip_prefix(')')?
            }
            None => quoted(rest)?.1,
        };
        rest = rest.strip_prefix(", ")?;
        rest = if rest.starts_with('[') {
            let (inner, after) = npy_fields(rest)?;
            objects |= inner;
            after
        } else {
            let (t, after) = quoted(rest)?;
            match () {
                _ if is_object_npy_type(t) => objects = true,
                _ if is_plain_npy_type(t) => {}
                _ => return None,
            }
            after
        };
        if let Some(shape) = rest.strip_prefix(", (") {
            let (dims, after) = shape.split_once(')')?;
            if !npy_dims(dims) {
                return None;
            }
            rest = after;
        }
        rest = rest.strip_prefix(')')?;
        match rest.strip_prefix(", ") {
            Some(next) => rest = next,
            None => return Some((objects, rest.strip_prefix(']')?)),
        }
    }
}

/// A numpy type string of raw elements: bool, ints, floats, complex,
/// bytes, unicode, void, datetimes (as `dtype.str` writes them).
fn is_plain_npy_type(descr: &str) -> bool {
    let t = descr.strip_prefix(['<', '>', '|', '=']).unwrap_or(descr);
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let Some(rest) = t.get(1..) else { return false };
    match t.as_bytes().first() {
        Some(b'?') => rest.is_empty(),
        Some(b'b') => rest == "1",
        Some(b'i' | b'u') => matches!(rest, "1" | "2" | "4" | "8"),
        Some(b'f') => matches!(rest, "2" | "4" | "8" | "16"),
        Some(b'c') => matches!(rest, "8" | "16" | "32"),
        Some(b'S' | b'U' | b'V') => digits(rest),
        Some(b'M' | b'm') => rest.strip_prefix('8').is_some_and(|unit| {
            unit.is_empty() || unit.strip_prefix('[').and_then(|u| u.strip_suffix(']')).is_some_and(|u| !u.is_empty() && u.bytes().all(|b| b.is_ascii_alphanumeric()))
        }),
        _ => false,
    }
}

/// A numpy type string of Python objects (`'|O'`, `'O'`, `'<O8'`).
fn is_object_npy_type(descr: &str) -> bool {
    let t = descr.strip_prefix(['<', '>', '|', '=']).unwrap_or(descr);
    t.strip_prefix('O').is_some_and(|size| size.bytes().all(|b| b.is_ascii_digit()))
}

/// The `.npy` header text and where the data start.
fn npy_header(bytes: &[u8]) -> Option<(String, usize)> {
    let major = *bytes.get(6)?;
    let (len, start): (usize, usize) = match major {
        1 => (u16::from_le_bytes(bytes.get(8..10)?.try_into().ok()?) as usize, 10),
        2 | 3 => (u32::from_le_bytes(bytes.get(8..12)?.try_into().ok()?) as usize, 12),
        _ => return None,
    };
    let text = bytes.get(start..start.checked_add(len)?)?;
    Some((String::from_utf8_lossy(text).into_owned(), start + len))
}

fn code_files(names: &[&str]) -> String {
    let code: Vec<&&str> = names.iter().filter(|n| n.contains("/code/") || n.starts_with("code/") || n.ends_with(".py")).collect();
    if code.is_empty() {
        return "none listed".into();
    }
    let shown: Vec<&str> = code.iter().take(10).map(|s| **s).collect();
    format!("{}{}", shown.join(", "), if code.len() > 10 { ", …" } else { "" })
}

/// Whether `global` (`module.name`) is a dotted path of Python
/// identifiers, which an import can find; anything else fails to import.
fn importable(global: &str) -> bool {
    global.split('.').all(|part| {
        let mut chars = part.chars();
        chars.next().is_some_and(|c| c == '_' || c.is_alphabetic()) && chars.all(|c| c == '_' || c.is_alphanumeric())
    })
}

/// The label of a file of another kind read as a pickle.
const FROM_THE_FIRST_BYTE: &str = "the file read as a pickle from its first byte";

/// Pickles scanned in one file, wherever they are (streams, zip members,
/// tar members, npy payloads): pickle.load runs one, torch's legacy format
/// five, a torch zip one.
const MAX_PICKLES_PER_FILE: usize = 10_000;

/// How many times a zip's bytes its entries may hold, all parsed together.
const ZIP_PARSE_FACTOR: u64 = 4;

/// Whether a member's name ends with `extension`, in any ASCII case (torch
/// and numpy open `DATA.PKL` and `X.NPY` as they do the lower-case names).
fn has_extension(name: &str, extension: &str) -> bool {
    name.len() >= extension.len() && name.is_char_boundary(name.len() - extension.len()) && name[name.len() - extension.len()..].eq_ignore_ascii_case(extension)
}

/// Whether bytes decode as a complete pickle (used to find pickles by content).
fn parses_as_pickle(data: &[u8], limits: &Limits) -> bool {
    if data.is_empty() || data.len() > 1 << 20 {
        return false;
    }
    let mut heap = Heap::default();
    let mut storages = StorageTable::default();
    let opts = VmOptions { mode: Mode::Scan, pids: PidSchema::None, data_only: false, allow_opaque: &[], limits, no_trailing: false };
    let (outcome, report) = Vm::new("probe", data, &mut heap, &mut storages, opts).run();
    outcome.result.is_ok() && (!report.imports.is_empty() || outcome.end == data.len())
}

fn sys_info_little(heap: &Heap, v: &Value) -> Option<bool> {
    let Some(Object::Dict(d)) = heap.object(v) else { return None };
    d.entries.iter().find(|(k, _)| k.as_str() == Some("little_endian")).and_then(|(_, v)| match v {
        Value::Bool(b) => Some(*b),
        _ => None,
    })
}

/// Follows the legacy raw storage section; returns where it ends (after
/// what torch leaves past the last storage).
fn raw_section(bytes: &[u8], mut pos: usize, keys: &[String], declared: &StorageTable, little: bool) -> Result<usize, String> {
    let mut last = None;
    for key in keys {
        let decl = declared.by_key.get(key.as_str()).ok_or_else(|| format!("key `{key}` was not declared"))?;
        pos = container::legacy_storage(bytes, pos, decl, little).map_err(|m| format!("storage `{key}` {m}"))?.end;
        last = Some(decl);
    }
    Ok(if container::legacy_tail_is_torchs(bytes.len() - pos, last) { bytes.len() } else { pos })
}

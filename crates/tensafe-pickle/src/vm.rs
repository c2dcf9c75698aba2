//! The restricted pickle machine.
//!
//! It decodes protocols 0 to 5 with CPython's semantics (marks, memo, frames,
//! Python 2 renames) but never imports or calls anything: globals are looked
//! up in an exact allowlist ([`crate::names::resolve`]) and calls to them are
//! *modelled* ([`crate::torch`]). Two modes share the code:
//!
//! * [`Mode::Convert`] stops at the first thing that is not allowlisted, with
//!   the pickle, offset, opcode and the object path being built.
//! * [`Mode::Scan`] records every import, call, persistent load, BUILD and
//!   anomaly, models unknown objects as opaque values and carries on; only a
//!   malformed stream stops it, and the events before the error are kept.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::rc::Rc;

use serde::Serialize;

use crate::error::{Error, PickleError, Result};
use crate::limits::Limits;
use crate::names::{self, Severity};
use crate::value::{DictKind, Heap, Key, Object, ObjId, Opaque, Storage, Value};

/// Strict conversion or symbolic scanning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Refuse anything not allowlisted.
    Convert,
    /// Record everything, refuse nothing but malformed input.
    Scan,
}

/// Which persistent ids the pickle may contain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PidSchema {
    /// None: a plain pickle.
    None,
    /// `('storage', type, key, location, numel)` with a decimal key.
    Zip,
    /// The legacy stream's 6-tuple with view metadata.
    Legacy,
    /// Either torch form (scanning pickles found outside their container).
    Any,
}

/// Options for one pickle.
#[derive(Debug, Clone)]
pub struct VmOptions<'o> {
    /// Convert or scan.
    pub mode: Mode,
    /// Accepted persistent ids.
    pub pids: PidSchema,
    /// A pure-data pickle (the legacy stream's side pickles): no global at all.
    pub data_only: bool,
    /// Classes (`module.Name`, or `module.*`) modelled as opaque objects instead
    /// of being refused. They are never executed; the option only means "not
    /// a finding".
    pub allow_opaque: &'o [String],
    /// Limits.
    pub limits: &'o Limits,
    /// Require the stream to end right after STOP.
    pub no_trailing: bool,
}

/// Declared storages of a checkpoint: key → (bytes, storage type), with the
/// order keys were first seen.
#[derive(Debug, Default)]
pub struct StorageTable {
    /// First declaration of each key.
    pub by_key: HashMap<Rc<str>, Storage>,
    /// Keys in first-seen order.
    pub order: Vec<Rc<str>>,
}

/// An import the pickle would make.
#[derive(Debug, Clone, Serialize)]
pub struct Import {
    /// `module.name` after the Python 2 renames.
    pub global: String,
    /// The spelling in the stream, when the renames changed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw: Option<String>,
    /// GLOBAL, STACK_GLOBAL or INST.
    pub opcode: &'static str,
    /// Byte offset.
    pub offset: u64,
    /// `allowlisted`, `user-allowed`, `unknown` or `denylisted`.
    pub status: &'static str,
    /// Severity.
    pub severity: Severity,
}

/// A call or construction the pickle would make.
#[derive(Debug, Clone, Serialize)]
pub struct Call {
    /// The callable.
    pub callee: String,
    /// Short rendering of the arguments.
    pub args: String,
    /// REDUCE, NEWOBJ, NEWOBJ_EX, INST, OBJ, BUILD, SETITEMS, ….
    pub opcode: &'static str,
    /// Byte offset.
    pub offset: u64,
    /// Whether the result is reachable from the pickle's result.
    pub reachable: bool,
    /// Severity.
    pub severity: Severity,
    #[serde(skip)]
    pub(crate) result: Option<ObjId>,
}

/// Something unusual about the stream.
#[derive(Debug, Clone, Serialize)]
pub struct Anomaly {
    /// Short kind, e.g. `frame`, `trailing-data`, `type-confusion`.
    pub kind: &'static str,
    /// Details.
    pub detail: String,
    /// Byte offset.
    pub offset: u64,
    /// Severity.
    pub severity: Severity,
}

/// What the scanner saw in one pickle.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PickleReport {
    /// Which pickle.
    pub name: String,
    /// Declared protocol.
    pub protocol: Option<u8>,
    /// Opcode histogram.
    pub opcodes: BTreeMap<&'static str, u64>,
    /// Imports.
    pub imports: Vec<Import>,
    /// Calls and constructions.
    pub calls: Vec<Call>,
    /// Persistent ids (summaries).
    pub persistent_ids: Vec<String>,
    /// Anomalies.
    pub anomalies: Vec<Anomaly>,
    /// Events not recorded because of the per-pickle cap.
    pub dropped_events: u64,
    /// Offset just past STOP (or where decoding stopped).
    pub end: u64,
    /// Why decoding stopped early, if it did.
    pub error: Option<String>,
}

impl PickleReport {
    /// The worst severity in the report.
    pub fn severity(&self) -> Severity {
        let imports = self.imports.iter().map(|i| i.severity);
        let calls = self.calls.iter().map(|c| c.severity);
        let anomalies = self.anomalies.iter().map(|a| a.severity);
        imports.chain(calls).chain(anomalies).max().unwrap_or(Severity::Safe)
    }
}

const MAX_EVENTS: usize = 10_000;
const SUMMARY: usize = 200;

/// The machine. Create one per pickle with [`Vm::new`], then [`Vm::run`].
pub struct Vm<'a, 'h> {
    name: &'a str,
    data: &'a [u8],
    pos: usize,
    frame_end: Option<usize>,
    pub(crate) stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u64, Value>,
    pub(crate) heap: &'h mut Heap,
    pub(crate) storages: &'h mut StorageTable,
    proto: Option<u8>,
    opcodes_seen: u64,
    pub(crate) opts: VmOptions<'a>,
    pub(crate) op_offset: u64,
    pub(crate) op_name: &'static str,
    work_left: u64,
    histogram: [u64; 256],
    /// How many joblib object-array pickles this one is nested in.
    nesting: u32,
    /// The scan report (events are recorded in scan mode only).
    pub report: PickleReport,
}

/// Deepest nesting of joblib object arrays (each one a pickle in a pickle).
const MAX_JOBLIB_NESTING: u32 = 16;

/// Result of one run.
pub struct Outcome {
    /// The value STOP returned, or the error that stopped decoding.
    pub result: Result<Value>,
    /// Offset just past STOP (or where decoding stopped).
    pub end: usize,
    /// Work units left (a nested pickle hands them back to its parent).
    pub(crate) work_left: u64,
}

impl<'a, 'h> Vm<'a, 'h> {
    /// A machine over `data`, named `name` in messages.
    pub fn new(
        name: &'a str,
        data: &'a [u8],
        heap: &'h mut Heap,
        storages: &'h mut StorageTable,
        opts: VmOptions<'a>,
    ) -> Vm<'a, 'h> {
        let work_left = (data.len() as u64).saturating_mul(opts.limits.work_per_byte).saturating_add(1 << 20);
        Vm {
            name,
            data,
            pos: 0,
            frame_end: None,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            heap,
            storages,
            proto: None,
            opcodes_seen: 0,
            opts,
            op_offset: 0,
            op_name: "",
            work_left,
            histogram: [0; 256],
            nesting: 0,
            report: PickleReport { name: name.to_owned(), ..Default::default() },
        }
    }

    /// Decodes one pickle, up to and including STOP.
    pub fn run(mut self) -> (Outcome, PickleReport) {
        let result = if self.data.len() as u64 > self.opts.limits.max_pickle_bytes {
            Err(self.err(format!(
                "pickle of {} bytes is larger than the limit of {} bytes",
                self.data.len(),
                self.opts.limits.max_pickle_bytes
            )))
        } else {
            self.execute()
        };
        let result = result.and_then(|v| {
            if self.opts.no_trailing && self.pos < self.data.len() {
                let extra = self.data.len() - self.pos;
                self.op_offset = self.pos as u64;
                self.op_name = "";
                self.flag(Severity::Dangerous, "trailing-data", format!("{extra} bytes after STOP"))?;
            }
            Ok(v)
        });
        for (op, n) in self.histogram.iter().enumerate() {
            if *n > 0 {
                self.report.opcodes.insert(opcode_name(op as u8), *n);
            }
        }
        self.report.protocol = self.proto;
        self.report.end = self.pos as u64;
        if self.opts.mode == Mode::Scan {
            if let Ok(root) = &result {
                let reachable = reachable_from(self.heap, root);
                for call in &mut self.report.calls {
                    call.reachable = call.result.is_some_and(|id| reachable.contains(&id));
                }
            }
            if let Err(e) = &result {
                self.report.error = Some(e.to_string());
            }
        }
        let end = self.pos;
        (Outcome { result, end, work_left: self.work_left }, self.report)
    }

    // ---- errors and events ------------------------------------------------

    /// A pickle error at the current opcode, with the object path.
    pub(crate) fn err(&self, reason: impl Into<String>) -> Error {
        Error::Pickle(Box::new(PickleError {
            pickle: self.name.to_owned(),
            offset: self.op_offset,
            opcode: (!self.op_name.is_empty()).then_some(self.op_name),
            reason: reason.into(),
            path: self.construction_path(),
        }))
    }

    /// A policy refusal: an error in convert mode, an anomaly in scan mode
    /// (and `Ok`, so the caller carries on with a fallback).
    pub(crate) fn flag(&mut self, severity: Severity, kind: &'static str, detail: impl Into<String>) -> Result<()> {
        let detail = detail.into();
        match self.opts.mode {
            Mode::Convert => Err(self.err(detail)),
            Mode::Scan => {
                self.anomaly(severity, kind, detail);
                Ok(())
            }
        }
    }

    /// Records an anomaly (scan mode only).
    pub(crate) fn anomaly(&mut self, severity: Severity, kind: &'static str, detail: String) {
        if self.opts.mode != Mode::Scan {
            return;
        }
        if self.report.anomalies.len() >= MAX_EVENTS {
            self.report.dropped_events += 1;
            return;
        }
        self.report.anomalies.push(Anomaly { kind, detail, offset: self.op_offset, severity });
    }

    fn record_call(&mut self, callee: &Value, args: &Value, severity: Severity, result: Option<ObjId>) -> Result<()> {
        if self.opts.mode != Mode::Scan {
            return Ok(());
        }
        if self.report.calls.len() >= MAX_EVENTS {
            self.report.dropped_events += 1;
            return Ok(());
        }
        self.charge(2 * SUMMARY as u64)?;
        let callee_text = match self.heap.global(callee) {
            Some(g) => g.qualified(),
            None => format!("<{}> {}", self.heap.type_name(callee), self.heap.summary(callee, SUMMARY)),
        };
        let args = self.heap.summary(args, SUMMARY);
        self.report.calls.push(Call {
            callee: callee_text,
            args,
            opcode: self.op_name,
            offset: self.op_offset,
            reachable: false,
            severity,
            result,
        });
        Ok(())
    }

    /// The hash key of `v` for a dict or set, the work of hashing and
    /// comparing it ([`Heap::costed_key`]) charged before anything hashes it:
    /// one key can be 256 strs of 64 MB.
    pub(crate) fn charged_key(&mut self, v: &Value) -> Result<Key> {
        let (key, cost) = self.heap.costed_key(v).map_err(|e| self.err(e))?;
        self.charge(cost)?;
        Ok(key)
    }

    /// Spends work units for operations that touch existing data (copies of
    /// containers), so that total time stays linear in the input size.
    pub(crate) fn charge(&mut self, units: u64) -> Result<()> {
        match self.work_left.checked_sub(units) {
            Some(left) => {
                self.work_left = left;
                Ok(())
            }
            None => Err(self.err(format!(
                "work limit reached ({} units per input byte): the pickle re-reads the same large objects too often",
                self.opts.limits.work_per_byte
            ))),
        }
    }

    /// The object being built, read off the value and mark stacks: for each
    /// open MARK, the container or call below it and the position being filled.
    fn construction_path(&self) -> Option<String> {
        let mut parts = String::new();
        for (i, &mark) in self.marks.iter().enumerate() {
            let level_end = self.marks.get(i + 1).copied().unwrap_or(self.stack.len()).min(self.stack.len());
            if mark == 0 || mark > self.stack.len() || level_end < mark {
                continue;
            }
            let n = level_end - mark;
            let below = &self.stack[mark - 1];
            match self.heap.object(below) {
                Some(Object::Dict(_)) if n >= 1 => {
                    let key = &self.stack[mark + 2 * ((n - 1) / 2)];
                    parts.push_str(&format!("[{}]", self.heap.summary(key, 60)));
                }
                Some(Object::List(items)) if n >= 1 => parts.push_str(&format!("[{}]", items.len() + n - 1)),
                Some(Object::Global(g)) if n >= 1 => parts.push_str(&format!(" → {}(…)[{}]", g.name, n - 1)),
                _ => {}
            }
        }
        (!parts.is_empty()).then_some(parts)
    }

    // ---- reading ------------------------------------------------------------

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if let Some(end) = self.frame_end {
            if self.pos == end && n > 0 {
                self.frame_end = None;
            } else if self.pos + n > end {
                self.frame_end = None;
                self.flag(
                    Severity::Dangerous,
                    "frame",
                    format!(
                        "{n}-byte read at offset {} crosses the frame end at offset {end} (CPython reading from a file drops the rest of the frame and reads on after it, so it may take other names and values from here on than this report shows)",
                        self.pos
                    ),
                )?;
            }
        }
        let left = self.data.len() - self.pos;
        if n > left {
            return Err(self.err(format!("truncated: needs {n} bytes, {left} left")));
        }
        let out = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn take_array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("take returns N bytes"))
    }

    fn readline(&mut self) -> Result<&'a [u8]> {
        let rest = &self.data[self.pos..];
        let limit = rest.len().min(self.opts.limits.max_string as usize + 1);
        let Some(nl) = rest[..limit].iter().position(|&b| b == b'\n') else {
            return Err(self.err("text argument without a terminating newline"));
        };
        let line = self.take(nl + 1)?;
        Ok(&line[..nl])
    }

    fn read_len(&mut self, len: u64, what: &str) -> Result<&'a [u8]> {
        let left = (self.data.len() - self.pos) as u64;
        if len > left {
            return Err(self.err(format!("{what} declares {len} bytes but only {left} remain")));
        }
        if len > self.opts.limits.max_string {
            return Err(self.err(format!("{what} of {len} bytes exceeds the limit of {}", self.opts.limits.max_string)));
        }
        self.take(len as usize)
    }

    // ---- stack --------------------------------------------------------------

    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    pub(crate) fn push(&mut self, v: Value) -> Result<()> {
        if self.stack.len() >= self.opts.limits.max_stack {
            return Err(self.err(format!("value stack deeper than {}", self.opts.limits.max_stack)));
        }
        // Every object the VM makes is pushed: the one place to bound them
        // (about 90 bytes each; a pickle can make one per byte).
        if self.heap.len() > self.opts.limits.max_objects {
            return Err(self.err(format!("more than {} objects", self.opts.limits.max_objects)));
        }
        self.stack.push(v);
        Ok(())
    }

    fn pop(&mut self) -> Result<Value> {
        if self.stack.len() <= self.floor() {
            return Err(self.err(if self.marks.is_empty() { "stack underflow" } else { "stack underflow (popping through a MARK)" }));
        }
        Ok(self.stack.pop().expect("checked above"))
    }

    fn top(&self) -> Result<Value> {
        if self.stack.len() <= self.floor() {
            return Err(self.err("stack underflow"));
        }
        Ok(self.stack.last().expect("checked above").clone())
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let Some(mark) = self.marks.pop() else { return Err(self.err("no MARK to pop to")) };
        Ok(self.stack.split_off(mark))
    }

    pub(crate) fn alloc(&mut self, obj: Object) -> Value {
        Value::Obj(self.heap.alloc(obj, self.op_offset))
    }

    fn memo_put(&mut self, index: u64, v: Value) -> Result<()> {
        if self.memo.len() >= self.opts.limits.max_memo && !self.memo.contains_key(&index) {
            return Err(self.err(format!("more than {} memo entries", self.opts.limits.max_memo)));
        }
        self.memo.insert(index, v);
        Ok(())
    }

    fn memo_get(&mut self, index: u64) -> Result<()> {
        match self.memo.get(&index) {
            Some(v) => {
                let v = v.clone();
                self.push(v)
            }
            None => Err(self.err(format!("memo entry {index} is not defined"))),
        }
    }

    // ---- the loop -----------------------------------------------------------

    fn execute(&mut self) -> Result<Value> {
        loop {
            self.op_offset = self.pos as u64;
            self.op_name = "";
            if self.pos >= self.data.len() {
                return Err(self.err("pickle ends before STOP"));
            }
            let op = self.take(1)?[0];
            self.op_name = opcode_name(op);
            self.histogram[op as usize] += 1;
            self.opcodes_seen += 1;
            match op {
                b'.' => return self.stop(),
                b'(' => {
                    if self.marks.len() >= self.opts.limits.max_marks {
                        return Err(self.err(format!("more than {} open MARKs", self.opts.limits.max_marks)));
                    }
                    self.marks.push(self.stack.len());
                }
                b'0' => {
                    if !self.marks.is_empty() && self.stack.len() == self.floor() {
                        self.marks.pop();
                    } else {
                        self.pop()?;
                    }
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?;
                    self.push(v)?;
                }
                b'N' => self.push(Value::None)?,
                0x88 => self.push(Value::Bool(true))?,
                0x89 => self.push(Value::Bool(false))?,
                b'I' => {
                    let line = self.readline()?;
                    let v = match line {
                        b"00" => Value::Bool(false),
                        b"01" => Value::Bool(true),
                        _ => self.text_int(line)?,
                    };
                    self.push(v)?;
                }
                b'L' => {
                    let line = self.readline()?;
                    let line = line.strip_suffix(b"L").unwrap_or(line);
                    let v = self.text_int(line)?;
                    self.push(v)?;
                }
                b'F' => {
                    let line = self.readline()?;
                    let v = match std::str::from_utf8(line).ok().and_then(|s| s.trim().parse::<f64>().ok()) {
                        Some(f) => Value::Float(f),
                        None => {
                            self.flag(Severity::Suspicious, "text", "FLOAT argument is not a number")?;
                            Value::None
                        }
                    };
                    self.push(v)?;
                }
                b'S' => {
                    let line = self.readline()?;
                    let v = match decode_string_literal(line) {
                        Some(bytes) => python2_str(bytes),
                        None => return Err(self.err("STRING argument is not a quoted string literal")),
                    };
                    self.push(v)?;
                }
                b'V' => {
                    let line = self.readline()?;
                    let v = match decode_raw_unicode_escape(line) {
                        Some(s) => Value::Str(s.into()),
                        None => {
                            self.flag(Severity::Suspicious, "text", "UNICODE argument has a bad escape or a lone surrogate")?;
                            Value::Str(String::from_utf8_lossy(line).into())
                        }
                    };
                    self.push(v)?;
                }
                b'c' | b'i' => {
                    let module = self.readline()?;
                    let name = self.readline()?;
                    let (Ok(module), Ok(name)) = (std::str::from_utf8(module), std::str::from_utf8(name)) else {
                        return Err(self.err("global name is not UTF-8"));
                    };
                    let global = self.global(module, name)?;
                    if op == b'c' {
                        self.push(global)?;
                    } else {
                        let args = self.pop_mark()?;
                        let args = self.alloc(Object::Tuple(args));
                        self.flag(Severity::Dangerous, "call-opcode", "INST calls a class; the converter never accepts it")?;
                        self.opaque_call(global, args, "INST")?;
                    }
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module.as_str(), name.as_str()) {
                        (Some(m), Some(n)) => {
                            let (m, n) = (m.to_owned(), n.to_owned());
                            let g = self.global(&m, &n)?;
                            self.push(g)?;
                        }
                        _ => {
                            let detail = format!(
                                "STACK_GLOBAL operands must be str, got {} and {}",
                                self.heap.type_name(&module),
                                self.heap.type_name(&name)
                            );
                            self.flag(Severity::Dangerous, "global", detail)?;
                            let g = self.unknown_global("?", "?");
                            self.push(g)?;
                        }
                    }
                }
                b'P' => {
                    let line = self.readline()?;
                    let pid = Value::Str(String::from_utf8_lossy(line).into());
                    self.flag(Severity::Suspicious, "persistent-id", "text PERSID (torch writes BINPERSID with a tuple)")?;
                    self.record_pid(&pid)?;
                    let callee = self.unknown_global("<persistent_load>", "PERSID");
                    self.opaque_call(callee, pid, "PERSID")?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.record_pid(&pid)?;
                    let v = self.persistent_load(pid)?;
                    self.push(v)?;
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.reduce(callable, args)?;
                    self.push(v)?;
                }
                0x81 | 0x92 => {
                    let kwargs = if op == 0x92 { Some(self.pop()?) } else { None };
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let v = self.newobj(cls, args, kwargs)?;
                    self.push(v)?;
                }
                b'o' => {
                    let mut items = self.pop_mark()?;
                    if items.is_empty() {
                        return Err(self.err("OBJ without a class"));
                    }
                    let cls = items.remove(0);
                    let args = self.alloc(Object::Tuple(items));
                    self.flag(Severity::Dangerous, "call-opcode", "OBJ calls a class; the converter never accepts it")?;
                    self.opaque_call(cls, args, "OBJ")?;
                }
                b'b' => {
                    let state = self.pop()?;
                    let target = self.top()?;
                    self.build(target, state)?;
                }
                b']' => {
                    let v = self.alloc(Object::List(Vec::new()));
                    self.push(v)?;
                }
                b')' => {
                    let v = self.alloc(Object::Tuple(Vec::new()));
                    self.push(v)?;
                }
                b'}' => {
                    let v = Value::Obj(self.heap.new_dict(DictKind::Dict, self.op_offset));
                    self.push(v)?;
                }
                0x8f => {
                    let v = Value::Obj(self.heap.new_set(false, self.op_offset));
                    self.push(v)?;
                }
                b'l' | b't' => {
                    let items = self.pop_mark()?;
                    let v = self.alloc(if op == b'l' { Object::List(items) } else { Object::Tuple(items) });
                    self.push(v)?;
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < self.floor() + n {
                        return Err(self.err("stack underflow"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    let v = self.alloc(Object::Tuple(items));
                    self.push(v)?;
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let id = self.heap.new_dict(DictKind::Dict, self.op_offset);
                    self.set_items(Value::Obj(id), items)?;
                    self.push(Value::Obj(id))?;
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    let id = self.heap.new_set(true, self.op_offset);
                    for item in items {
                        let k = self.charged_key(&item)?;
                        self.heap.set_add(id, item, k).map_err(|e| self.err(e))?;
                    }
                    self.push(Value::Obj(id))?;
                }
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    let target = self.top()?;
                    self.set_items(target, vec![key, value])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let target = self.top()?;
                    self.set_items(target, items)?;
                }
                b'a' => {
                    let value = self.pop()?;
                    let target = self.top()?;
                    self.append_items(target, vec![value])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let target = self.top()?;
                    self.append_items(target, items)?;
                }
                0x90 => {
                    let items = self.pop_mark()?;
                    let target = self.top()?;
                    self.add_items(target, items)?;
                }
                b'g' => {
                    let line = self.readline()?;
                    let index = self.text_index(line)?;
                    self.memo_get(index)?;
                }
                b'h' => {
                    let i = self.take(1)?[0] as u64;
                    self.memo_get(i)?;
                }
                b'j' => {
                    let i = u32::from_le_bytes(self.take_array()?) as u64;
                    self.memo_get(i)?;
                }
                b'p' => {
                    let line = self.readline()?;
                    let index = self.text_index(line)?;
                    let top = self.top()?;
                    self.memo_put(index, top)?;
                }
                b'q' => {
                    let i = self.take(1)?[0] as u64;
                    let top = self.top()?;
                    self.memo_put(i, top)?;
                }
                b'r' => {
                    let i = u32::from_le_bytes(self.take_array()?) as u64;
                    let top = self.top()?;
                    self.memo_put(i, top)?;
                }
                0x94 => {
                    let top = self.top()?;
                    let i = self.memo.len() as u64;
                    self.memo_put(i, top)?;
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.take_array()?);
                    self.push(Value::Int(v as i64))?;
                }
                b'K' => {
                    let v = self.take(1)?[0];
                    self.push(Value::Int(v as i64))?;
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.take_array()?);
                    self.push(Value::Int(v as i64))?;
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        self.take(1)?[0] as i64
                    } else {
                        i32::from_le_bytes(self.take_array()?) as i64
                    };
                    if n < 0 {
                        return Err(self.err("LONG4 with a negative length"));
                    }
                    let bytes = self.read_len(n as u64, "LONG")?;
                    let v = if n as u64 > self.opts.limits.max_long_bytes {
                        self.flag(
                            Severity::Suspicious,
                            "huge-int",
                            format!("{n}-byte int (limit {} bytes)", self.opts.limits.max_long_bytes),
                        )?;
                        Value::None
                    } else {
                        long_from_le(bytes)
                    };
                    self.push(v)?;
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take_array()?);
                    self.push(Value::Float(v))?;
                }
                b'T' | b'U' => {
                    let len = if op == b'T' {
                        let n = i32::from_le_bytes(self.take_array()?);
                        if n < 0 {
                            return Err(self.err("BINSTRING with a negative length"));
                        }
                        n as u64
                    } else {
                        self.take(1)?[0] as u64
                    };
                    let bytes = self.read_len(len, "string")?;
                    self.charge(len)?;
                    self.push(python2_str(bytes.to_vec()))?;
                }
                b'X' | 0x8c | 0x8d => {
                    let len = match op {
                        b'X' => u32::from_le_bytes(self.take_array()?) as u64,
                        0x8c => self.take(1)?[0] as u64,
                        _ => u64::from_le_bytes(self.take_array()?),
                    };
                    let bytes = self.read_len(len, "str")?;
                    let v = match std::str::from_utf8(bytes) {
                        Ok(s) => Value::Str(s.into()),
                        Err(_) => {
                            self.flag(Severity::Suspicious, "text", "str is not valid UTF-8 (or holds a lone surrogate)")?;
                            Value::Str(String::from_utf8_lossy(bytes).into())
                        }
                    };
                    self.push(v)?;
                }
                b'B' | b'C' | 0x8e | 0x96 => {
                    let len = match op {
                        b'B' => u32::from_le_bytes(self.take_array()?) as u64,
                        b'C' => self.take(1)?[0] as u64,
                        _ => u64::from_le_bytes(self.take_array()?),
                    };
                    let bytes = self.read_len(len, "bytes")?;
                    self.push(Value::Bytes(bytes.into()))?;
                }
                0x80 => {
                    let version = self.take(1)?[0];
                    if version > 5 {
                        return Err(self.err(format!("unsupported protocol {version}")));
                    }
                    if self.opcodes_seen != 1 || self.proto.is_some() {
                        self.flag(Severity::Suspicious, "protocol", "PROTO is not the first opcode")?;
                    }
                    self.proto = Some(version);
                }
                0x95 => {
                    let len = u64::from_le_bytes(self.take_array()?);
                    if let Some(end) = self.frame_end
                        && self.pos < end
                    {
                        self.flag(
                            Severity::Dangerous,
                            "frame",
                            format!("new FRAME before the frame ending at offset {end} is used up"),
                        )?;
                    }
                    let left = (self.data.len() - self.pos) as u64;
                    if len > left {
                        return Err(self.err(format!("FRAME of {len} bytes but only {left} remain")));
                    }
                    if len == 0 {
                        self.anomaly(Severity::Safe, "frame", "empty frame".into());
                    }
                    self.frame_end = Some(self.pos + len as usize);
                }
                0x82..=0x84 => {
                    return Err(self.err("extension-registry opcodes (EXT1/EXT2/EXT4) are refused"));
                }
                0x97 => {
                    return Err(self.err("out-of-band buffers (NEXT_BUFFER) are refused"));
                }
                // READONLY_BUFFER on in-band bytes: CPython makes a read-only
                // view of them, the same bytes (here, nothing changes).
                0x98 => {
                    if !matches!(self.top()?, Value::Bytes(_)) {
                        return Err(self.err("READONLY_BUFFER on something that is not bytes"));
                    }
                }
                _ => return Err(self.err(format!("invalid opcode 0x{op:02x}"))),
            }
        }
    }

    fn stop(&mut self) -> Result<Value> {
        let value = self.pop()?;
        if !self.stack.is_empty() || !self.marks.is_empty() {
            let detail =
                format!("{} values and {} MARKs left on the stack at STOP", self.stack.len(), self.marks.len());
            self.flag(Severity::Suspicious, "leftovers", detail)?;
        }
        Ok(value)
    }

    fn text_int(&mut self, line: &[u8]) -> Result<Value> {
        let text = std::str::from_utf8(line).unwrap_or("");
        let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
        if !digits.is_empty() && digits.len() <= 64 && digits.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(i) = text.parse::<i64>() {
                return Ok(Value::Int(i));
            }
            if let Some(v) = decimal_to_long(text) {
                return Ok(v);
            }
        }
        self.flag(Severity::Suspicious, "text", format!("text int {:?} is not plain decimal", String::from_utf8_lossy(line)))?;
        Ok(Value::None)
    }

    /// A PUT or GET index as CPython reads it (`int(line, 10)`:
    /// whitespace around it, a sign, underscores between digits).
    fn text_index(&mut self, line: &[u8]) -> Result<u64> {
        match python_decimal(line) {
            Some(i) if i >= 0 => Ok(i as u64),
            Some(_) => Err(self.err("negative memo index")),
            None => Err(self.err("memo index is not a decimal int")),
        }
    }

    // ---- globals and calls --------------------------------------------------

    fn unknown_global(&mut self, module: &str, name: &str) -> Value {
        self.alloc(Object::Global(Box::new(crate::value::Global { module: module.into(), name: name.into(), known: None })))
    }

    /// Whether the caller's patterns (`--allow-class`) allow `module.name`.
    /// Never a name the denylist knows can run code: a pattern such as
    /// `numpy.*`, meant for data classes, would otherwise let through the
    /// module's code-running functions too.
    fn user_allowed(&self, module: &str, name: &str) -> bool {
        if names::severity(module, name) == Severity::Dangerous {
            return false;
        }
        self.opts.allow_opaque.iter().any(|pattern| match pattern.strip_suffix(".*") {
            Some(prefix) => module == prefix || module.strip_prefix(prefix).is_some_and(|r| r.starts_with('.')),
            None => pattern.strip_prefix(module).and_then(|r| r.strip_prefix('.')) == Some(name),
        })
    }

    /// Resolves GLOBAL / STACK_GLOBAL / INST names. CPython would import the
    /// module here; we look the exact pair up.
    fn global(&mut self, raw_module: &str, raw_name: &str) -> Result<Value> {
        let fix_imports = self.proto.unwrap_or(0) < 3;
        let (module, name) = match fix_imports.then(|| names::python2_rename(raw_module, raw_name)).flatten() {
            Some((m, n)) => (m.to_owned(), n),
            None => (raw_module.to_owned(), raw_name.to_owned()),
        };
        let qualified = format!("{module}.{name}");
        let raw = (module != raw_module || name != raw_name).then(|| format!("{raw_module}.{raw_name}"));
        let known = names::resolve(&module, &name);
        if self.opts.data_only {
            self.flag(Severity::Dangerous, "global", format!("global `{qualified}` in a pickle that must hold plain data only"))?;
        }
        let (status, severity) = match known {
            Some(_) => ("allowlisted", Severity::Safe),
            None if self.user_allowed(&module, &name) => ("user-allowed", Severity::Safe),
            None => {
                let severity = names::severity(&module, &name);
                if self.opts.mode == Mode::Convert {
                    return Err(self.err(format!(
                        "global `{qualified}` is not allowlisted: a Python unpickler would import `{module}` here (and call `{name}` if a call follows)"
                    )));
                }
                if name.contains('.') {
                    self.anomaly(
                        Severity::Dangerous,
                        "attribute-walk",
                        format!("`{qualified}`: CPython resolves the dotted name by walking attributes"),
                    );
                }
                (if severity == Severity::Dangerous { "denylisted" } else { "unknown" }, severity)
            }
        };
        if self.opts.mode == Mode::Scan {
            if self.report.imports.len() < MAX_EVENTS {
                self.report.imports.push(Import {
                    global: qualified,
                    raw,
                    opcode: self.op_name,
                    offset: self.op_offset,
                    status,
                    severity,
                });
            } else {
                self.report.dropped_events += 1;
            }
        }
        let known = if self.opts.data_only { None } else { known };
        Ok(self.alloc(Object::Global(Box::new(crate::value::Global { module: module.into(), name: name.into(), known }))))
    }

    /// The model of calling something not allowlisted: an opaque object.
    fn opaque_call(&mut self, callee: Value, args: Value, how: &'static str) -> Result<()> {
        let severity = match self.heap.global(&callee) {
            Some(g) if g.known.is_some() || self.user_allowed(&g.module, &g.name) => Severity::Safe,
            Some(g) => names::severity(&g.module, &g.name),
            None => Severity::Dangerous,
        };
        let id = self.heap.alloc(
            Object::Opaque(Box::new(Opaque { callable: callee.clone(), args: args.clone(), how, states: vec![], items: vec![] })),
            self.op_offset,
        );
        self.record_call(&callee, &args, severity, Some(id))?;
        self.push(Value::Obj(id))
    }

    fn reduce(&mut self, callable: Value, args: Value) -> Result<Value> {
        if self.heap.tuple(&args).is_none() {
            return Err(self.err(format!("REDUCE arguments must be a tuple, got {}", self.heap.type_name(&args))));
        }
        let known = match self.heap.object(&callable) {
            Some(Object::Global(g)) => g.known,
            _ => {
                let what = self.heap.type_name(&callable);
                self.flag(Severity::Dangerous, "call", format!("REDUCE calls a {what}, not an allowlisted function"))?;
                return self.opaque_value(callable, args, "REDUCE");
            }
        };
        match known {
            Some(k) if k.is_callable() => match self.call_known(k, &args) {
                Ok(v) => {
                    if self.opts.mode == Mode::Scan {
                        self.record_call(&callable, &args, Severity::Safe, v_obj(&v))?;
                    }
                    Ok(v)
                }
                Err(reason) => {
                    let name = self.heap.global(&callable).map(|g| g.qualified()).unwrap_or_default();
                    self.flag(Severity::Suspicious, "bad-call", format!("{name}: {reason}"))?;
                    self.opaque_value(callable, args, "REDUCE")
                }
            },
            Some(_) => {
                let name = self.heap.global(&callable).map(|g| g.qualified()).unwrap_or_default();
                self.flag(Severity::Suspicious, "bad-call", format!("`{name}` is allowlisted as a value, not as a function"))?;
                self.opaque_value(callable, args, "REDUCE")
            }
            None => self.opaque_value(callable, args, "REDUCE"),
        }
    }

    fn opaque_value(&mut self, callable: Value, args: Value, how: &'static str) -> Result<Value> {
        self.opaque_call(callable, args, how)?;
        self.pop()
    }

    fn newobj(&mut self, cls: Value, args: Value, kwargs: Option<Value>) -> Result<Value> {
        if self.heap.tuple(&args).is_none() {
            return Err(self.err(format!("NEWOBJ arguments must be a tuple, got {}", self.heap.type_name(&args))));
        }
        if let Some(kw) = &kwargs {
            let empty = matches!(self.heap.object(kw), Some(Object::Dict(d)) if d.entries.is_empty());
            if !empty {
                self.flag(Severity::Suspicious, "bad-call", "NEWOBJ_EX with keyword arguments")?;
                return self.opaque_value(cls, args, "NEWOBJ_EX");
            }
        }
        let known = self.heap.global(&cls).and_then(|g| g.known);
        let made = match known {
            Some(k) => self.construct_known(k, &args),
            None => return self.opaque_value(cls, args, if kwargs.is_some() { "NEWOBJ_EX" } else { "NEWOBJ" }),
        };
        match made {
            Ok(v) => {
                if self.opts.mode == Mode::Scan {
                    self.record_call(&cls, &args, Severity::Safe, v_obj(&v))?;
                }
                Ok(v)
            }
            Err(reason) => {
                let name = self.heap.global(&cls).map(|g| g.qualified()).unwrap_or_default();
                self.flag(Severity::Suspicious, "bad-call", format!("NEWOBJ {name}: {reason}"))?;
                self.opaque_value(cls, args, "NEWOBJ")
            }
        }
    }

    fn build(&mut self, target: Value, state: Value) -> Result<()> {
        let Value::Obj(id) = target else {
            let what = self.heap.type_name(&target);
            return self.flag(Severity::Dangerous, "type-confusion", format!("BUILD on a {what}"));
        };
        let state_is_dict = matches!(self.heap.object(&state), Some(Object::Dict(_)));
        match self.heap.get_mut(id) {
            Object::Dict(d) if d.kind != DictKind::Dict && state_is_dict => d.attrs.push(state),
            Object::Opaque(o) => {
                o.states.push(state.clone());
                if self.opts.mode == Mode::Scan {
                    let callable = o.callable.clone();
                    let (severity, joblib) = match self.heap.global(&callable) {
                        Some(g) if self.user_allowed(&g.module, &g.name) => (Severity::Safe, false),
                        Some(g) => (names::severity(&g.module, &g.name), names::is_joblib_array_wrapper(&g.module, &g.name)),
                        None => (Severity::Suspicious, false),
                    };
                    self.record_call(&callable, &state, severity, Some(id))?;
                    if joblib {
                        self.skip_joblib_array(id, &state)?;
                    }
                }
            }
            // torch never writes one; its loader would call `set_(*state)`,
            // giving the tensor other bytes than the ones this reads.
            Object::Tensor(_) => {
                let detail = format!("BUILD on a tensor with a {} state (torch's loader would pass it to `set_`)", self.heap.type_name(&state));
                self.flag(Severity::Dangerous, "type-confusion", detail)?;
            }
            other => {
                let what = other.type_name();
                let detail = if state_is_dict {
                    format!("BUILD on a {what} (only OrderedDict and allowed opaque objects take a state)")
                } else {
                    format!("BUILD on a {what} with a {} state", self.heap.type_name(&state))
                };
                self.flag(Severity::Dangerous, "type-confusion", detail)?;
            }
        }
        Ok(())
    }

    /// joblib writes each numpy array into the pickle stream right after the
    /// BUILD of its `NumpyArrayWrapper` (outside any frame): a padding length
    /// byte and padding when the state has `numpy_array_alignment_bytes`,
    /// then the raw elements, or, for object arrays, a whole nested pickle
    /// that joblib's unpickler loads with `pickle.load`. Step over them as
    /// joblib does, scanning the nested pickle, so that the rest of the
    /// stream is scanned too (scan mode only: convert refuses the import).
    fn skip_joblib_array(&mut self, wrapper: ObjId, state: &Value) -> Result<()> {
        let (count, itemsize, padded) = match joblib_layout(self.heap, state) {
            Ok(layout) => layout,
            Err(m) => {
                // joblib would step over some number of bytes and go on
                // unpickling; not knowing how many, the rest is not scanned,
                // and what numpy reads differently from this is a crafted file.
                self.flag(Severity::Dangerous, "joblib", format!("joblib array whose layout this does not read as numpy does: {m}"))?;
                return Err(self.err(format!("joblib array: {m}")));
            }
        };
        if let Some(end) = self.frame_end.take()
            && self.pos != end
        {
            // joblib's reader takes the array from the file after the whole
            // frame; a frame-respecting decoder would read it here.
            self.flag(Severity::Dangerous, "frame", format!("joblib array data inside a frame ending at offset {end}"))?;
        }
        let Some(itemsize) = itemsize else {
            if self.nesting >= MAX_JOBLIB_NESTING {
                return Err(self.err(format!("joblib object arrays nested more than {MAX_JOBLIB_NESTING} deep")));
            }
            let base = self.pos as u64;
            let name = format!("{} (object array at offset {base})", self.name);
            let mut nested = Vm::new(&name, &self.data[self.pos..], self.heap, self.storages, self.opts.clone());
            nested.nesting = self.nesting + 1;
            // The parent's budget, not a fresh one per array: N arrays must not get N budgets.
            nested.work_left = self.work_left;
            let (outcome, report) = nested.run();
            self.work_left = outcome.work_left;
            self.merge_nested(report, base);
            let value = outcome.result?;
            if let Object::Opaque(o) = self.heap.get_mut(wrapper) {
                o.items.push(value);
            }
            self.pos += outcome.end;
            return Ok(());
        };
        if padded {
            let n = self.take(1)?[0] as usize;
            self.take(n)?;
        }
        let left = (self.data.len() - self.pos) as u64;
        match count.checked_mul(itemsize) {
            Some(len) if len <= left => self.pos += len as usize,
            _ => return Err(self.err(format!("joblib array of {count} × {itemsize} bytes runs past the end ({left} bytes left)"))),
        }
        Ok(())
    }

    /// Adds a nested pickle's events to this one's, at file offsets, within
    /// the same cap as this pickle's own events.
    fn merge_nested(&mut self, nested: PickleReport, base: u64) {
        fn capped<T>(list: &mut Vec<T>, items: impl IntoIterator<Item = T>, dropped: &mut u64) {
            for item in items {
                if list.len() < MAX_EVENTS {
                    list.push(item);
                } else {
                    *dropped += 1;
                }
            }
        }
        let r = &mut self.report;
        r.dropped_events += nested.dropped_events;
        capped(&mut r.imports, nested.imports.into_iter().map(|i| Import { offset: i.offset + base, ..i }), &mut r.dropped_events);
        capped(&mut r.calls, nested.calls.into_iter().map(|c| Call { offset: c.offset + base, ..c }), &mut r.dropped_events);
        capped(&mut r.anomalies, nested.anomalies.into_iter().map(|a| Anomaly { offset: a.offset + base, ..a }), &mut r.dropped_events);
        capped(&mut r.persistent_ids, nested.persistent_ids, &mut r.dropped_events);
        for (op, n) in nested.opcodes {
            *r.opcodes.entry(op).or_default() += n;
        }
    }

    fn set_items(&mut self, target: Value, items: Vec<Value>) -> Result<()> {
        if !items.len().is_multiple_of(2) {
            return Err(self.err("odd number of items for a dict"));
        }
        let Value::Obj(id) = target else {
            let what = self.heap.type_name(&target);
            return self.flag(Severity::Dangerous, "type-confusion", format!("item assignment on a {what}"));
        };
        match self.heap.get(id) {
            Object::Dict(_) => {
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    let hashed = self.charged_key(&k)?;
                    let repeated = self.heap.dict_set(id, k.clone(), hashed, v).map_err(|e| self.err(e))?;
                    if repeated {
                        let key = self.heap.summary(&k, 60);
                        self.anomaly(Severity::Safe, "repeated-key", format!("key {key} set twice"));
                    }
                }
                Ok(())
            }
            Object::Opaque(_) => self.opaque_items(id, items, "__setitem__"),
            other => {
                let what = other.type_name();
                self.flag(
                    Severity::Dangerous,
                    "type-confusion",
                    format!("item assignment on a {what} (only dicts take SETITEM(S))"),
                )
            }
        }
    }

    fn append_items(&mut self, target: Value, items: Vec<Value>) -> Result<()> {
        let Value::Obj(id) = target else {
            let what = self.heap.type_name(&target);
            return self.flag(Severity::Dangerous, "type-confusion", format!("APPEND on a {what}"));
        };
        match self.heap.get_mut(id) {
            Object::List(list) => {
                list.extend(items);
                Ok(())
            }
            Object::Opaque(_) => self.opaque_items(id, items, "append/extend"),
            other => {
                let what = other.type_name();
                self.flag(Severity::Dangerous, "type-confusion", format!("APPEND on a {what} (only lists take APPEND(S))"))
            }
        }
    }

    fn add_items(&mut self, target: Value, items: Vec<Value>) -> Result<()> {
        let Value::Obj(id) = target else {
            let what = self.heap.type_name(&target);
            return self.flag(Severity::Dangerous, "type-confusion", format!("ADDITEMS on a {what}"));
        };
        match self.heap.get(id) {
            Object::Set(s) if !s.frozen => {
                for item in items {
                    let k = self.charged_key(&item)?;
                    self.heap.set_add(id, item, k).map_err(|e| self.err(e))?;
                }
                Ok(())
            }
            Object::Opaque(_) => self.opaque_items(id, items, "add"),
            other => {
                let what = other.type_name();
                self.flag(Severity::Dangerous, "type-confusion", format!("ADDITEMS on a {what}"))
            }
        }
    }

    /// Container opcodes on an opaque object: Python would call one of its
    /// methods. Kept (so tensors inside stay reachable) and reported.
    fn opaque_items(&mut self, id: ObjId, items: Vec<Value>, method: &str) -> Result<()> {
        let callable = match self.heap.get(id) {
            Object::Opaque(o) => o.callable.clone(),
            _ => unreachable!("caller checked"),
        };
        let (allowed, severity) = match self.heap.global(&callable) {
            Some(g) if self.user_allowed(&g.module, &g.name) => (true, Severity::Safe),
            Some(g) => (false, names::severity(&g.module, &g.name)),
            None => (false, Severity::Suspicious),
        };
        if !allowed {
            self.flag(severity, "method-call", format!("{} would call `{method}` on an object that was not modelled", self.op_name))?;
        }
        if let Object::Opaque(o) = self.heap.get_mut(id) {
            o.items.extend(items);
        }
        Ok(())
    }

    fn record_pid(&mut self, pid: &Value) -> Result<()> {
        if self.opts.mode == Mode::Scan {
            if self.report.persistent_ids.len() < MAX_EVENTS {
                self.charge(SUMMARY as u64)?;
                let text = self.heap.summary(pid, SUMMARY);
                self.report.persistent_ids.push(text);
            } else {
                self.report.dropped_events += 1;
            }
        }
        Ok(())
    }
}

fn v_obj(v: &Value) -> Option<ObjId> {
    match v {
        Value::Obj(id) => Some(*id),
        _ => None,
    }
}

/// Ids of the objects reachable from `root` (iterative, linear).
pub fn reachable_from(heap: &Heap, root: &Value) -> HashSet<ObjId> {
    let mut seen = HashSet::new();
    let mut todo: Vec<ObjId> = v_obj(root).into_iter().collect();
    while let Some(id) = todo.pop() {
        if !seen.insert(id) {
            continue;
        }
        let mut children: Vec<&Value> = Vec::new();
        match heap.get(id) {
            Object::Tuple(items) | Object::List(items) => children.extend(items),
            Object::Set(s) => children.extend(&s.items),
            Object::Dict(d) => {
                for (k, v) in &d.entries {
                    children.push(k);
                    children.push(v);
                }
                children.extend(&d.attrs);
            }
            Object::Tensor(t) => {
                todo.push(t.storage);
                children.extend(&t.attrs);
            }
            Object::Opaque(o) => {
                children.push(&o.callable);
                children.push(&o.args);
                children.extend(&o.states);
                children.extend(&o.items);
            }
            Object::Global(_) | Object::Storage(_) | Object::Complex(..) | Object::Layout(_) | Object::Unconvertible(_) => {}
        }
        todo.extend(children.into_iter().filter_map(v_obj));
    }
    seen
}

/// A LONG1/LONG4 payload: little-endian two's complement.
fn long_from_le(bytes: &[u8]) -> Value {
    if bytes.is_empty() {
        return Value::Int(0);
    }
    let negative = bytes[bytes.len() - 1] & 0x80 != 0;
    let fill = if negative { 0xff } else { 0 };
    // Minimal form: drop redundant sign bytes.
    let mut len = bytes.len();
    while len > 1 && bytes[len - 1] == fill && (bytes[len - 2] & 0x80 != 0) == negative {
        len -= 1;
    }
    let bytes = &bytes[..len];
    if len <= 8 {
        let mut buf = [fill; 8];
        buf[..len].copy_from_slice(bytes);
        Value::Int(i64::from_le_bytes(buf))
    } else {
        Value::BigInt(bytes.into())
    }
}

/// Decimal text as Python's `int(text, 10)` reads it, within an `i64`:
/// ASCII whitespace around it, an optional sign, digits with single
/// underscores between them.
fn python_decimal(line: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(line).ok()?.trim_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let (negative, digits) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    if digits.is_empty() || digits.starts_with('_') || digits.ends_with('_') || digits.contains("__") || !digits.bytes().all(|b| b.is_ascii_digit() || b == b'_') {
        return None;
    }
    let magnitude: i64 = digits.replace('_', "").parse().ok()?;
    Some(if negative { -magnitude } else { magnitude })
}

/// Plain decimal text to a big int (two's complement LE bytes), ≤ 64 digits.
fn decimal_to_long(text: &str) -> Option<Value> {
    let (negative, digits) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    // Magnitude as little-endian base-256 digits.
    let mut mag: Vec<u8> = vec![0];
    for d in digits.bytes() {
        let mut carry = (d - b'0') as u32;
        for byte in mag.iter_mut() {
            let v = *byte as u32 * 10 + carry;
            *byte = v as u8;
            carry = v >> 8;
        }
        while carry > 0 {
            mag.push(carry as u8);
            carry >>= 8;
        }
    }
    mag.push(0); // room for the sign bit
    if negative {
        let mut carry = 1u16;
        for byte in mag.iter_mut() {
            let v = (!*byte) as u16 + carry;
            *byte = v as u8;
            carry = v >> 8;
        }
    }
    Some(long_from_le(&mag))
}

/// A Python 2 `str`: kept as str when it is UTF-8, else as bytes.
fn python2_str(bytes: Vec<u8>) -> Value {
    match String::from_utf8(bytes) {
        Ok(s) => Value::Str(s.into()),
        Err(e) => Value::Bytes(e.into_bytes().into()),
    }
}

/// The protocol 0 STRING argument: a quoted literal with Python 2 escapes.
fn decode_string_literal(line: &[u8]) -> Option<Vec<u8>> {
    let (&q, rest) = line.split_first()?;
    if !(q == b'\'' || q == b'"') || rest.last() != Some(&q) {
        return None;
    }
    let body = &rest[..rest.len() - 1];
    let mut out = Vec::with_capacity(body.len());
    let mut i = 0;
    while i < body.len() {
        let c = body[i];
        i += 1;
        if c != b'\\' {
            out.push(c);
            continue;
        }
        let e = *body.get(i)?;
        i += 1;
        match e {
            b'\\' | b'\'' | b'"' => out.push(e),
            b'n' => out.push(b'\n'),
            b't' => out.push(b'\t'),
            b'r' => out.push(b'\r'),
            b'a' => out.push(7),
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'v' => out.push(11),
            b'\n' => {}
            b'x' => {
                let hex = body.get(i..i + 2)?;
                out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                i += 2;
            }
            b'0'..=b'7' => {
                let mut v = (e - b'0') as u32;
                for _ in 0..2 {
                    match body.get(i) {
                        Some(d @ b'0'..=b'7') => {
                            v = v * 8 + (d - b'0') as u32;
                            i += 1;
                        }
                        _ => break,
                    }
                }
                out.push(v as u8);
            }
            other => {
                out.push(b'\\');
                out.push(other);
            }
        }
    }
    Some(out)
}

/// The protocol 0 UNICODE argument: latin-1 with `\uXXXX` / `\UXXXXXXXX`.
fn decode_raw_unicode_escape(line: &[u8]) -> Option<String> {
    let mut out = String::with_capacity(line.len());
    let mut i = 0;
    while i < line.len() {
        let c = line[i];
        if c == b'\\' && matches!(line.get(i + 1), Some(b'u' | b'U')) {
            // An odd run of backslashes escapes; CPython counts them.
            let run = line[..i].iter().rev().take_while(|&&b| b == b'\\').count();
            if run % 2 == 0 {
                let n = if line[i + 1] == b'u' { 4 } else { 8 };
                let hex = std::str::from_utf8(line.get(i + 2..i + 2 + n)?).ok()?;
                out.push(char::from_u32(u32::from_str_radix(hex, 16).ok()?)?);
                i += 2 + n;
                continue;
            }
        }
        out.push(c as char);
        i += 1;
    }
    Some(out)
}

/// From a `NumpyArrayWrapper` state: the element count, the element size
/// (`None` for object arrays) and whether a padding length byte comes first.
fn joblib_layout(heap: &Heap, state: &Value) -> std::result::Result<(u64, Option<u64>, bool), String> {
    let Some(Object::Dict(d)) = heap.object(state) else { return Err("the wrapper's state is not a dict".into()) };
    let get = |key: &str| d.entries.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v);
    let shape = get("shape").and_then(|v| heap.tuple(v)).ok_or("no shape tuple")?;
    let count = shape.iter().try_fold(1u64, |n, dim| {
        let dim = dim.as_int().filter(|&d| d >= 0).ok_or("a shape entry is not a non-negative int")?;
        n.checked_mul(dim as u64).ok_or("the element count overflows")
    })?;
    // numpy.dtype(code, False, True) with BUILD state (version, byte order,
    // subarray, names, fields, elsize, alignment, flags), as numpy's
    // `dtype.__reduce__` writes it.
    let Some(Object::Opaque(dtype)) = get("dtype").and_then(|v| heap.object(v)) else { return Err("no dtype object".into()) };
    let code = heap.tuple(&dtype.args).and_then(|a| a.first()).and_then(Value::as_str).ok_or("the dtype has no type code")?;
    let state = dtype.states.first().and_then(|s| heap.tuple(s));
    let field = |i: usize| state.and_then(|t| t.get(i));
    let elsize = field(5).and_then(Value::as_int).filter(|&e| e > 0);
    // NPY_ITEM_REFCOUNT: the elements hold Python objects (joblib then
    // pickles the whole array: a nested pickle), whatever the code says.
    let holds_objects = field(7).and_then(Value::as_int).is_some_and(|flags| flags & 1 != 0);
    let code_kind = numpy_reduce_code(code);
    // A subarray, field names or fields: structured, which numpy writes as
    // void (`V12`); its size is the state's.
    let structured = [2, 3, 4].into_iter().any(|i| field(i).is_some_and(|v| !matches!(v, Value::None)));
    if structured && code_kind != Some(NumpyCode::Void) {
        return Err(format!("dtype {code:?} has a subarray or fields"));
    }
    let itemsize = match code_kind {
        Some(NumpyCode::Objects) => None,
        // Structured with an object field: joblib pickles the array.
        Some(NumpyCode::Void) if holds_objects => None,
        _ if holds_objects => return Err(format!("dtype {code:?} is flagged as holding objects")),
        Some(NumpyCode::Fixed(size)) => Some(size),
        // Strings and void: the state's element size is the size.
        Some(NumpyCode::Strings | NumpyCode::Void) => Some(elsize.ok_or_else(|| format!("dtype {code:?} has no element size in its state"))? as u64),
        None => return Err(format!("dtype code {code:?} is not one numpy's pickling writes")),
    };
    let padded = get("numpy_array_alignment_bytes").is_some_and(|v| !matches!(v, Value::None));
    Ok((count, itemsize, padded))
}

/// What a dtype code in numpy's pickling form (`dtype.__reduce__`: a kind
/// letter and the element size, e.g. `f8`, `u1`, `O8`, `U20`, after an
/// optional byte-order character) says about its elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NumpyCode {
    /// Raw elements of this many bytes.
    Fixed(u64),
    /// Bytes or str: the size is the state's.
    Strings,
    /// Void, the code of structured dtypes: the size is the state's.
    Void,
    /// Python objects (a nested pickle in joblib's files).
    Objects,
}

/// The codes numpy's pickling writes, and nothing else: numpy takes many
/// other spellings (`uint8`, `object`, `d`), and one read wrongly here is
/// an array stepped over by the wrong number of bytes.
fn numpy_reduce_code(code: &str) -> Option<NumpyCode> {
    let code = code.strip_prefix(['<', '>', '=', '|']).unwrap_or(code);
    let (kind, size) = code.split_at_checked(1)?;
    let fixed = |sizes: &[&str]| sizes.contains(&size).then(|| NumpyCode::Fixed(size.parse().expect("digits")));
    match kind {
        "b" => fixed(&["1"]),
        "i" | "u" => fixed(&["1", "2", "4", "8"]),
        "f" => fixed(&["2", "4", "8", "16"]),
        "c" => fixed(&["8", "16", "32"]),
        "M" | "m" => fixed(&["8"]),
        "O" => matches!(size, "" | "4" | "8").then_some(NumpyCode::Objects),
        "S" | "U" | "V" if size.is_empty() || !size.bytes().all(|b| b.is_ascii_digit()) => None,
        "S" | "U" => Some(NumpyCode::Strings),
        "V" => Some(NumpyCode::Void),
        _ => None,
    }
}

/// Opcode names, as `pickletools` spells them.
pub fn opcode_name(op: u8) -> &'static str {
    match op {
        b'(' => "MARK",
        b'.' => "STOP",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'F' => "FLOAT",
        b'I' => "INT",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'L' => "LONG",
        b'M' => "BININT2",
        b'N' => "NONE",
        b'P' => "PERSID",
        b'Q' => "BINPERSID",
        b'R' => "REDUCE",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'X' => "BINUNICODE",
        b'a' => "APPEND",
        b'b' => "BUILD",
        b'c' => "GLOBAL",
        b'd' => "DICT",
        b'}' => "EMPTY_DICT",
        b'e' => "APPENDS",
        b'g' => "GET",
        b'h' => "BINGET",
        b'i' => "INST",
        b'j' => "LONG_BINGET",
        b'l' => "LIST",
        b']' => "EMPTY_LIST",
        b'o' => "OBJ",
        b'p' => "PUT",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        b's' => "SETITEM",
        b't' => "TUPLE",
        b')' => "EMPTY_TUPLE",
        b'u' => "SETITEMS",
        b'G' => "BINFLOAT",
        0x80 => "PROTO",
        0x81 => "NEWOBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        0x8a => "LONG1",
        0x8b => "LONG4",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        0x8e => "BINBYTES8",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        0x93 => "STACK_GLOBAL",
        0x94 => "MEMOIZE",
        0x95 => "FRAME",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => "INVALID",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longs_decode_like_python() {
        assert!(matches!(long_from_le(&[]), Value::Int(0)));
        assert!(matches!(long_from_le(&[0xff]), Value::Int(-1)));
        assert!(matches!(long_from_le(&[0x80, 0x00]), Value::Int(128)));
        assert!(matches!(long_from_le(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f, 0, 0]), Value::Int(i64::MAX)));
        let Value::BigInt(b) = long_from_le(&[0, 0, 0, 0, 0, 0, 0, 0x80, 0]) else { panic!() };
        assert_eq!(&*b, &[0, 0, 0, 0, 0, 0, 0, 0x80, 0]);
        let Value::BigInt(m) = decimal_to_long("119547037146038801333356").unwrap() else { panic!() };
        assert_eq!(&*m, &[0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19]);
        assert!(matches!(decimal_to_long("-5"), Some(Value::Int(-5))));
    }

    #[test]
    fn text_literals() {
        assert_eq!(decode_string_literal(b"'a\\x41\\n\\101'").unwrap(), b"aA\nA");
        assert!(decode_string_literal(b"'abc").is_none());
        assert_eq!(decode_raw_unicode_escape(b"caf\\u00e9 \xe9").unwrap(), "café é");
        assert!(decode_raw_unicode_escape(b"\\ud800").is_none());
    }
}

//! From the object tree to named tensors: root selection, naming, and the
//! non-tensor values around them. The walk is iterative, keeps a visited set
//! (cycles are legal in pickle; shared subtrees are emitted once) and stops
//! at the nesting and path limits.

use std::collections::{HashMap, HashSet};

use serde_json::json;

use crate::error::{Error, Result};
use crate::limits::Limits;
use crate::value::{Heap, Object, ObjId, Value};

/// Keys tried, in order, for the state dict inside a training checkpoint.
pub const STATE_DICT_KEYS: &[&str] = &["state_dict", "model_state_dict", "model", "module", "state_dict_ema"];

/// Top-level keys holding optimizer state, skipped unless asked for.
pub const OPTIMIZER_KEYS: &[&str] = &["optimizer", "optimizer_state_dict", "optimizer_states", "optim", "lr_schedulers"];

/// How to find the tensors.
#[derive(Debug, Clone, Default)]
pub struct ExtractOptions {
    /// Dotted key path of the state dict (e.g. `model.ema`).
    pub key: Option<String>,
    /// Walk every container when no state dict is found.
    pub flatten: bool,
    /// Also convert optimizer state (prefixed with its top-level key).
    pub include_optimizer: bool,
    /// Refuse meta tensors instead of skipping them with a warning.
    pub strict_meta: bool,
}

/// Named tensors plus what was left out.
#[derive(Debug, Default)]
pub struct Extracted {
    /// Path of the selected root (empty: the top level).
    pub root: String,
    /// Tensor name → tensor object.
    pub tensors: Vec<(String, ObjId)>,
    /// Non-tensor values: path → value.
    pub non_tensors: Vec<(String, Value)>,
    /// Things not converted: path → reason.
    pub skipped: Vec<(String, String)>,
    /// How many of `skipped` are containers reached a second time (a
    /// pickle can share one object many times; each is walked once).
    pub shared_references: usize,
}

struct Walker<'h> {
    heap: &'h Heap,
    holders: HashSet<ObjId>,
    counted: HashSet<ObjId>,
    limits: &'h Limits,
    options: &'h ExtractOptions,
    visited: HashMap<ObjId, String>,
    names: HashSet<String>,
    /// Bytes of all the paths named so far, within `limits.max_path_bytes`.
    path_bytes: u64,
    out: Extracted,
}

/// The first 80 characters of a path, for messages (a path can be megabytes).
fn start_of(path: &str) -> String {
    match path.char_indices().nth(80) {
        Some((end, _)) => format!("{}…", &path[..end]),
        None => path.to_owned(),
    }
}

fn join(prefix: &str, part: &str) -> String {
    if prefix.is_empty() { part.to_owned() } else { format!("{prefix}.{part}") }
}

/// A dict key as a name part: str as is, ints in decimal.
fn key_name(heap: &Heap, k: &Value) -> std::result::Result<String, String> {
    match k {
        Value::Str(s) => Ok(s.to_string()),
        Value::Int(i) => Ok(i.to_string()),
        other => Err(format!("a {} key ({}) cannot name a tensor", heap.type_name(other), heap.summary(other, 40))),
    }
}

fn dict_get<'a>(heap: &'a Heap, v: &Value, key: &str) -> Option<&'a Value> {
    match heap.object(v)? {
        Object::Dict(d) => d.entries.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v),
        _ => None,
    }
}

/// A tensor, or a tensor kind safetensors cannot hold (meta, quantized,
/// sparse): both make a dict a state dict.
fn is_tensor(heap: &Heap, v: &Value) -> bool {
    matches!(heap.object(v), Some(Object::Tensor(_) | Object::Unconvertible(_)))
}

/// Finds the state dict and names every tensor under it.
pub fn extract(heap: &Heap, root: &Value, options: &ExtractOptions, limits: &Limits) -> Result<Extracted> {
    let mut w = Walker { heap, holders: tensor_holders(heap, root), counted: HashSet::new(), limits, options, visited: HashMap::new(), names: HashSet::new(), path_bytes: 0, out: Extracted::default() };
    let top_dict = match heap.object(root) {
        Some(Object::Dict(d)) => Some(d),
        _ => None,
    };
    if is_tensor(heap, root) {
        return Err(Error::Structure(
            "the checkpoint is one tensor, not a dict of named tensors: safetensors stores tensors by name, and this one has none".into(),
        ));
    }
    // A state dict: tensors by name, and maybe values that hold none (a
    // module's `_extra_state`, a step count); nothing nested holds tensors.
    let flat_state_dict = top_dict.is_some_and(|d| {
        d.entries.iter().any(|(_, v)| is_tensor(heap, v)) && d.entries.iter().all(|(_, v)| is_tensor(heap, v) || !w.holds_tensor(v))
    });
    let whole_module = matches!(heap.object(root), Some(Object::Opaque(o)) if module_state(heap, o).is_some());
    let selected: Option<(String, Value)> = if let Some(key) = &options.key {
        let mut v = root.clone();
        for part in key.split('.') {
            v = dict_get(heap, &v, part)
                .ok_or_else(|| Error::Structure(format!("--key {key}: no entry `{part}` (the top level has {})", describe_keys(heap, root))))?
                .clone();
        }
        Some((key.clone(), v))
    } else if flat_state_dict || whole_module {
        Some((String::new(), root.clone()))
    } else {
        STATE_DICT_KEYS.iter().find_map(|k| {
            dict_get(heap, root, k).filter(|v| w.holds_tensor(v) && !is_tensor(heap, v)).map(|v| (k.to_string(), v.clone()))
        })
    };
    match selected {
        Some((path, value)) => {
            w.out.root = path.clone();
            // A tensor picked by --key is named by the key.
            let prefix = if is_tensor(heap, &value) { path.as_str() } else { "" };
            w.walk(&value, prefix)?;
            // Everything beside the root: reported, or converted when it is
            // optimizer state and that was asked for.
            if let Some(d) = top_dict
                && !path.is_empty()
            {
                let top = path.split('.').next().unwrap_or_default();
                for (k, v) in &d.entries {
                    let name = key_name(heap, k).unwrap_or_else(|_| heap.summary(k, 40));
                    if name == top {
                        continue;
                    }
                    w.beside(&name, v)?;
                }
            }
        }
        None if options.flatten => {
            w.out.root = String::new();
            if let (Some(d), Value::Obj(id)) = (top_dict, root) {
                w.visited.insert(*id, "<top level>".into());
                for (k, v) in &d.entries {
                    let name = key_name(heap, k).map_err(Error::Structure)?;
                    if OPTIMIZER_KEYS.contains(&name.as_str()) {
                        w.beside(&name, v)?;
                    } else {
                        w.walk(v, &name)?;
                    }
                }
            } else {
                w.walk(root, "")?;
            }
        }
        None => {
            return Err(Error::Structure(format!(
                "no state dict found: the top level is {} with {}; pass --key KEY to pick one, or --flatten to convert every tensor",
                heap.type_name(root),
                describe_keys(heap, root)
            )));
        }
    }
    if w.out.tensors.is_empty() {
        return Err(Error::Structure("the checkpoint holds no tensor to convert".into()));
    }
    Ok(w.out)
}

fn describe_keys(heap: &Heap, v: &Value) -> String {
    match heap.object(v) {
        Some(Object::Dict(d)) => {
            let keys: Vec<String> = d.entries.iter().take(12).map(|(k, _)| heap.summary(k, 40)).collect();
            format!("keys [{}{}]", keys.join(", "), if d.entries.len() > 12 { ", …" } else { "" })
        }
        _ => "no keys".into(),
    }
}

fn children(heap: &Heap, id: ObjId) -> Vec<ObjId> {
    let ids = |items: &[Value]| items.iter().filter_map(|v| if let Value::Obj(c) = v { Some(*c) } else { None }).collect::<Vec<_>>();
    match heap.get(id) {
        Object::Dict(d) => d.entries.iter().filter_map(|(_, v)| if let Value::Obj(c) = v { Some(*c) } else { None }).collect(),
        Object::List(items) | Object::Tuple(items) => ids(items),
        Object::Opaque(o) => {
            let mut out = ids(&o.states);
            out.extend(ids(&o.items));
            out
        }
        _ => Vec::new(),
    }
}

/// The objects whose subtree holds a tensor (tensors included), computed
/// once in linear time by an iterative post-order walk. A back edge of a
/// cycle counts as holding nothing.
fn tensor_holders(heap: &Heap, root: &Value) -> HashSet<ObjId> {
    let mut holders = HashSet::new();
    let Value::Obj(root) = root else { return holders };
    let mut state: HashSet<ObjId> = HashSet::new();
    let mut stack: Vec<(ObjId, bool)> = vec![(*root, false)];
    while let Some((id, expanded)) = stack.pop() {
        if expanded {
            if matches!(heap.get(id), Object::Tensor(_)) || children(heap, id).iter().any(|c| holders.contains(c)) {
                holders.insert(id);
            }
            continue;
        }
        if !state.insert(id) {
            continue;
        }
        stack.push((id, true));
        for c in children(heap, id) {
            if !state.contains(&c) {
                stack.push((c, false));
            }
        }
    }
    holders
}

impl Walker<'_> {
    fn holds_tensor(&self, v: &Value) -> bool {
        matches!(v, Value::Obj(id) if self.holders.contains(id))
    }

    /// Tensors under `v` not counted before (linear over all calls).
    fn count_new_tensors(&mut self, v: &Value) -> usize {
        let mut n = 0;
        let mut todo: Vec<ObjId> = match v {
            Value::Obj(id) => vec![*id],
            _ => vec![],
        };
        while let Some(id) = todo.pop() {
            if !self.holders.contains(&id) || !self.counted.insert(id) {
                continue;
            }
            if matches!(self.heap.get(id), Object::Tensor(_)) {
                n += 1;
            }
            todo.extend(children(self.heap, id));
        }
        n
    }

    fn emit(&mut self, name: String, id: ObjId) -> Result<()> {
        if !self.names.insert(name.clone()) {
            return Err(Error::Tensor { name, reason: "two tensors get this name after flattening with `.`".into() });
        }
        if self.out.tensors.len() >= self.limits.max_tensors {
            return Err(Error::Limit(format!("more than {} tensors", self.limits.max_tensors)));
        }
        self.out.tensors.push((name, id));
        Ok(())
    }

    /// A top-level entry beside the selected root.
    fn beside(&mut self, name: &str, v: &Value) -> Result<()> {
        if !self.holds_tensor(v) {
            self.out.non_tensors.push((name.to_owned(), v.clone()));
        } else if OPTIMIZER_KEYS.contains(&name) && self.options.include_optimizer {
            self.walk(v, name)?;
        } else if OPTIMIZER_KEYS.contains(&name) {
            let n = self.count_new_tensors(v);
            self.out.skipped.push((name.to_owned(), format!("optimizer state with {n} tensors (pass --include-optimizer to keep it)")));
        } else {
            let n = self.count_new_tensors(v);
            self.out.skipped.push((name.to_owned(), format!("{n} tensors outside the selected state dict")));
        }
        Ok(())
    }

    /// `parent.part`, counted against `limits.max_path_bytes` before it is
    /// made: each path holds its parent's, so long keys nested deep (or a
    /// long key over many entries) would take memory quadratic in the input.
    fn child_path(&mut self, parent: &str, part: &str) -> Result<String> {
        self.path_bytes = self.path_bytes.saturating_add((parent.len() + 1 + part.len()) as u64);
        if self.path_bytes > self.limits.max_path_bytes {
            return Err(Error::Limit(format!(
                "the paths of the values take more than {} bytes (long keys nested deep), at `{}`",
                self.limits.max_path_bytes,
                start_of(parent)
            )));
        }
        Ok(join(parent, part))
    }

    /// Walks `v`, naming tensors `prefix.<…>`.
    fn walk(&mut self, v: &Value, prefix: &str) -> Result<()> {
        let mut todo: Vec<(Value, String, usize)> = vec![(v.clone(), prefix.to_owned(), 0)];
        let mut paths = 0usize;
        while let Some((v, name, depth)) = todo.pop() {
            paths += 1;
            if paths > self.limits.max_paths {
                return Err(Error::Limit(format!("more than {} paths (shared-reference explosion)", self.limits.max_paths)));
            }
            if depth > self.limits.max_nesting {
                return Err(Error::Limit(format!("containers nested deeper than {} at `{name}`", self.limits.max_nesting)));
            }
            let Value::Obj(id) = v else {
                self.out.non_tensors.push((name, v));
                continue;
            };
            let obj = self.heap.get(id);
            if matches!(obj, Object::Dict(_) | Object::List(_) | Object::Tuple(_) | Object::Opaque(_)) {
                if let Some(first) = self.visited.get(&id) {
                    self.out.skipped.push((name, format!("the same container as `{first}` (shared reference, emitted once)")));
                    self.out.shared_references += 1;
                    continue;
                }
                self.visited.insert(id, name.clone());
            }
            let mut children: Vec<(Value, String)> = Vec::new();
            match obj {
                Object::Tensor(_) => self.emit(name, id)?,
                Object::Dict(d) => {
                    for (k, v) in &d.entries {
                        let part = key_name(self.heap, k).map_err(|reason| Error::Structure(format!("at `{name}`: {reason}")))?;
                        children.push((v.clone(), self.child_path(&name, &part)?));
                    }
                }
                Object::List(items) | Object::Tuple(items) => {
                    if self.holders.contains(&id) {
                        for (i, item) in items.iter().enumerate() {
                            children.push((item.clone(), self.child_path(&name, &i.to_string())?));
                        }
                    } else {
                        self.out.non_tensors.push((name, v));
                    }
                }
                Object::Unconvertible(u) => {
                    if u.kind == "meta tensor" && !self.options.strict_meta {
                        self.out.skipped.push((name, format!("meta tensor: {}", u.detail)));
                    } else {
                        return Err(Error::Tensor { name, reason: format!("{}: {}", u.kind, u.detail) });
                    }
                }
                Object::Opaque(o) => match module_state(self.heap, o) {
                    Some(fields) => {
                        for (v, part) in fields {
                            children.push((v, self.child_path(&name, &part)?));
                        }
                    }
                    None => self.out.non_tensors.push((name, v)),
                },
                _ => self.out.non_tensors.push((name, v)),
            }
            // Reverse so that children are visited in order.
            for (v, n) in children.into_iter().rev() {
                todo.push((v, n, depth + 1));
            }
        }
        Ok(())
    }
}

/// The state of an opaque object (only user-allowed classes become opaque
/// in conversion): an `nn.Module`'s `_parameters`, persistent `_buffers` and
/// `_modules`, or else the entries of a dict state.
fn module_state(heap: &Heap, o: &crate::value::Opaque) -> Option<Vec<(Value, String)>> {
    let state = o.states.last()?;
    let Some(Object::Dict(d)) = heap.object(state) else { return None };
    let field = |name: &str| d.entries.iter().find(|(k, _)| k.as_str() == Some(name)).map(|(_, v)| v);
    let mut out = Vec::new();
    if field("_parameters").is_some() || field("_modules").is_some() {
        let non_persistent: HashSet<String> = match field("_non_persistent_buffers_set").and_then(|v| heap.object(v)) {
            Some(Object::Set(s)) => s.items.iter().filter_map(|i| i.as_str().map(str::to_owned)).collect(),
            _ => HashSet::new(),
        };
        for group in ["_parameters", "_buffers", "_modules"] {
            if let Some(Object::Dict(g)) = field(group).and_then(|v| heap.object(v)) {
                for (k, v) in &g.entries {
                    let Some(k) = k.as_str() else { continue };
                    if (group == "_buffers" && non_persistent.contains(k)) || matches!(v, Value::None) {
                        continue;
                    }
                    out.push((v.clone(), k.to_owned()));
                }
            }
        }
    } else {
        for (k, v) in &d.entries {
            out.push((v.clone(), key_name(heap, k).ok()?));
        }
    }
    Some(out)
}

/// A JSON rendering of a non-tensor value, bounded in depth and in size by
/// `budget`: [`JSON_NODE_UNITS`] per value (about what a JSON value takes
/// in memory), a cut-off placeholder included, and a unit per byte of its
/// strs, spent as it renders. A value below [`JSON_DEPTH`] shows as `"…"`
/// (and pays as any value), and what a container has left once the budget
/// is spent as one `"…"`: the work is bounded by the budget (a big int is
/// one value, up to its limit of digits), however often a pickle refers to
/// one value (4000
/// references to a 1 MB str took 4 GB when only values were counted, and
/// wide lists of values past the depth limit, free, took minutes).
pub fn to_json(heap: &Heap, v: &Value, budget: &mut usize) -> serde_json::Value {
    json_inner(heap, v, 0, budget)
}

/// `s`, or as much of it as `budget` allows (then `…`); spends its bytes.
fn within(s: &str, budget: &mut usize) -> String {
    if s.len() <= *budget {
        *budget -= s.len();
        return s.to_owned();
    }
    let mut end = *budget;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    *budget = 0;
    format!("{}…", &s[..end])
}

/// Units of [`to_json`]'s budget one value costs, whatever its size.
pub const JSON_NODE_UNITS: usize = 32;

/// Containers nested deeper than this render as `"…"`.
pub const JSON_DEPTH: usize = 32;

/// What [`to_json`] shows for what it does not render.
fn cut_off() -> serde_json::Value {
    json!("…")
}

fn json_inner(heap: &Heap, v: &Value, depth: usize, budget: &mut usize) -> serde_json::Value {
    // Every value pays, the placeholder too, and a container's items stop
    // when the budget does.
    if *budget < JSON_NODE_UNITS || depth > JSON_DEPTH {
        *budget = budget.saturating_sub(JSON_NODE_UNITS);
        return cut_off();
    }
    *budget -= JSON_NODE_UNITS;
    let items = |values: &mut dyn Iterator<Item = &Value>, budget: &mut usize| -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        for value in values {
            if *budget < JSON_NODE_UNITS {
                out.push(cut_off());
                break;
            }
            out.push(json_inner(heap, value, depth + 1, budget));
        }
        out
    };
    match v {
        Value::None => serde_json::Value::Null,
        Value::Bool(b) => json!(b),
        Value::Int(i) => json!(i),
        Value::BigInt(b) => json!(big_to_decimal(b)),
        Value::Float(f) if f.is_finite() => json!(f),
        Value::Float(f) => json!(f.to_string()),
        Value::Str(s) => json!(within(s, budget)),
        Value::Bytes(_) => json!(within(&heap.summary(v, 1000), budget)),
        Value::Obj(id) => match heap.get(*id) {
            Object::Tuple(values) | Object::List(values) => serde_json::Value::Array(items(&mut values.iter(), budget)),
            Object::Set(s) => serde_json::Value::Array(items(&mut s.items.iter(), budget)),
            Object::Dict(d) => {
                let mut map = serde_json::Map::new();
                for (k, v) in &d.entries {
                    if *budget < JSON_NODE_UNITS {
                        map.insert("…".into(), cut_off());
                        break;
                    }
                    let key = match k.as_str() {
                        Some(k) => within(k, budget),
                        None => within(&heap.summary(k, 100), budget),
                    };
                    map.insert(key, json_inner(heap, v, depth + 1, budget));
                }
                serde_json::Value::Object(map)
            }
            Object::Complex(re, im) => json!([re, im]),
            Object::Opaque(o) => {
                let class = heap.global(&o.callable).map(|g| g.qualified()).unwrap_or_else(|| "?".into());
                let mut m = serde_json::Map::new();
                m.insert("__class__".into(), json!(within(&class, budget)));
                if let Some(state) = o.states.last() {
                    m.insert("__state__".into(), json_inner(heap, state, depth + 1, budget));
                }
                serde_json::Value::Object(m)
            }
            _ => json!(within(&heap.summary(v, 200), budget)),
        },
    }
}

/// Decimal text of a little-endian two's complement integer.
pub(crate) fn big_to_decimal(le: &[u8]) -> String {
    let negative = le.last().is_some_and(|b| b & 0x80 != 0);
    let mut mag: Vec<u8> = le.to_vec();
    if negative {
        let mut carry = 1u16;
        for b in mag.iter_mut() {
            let v = (!*b) as u16 + carry;
            *b = v as u8;
            carry = v >> 8;
        }
    }
    // Repeated division by 10 on big-endian base-256 digits.
    let mut be: Vec<u8> = mag.into_iter().rev().skip_while(|&b| b == 0).collect();
    let mut digits = Vec::new();
    while !be.is_empty() {
        let mut rem = 0u32;
        for b in be.iter_mut() {
            let cur = rem * 256 + *b as u32;
            *b = (cur / 10) as u8;
            rem = cur % 10;
        }
        digits.push(b'0' + rem as u8);
        be = be.into_iter().skip_while(|&b| b == 0).collect();
    }
    if digits.is_empty() {
        digits.push(b'0');
    }
    if negative {
        digits.push(b'-');
    }
    digits.reverse();
    String::from_utf8(digits).expect("ASCII digits")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_ints_print_in_decimal() {
        assert_eq!(big_to_decimal(&[0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19]), "119547037146038801333356");
        assert_eq!(big_to_decimal(&[0xff]), "-1");
        assert_eq!(big_to_decimal(&[0]), "0");
        assert_eq!(big_to_decimal(&[0, 0, 0, 0, 0, 0, 0, 0x80]), "-9223372036854775808");
    }
}

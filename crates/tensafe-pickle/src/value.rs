//! The VM's data model. Nothing here is ever executed: every Python object a
//! pickle would create is represented by a description of it.
//!
//! Immutable scalars live in [`Value`]; everything with identity (tuples,
//! containers, globals, tensors, opaque objects) lives in the [`Heap`] and is
//! referred to by an [`ObjId`]. Memo reads and `DUP` copy the id, never the
//! object, so a "billion laughs" pickle costs O(1) per reference, and nothing
//! is dropped recursively.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::rc::Rc;

use crate::names::{Known, StorageType, TorchDtype};

/// Index of an object in the [`Heap`].
pub type ObjId = u32;

/// A pickle value.
#[derive(Debug, Clone)]
pub enum Value {
    /// `None`.
    None,
    /// `True` / `False`.
    Bool(bool),
    /// An int that fits 64 bits.
    Int(i64),
    /// A larger int: minimal little-endian two's complement bytes.
    BigInt(Rc<[u8]>),
    /// A float.
    Float(f64),
    /// A str.
    Str(Rc<str>),
    /// bytes (or a Python 2 str that is not UTF-8, or a bytearray).
    Bytes(Rc<[u8]>),
    /// An object in the heap.
    Obj(ObjId),
}

impl Value {
    /// The int value, if this is a (small) int or a bool.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }

    /// The str value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// A dict, OrderedDict or Counter: insertion-ordered, any hashable key.
#[derive(Debug, Default)]
pub struct Dict {
    /// Which class.
    pub kind: DictKind,
    /// Entries in insertion order (a repeated key keeps its first position).
    pub entries: Vec<(Value, Value)>,
    index: HashMap<Key, usize>,
    /// States given by BUILD (e.g. a state dict's `_metadata`), kept, never applied.
    pub attrs: Vec<Value>,
}

/// The class of a [`Dict`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum DictKind {
    /// `dict`.
    #[default]
    Dict,
    /// `collections.OrderedDict`.
    OrderedDict,
    /// `collections.Counter`.
    Counter,
}

/// A set or frozenset.
#[derive(Debug, Default)]
pub struct Set {
    /// Whether it is a frozenset.
    pub frozen: bool,
    /// Items in insertion order.
    pub items: Vec<Value>,
    index: HashMap<Key, ()>,
}

/// A resolved global: an allowlisted entry or, in scan mode (or for a class
/// the user allowed as opaque), an unknown one.
#[derive(Debug)]
pub struct Global {
    /// Module after the Python 2 renames.
    pub module: Rc<str>,
    /// Name (possibly dotted, which never matches the allowlist).
    pub name: Rc<str>,
    /// The allowlist entry, or `None` for an unknown global.
    pub known: Option<Known>,
}

impl Global {
    /// `module.name`.
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.module, self.name)
    }
}

/// A storage named by a persistent id.
#[derive(Debug, Clone)]
pub struct Storage {
    /// The record key (`data/<key>` in a zip, the address in the legacy format).
    pub key: Rc<str>,
    /// The storage class.
    pub storage_type: StorageType,
    /// Element count declared by the pid (bytes for untyped storages).
    pub numel: u64,
    /// Device string, informational.
    pub location: Rc<str>,
    /// Legacy storage views: `(root key, offset, size)` in elements.
    pub view: Option<(Rc<str>, u64, u64)>,
}

impl Storage {
    /// Declared size in bytes.
    pub fn byte_len(&self) -> Option<u64> {
        self.numel.checked_mul(self.storage_type.element_size())
    }
}

/// A dense tensor: a strided window on a storage.
#[derive(Debug, Clone)]
pub struct Tensor {
    /// The storage (a [`Object::Storage`] in the heap).
    pub storage: ObjId,
    /// Element type.
    pub dtype: TorchDtype,
    /// Offset in elements of `dtype`.
    pub offset: u64,
    /// Sizes.
    pub size: Vec<u64>,
    /// Strides in elements.
    pub stride: Vec<u64>,
    /// The conjugate bit: data is stored un-conjugated.
    pub conj: bool,
    /// The negative bit: data is stored un-negated.
    pub neg: bool,
    /// `requires_grad` as saved.
    pub requires_grad: bool,
    /// Whether it was saved as an `nn.Parameter`.
    pub parameter: bool,
    /// Python attributes torch would `setattr` (kept, never applied).
    pub attrs: Vec<Value>,
}

/// Something a pickle described that has no safetensors equivalent.
#[derive(Debug, Clone)]
pub struct Unconvertible {
    /// What it is: "quantized tensor", "sparse tensor", "meta tensor", ….
    pub kind: &'static str,
    /// Details for the message.
    pub detail: String,
}

/// An object the VM did not model: the result of calling or constructing a
/// global that is not allowlisted (scan mode, or a class the user allowed
/// as opaque). Its arguments and states are kept for the report.
#[derive(Debug)]
pub struct Opaque {
    /// The callable (usually a [`Global`]).
    pub callable: Value,
    /// The arguments it would have been called with.
    pub args: Value,
    /// How it was made: `REDUCE`, `NEWOBJ`, `INST`, `OBJ`, `PERSID`, ….
    pub how: &'static str,
    /// BUILD states.
    pub states: Vec<Value>,
    /// Items given by APPEND(S) / SETITEM(S) / ADDITEMS.
    pub items: Vec<Value>,
}

/// A heap object.
///
/// The large variants are boxed: a pickle can make an object per input
/// byte, and each takes the size of the largest variant (a heap node was
/// 128 bytes unboxed, 40 boxed; a 5 MB pickle of nested TUPLE1s took
/// 858 MB to scan, then 429 MB).
#[derive(Debug)]
pub enum Object {
    /// A tuple.
    Tuple(Vec<Value>),
    /// A list.
    List(Vec<Value>),
    /// A dict-like.
    Dict(Box<Dict>),
    /// A set or frozenset.
    Set(Box<Set>),
    /// A global.
    Global(Box<Global>),
    /// A storage from a persistent id.
    Storage(Box<Storage>),
    /// A dense tensor.
    Tensor(Box<Tensor>),
    /// A complex scalar `(re, im)`.
    Complex(f64, f64),
    /// A sparse layout name from `_get_layout`.
    Layout(Rc<str>),
    /// A tensor kind safetensors cannot hold.
    Unconvertible(Box<Unconvertible>),
    /// An object that was not modelled.
    Opaque(Box<Opaque>),
}

impl Object {
    /// Python-ish type name for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Object::Tuple(_) => "tuple",
            Object::List(_) => "list",
            Object::Dict(d) => match d.kind {
                DictKind::Dict => "dict",
                DictKind::OrderedDict => "OrderedDict",
                DictKind::Counter => "Counter",
            },
            Object::Set(s) => {
                if s.frozen {
                    "frozenset"
                } else {
                    "set"
                }
            }
            Object::Global(_) => "global",
            Object::Storage(_) => "storage",
            Object::Tensor(_) => "tensor",
            Object::Complex(..) => "complex",
            Object::Layout(_) => "layout",
            Object::Unconvertible(u) => u.kind,
            Object::Opaque(_) => "opaque object",
        }
    }
}

/// A heap slot: the object and the offset of the opcode that made it.
#[derive(Debug)]
pub struct Node {
    /// The object.
    pub obj: Object,
    /// Byte offset in its pickle of the opcode that created it.
    pub offset: u64,
}

/// All objects of one checkpoint (shared by the pickles of a legacy file).
#[derive(Debug, Default)]
pub struct Heap {
    nodes: Vec<Node>,
}

impl Heap {
    /// Adds an object.
    pub fn alloc(&mut self, obj: Object, offset: u64) -> ObjId {
        let id = self.nodes.len() as ObjId;
        self.nodes.push(Node { obj, offset });
        id
    }

    /// Number of objects.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the heap is empty.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The object with this id.
    pub fn get(&self, id: ObjId) -> &Object {
        &self.nodes[id as usize].obj
    }

    /// The object with this id, mutably.
    pub fn get_mut(&mut self, id: ObjId) -> &mut Object {
        &mut self.nodes[id as usize].obj
    }

    /// The offset of the opcode that created the object.
    pub fn offset(&self, id: ObjId) -> u64 {
        self.nodes[id as usize].offset
    }

    /// The object a value refers to, if any.
    pub fn object(&self, v: &Value) -> Option<&Object> {
        match v {
            Value::Obj(id) => Some(self.get(*id)),
            _ => None,
        }
    }

    /// The global a value refers to.
    pub fn global(&self, v: &Value) -> Option<&Global> {
        match self.object(v)? {
            Object::Global(g) => Some(g),
            _ => None,
        }
    }

    /// The items of a tuple value.
    pub fn tuple(&self, v: &Value) -> Option<&[Value]> {
        match self.object(v)? {
            Object::Tuple(items) => Some(items),
            _ => None,
        }
    }

    /// Python-ish type name of a value.
    pub fn type_name(&self, v: &Value) -> &'static str {
        match v {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) | Value::BigInt(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::Obj(id) => self.get(*id).type_name(),
        }
    }

    /// Builds the hash key of a value, as Python would compare it. Errors on
    /// unhashable values and on keys too large or deep to hash cheaply (an
    /// attacker could otherwise make every SETITEM re-hash a huge tuple).
    /// Returns the key with the work that hashing and comparing it costs: a
    /// unit per part and per byte of its strs, bytes and big ints, which the
    /// VM charges (an 8 MB str key set a million times must run out of work,
    /// not take hours).
    pub fn costed_key(&self, v: &Value) -> Result<(Key, u64), String> {
        let (mut budget, mut cost) = (256u32, 0u64);
        let key = self.key_inner(v, 0, &mut budget, &mut cost)?;
        Ok((key, cost))
    }

    fn key_inner(&self, v: &Value, depth: u32, budget: &mut u32, cost: &mut u64) -> Result<Key, String> {
        *budget = budget.checked_sub(1).ok_or("dict key too large to hash (more than 256 parts)")?;
        let bytes = match v {
            Value::BigInt(b) | Value::Bytes(b) => b.len(),
            Value::Str(s) => s.len(),
            _ => 0,
        };
        *cost = cost.saturating_add(1 + bytes as u64);
        if depth > 32 {
            return Err("dict key nested more than 32 levels".into());
        }
        Ok(match v {
            Value::None => Key::None,
            Value::Bool(b) => Key::Int(*b as i64),
            Value::Int(i) => Key::Int(*i),
            Value::BigInt(b) => Key::Big(b.clone()),
            Value::Float(f) => {
                if f.fract() == 0.0 && f.abs() < 9.0e18 {
                    Key::Int(*f as i64)
                } else {
                    Key::Float(f.to_bits())
                }
            }
            Value::Str(s) => Key::Str(s.clone()),
            Value::Bytes(b) => Key::Bytes(b.clone()),
            Value::Obj(id) => match self.get(*id) {
                Object::Tuple(items) => {
                    Key::Tuple(items.iter().map(|i| self.key_inner(i, depth + 1, budget, cost)).collect::<Result<_, _>>()?)
                }
                Object::Global(g) => {
                    *cost = cost.saturating_add((g.module.len() + g.name.len()) as u64);
                    Key::Global(g.module.clone(), g.name.clone())
                }
                Object::List(_) | Object::Dict(_) => return Err(format!("unhashable type: '{}'", self.get(*id).type_name())),
                Object::Set(s) if !s.frozen => return Err("unhashable type: 'set'".into()),
                _ => Key::Id(*id),
            },
        })
    }

    /// Inserts or overwrites `dict[key] = value`, `k` being `key`'s hash key
    /// ([`Heap::costed_key`], whose work the caller has charged); returns
    /// whether the key was already there.
    pub fn dict_set(&mut self, dict: ObjId, key: Value, k: Key, value: Value) -> Result<bool, String> {
        let Object::Dict(d) = self.get_mut(dict) else { return Err("not a dict".into()) };
        if let Some(&i) = d.index.get(&k) {
            d.entries[i].1 = value;
            Ok(true)
        } else {
            d.index.insert(k, d.entries.len());
            d.entries.push((key, value));
            Ok(false)
        }
    }

    /// Adds `item` (hash key `k`, as for [`Heap::dict_set`]) to a set;
    /// returns whether it was already there.
    pub fn set_add(&mut self, set: ObjId, item: Value, k: Key) -> Result<bool, String> {
        let Object::Set(s) = self.get_mut(set) else { return Err("not a set".into()) };
        if s.index.insert(k, ()).is_some() {
            Ok(true)
        } else {
            s.items.push(item);
            Ok(false)
        }
    }

    /// A new empty dict of the given kind.
    pub fn new_dict(&mut self, kind: DictKind, offset: u64) -> ObjId {
        self.alloc(Object::Dict(Box::new(Dict { kind, ..Default::default() })), offset)
    }

    /// A new empty set.
    pub fn new_set(&mut self, frozen: bool, offset: u64) -> ObjId {
        self.alloc(Object::Set(Box::new(Set { frozen, ..Default::default() })), offset)
    }

    /// A short Python-like rendering of a value (at most about `limit`
    /// characters, whatever the size or depth of the value).
    pub fn summary(&self, v: &Value, limit: usize) -> String {
        let mut out = String::new();
        self.summarize(v, &mut out, limit, 0);
        if out.len() > limit {
            let mut cut = limit;
            while !out.is_char_boundary(cut) {
                cut -= 1;
            }
            out.truncate(cut);
            out.push('…');
        }
        out
    }

    fn summarize(&self, v: &Value, out: &mut String, limit: usize, depth: usize) {
        if out.len() > limit {
            return;
        }
        match v {
            Value::None => out.push_str("None"),
            Value::Bool(b) => out.push_str(if *b { "True" } else { "False" }),
            Value::Int(i) => {
                let _ = write!(out, "{i}");
            }
            Value::BigInt(b) => {
                let _ = write!(out, "<{}-byte int>", b.len());
            }
            Value::Float(f) => {
                let _ = write!(out, "{f:?}");
            }
            Value::Str(s) => {
                // Python's repr: single quotes, escapes for quotes, backslashes
                // and unprintable characters.
                out.push('\'');
                for c in s.chars().take(limit) {
                    match c {
                        '\'' => out.push_str("\\'"),
                        '\\' => out.push_str("\\\\"),
                        c if c.is_control() => out.extend(c.escape_default()),
                        c => out.push(c),
                    }
                }
                out.push('\'');
            }
            Value::Bytes(b) => {
                out.push_str("b\"");
                for &c in b.iter().take(limit) {
                    let _ = write!(out, "{}", std::ascii::escape_default(c));
                }
                out.push('"');
            }
            Value::Obj(id) => {
                if depth > 8 {
                    out.push('…');
                    return;
                }
                let seq = |out: &mut String, open: &str, items: &[Value], close: &str| {
                    out.push_str(open);
                    for (i, item) in items.iter().enumerate() {
                        if out.len() > limit {
                            break;
                        }
                        if i > 0 {
                            out.push_str(", ");
                        }
                        self.summarize(item, out, limit, depth + 1);
                    }
                    out.push_str(close);
                };
                match self.get(*id) {
                    Object::Tuple(items) => seq(out, "(", items, ")"),
                    Object::List(items) => seq(out, "[", items, "]"),
                    Object::Set(s) => seq(out, "{", &s.items, "}"),
                    Object::Dict(d) => {
                        out.push('{');
                        for (i, (k, v)) in d.entries.iter().enumerate() {
                            if out.len() > limit {
                                break;
                            }
                            if i > 0 {
                                out.push_str(", ");
                            }
                            self.summarize(k, out, limit, depth + 1);
                            out.push_str(": ");
                            self.summarize(v, out, limit, depth + 1);
                        }
                        out.push('}');
                    }
                    Object::Global(g) => out.extend(g.qualified().chars().take(limit)),
                    Object::Storage(s) => {
                        let _ = write!(out, "<storage {} ({} elements)>", s.key, s.numel);
                    }
                    Object::Tensor(t) => {
                        let _ = write!(out, "<tensor {} {:?}>", t.dtype.name, t.size);
                    }
                    Object::Complex(re, im) => {
                        let _ = write!(out, "({re:?}{im:+?}j)");
                    }
                    Object::Layout(l) => out.push_str(l),
                    Object::Unconvertible(u) => {
                        let _ = write!(out, "<{}>", u.kind);
                    }
                    Object::Opaque(o) => {
                        self.summarize(&o.callable, out, limit, depth + 1);
                        self.summarize(&o.args, out, limit, depth + 1);
                    }
                }
            }
        }
    }
}

/// A hashable key with Python's equality: `1 == 1.0 == True`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    /// None.
    None,
    /// An int, bool or integral float.
    Int(i64),
    /// A big int (canonical bytes).
    Big(Rc<[u8]>),
    /// A non-integral float, by bits.
    Float(u64),
    /// A str.
    Str(Rc<str>),
    /// bytes.
    Bytes(Rc<[u8]>),
    /// A tuple of keys.
    Tuple(Vec<Key>),
    /// A global, by name.
    Global(Rc<str>, Rc<str>),
    /// Any other object, by identity.
    Id(ObjId),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_compare_like_python() {
        let mut heap = Heap::default();
        let d = heap.new_dict(DictKind::Dict, 0);
        let mut set = |key: Value, value: Value| {
            let (k, _) = heap.costed_key(&key)?;
            heap.dict_set(d, key, k, value)
        };
        assert!(!set(Value::Int(1), Value::None).unwrap());
        assert!(set(Value::Bool(true), Value::Int(5)).unwrap());
        assert!(set(Value::Float(1.0), Value::Int(6)).unwrap());
        let Object::Dict(dict) = heap.get(d) else { panic!() };
        assert_eq!(dict.entries.len(), 1);
        assert!(matches!(dict.entries[0], (Value::Int(1), Value::Int(6))));
        let l = heap.alloc(Object::List(vec![]), 0);
        assert!(heap.costed_key(&Value::Obj(l)).unwrap_err().contains("unhashable"));
    }

    #[test]
    fn deep_keys_are_refused_not_recursed() {
        let mut heap = Heap::default();
        let mut v = Value::None;
        for _ in 0..10_000 {
            v = Value::Obj(heap.alloc(Object::Tuple(vec![v]), 0));
        }
        assert!(heap.costed_key(&v).is_err());
        assert!(heap.summary(&v, 100).len() < 200);
    }
}

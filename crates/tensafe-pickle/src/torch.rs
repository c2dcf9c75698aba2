//! Models of the allowlisted callables: what `torch.load` would build, as
//! data, after checking every argument (types, arities, geometry against the
//! declared storage size). Nothing is called.

use std::rc::Rc;

use crate::error::Result;
use crate::names::{Known, Rebuild, Severity, StorageType, TorchDtype};
use crate::value::{DictKind, Object, Storage, Tensor, Unconvertible, Value};
use crate::vm::{PidSchema, Vm};

type Model = std::result::Result<Value, String>;

const SPARSE_LAYOUTS: &[&str] = &["torch.sparse_coo", "torch.sparse_csr", "torch.sparse_csc", "torch.sparse_bsr", "torch.sparse_bsc"];

impl Vm<'_, '_> {
    fn int_arg(&self, v: &Value, what: &str) -> std::result::Result<i64, String> {
        match v {
            Value::Int(i) => Ok(*i),
            Value::Bool(b) => Ok(*b as i64),
            other => Err(format!("{what} must be an int, got {}", self.heap.type_name(other))),
        }
    }

    fn bool_arg(&self, v: &Value, what: &str) -> std::result::Result<bool, String> {
        match v {
            Value::Bool(b) => Ok(*b),
            other => Err(format!("{what} must be a bool, got {}", self.heap.type_name(other))),
        }
    }

    fn ints(&self, v: &Value, what: &str) -> std::result::Result<Vec<u64>, String> {
        let items = self.heap.tuple(v).ok_or_else(|| format!("{what} must be a tuple, got {}", self.heap.type_name(v)))?;
        if items.len() > self.opts.limits.max_ndim {
            return Err(format!("{what} has {} dimensions (limit {})", items.len(), self.opts.limits.max_ndim));
        }
        items
            .iter()
            .map(|i| match self.int_arg(i, what)? {
                n if n < 0 => Err(format!("{what} holds the negative value {n}")),
                n => Ok(n as u64),
            })
            .collect()
    }

    fn dtype_arg(&self, v: &Value) -> std::result::Result<TorchDtype, String> {
        match self.heap.global(v).and_then(|g| g.known) {
            Some(Known::Dtype(d)) => Ok(d),
            _ => Err(format!("expected a torch dtype, got {}", self.heap.summary(v, 80))),
        }
    }

    fn empty_hooks(&self, v: &Value) -> std::result::Result<(), String> {
        match self.heap.object(v) {
            Some(Object::Dict(d)) if d.entries.is_empty() => Ok(()),
            Some(Object::Dict(_)) => Err("non-empty backward hooks (torch would call them)".into()),
            _ => Err(format!("backward_hooks must be an empty dict, got {}", self.heap.type_name(v))),
        }
    }

    fn tensor_arg(&self, v: &Value, what: &str) -> std::result::Result<Tensor, String> {
        match self.heap.object(v) {
            Some(Object::Tensor(t)) => Ok((**t).clone()),
            _ => Err(format!("{what} must be a tensor, got {}", self.heap.type_name(v))),
        }
    }

    /// Checks a strided window against the storage it reads.
    fn tensor_on(&self, storage: &Value, dtype: Option<TorchDtype>, offset: &Value, size: &Value, stride: &Value) -> std::result::Result<Tensor, String> {
        let Some(Object::Storage(st)) = self.heap.object(storage) else {
            return Err(format!("storage argument must come from a persistent id, got {}", self.heap.type_name(storage)));
        };
        let dtype = match (st.storage_type, dtype) {
            (StorageType::Typed(d), None) => d,
            (StorageType::Untyped, Some(d)) => d,
            (StorageType::Typed(d), Some(given)) if d == given => d,
            (StorageType::Typed(d), Some(given)) => return Err(format!("dtype {} disagrees with the {} storage", given.name, d.name)),
            (StorageType::Untyped, None) => return Err("an untyped storage needs the dtype of _rebuild_tensor_v3".into()),
        };
        let offset = match self.int_arg(offset, "storage_offset")? {
            n if n < 0 => return Err(format!("negative storage_offset {n}")),
            n => n as u64,
        };
        let size = self.ints(size, "size")?;
        let stride = self.ints(stride, "stride")?;
        if size.len() != stride.len() {
            return Err(format!("size has {} dimensions but stride has {}", size.len(), stride.len()));
        }
        let storage_bytes = match &st.view {
            Some((_, _, view_numel)) => view_numel.checked_mul(st.storage_type.element_size()),
            None => st.byte_len(),
        }
        .ok_or("storage size overflows")?;
        let itemsize = dtype.itemsize as u64;
        if storage_bytes % itemsize != 0 {
            return Err(format!("storage of {storage_bytes} bytes is not a whole number of {} elements", dtype.name));
        }
        let elements = storage_bytes / itemsize;
        let numel = size.iter().try_fold(1u64, |a, &s| a.checked_mul(s)).ok_or("element count overflows")?;
        if numel > 0 {
            let mut last = offset;
            for (s, st) in size.iter().zip(&stride) {
                last = (s - 1).checked_mul(*st).and_then(|x| x.checked_add(last)).ok_or("extent overflows")?;
            }
            if last >= elements {
                return Err(format!(
                    "extent reaches element {last} but the storage holds {elements} {} elements (offset {offset}, size {size:?}, stride {stride:?})",
                    dtype.name
                ));
            }
        }
        let Value::Obj(storage) = storage else { unreachable!("checked above") };
        Ok(Tensor {
            storage: *storage,
            dtype,
            offset,
            size,
            stride,
            conj: false,
            neg: false,
            requires_grad: false,
            parameter: false,
            attrs: vec![],
        })
    }

    fn tensor_metadata(&self, v: &Value, t: &mut Tensor) -> std::result::Result<(), String> {
        let Some(Object::Dict(d)) = self.heap.object(v) else {
            return Err(format!("tensor metadata must be a dict, got {}", self.heap.type_name(v)));
        };
        for (k, val) in &d.entries {
            let flag = self.bool_arg(val, "a metadata flag")?;
            match k.as_str() {
                Some("conj") => t.conj = flag,
                Some("neg") => t.neg = flag,
                _ => return Err(format!("unknown tensor metadata key {}", self.heap.summary(k, 60))),
            }
        }
        Ok(())
    }

    /// The model of calling an allowlisted function with `args` (a tuple).
    pub(crate) fn call_known(&mut self, known: Known, args: &Value) -> Model {
        let a: Vec<Value> = self.heap.tuple(args).expect("caller checked").to_vec();
        let arity = |lo: usize, hi: usize| -> std::result::Result<(), String> {
            if a.len() < lo || a.len() > hi {
                Err(if lo == hi { format!("takes {lo} arguments, got {}", a.len()) } else { format!("takes {lo} to {hi} arguments, got {}", a.len()) })
            } else {
                Ok(())
            }
        };
        match known {
            Known::OrderedDict | Known::Counter => {
                arity(0, 1)?;
                let kind = if known == Known::Counter { DictKind::Counter } else { DictKind::OrderedDict };
                let id = self.heap.new_dict(kind, self.op_offset);
                if let Some(src) = a.first() {
                    let pairs: Vec<(Value, Value)> = match self.heap.object(src) {
                        Some(Object::Dict(d)) => d.entries.clone(),
                        Some(Object::List(items)) | Some(Object::Tuple(items)) => items
                            .iter()
                            .map(|p| match self.heap.object(p) {
                                Some(Object::Tuple(kv)) | Some(Object::List(kv)) if kv.len() == 2 => Ok((kv[0].clone(), kv[1].clone())),
                                _ => Err("items must be (key, value) pairs".to_string()),
                            })
                            .collect::<std::result::Result<_, _>>()?,
                        _ => return Err(format!("cannot build a dict from a {}", self.heap.type_name(src))),
                    };
                    self.charge(pairs.len() as u64 + 1).map_err(|e| e.to_string())?;
                    for (k, v) in pairs {
                        let hashed = self.charged_key(&k).map_err(|e| e.to_string())?;
                        self.heap.dict_set(id, k, hashed, v)?;
                    }
                }
                Ok(Value::Obj(id))
            }
            Known::Set | Known::FrozenSet => {
                arity(0, 1)?;
                let id = self.heap.new_set(known == Known::FrozenSet, self.op_offset);
                if let Some(src) = a.first() {
                    let items = match self.heap.object(src) {
                        Some(Object::List(items)) | Some(Object::Tuple(items)) => items.clone(),
                        Some(Object::Set(s)) => s.items.clone(),
                        _ => return Err(format!("cannot build a set from a {}", self.heap.type_name(src))),
                    };
                    self.charge(items.len() as u64 + 1).map_err(|e| e.to_string())?;
                    for item in items {
                        let k = self.charged_key(&item).map_err(|e| e.to_string())?;
                        self.heap.set_add(id, item, k)?;
                    }
                }
                Ok(Value::Obj(id))
            }
            Known::ByteArray | Known::CodecsEncode => {
                if known == Known::ByteArray && a.is_empty() {
                    return Ok(Value::Bytes(Rc::from(&[][..])));
                }
                if let (Known::ByteArray, [Value::Bytes(b)]) = (known, a.as_slice()) {
                    return Ok(Value::Bytes(b.clone()));
                }
                match a.as_slice() {
                    [Value::Str(s), Value::Str(enc)] if matches!(&**enc, "latin1" | "latin-1") => {
                        self.charge(s.len() as u64).map_err(|e| e.to_string())?;
                        let bytes: Option<Vec<u8>> = s.chars().map(|c| u8::try_from(c as u32).ok()).collect();
                        Ok(Value::Bytes(bytes.ok_or("a code point above 255 cannot be latin-1")?.into()))
                    }
                    _ => Err("expected (str, 'latin1')".into()),
                }
            }
            Known::Complex => match a.as_slice() {
                [re] | [re, Value::Int(0)] => Ok(self.alloc(Object::Complex(number(re)?, 0.0))),
                [re, im] => Ok(self.alloc(Object::Complex(number(re)?, number(im)?))),
                _ => Err("expected (real, imag)".into()),
            },
            Known::Size => {
                arity(1, 1)?;
                let dims = self.ints(&a[0], "torch.Size")?;
                Ok(self.alloc(Object::Tuple(dims.into_iter().map(|d| Value::Int(d as i64)).collect())))
            }
            Known::Device => match a.as_slice() {
                [Value::Str(s)] => Ok(Value::Str(s.clone())),
                [Value::Str(s), Value::Int(i)] if *i >= 0 => Ok(Value::Str(format!("{s}:{i}").into())),
                _ => Err("expected (str,) or (str, int)".into()),
            },
            Known::GetLayout => match a.as_slice() {
                [Value::Str(s)] if SPARSE_LAYOUTS.contains(&&**s) => Ok(self.alloc(Object::Layout(s.clone()))),
                _ => Err(format!("unknown layout {}", self.heap.summary(args, 80))),
            },
            Known::Parameter => Err("torch.nn.parameter.Parameter is built with NEWOBJ, not REDUCE".into()),
            Known::Rebuild(r) => self.rebuild(r, &a),
            Known::Storage(_) | Known::Dtype(_) | Known::QScheme(_) | Known::Tensor => Err("not callable".into()),
        }
    }

    fn rebuild(&mut self, r: Rebuild, a: &[Value]) -> Model {
        let arity = |lo: usize, hi: usize| -> std::result::Result<(), String> {
            if a.len() < lo || a.len() > hi {
                Err(format!("takes {lo}{} arguments, got {}", if hi > lo { format!(" to {hi}") } else { String::new() }, a.len()))
            } else {
                Ok(())
            }
        };
        let tensor = match r {
            Rebuild::Tensor => {
                arity(4, 4)?;
                self.tensor_on(&a[0], None, &a[1], &a[2], &a[3])?
            }
            Rebuild::TensorV2 => {
                arity(6, 7)?;
                let mut t = self.tensor_on(&a[0], None, &a[1], &a[2], &a[3])?;
                t.requires_grad = self.bool_arg(&a[4], "requires_grad")?;
                self.empty_hooks(&a[5])?;
                if let Some(m) = a.get(6) {
                    self.tensor_metadata(m, &mut t)?;
                }
                t
            }
            Rebuild::TensorV3 => {
                arity(7, 8)?;
                let dtype = self.dtype_arg(&a[6])?;
                let mut t = self.tensor_on(&a[0], Some(dtype), &a[1], &a[2], &a[3])?;
                t.requires_grad = self.bool_arg(&a[4], "requires_grad")?;
                self.empty_hooks(&a[5])?;
                if let Some(m) = a.get(7) {
                    self.tensor_metadata(m, &mut t)?;
                }
                t
            }
            Rebuild::Parameter | Rebuild::ParameterWithState => {
                if r == Rebuild::Parameter { arity(3, 3)? } else { arity(4, 4)? }
                let mut t = self.tensor_arg(&a[0], "the parameter's data")?;
                t.requires_grad = self.bool_arg(&a[1], "requires_grad")?;
                self.empty_hooks(&a[2])?;
                t.parameter = true;
                if let Some(state) = a.get(3)
                    && !is_empty_state(self, state)
                {
                    t.attrs.push(state.clone());
                }
                t
            }
            Rebuild::FromTypeV2 => {
                arity(4, 4)?;
                let func = match self.heap.global(&a[0]).and_then(|g| g.known) {
                    Some(Known::Rebuild(f)) if f != Rebuild::FromTypeV2 => f,
                    _ => return Err(format!("func must be a torch rebuild function, got {}", self.heap.summary(&a[0], 80))),
                };
                let parameter = match self.heap.global(&a[1]).and_then(|g| g.known) {
                    Some(Known::Tensor) => false,
                    Some(Known::Parameter) => true,
                    _ => return Err(format!("new_type must be torch.Tensor or torch.nn.parameter.Parameter, got {}", self.heap.summary(&a[1], 80))),
                };
                let inner_args = self.heap.tuple(&a[2]).ok_or("args must be a tuple")?.to_vec();
                let inner = self.rebuild(func, &inner_args)?;
                let mut t = self.tensor_arg(&inner, "the rebuilt value")?;
                t.parameter |= parameter;
                if !is_empty_state(self, &a[3]) {
                    t.attrs.push(a[3].clone());
                }
                t
            }
            Rebuild::DeviceFromCpu => {
                arity(4, 4)?;
                let mut t = self.tensor_arg(&a[0], "cpu_tensor")?;
                let dtype = self.dtype_arg(&a[1])?;
                if dtype != t.dtype {
                    return Err(format!("dtype {} differs from the tensor's {}", dtype.name, t.dtype.name));
                }
                if a[2].as_str().is_none() {
                    return Err("device must be a str".into());
                }
                t.requires_grad = self.bool_arg(&a[3], "requires_grad")?;
                t
            }
            Rebuild::QTensor => {
                arity(7, 7)?;
                self.check_qtensor(a)?;
                return Ok(self.unconvertible("quantized tensor", "safetensors has no quantized dtypes"));
            }
            Rebuild::Sparse => {
                arity(2, 2)?;
                match self.heap.object(&a[0]) {
                    Some(Object::Layout(l)) => {
                        let detail = format!("layout {l}; safetensors holds dense tensors only");
                        return Ok(self.unconvertible("sparse tensor", &detail));
                    }
                    _ => return Err("layout must come from torch.serialization._get_layout".into()),
                }
            }
            Rebuild::Meta => {
                arity(4, 4)?;
                let dtype = self.dtype_arg(&a[0])?;
                let size = self.ints(&a[1], "size")?;
                self.ints(&a[2], "stride")?;
                return Ok(self.unconvertible("meta tensor", &format!("{} {size:?} has no data", dtype.name)));
            }
            Rebuild::WrapperSubclass => return Err("tensor wrapper subclasses carry no data and are not supported".into()),
            Rebuild::FromNumpy => return Err("tensors rebuilt from numpy arrays need numpy globals and are not supported".into()),
            Rebuild::Nested => return Err("nested tensors are not supported".into()),
        };
        Ok(self.alloc(Object::Tensor(Box::new(tensor))))
    }

    fn unconvertible(&mut self, kind: &'static str, detail: &str) -> Value {
        self.alloc(Object::Unconvertible(Box::new(Unconvertible { kind, detail: detail.to_owned() })))
    }

    fn check_qtensor(&self, a: &[Value]) -> std::result::Result<(), String> {
        let t = self.tensor_on(&a[0], None, &a[1], &a[2], &a[3])?;
        let params = self.heap.tuple(&a[4]).ok_or("quantizer_params must be a tuple")?;
        let scheme = match params.first().and_then(|s| self.heap.global(s)).and_then(|g| g.known) {
            Some(Known::QScheme(s)) => s,
            _ => return Err("quantizer_params must start with a torch qscheme".into()),
        };
        if scheme.starts_with("per_channel") {
            let [_, scales, zero_points, axis] = params else { return Err("per-channel params are (scheme, scales, zero_points, axis)".into()) };
            let axis = self.int_arg(axis, "axis")?;
            if axis < 0 || axis as usize >= t.size.len() {
                return Err(format!("axis {axis} is outside the tensor's {} dimensions", t.size.len()));
            }
            let want = t.size[axis as usize];
            for (what, v) in [("scales", scales), ("zero_points", zero_points)] {
                let s = self.tensor_arg(v, what)?;
                if s.size.len() != 1 || s.size[0] != want {
                    return Err(format!("{what} has shape {:?} but axis {axis} has {want} channels", s.size));
                }
            }
        } else if params.len() != 3 {
            return Err("per-tensor params are (scheme, scale, zero_point)".into());
        }
        Ok(())
    }

    /// The model of `cls.__new__(cls, *args)` for allowlisted classes.
    pub(crate) fn construct_known(&mut self, known: Known, args: &Value) -> Model {
        let a: Vec<Value> = self.heap.tuple(args).expect("caller checked").to_vec();
        match known {
            Known::Parameter => {
                let mut t = match a.as_slice() {
                    [t] | [t, Value::Bool(_)] => self.tensor_arg(t, "Parameter data")?,
                    _ => return Err("expected (tensor[, requires_grad])".into()),
                };
                t.parameter = true;
                if let Some(Value::Bool(rg)) = a.get(1) {
                    t.requires_grad = *rg;
                }
                Ok(self.alloc(Object::Tensor(Box::new(t))))
            }
            Known::OrderedDict | Known::Counter | Known::Set | Known::FrozenSet if a.is_empty() => {
                let empty = self.alloc(Object::Tuple(vec![]));
                self.call_known(known, &empty)
            }
            Known::Tensor => Err("legacy torch.Tensor construction is not supported".into()),
            _ => Err("not constructible with NEWOBJ".into()),
        }
    }

    /// `persistent_load(pid)`: a storage declaration, checked against the
    /// pid schema and against earlier declarations of the same key.
    pub(crate) fn persistent_load(&mut self, pid: Value) -> Result<Value> {
        match self.storage_from_pid(&pid) {
            Ok(storage) => {
                if let Some(first) = self.storages.by_key.get(&storage.key) {
                    let (a, b) = (first.byte_len(), storage.byte_len());
                    let same_type = first.storage_type == storage.storage_type;
                    if a != b || (!same_type && a != Some(0)) {
                        let bytes = |n: Option<u64>| n.map_or_else(|| "more than 2^64".to_owned(), |n| n.to_string());
                        let detail = if a != b {
                            format!("storage `{}` declared twice with different sizes ({} and {} bytes)", storage.key, bytes(a), bytes(b))
                        } else {
                            let (x, y) = (first.storage_type.element_name(), storage.storage_type.element_name());
                            format!("storage `{}` declared twice with different element types ({x} and {y})", storage.key)
                        };
                        self.flag(Severity::Dangerous, "storage", detail)?;
                    }
                } else {
                    self.storages.order.push(storage.key.clone());
                    self.storages.by_key.insert(storage.key.clone(), storage.clone());
                }
                Ok(self.alloc(Object::Storage(Box::new(storage))))
            }
            Err(reason) => {
                let severity = if self.opts.pids == PidSchema::None { Severity::Suspicious } else { Severity::Dangerous };
                self.flag(severity, "persistent-id", reason)?;
                let callee = self.alloc(Object::Global(Box::new(crate::value::Global { module: "<persistent_load>".into(), name: "BINPERSID".into(), known: None })));
                let id = self.heap.alloc(
                    Object::Opaque(Box::new(crate::value::Opaque { callable: callee, args: pid, how: "BINPERSID", states: vec![], items: vec![] })),
                    self.op_offset,
                );
                Ok(Value::Obj(id))
            }
        }
    }

    fn storage_from_pid(&self, pid: &Value) -> std::result::Result<Storage, String> {
        let schema = self.opts.pids;
        if schema == PidSchema::None {
            return Err("persistent id in a pickle that is not a torch checkpoint".into());
        }
        let items = self.heap.tuple(pid).ok_or_else(|| format!("persistent id must be a tuple, got {}", self.heap.type_name(pid)))?;
        if items.first().and_then(Value::as_str) == Some("module") {
            let class = items.get(1).map(|c| self.heap.summary(c, 100)).unwrap_or_default();
            let source = items.get(3).map(|s| self.heap.summary(s, 200)).unwrap_or_default();
            return Err(format!("whole-module persistent id for {class} (torch would return the class; embedded source {source})"));
        }
        let arity_ok = match schema {
            PidSchema::Zip => items.len() == 5,
            PidSchema::Legacy => items.len() == 6,
            _ => items.len() == 5 || items.len() == 6,
        };
        if !arity_ok || items[0].as_str() != Some("storage") {
            let view = if schema == PidSchema::Legacy { ", view" } else { "" };
            return Err(format!("persistent id must be ('storage', type, key, location, numel{view}), got {}", self.heap.summary(pid, 120)));
        }
        let storage_type = match self.heap.global(&items[1]).and_then(|g| g.known) {
            Some(Known::Storage(t)) => t,
            _ => return Err(format!("storage type must be a torch storage class, got {}", self.heap.summary(&items[1], 80))),
        };
        let key = items[2].as_str().ok_or("storage key must be a str")?;
        let max_digits = if schema == PidSchema::Zip { 10 } else { 20 };
        if key.is_empty() || key.len() > max_digits || !key.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("storage key {key:?} is not a decimal number of at most {max_digits} digits"));
        }
        let location = items[3].as_str().ok_or("storage location must be a str")?;
        let numel = match items[4] {
            Value::Int(n) if n >= 0 => n as u64,
            _ => return Err(format!("storage numel must be a non-negative int, got {}", self.heap.summary(&items[4], 40))),
        };
        let elsize = storage_type.element_size();
        numel.checked_mul(elsize).ok_or_else(|| format!("storage `{key}`: {numel} × {elsize} bytes overflows"))?;
        let view = match items.get(5) {
            None | Some(Value::None) => None,
            Some(v) => {
                let parts = self.heap.tuple(v).ok_or("view metadata must be None or a tuple")?;
                match parts {
                    [Value::Str(vk), Value::Int(off), Value::Int(len)] if *off >= 0 && *len >= 0 => {
                        let end = (*off as u64).checked_add(*len as u64).ok_or("view overflows")?;
                        if end > numel {
                            return Err(format!("storage view {vk} [{off}, {end}) lies outside its root of {numel} elements"));
                        }
                        Some((vk.clone(), *off as u64, *len as u64))
                    }
                    _ => return Err("view metadata must be (key, offset, size)".into()),
                }
            }
        };
        Ok(Storage { key: key.into(), storage_type, numel, location: location.into(), view })
    }
}

fn number(v: &Value) -> std::result::Result<f64, String> {
    match v {
        Value::Float(f) => Ok(*f),
        Value::Int(i) => Ok(*i as f64),
        Value::Bool(b) => Ok(*b as u8 as f64),
        _ => Err("complex parts must be numbers".into()),
    }
}

fn is_empty_state(vm: &Vm<'_, '_>, v: &Value) -> bool {
    match vm.heap.object(v) {
        Some(Object::Dict(d)) => d.entries.is_empty() && d.attrs.is_empty(),
        None => matches!(v, Value::None),
        _ => false,
    }
}

//! The names a checkpoint may mention: torch dtypes and storage types, the
//! globals allowlist, the Python 2 renames, and the denylist that only sets
//! how loudly the scanner reports a name that is not allowlisted.

use tensafe::Dtype;

use crate::compat::{IMPORT_MAPPING, NAME_MAPPING};

/// A torch element type as pickled (`GLOBAL torch <name>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TorchDtype {
    /// The canonical torch name, e.g. `float32`.
    pub name: &'static str,
    /// Bytes per element in storage (1 for the packed and sub-byte types).
    pub itemsize: u8,
}

impl TorchDtype {
    /// The safetensors dtype holding the same bytes, if there is one. Derived
    /// from the core crate's table (`Dtype::framework_name`), so the two never
    /// disagree.
    pub fn safetensors(self) -> Option<Dtype> {
        Dtype::from_framework_name(self.name)
    }

    /// Looks a canonical torch dtype name up.
    pub fn from_name(name: &str) -> Option<TorchDtype> {
        TORCH_DTYPES.iter().copied().find(|d| d.name == name)
    }

    /// Whether negating a value is flipping its top bit (IEEE-style floats).
    pub(crate) fn neg_is_sign_flip(self) -> bool {
        matches!(self.name, "float16" | "bfloat16" | "float32" | "float64" | "complex64" | "float8_e4m3fn" | "float8_e5m2")
    }

    /// Whether negating a value is a two's complement negation (uint8's
    /// wraps, as torch's does; torch has no negation for the wider unsigned
    /// types, nor for the fnuz and e8m0 floats).
    pub(crate) fn neg_is_twos_complement(self) -> bool {
        matches!(self.name, "int8" | "int16" | "int32" | "int64" | "uint8")
    }

    /// Size of the part to byte-swap: the element, or each half of a complex.
    pub(crate) fn swap_unit(self) -> usize {
        match self.name {
            "complex64" | "complex128" | "complex32" => self.itemsize as usize / 2,
            _ => self.itemsize as usize,
        }
    }
}

macro_rules! dtypes {
    ($($name:literal $size:literal),* $(,)?) => {
        /// Every torch dtype a checkpoint can name, with its storage width.
        pub static TORCH_DTYPES: &[TorchDtype] = &[$(TorchDtype { name: $name, itemsize: $size }),*];
    };
}

dtypes! {
    "float64" 8, "float32" 4, "float16" 2, "bfloat16" 2, "int64" 8, "int32" 4, "int16" 2, "int8" 1,
    "uint8" 1, "bool" 1, "complex64" 8, "complex128" 16, "complex32" 4, "bcomplex32" 4,
    "float8_e4m3fn" 1, "float8_e5m2" 1, "float8_e4m3fnuz" 1, "float8_e5m2fnuz" 1, "float8_e8m0fnu" 1,
    "float4_e2m1fn_x2" 1, "uint16" 2, "uint32" 4, "uint64" 8,
    "qint8" 1, "quint8" 1, "qint32" 4, "quint4x2" 1, "quint2x4" 1,
    "bits8" 1, "bits16" 2, "bits1x8" 1, "bits2x4" 1, "bits4x2" 1,
    "int1" 1, "int2" 1, "int3" 1, "int4" 1, "int5" 1, "int6" 1, "int7" 1,
    "uint1" 1, "uint2" 1, "uint3" 1, "uint4" 1, "uint5" 1, "uint6" 1, "uint7" 1,
}

/// The legacy typed storage names and the dtype each implies.
static TYPED_STORAGES: &[(&str, &str)] = &[
    ("DoubleStorage", "float64"),
    ("FloatStorage", "float32"),
    ("HalfStorage", "float16"),
    ("BFloat16Storage", "bfloat16"),
    ("LongStorage", "int64"),
    ("IntStorage", "int32"),
    ("ShortStorage", "int16"),
    ("CharStorage", "int8"),
    ("ByteStorage", "uint8"),
    ("BoolStorage", "bool"),
    ("ComplexFloatStorage", "complex64"),
    ("ComplexDoubleStorage", "complex128"),
    ("QInt8Storage", "qint8"),
    ("QUInt8Storage", "quint8"),
    ("QInt32Storage", "qint32"),
    ("QUInt4x2Storage", "quint4x2"),
    ("QUInt2x4Storage", "quint2x4"),
];

/// The storage class named in a persistent id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageType {
    /// `torch.<Name>Storage`: the element type is implied.
    Typed(TorchDtype),
    /// `torch.storage.UntypedStorage`: bytes; the tensor's dtype comes from
    /// `_rebuild_tensor_v3`.
    Untyped,
}

impl StorageType {
    /// The element type's name for messages: `float32`, or `bytes` (untyped).
    pub fn element_name(self) -> &'static str {
        match self {
            StorageType::Typed(d) => d.name,
            StorageType::Untyped => "bytes",
        }
    }

    /// Bytes per storage element (`numel` counts these).
    pub fn element_size(self) -> u64 {
        match self {
            StorageType::Typed(d) => d.itemsize as u64,
            StorageType::Untyped => 1,
        }
    }
}

/// A torch rebuild function (`torch._utils._rebuild_*` and friends).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rebuild {
    /// `_rebuild_tensor(storage, offset, size, stride)`.
    Tensor,
    /// `_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])`.
    TensorV2,
    /// `_rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype[, metadata])`.
    TensorV3,
    /// `_rebuild_parameter(tensor, requires_grad, hooks)`.
    Parameter,
    /// `_rebuild_parameter_with_state(tensor, requires_grad, hooks, state)`.
    ParameterWithState,
    /// `torch._tensor._rebuild_from_type_v2(func, new_type, args, state)`.
    FromTypeV2,
    /// Quantized tensors.
    QTensor,
    /// Sparse tensors.
    Sparse,
    /// Meta tensors (no data).
    Meta,
    /// `_rebuild_device_tensor_from_cpu_tensor(cpu_tensor, dtype, device, requires_grad)`.
    DeviceFromCpu,
    /// Recognised and refused: wrapper subclasses carry no data.
    WrapperSubclass,
    /// Recognised and refused: needs numpy globals.
    FromNumpy,
    /// Recognised and refused: nested tensors.
    Nested,
}

/// What an allowlisted global is, i.e. how the VM models it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Known {
    /// `collections.OrderedDict`.
    OrderedDict,
    /// `collections.Counter`.
    Counter,
    /// `builtins.set`.
    Set,
    /// `builtins.frozenset`.
    FrozenSet,
    /// `builtins.bytearray`.
    ByteArray,
    /// `builtins.complex`.
    Complex,
    /// `_codecs.encode` (how protocol 2 pickles `bytes`).
    CodecsEncode,
    /// `torch.Size`.
    Size,
    /// `torch.device`.
    Device,
    /// `torch.Tensor` (a `new_type` for `_rebuild_from_type_v2`).
    Tensor,
    /// `torch.nn.parameter.Parameter`.
    Parameter,
    /// A storage class (only inside a persistent id).
    Storage(StorageType),
    /// A dtype value.
    Dtype(TorchDtype),
    /// A quantization scheme value.
    QScheme(&'static str),
    /// `torch.serialization._get_layout`.
    GetLayout,
    /// A rebuild function.
    Rebuild(Rebuild),
}

impl Known {
    /// Whether the VM may call this global with REDUCE.
    pub fn is_callable(self) -> bool {
        !matches!(self, Known::Storage(_) | Known::Dtype(_) | Known::QScheme(_) | Known::Tensor)
    }
}

const QSCHEMES: &[&str] =
    &["per_tensor_affine", "per_tensor_symmetric", "per_channel_affine", "per_channel_symmetric", "per_channel_affine_float_qparams"];

/// Resolves an exact `(module, name)` pair against the allowlist. No
/// attribute walking: a dotted name only matches if that exact pair is listed.
pub fn resolve(module: &str, name: &str) -> Option<Known> {
    let known = match (module, name) {
        ("collections", "OrderedDict") => Known::OrderedDict,
        ("collections", "Counter") => Known::Counter,
        ("builtins", "set") => Known::Set,
        ("builtins", "frozenset") => Known::FrozenSet,
        ("builtins", "bytearray") => Known::ByteArray,
        ("builtins", "complex") => Known::Complex,
        ("_codecs", "encode") => Known::CodecsEncode,
        ("torch", "Size") => Known::Size,
        ("torch", "device") => Known::Device,
        ("torch", "Tensor") => Known::Tensor,
        ("torch.nn.parameter", "Parameter") => Known::Parameter,
        ("torch.storage", "UntypedStorage") => Known::Storage(StorageType::Untyped),
        ("torch.serialization", "_get_layout") => Known::GetLayout,
        ("torch._tensor", "_rebuild_from_type_v2") => Known::Rebuild(Rebuild::FromTypeV2),
        ("torch._utils", f) => Known::Rebuild(match f {
            "_rebuild_tensor" => Rebuild::Tensor,
            "_rebuild_tensor_v2" => Rebuild::TensorV2,
            "_rebuild_tensor_v3" => Rebuild::TensorV3,
            "_rebuild_parameter" => Rebuild::Parameter,
            "_rebuild_parameter_with_state" => Rebuild::ParameterWithState,
            "_rebuild_qtensor" => Rebuild::QTensor,
            "_rebuild_sparse_tensor" => Rebuild::Sparse,
            "_rebuild_meta_tensor_no_storage" => Rebuild::Meta,
            "_rebuild_device_tensor_from_cpu_tensor" => Rebuild::DeviceFromCpu,
            "_rebuild_wrapper_subclass" => Rebuild::WrapperSubclass,
            "_rebuild_device_tensor_from_numpy" => Rebuild::FromNumpy,
            "_rebuild_nested_tensor" => Rebuild::Nested,
            _ => return None,
        }),
        ("torch", n) | ("torch.cuda", n) if n.ends_with("Storage") => {
            let (_, dtype) = TYPED_STORAGES.iter().find(|(s, _)| *s == n)?;
            let dtype = TorchDtype::from_name(dtype).expect("storage table names known dtypes");
            // The cuda aliases exist for the 12 non-quantized names only.
            if module == "torch.cuda" && dtype.name.starts_with('q') {
                return None;
            }
            Known::Storage(StorageType::Typed(dtype))
        }
        ("torch", n) if QSCHEMES.contains(&n) => Known::QScheme(QSCHEMES.iter().find(|q| **q == n).expect("just checked")),
        ("torch", n) => Known::Dtype(TorchDtype::from_name(n)?),
        _ => return None,
    };
    Some(known)
}

/// Applies CPython's Python 2 renames (`fix_imports`, protocol < 3).
pub fn python2_rename(module: &str, name: &str) -> Option<(&'static str, String)> {
    if let Some((_, (m, n))) = NAME_MAPPING.iter().find(|((m, n), _)| *m == module && *n == name) {
        return Some((m, n.to_string()));
    }
    IMPORT_MAPPING.iter().find(|(m, _)| *m == module).map(|(_, to)| (*to, name.to_owned()))
}

/// How bad a global is, for the scanner's wording and verdict. This never
/// decides safety: anything not allowlisted is refused by the converter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Allowlisted: what a checkpoint legitimately contains.
    Safe,
    /// Not allowlisted; nothing known against it.
    Suspicious,
    /// Code execution, process, file, network or import machinery, or a
    /// disguised name.
    Dangerous,
}

/// Modules whose every name is reported as dangerous (prefix match on whole
/// dotted components).
static DANGEROUS_MODULES: &[&str] = &[
    "os", "posix", "nt", "posixpath", "ntpath", "subprocess", "sys", "socket", "_socket", "ssl", "shutil",
    "importlib", "imp", "zipimport", "pkgutil", "runpy", "pty", "ctypes", "_ctypes", "cffi", "code", "codeop",
    "pdb", "bdb", "trace", "cProfile", "profile", "timeit", "webbrowser", "multiprocessing", "asyncio",
    "concurrent", "threading", "_thread", "signal", "requests", "urllib", "urllib3", "http", "httplib",
    "ftplib", "telnetlib", "smtplib", "poplib", "imaplib", "xmlrpc", "socketserver", "pickle", "_pickle",
    "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve", "types", "io", "_io", "tempfile", "glob",
    "fileinput", "pathlib", "venv", "ensurepip", "pip", "setuptools", "distutils", "site", "sysconfig",
    "gc", "inspect", "commands", "platform", "resource", "mmap", "select", "selectors",
    "tarfile", "zipfile", "sqlite3", "dbm", "logging.config", "idlelib", "lib2to3", "pydoc", "doctest",
    "unittest", "torch.hub", "torch.jit", "torch._C", "torch.utils.cpp_extension", "torch.package",
    "torch.distributed", "torch.ops", "torch._dynamo", "torch._inductor", "torch.fx", "numpy.testing",
    "numpy.f2py", "numpy.distutils", "nose", "pytest", "IPython", "jinja2", "yaml",
    // numpy's file I/O (reading, writing, mapping, loading libraries), under
    // its numpy 1 and numpy 2 module names.
    "numpy.ctypeslib", "numpy.lib.npyio", "numpy.lib._npyio_impl", "numpy.lib.format", "numpy.lib._format_impl",
    "numpy.lib._datasource", "numpy.lib.utils", "numpy.core.memmap", "numpy._core.memmap",
];

/// Single names reported as dangerous.
static DANGEROUS_NAMES: &[(&str, &str)] = &[
    ("builtins", "eval"),
    ("builtins", "exec"),
    ("builtins", "compile"),
    ("builtins", "open"),
    ("builtins", "__import__"),
    ("builtins", "getattr"),
    ("builtins", "setattr"),
    ("builtins", "delattr"),
    ("builtins", "globals"),
    ("builtins", "locals"),
    ("builtins", "vars"),
    ("builtins", "breakpoint"),
    ("builtins", "input"),
    ("builtins", "exit"),
    ("builtins", "quit"),
    ("builtins", "help"),
    ("builtins", "memoryview"),
    ("builtins", "__builtins__"),
    ("builtins", "apply"),
    ("builtins", "execfile"),
    ("builtins", "file"),
    ("builtins", "reload"),
    ("operator", "attrgetter"),
    ("operator", "methodcaller"),
    ("operator", "itemgetter"),
    ("operator", "getitem"),
    ("_operator", "attrgetter"),
    ("_operator", "methodcaller"),
    ("functools", "partial"),
    ("functools", "reduce"),
    ("torch", "load"),
    ("torch.serialization", "load"),
    ("torch", "save"),
    ("numpy", "load"),
    ("numpy", "save"),
    ("numpy", "savez"),
    ("numpy", "savez_compressed"),
    ("numpy", "savetxt"),
    ("numpy", "loadtxt"),
    ("numpy", "genfromtxt"),
    ("numpy", "fromfile"),
    ("numpy", "fromregex"),
    ("numpy", "memmap"),
    ("numpy", "DataSource"),
    ("copyreg", "_reconstructor"),
    ("copyreg", "__newobj__"),
    ("copyreg", "__newobj_ex__"),
];

/// Severity of an import that is not allowlisted.
pub fn severity(module: &str, name: &str) -> Severity {
    if name.contains('.') || module.is_empty() || name.is_empty() {
        return Severity::Dangerous;
    }
    if is_joblib_array_wrapper(module, name) {
        // A data record joblib's own loader consumes (the scanner steps over
        // its array bytes); not allowlisted, but nothing runs through it.
        return Severity::Suspicious;
    }
    let module_matches = |prefix: &str| module == prefix || module.strip_prefix(prefix).is_some_and(|r| r.starts_with('.'));
    if DANGEROUS_MODULES.iter().any(|m| module_matches(m))
        || DANGEROUS_NAMES.iter().any(|(m, n)| *m == module && *n == name)
        || name.starts_with("__") && name != "__main__"
    {
        Severity::Dangerous
    } else {
        Severity::Suspicious
    }
}

/// joblib's array wrapper (also under scikit-learn's old vendored copy).
pub fn is_joblib_array_wrapper(module: &str, name: &str) -> bool {
    name == "NumpyArrayWrapper" && matches!(module, "joblib.numpy_pickle" | "sklearn.externals.joblib.numpy_pickle")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_and_dtype_names_resolve() {
        assert_eq!(resolve("torch", "FloatStorage"), Some(Known::Storage(StorageType::Typed(TorchDtype::from_name("float32").unwrap()))));
        assert_eq!(resolve("torch.cuda", "HalfStorage").map(|_| ()), Some(()));
        assert_eq!(resolve("torch.cuda", "QInt8Storage"), None);
        assert_eq!(resolve("torch", "NopeStorage"), None);
        assert_eq!(resolve("torch", "float8_e4m3fn"), Some(Known::Dtype(TorchDtype { name: "float8_e4m3fn", itemsize: 1 })));
        assert_eq!(resolve("torch", "load"), None);
        assert_eq!(resolve("torch._utils", "_rebuild_tensor_v2.__globals__"), None);
        assert_eq!(resolve("builtins", "eval"), None);
    }

    #[test]
    fn every_safetensors_dtype_has_a_torch_name() {
        for d in Dtype::ALL {
            if let Some(name) = d.framework_name() {
                assert!(TorchDtype::from_name(name).is_some(), "{name}");
            }
        }
        assert_eq!(TorchDtype::from_name("complex128").unwrap().safetensors(), None);
    }

    #[test]
    fn python2_names_are_renamed() {
        assert_eq!(python2_rename("__builtin__", "set"), Some(("builtins", "set".into())));
        assert_eq!(python2_rename("__builtin__", "unicode"), Some(("builtins", "str".into())));
        assert_eq!(python2_rename("collections", "OrderedDict"), None);
    }

    #[test]
    fn severity_is_loud_for_code_execution() {
        assert_eq!(severity("posix", "system"), Severity::Dangerous);
        assert_eq!(severity("os.path", "join"), Severity::Dangerous);
        assert_eq!(severity("builtins", "getattr"), Severity::Dangerous);
        assert_eq!(severity("torch", "serialization.os.system"), Severity::Dangerous);
        assert_eq!(severity("argparse", "Namespace"), Severity::Suspicious);
        assert_eq!(severity("osmium", "x"), Severity::Suspicious);
    }
}

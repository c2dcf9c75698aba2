//! Element types of the safetensors format.
//!
//! Everything tensafe knows about a dtype — its header code, its bit width, its
//! place in the writer's ordering and the name frameworks use for it — comes
//! from the single table in [`dtype_table!`] below. Other crates (the Python
//! bindings, the pickle converter) look dtypes up here instead of keeping their
//! own lists.

use std::fmt;

/// Declares [`Dtype`] and its lookup functions from one table.
///
/// Rows are in the reference implementation's declaration order. That order is
/// observable twice: the writer sorts tensors by it (descending), and the
/// "unknown variant" error lists the codes in it.
macro_rules! dtype_table {
    ($( $(#[$doc:meta])* $variant:ident = $code:literal, bits $bits:literal, framework $framework:expr; )*) => {
        /// The element type of a tensor, as written in the header's `dtype` field.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[non_exhaustive]
        pub enum Dtype {
            $( $(#[$doc])* $variant, )*
        }

        impl Dtype {
            /// Every dtype, in the reference's declaration order (ascending rank).
            pub const ALL: &'static [Dtype] = &[$(Dtype::$variant),*];

            /// Every header code, in the same order as [`Dtype::ALL`].
            pub const CODES: &'static [&'static str] = &[$($code),*];

            /// The header code, e.g. `"BF16"`.
            pub const fn code(self) -> &'static str {
                match self { $(Dtype::$variant => $code,)* }
            }

            /// Width of one element in bits (4 or 6 for the sub-byte float types).
            pub const fn bits(self) -> usize {
                match self { $(Dtype::$variant => $bits,)* }
            }

            /// The dtype name shared by torch (`torch.<name>`), numpy/ml_dtypes and the
            /// Python `TensorSpec`, or `None` where no framework has the type (F6).
            pub const fn framework_name(self) -> Option<&'static str> {
                match self { $(Dtype::$variant => $framework,)* }
            }

            /// Parses a header code. Case-sensitive, like the reference.
            pub fn from_code(code: &str) -> Option<Dtype> {
                match code { $($code => Some(Dtype::$variant),)* _ => None }
            }

            /// Inverse of [`Dtype::framework_name`].
            pub fn from_framework_name(name: &str) -> Option<Dtype> {
                Dtype::ALL.iter().copied().find(|d| d.framework_name() == Some(name))
            }
        }
    };
}

dtype_table! {
    /// Boolean, one byte per element.
    Bool = "BOOL", bits 8, framework Some("bool");
    /// 4-bit float (e2m1); two values per byte.
    F4 = "F4", bits 4, framework Some("float4_e2m1fn_x2");
    /// 6-bit float (e2m3); four values per three bytes.
    F6E2M3 = "F6_E2M3", bits 6, framework None;
    /// 6-bit float (e3m2); four values per three bytes.
    F6E3M2 = "F6_E3M2", bits 6, framework None;
    /// Unsigned 8-bit integer.
    U8 = "U8", bits 8, framework Some("uint8");
    /// Signed 8-bit integer.
    I8 = "I8", bits 8, framework Some("int8");
    /// 8-bit float, e5m2.
    F8E5M2 = "F8_E5M2", bits 8, framework Some("float8_e5m2");
    /// 8-bit float, e4m3 (finite, no infinities).
    F8E4M3 = "F8_E4M3", bits 8, framework Some("float8_e4m3fn");
    /// 8-bit exponent-only float (e8m0), used for MX scales.
    F8E8M0 = "F8_E8M0", bits 8, framework Some("float8_e8m0fnu");
    /// 8-bit float, e4m3 with unsigned zero and NaN at 0x80.
    F8E4M3Fnuz = "F8_E4M3FNUZ", bits 8, framework Some("float8_e4m3fnuz");
    /// 8-bit float, e5m2 with unsigned zero and NaN at 0x80.
    F8E5M2Fnuz = "F8_E5M2FNUZ", bits 8, framework Some("float8_e5m2fnuz");
    /// Signed 16-bit integer.
    I16 = "I16", bits 16, framework Some("int16");
    /// Unsigned 16-bit integer.
    U16 = "U16", bits 16, framework Some("uint16");
    /// IEEE half precision.
    F16 = "F16", bits 16, framework Some("float16");
    /// bfloat16.
    BF16 = "BF16", bits 16, framework Some("bfloat16");
    /// Signed 32-bit integer.
    I32 = "I32", bits 32, framework Some("int32");
    /// Unsigned 32-bit integer.
    U32 = "U32", bits 32, framework Some("uint32");
    /// IEEE single precision.
    F32 = "F32", bits 32, framework Some("float32");
    /// Complex number of two F32 values.
    C64 = "C64", bits 64, framework Some("complex64");
    /// IEEE double precision.
    F64 = "F64", bits 64, framework Some("float64");
    /// Signed 64-bit integer.
    I64 = "I64", bits 64, framework Some("int64");
    /// Unsigned 64-bit integer.
    U64 = "U64", bits 64, framework Some("uint64");
}

impl Dtype {
    /// Position in the reference's declaration order. The writer places tensors
    /// with a higher rank first, which keeps every tensor aligned to its element
    /// size when the data section starts 8-aligned.
    pub fn rank(self) -> usize {
        // `ALL` is in declaration order and short; the derive(Ord) order is the same.
        Dtype::ALL.iter().position(|d| *d == self).expect("every dtype is in ALL")
    }

    /// Size in bytes of `elements` values, or `None` on overflow or when the bits
    /// do not fill whole bytes (sub-byte dtypes with an odd count).
    pub fn byte_len(self, elements: usize) -> Option<usize> {
        let bits = elements.checked_mul(self.bits())?;
        (bits % 8 == 0).then_some(bits / 8)
    }

    /// Size of one element in bytes, or `None` for the sub-byte dtypes.
    pub fn size(self) -> Option<usize> {
        self.bits().is_multiple_of(8).then_some(self.bits() / 8)
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl std::str::FromStr for Dtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Dtype::from_code(s).ok_or_else(|| format!("unknown dtype `{s}`"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_has_the_22_format_dtypes_with_unique_codes() {
        assert_eq!(Dtype::ALL.len(), 22);
        for (rank, d) in Dtype::ALL.iter().enumerate() {
            assert_eq!(d.rank(), rank);
            assert_eq!(Dtype::from_code(d.code()), Some(*d));
            if let Some(name) = d.framework_name() {
                assert_eq!(Dtype::from_framework_name(name), Some(*d));
            }
        }
        assert_eq!(Dtype::from_code("f32"), None, "codes are case-sensitive");
    }

    #[test]
    fn sub_byte_lengths_need_whole_bytes() {
        assert_eq!(Dtype::F4.byte_len(3), None);
        assert_eq!(Dtype::F4.byte_len(4), Some(2));
        assert_eq!(Dtype::F6E2M3.byte_len(4), Some(3));
        assert_eq!(Dtype::F6E2M3.byte_len(2), None);
        assert_eq!(Dtype::U64.byte_len(usize::MAX), None);
    }
}

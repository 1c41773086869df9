//! ONNX element types (`TensorProto.DataType`): names and storage sizes.

use std::fmt;

/// An ONNX element type. Values are the `TensorProto.DataType` numbers; unknown numbers are
/// kept as `Other` so that nothing is lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataType {
    Float,
    Uint8,
    Int8,
    Uint16,
    Int16,
    Int32,
    Int64,
    String,
    Bool,
    Float16,
    Double,
    Uint32,
    Uint64,
    Complex64,
    Complex128,
    Bfloat16,
    Float8(i32),
    Int4,
    Uint4,
    Float4e2m1,
    Int2,
    Uint2,
    Float6(i32),
    Other(i32),
}

impl DataType {
    pub fn from_i32(v: i32) -> Self {
        use DataType::*;
        match v {
            1 => Float,
            2 => Uint8,
            3 => Int8,
            4 => Uint16,
            5 => Int16,
            6 => Int32,
            7 => Int64,
            8 => String,
            9 => Bool,
            10 => Float16,
            11 => Double,
            12 => Uint32,
            13 => Uint64,
            14 => Complex64,
            15 => Complex128,
            16 => Bfloat16,
            17..=20 | 24 => Float8(v),
            21 => Uint4,
            22 => Int4,
            23 => Float4e2m1,
            25 => Uint2,
            26 => Int2,
            27 | 28 => Float6(v),
            other => Other(other),
        }
    }

    pub fn to_i32(self) -> i32 {
        use DataType::*;
        match self {
            Float => 1,
            Uint8 => 2,
            Int8 => 3,
            Uint16 => 4,
            Int16 => 5,
            Int32 => 6,
            Int64 => 7,
            String => 8,
            Bool => 9,
            Float16 => 10,
            Double => 11,
            Uint32 => 12,
            Uint64 => 13,
            Complex64 => 14,
            Complex128 => 15,
            Bfloat16 => 16,
            Uint4 => 21,
            Int4 => 22,
            Float4e2m1 => 23,
            Uint2 => 25,
            Int2 => 26,
            Float8(v) | Float6(v) | Other(v) => v,
        }
    }

    /// Bits per element as stored in `raw_data`, when that is fixed.
    pub fn bits(self) -> Option<usize> {
        use DataType::*;
        Some(match self {
            Bool | Uint8 | Int8 | Float8(_) => 8,
            Uint16 | Int16 | Float16 | Bfloat16 => 16,
            Float | Int32 | Uint32 => 32,
            Int64 | Uint64 | Double | Complex64 => 64,
            Complex128 => 128,
            Int4 | Uint4 | Float4e2m1 => 4,
            Int2 | Uint2 => 2,
            Float6(_) => 6,
            String | Other(_) => return None,
        })
    }

    /// Bytes that `n` elements take in `raw_data` (sub-byte types are packed, rounded up).
    pub fn raw_len(self, n: usize) -> Option<usize> {
        self.bits().map(|b| n.saturating_mul(b).div_ceil(8))
    }

    /// True for the float types onnx-lora can fold into (fp32, fp16, bf16, fp64).
    pub fn is_foldable_float(self) -> bool {
        matches!(
            self,
            DataType::Float | DataType::Float16 | DataType::Bfloat16 | DataType::Double
        )
    }

    pub fn name(self) -> String {
        use DataType::*;
        match self {
            Float => "float32".into(),
            Uint8 => "uint8".into(),
            Int8 => "int8".into(),
            Uint16 => "uint16".into(),
            Int16 => "int16".into(),
            Int32 => "int32".into(),
            Int64 => "int64".into(),
            String => "string".into(),
            Bool => "bool".into(),
            Float16 => "float16".into(),
            Double => "float64".into(),
            Uint32 => "uint32".into(),
            Uint64 => "uint64".into(),
            Complex64 => "complex64".into(),
            Complex128 => "complex128".into(),
            Bfloat16 => "bfloat16".into(),
            Int4 => "int4".into(),
            Uint4 => "uint4".into(),
            Float4e2m1 => "float4e2m1".into(),
            Int2 => "int2".into(),
            Uint2 => "uint2".into(),
            Float8(v) => format!("float8({v})"),
            Float6(v) => format!("float6({v})"),
            Other(0) => "undefined (data_type 0)".into(),
            Other(v) => format!("unknown (data_type {v})"),
        }
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

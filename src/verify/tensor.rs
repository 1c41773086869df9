//! Host arrays exchanged with the backends and npz files: an ONNX element type, a shape and
//! the elements as little-endian bytes in C order, with the numeric views that feeds, casts
//! and comparisons need. One byte layout for every type keeps backends and files type-agnostic.

use half::{bf16, f16};

use crate::error::{Error, Result};
use crate::onnx::DataType;

/// A dense array on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct ArrayData {
    pub dtype: DataType,
    pub shape: Vec<usize>,
    /// `numel * dtype size` bytes, little-endian, C order.
    pub data: Vec<u8>,
}

/// Named arrays, in the order a model or a file lists them.
pub type Tensors = Vec<(String, ArrayData)>;

/// The element types verification handles (fixed-size, not sub-byte, not complex).
pub const SUPPORTED: [DataType; 13] = [
    DataType::Float,
    DataType::Float16,
    DataType::Bfloat16,
    DataType::Double,
    DataType::Int8,
    DataType::Int16,
    DataType::Int32,
    DataType::Int64,
    DataType::Uint8,
    DataType::Uint16,
    DataType::Uint32,
    DataType::Uint64,
    DataType::Bool,
];

/// Bytes per element of a supported type.
pub fn elem_size(dtype: DataType) -> Option<usize> {
    SUPPORTED
        .contains(&dtype)
        .then(|| dtype.bits().map(|b| b / 8))
        .flatten()
}

impl ArrayData {
    /// Checks that `data` holds exactly `shape`'s elements of a supported `dtype`.
    pub fn new(dtype: DataType, shape: Vec<usize>, data: Vec<u8>) -> Result<Self> {
        let size = elem_size(dtype)
            .ok_or_else(|| Error::Verify(format!("{dtype} arrays are not supported")))?;
        let numel = numel(&shape)?;
        if numel.checked_mul(size) != Some(data.len()) {
            return Err(Error::Verify(format!(
                "a {dtype} array of shape {shape:?} needs {} bytes, got {}",
                numel.saturating_mul(size),
                data.len()
            )));
        }
        Ok(ArrayData { dtype, shape, data })
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Encodes `values` (one per element, C order) as `dtype`: floats round to nearest,
    /// integers round and saturate, bool is `v != 0`.
    pub fn from_f64(dtype: DataType, shape: Vec<usize>, values: &[f64]) -> Result<Self> {
        let enc = encoder(dtype)
            .ok_or_else(|| Error::Verify(format!("{dtype} arrays are not supported")))?;
        let mut data = Vec::with_capacity(values.len() * elem_size(dtype).unwrap_or(0));
        values.iter().for_each(|&v| enc(v, &mut data));
        Self::new(dtype, shape, data)
    }

    /// The elements as f64 (exact for every type but 64-bit integers beyond 2^53).
    pub fn values(&self) -> Result<Box<dyn Iterator<Item = f64> + '_>> {
        if let Some(ints) = self.ints() {
            return Ok(Box::new(ints.map(|v| v as f64)));
        }
        let dec = decoder(self.dtype)
            .ok_or_else(|| Error::Verify(format!("{} arrays are not supported", self.dtype)))?;
        let size = elem_size(self.dtype).unwrap_or(1);
        Ok(Box::new(self.data.chunks_exact(size).map(dec)))
    }

    /// The elements as exact integers, for integer and bool arrays (None for others): 64-bit
    /// values beyond 2^53, which f64 rounds, compare and convert exactly this way.
    pub fn ints(&self) -> Option<impl Iterator<Item = i128> + '_> {
        let dec = int_decoder(self.dtype)?;
        let size = elem_size(self.dtype).unwrap_or(1);
        Some(self.data.chunks_exact(size).map(dec))
    }

    /// The array as `to`. numpy has no bfloat16, so a uint16 array becomes bfloat16 by
    /// reinterpreting its bits (the usual way bf16 is stored in npz); integers become other
    /// integers exactly (saturating where they do not fit); other pairs convert values.
    pub fn cast(&self, to: DataType) -> Result<ArrayData> {
        if self.dtype == to {
            return Ok(self.clone());
        }
        if self.dtype == DataType::Uint16 && to == DataType::Bfloat16 {
            return Ok(ArrayData {
                dtype: to,
                ..self.clone()
            });
        }
        if let (Some(values), Some((lo, hi))) = (self.ints(), int_range(to))
            && to != DataType::Bool
        {
            let size = elem_size(to).unwrap_or(1);
            let mut data = Vec::with_capacity(self.numel() * size);
            for v in values {
                // (little-endian two's complement: the low `size` bytes of the clamped value)
                data.extend_from_slice(&v.clamp(lo, hi).to_le_bytes()[..size]);
            }
            return Self::new(to, self.shape.clone(), data);
        }
        let values: Vec<f64> = self.values()?.collect();
        Self::from_f64(to, self.shape.clone(), &values)
    }
}

/// Element count of a shape, refusing overflow.
pub fn numel(shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::Verify(format!("shape {shape:?} is too large")))
}

/// Whether the type holds floating-point values.
pub fn is_float(dtype: DataType) -> bool {
    matches!(
        dtype,
        DataType::Float | DataType::Float16 | DataType::Bfloat16 | DataType::Double
    )
}

type Decoder = fn(&[u8]) -> f64;
type Encoder = fn(f64, &mut Vec<u8>);

/// Reads fixed-size little-endian bytes; callers pass chunks of exactly `N` bytes.
fn le<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&b[..N]);
    out
}

fn decoder(dtype: DataType) -> Option<Decoder> {
    use DataType::*;
    Some(match dtype {
        Float => |b| f32::from_le_bytes(le(b)) as f64,
        Float16 => |b| f16::from_le_bytes(le(b)).to_f64(),
        Bfloat16 => |b| bf16::from_le_bytes(le(b)).to_f64(),
        Double => |b| f64::from_le_bytes(le(b)),
        // (integers and bool: `int_decoder`)
        _ => return None,
    })
}

fn int_decoder(dtype: DataType) -> Option<fn(&[u8]) -> i128> {
    use DataType::*;
    Some(match dtype {
        Int8 => |b| b[0] as i8 as i128,
        Uint8 => |b| b[0] as i128,
        Bool => |b| (b[0] != 0) as i128,
        Int16 => |b| i16::from_le_bytes(le(b)) as i128,
        Uint16 => |b| u16::from_le_bytes(le(b)) as i128,
        Int32 => |b| i32::from_le_bytes(le(b)) as i128,
        Uint32 => |b| u32::from_le_bytes(le(b)) as i128,
        Int64 => |b| i64::from_le_bytes(le(b)) as i128,
        Uint64 => |b| u64::from_le_bytes(le(b)) as i128,
        _ => return None,
    })
}

/// The values an integer type (or bool) holds.
fn int_range(dtype: DataType) -> Option<(i128, i128)> {
    use DataType::*;
    Some(match dtype {
        Int8 => (i8::MIN.into(), i8::MAX.into()),
        Uint8 => (0, u8::MAX.into()),
        Bool => (0, 1),
        Int16 => (i16::MIN.into(), i16::MAX.into()),
        Uint16 => (0, u16::MAX.into()),
        Int32 => (i32::MIN.into(), i32::MAX.into()),
        Uint32 => (0, u32::MAX.into()),
        Int64 => (i64::MIN.into(), i64::MAX.into()),
        Uint64 => (0, u64::MAX.into()),
        _ => return None,
    })
}

fn encoder(dtype: DataType) -> Option<Encoder> {
    use DataType::*;
    // `as` from f64 to an integer saturates and maps NaN to 0, which is what a cast wants.
    Some(match dtype {
        Float => |v, out| out.extend_from_slice(&(v as f32).to_le_bytes()),
        Float16 => |v, out| out.extend_from_slice(&f16::from_f64(v).to_le_bytes()),
        Bfloat16 => |v, out| out.extend_from_slice(&bf16::from_f64(v).to_le_bytes()),
        Double => |v, out| out.extend_from_slice(&v.to_le_bytes()),
        Int8 => |v, out| out.push(v.round() as i8 as u8),
        Uint8 => |v, out| out.push(v.round() as u8),
        Bool => |v, out| out.push((v != 0.0) as u8),
        Int16 => |v, out| out.extend_from_slice(&(v.round() as i16).to_le_bytes()),
        Uint16 => |v, out| out.extend_from_slice(&(v.round() as u16).to_le_bytes()),
        Int32 => |v, out| out.extend_from_slice(&(v.round() as i32).to_le_bytes()),
        Uint32 => |v, out| out.extend_from_slice(&(v.round() as u32).to_le_bytes()),
        Int64 => |v, out| out.extend_from_slice(&(v.round() as i64).to_le_bytes()),
        Uint64 => |v, out| out.extend_from_slice(&(v.round() as u64).to_le_bytes()),
        _ => return None,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_type() -> Result<()> {
        let vals = [0.0, 1.0, -2.0, 3.0];
        for dt in SUPPORTED {
            let a = ArrayData::from_f64(dt, vec![2, 2], &vals)?;
            let back: Vec<f64> = a.values()?.collect();
            let want: Vec<f64> = vals
                .iter()
                .map(|&v| match dt {
                    DataType::Bool => (v != 0.0) as u8 as f64,
                    DataType::Uint8 | DataType::Uint16 | DataType::Uint32 | DataType::Uint64 => {
                        v.max(0.0)
                    }
                    _ => v,
                })
                .collect();
            assert_eq!(back, want, "{dt}");
        }
        Ok(())
    }

    #[test]
    fn uint16_reinterprets_as_bf16() -> Result<()> {
        let one = bf16::from_f32(1.5).to_bits();
        let a = ArrayData::new(DataType::Uint16, vec![1], one.to_le_bytes().to_vec())?;
        let b = a.cast(DataType::Bfloat16)?;
        assert_eq!(b.values()?.collect::<Vec<_>>(), vec![1.5]);
        Ok(())
    }

    #[test]
    fn integers_beyond_2_pow_53_stay_exact() -> Result<()> {
        let big: i64 = (1 << 60) + 1;
        let a = ArrayData::new(DataType::Int64, vec![1], big.to_le_bytes().to_vec())?;
        assert_eq!(a.ints().unwrap().collect::<Vec<_>>(), vec![big as i128]);
        let u = a.cast(DataType::Uint64)?;
        assert_eq!(u.ints().unwrap().collect::<Vec<_>>(), vec![big as i128]);
        // 2^63 as uint64 saturates to int64's largest (the caller sees the value change)
        let top = ArrayData::new(
            DataType::Uint64,
            vec![1],
            (1u64 << 63).to_le_bytes().to_vec(),
        )?;
        let c = top.cast(DataType::Int64)?;
        assert_eq!(
            c.ints().unwrap().collect::<Vec<_>>(),
            vec![i64::MAX as i128]
        );
        let n = ArrayData::new(DataType::Int32, vec![1], (-5i32).to_le_bytes().to_vec())?;
        let m = n.cast(DataType::Int8)?;
        assert_eq!(m.ints().unwrap().collect::<Vec<_>>(), vec![-5]);
        assert!(
            ArrayData::from_f64(DataType::Float, vec![1], &[1.0])?
                .ints()
                .is_none()
        );
        Ok(())
    }

    #[test]
    fn rejects_wrong_length() {
        assert!(ArrayData::new(DataType::Float, vec![2], vec![0; 7]).is_err());
    }
}

//! Dense numerics for rewrites: element conversion between stored dtypes and f32
//! (fp32, fp16, bf16, fp64 via `half`'s slice conversions) and the low-rank update
//! `W += s * B @ A` applied row by row in place, in parallel, without forming B @ A.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::onnx::DataType;

/// Elements converted per parallel task.
const CHUNK: usize = 1 << 16;

/// Decodes little-endian stored elements to f32 (in parallel chunks).
pub fn to_f32(bytes: &[u8], dtype: DataType, name: &str) -> Result<Vec<f32>> {
    let width = match dtype {
        DataType::Float => 4,
        DataType::Float16 | DataType::Bfloat16 => 2,
        DataType::Double => 8,
        other => {
            return Err(Error::tensor(
                name,
                format!(
                    "{other} weights cannot be adapted (float32, float16, bfloat16, float64 only)"
                ),
            ));
        }
    };
    let mut out = buffer(bytes.len() / width);
    #[cfg(target_endian = "little")]
    if dtype == DataType::Float {
        // Stored little-endian f32 is the in-memory representation: a plain copy.
        out.par_chunks_mut(CHUNK)
            .zip(bytes.par_chunks(CHUNK * 4))
            .for_each(|(dst, src)| {
                let n = dst.len().min(src.len() / 4);
                // SAFETY: `dst` holds at least `n` f32 (4n bytes) and `src` at least 4n bytes;
                // the buffers do not overlap (one is ours, the other the model's), and every
                // bit pattern is a valid f32.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        src.as_ptr(),
                        dst.as_mut_ptr().cast::<u8>(),
                        4 * n,
                    );
                }
            });
        return Ok(out);
    }
    out.par_chunks_mut(CHUNK)
        .zip(bytes.par_chunks(CHUNK * width))
        .for_each(|(dst, src)| {
            let elems = src.chunks_exact(width);
            match dtype {
                DataType::Float16 => dst
                    .iter_mut()
                    .zip(elems)
                    .for_each(|(d, c)| *d = f16::from_le_bytes([c[0], c[1]]).to_f32()),
                DataType::Bfloat16 => dst
                    .iter_mut()
                    .zip(elems)
                    .for_each(|(d, c)| *d = bf16::from_le_bytes([c[0], c[1]]).to_f32()),
                DataType::Double => dst.iter_mut().zip(elems).for_each(|(d, c)| {
                    *d = f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32
                }),
                _ => dst
                    .iter_mut()
                    .zip(elems)
                    .for_each(|(d, c)| *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            }
        });
    Ok(out)
}

/// f32 buffers that `f32_into_bytes` handed out and got back once the bytes were written:
/// merging weight after weight reuses a few buffers instead of mapping (and zeroing) fresh
/// pages for every weight.
static POOL: std::sync::Mutex<Vec<Vec<f32>>> = std::sync::Mutex::new(Vec::new());
/// Buffers kept for reuse (the save pipeline has at most two merged weights in flight).
const POOL_SIZE: usize = 3;

/// A vector of `n` f32 values, all to be overwritten by the caller (from the pool when one is
/// large enough: its old values stand in for zeros).
fn buffer(n: usize) -> Vec<f32> {
    let reused = POOL.lock().ok().and_then(|mut pool| {
        let i = pool.iter().position(|v| v.capacity() >= n)?;
        Some(pool.swap_remove(i))
    });
    match reused {
        Some(mut v) => {
            if v.len() >= n {
                v.truncate(n);
            } else {
                v.resize(n, 0.0);
            }
            v
        }
        None => vec![0f32; n],
    }
}

fn recycle(v: Vec<f32>) {
    if v.capacity() < CHUNK {
        return;
    }
    if let Ok(mut pool) = POOL.lock() {
        if pool.len() < POOL_SIZE {
            pool.push(v);
        } else if let Some(smallest) = pool.iter_mut().min_by_key(|b| b.capacity())
            && smallest.capacity() < v.capacity()
        {
            *smallest = v;
        }
    }
}

/// Encodes f32 values to the stored dtype, rounding once (in parallel chunks).
pub fn from_f32(values: &[f32], dtype: DataType, name: &str) -> Result<Vec<u8>> {
    let width = match dtype {
        DataType::Float => 4,
        DataType::Float16 | DataType::Bfloat16 => 2,
        DataType::Double => 8,
        other => return Err(Error::tensor(name, format!("cannot write {other} weights"))),
    };
    let mut out = vec![0u8; values.len() * width];
    // The first finite value that a narrower type would store as Inf, by chunk.
    let overflow = out
        .par_chunks_mut(CHUNK * width)
        .zip(values.par_chunks(CHUNK))
        .enumerate()
        .filter_map(|(chunk, (dst, src))| {
            let slots = dst.chunks_exact_mut(width);
            let mut first = None;
            let mut note = |i: usize, inf: bool, v: f32| {
                if inf && v.is_finite() && first.is_none() {
                    first = Some(chunk * CHUNK + i);
                }
            };
            match dtype {
                DataType::Float16 => slots.zip(src).enumerate().for_each(|(i, (d, v))| {
                    let h = f16::from_f32(*v);
                    note(i, h.is_infinite(), *v);
                    d.copy_from_slice(&h.to_le_bytes());
                }),
                DataType::Bfloat16 => slots.zip(src).enumerate().for_each(|(i, (d, v))| {
                    let h = bf16::from_f32(*v);
                    note(i, h.is_infinite(), *v);
                    d.copy_from_slice(&h.to_le_bytes());
                }),
                DataType::Double => slots
                    .zip(src)
                    .for_each(|(d, v)| d.copy_from_slice(&(*v as f64).to_le_bytes())),
                _ => slots
                    .zip(src)
                    .for_each(|(d, v)| d.copy_from_slice(&v.to_le_bytes())),
            }
            first
        })
        .min();
    if let Some(i) = overflow {
        return Err(Error::tensor(
            name,
            format!(
                "value {} (element {i}) is beyond {}'s range: it would be stored as Inf",
                values[i],
                dtype.name()
            ),
        ));
    }
    Ok(out)
}

/// f32 values as their little-endian bytes without a copy (on little-endian machines; a
/// converted copy elsewhere). The vector goes back to the buffer pool when the bytes are
/// dropped.
pub fn f32_into_bytes(values: Vec<f32>) -> bytes::Bytes {
    #[cfg(target_endian = "little")]
    {
        struct AsBytes(Vec<f32>);
        impl Drop for AsBytes {
            fn drop(&mut self) {
                recycle(std::mem::take(&mut self.0));
            }
        }
        impl AsRef<[u8]> for AsBytes {
            fn as_ref(&self) -> &[u8] {
                // SAFETY: f32 has no padding and every bit pattern is a valid u8; the slice
                // covers exactly the vector's initialized elements and lives as long as it.
                unsafe {
                    std::slice::from_raw_parts(self.0.as_ptr().cast::<u8>(), self.0.len() * 4)
                }
            }
        }
        bytes::Bytes::from_owner(AsBytes(values))
    }
    #[cfg(not(target_endian = "little"))]
    {
        bytes::Bytes::from(
            values
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>(),
        )
    }
}

/// The largest |a - b| and whether every element of `a` is finite, in one parallel pass.
pub fn max_abs_diff_finite(a: &[f32], b: &[f32]) -> (f32, Option<usize>) {
    let bad = a.par_iter().position_any(|v| !v.is_finite());
    let max = a
        .par_chunks(CHUNK)
        .zip(b.par_chunks(CHUNK))
        .map(|(x, y)| {
            x.iter()
                .zip(y)
                .map(|(p, q)| (p - q).abs())
                .fold(0.0, f32::max)
        })
        .reduce(|| 0.0, f32::max);
    (max, bad)
}

/// A row-major f32 matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Matrix {
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Result<Self> {
        if rows * cols != data.len() {
            return Err(Error::tensor(
                "matrix",
                format!("{} values do not fill {rows}x{cols}", data.len()),
            ));
        }
        Ok(Matrix { rows, cols, data })
    }

    pub fn transposed(&self) -> Matrix {
        let mut data = vec![0f32; self.data.len()];
        for r in 0..self.rows {
            for c in 0..self.cols {
                data[c * self.rows + r] = self.data[r * self.cols + c];
            }
        }
        Matrix {
            rows: self.cols,
            cols: self.rows,
            data,
        }
    }
}

/// Which index of a stored 2-D weight is the layer's output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Orientation {
    /// rows = out, cols = in (torch Linear, Conv flattened).
    OutIn,
    /// rows = in, cols = out (MatMul weights, embeddings as [num, dim]).
    InOut,
}

impl Orientation {
    /// The flat index of element (input `i`, output `j`) of an `n_in` × `n_out` weight.
    pub fn index(self, n_in: usize, n_out: usize, i: usize, j: usize) -> usize {
        match self {
            Orientation::InOut => i * n_out + j,
            Orientation::OutIn => j * n_in + i,
        }
    }
}

/// `W += s * B @ A` (in `OutIn` terms) on a stored weight of either orientation, where
/// A is (r, in) and B is (out, r). Each stored row's delta is a rank-r combination of rows of A
/// (or of scaled columns of B), summed block by block in registers and added once
/// (`row_update`), so nothing larger than a row is formed; rows run in parallel. Returns the largest |delta| element and
/// whether every updated value is finite (checked while the row is in cache).
pub fn add_low_rank(
    w: &mut [f32],
    orient: Orientation,
    a: &Matrix,
    b: &Matrix,
    s: f32,
) -> (f32, bool) {
    let (r, n_in, n_out) = (a.rows, a.cols, b.rows);
    // Per stored row: the coefficient of each of the r basis rows, and the basis itself.
    type Coef<'c> = Box<dyn Fn(usize, usize) -> f32 + Sync + 'c>;
    let (row_len, basis, coefs): (usize, Vec<f32>, Coef) = match orient {
        Orientation::OutIn => (
            n_in,
            a.data.clone(),
            Box::new(move |row, k| s * b.data[row * r + k]),
        ),
        Orientation::InOut => {
            // B transposed and scaled once: (r, out), so the inner loop is contiguous.
            let bt = (0..r)
                .flat_map(|k| (0..n_out).map(move |o| s * b.data[o * r + k]))
                .collect();
            (n_out, bt, Box::new(move |row, k| a.data[k * n_in + row]))
        }
    };
    if row_len == 0 {
        return (0.0, true);
    }
    // Rows go in groups of ROWS, which share each load of the basis.
    w.par_chunks_mut(row_len * ROWS)
        .enumerate()
        .map_init(
            || vec![0f32; ROWS * r],
            |coef, (group, values)| {
                let rows = values.len() / row_len;
                for q in 0..rows {
                    for k in 0..r {
                        coef[q * r + k] = coefs(group * ROWS + q, k);
                    }
                }
                rows_update(values, &coef[..rows * r], &basis, row_len, r)
            },
        )
        .reduce(|| (0.0, true), |(m1, f1), (m2, f2)| (m1.max(m2), f1 && f2))
}

/// Rows updated together by `rows_update` (each basis block loaded once serves all of them).
const ROWS: usize = 4;
/// Output elements per row that a block keeps in registers while it sums the r basis rows.
const BLOCK: usize = 16;

/// `row_q += Σ_k coef[q·r + k] · basis[k]` for the rows of `rows` (each `row_len` long; basis
/// rows too), the merge's inner loop: for each block of columns, the deltas of up to `ROWS`
/// rows are summed over all r basis rows in registers, then added once, so each row is read
/// and written once and each basis block read once per group. Returns the largest |delta| and
/// whether every result is finite. On x86-64 CPUs with AVX2 and FMA (checked at run time, once)
/// a copy compiled for them runs, else the same code for the baseline target.
fn rows_update(
    rows: &mut [f32],
    coef: &[f32],
    basis: &[f32],
    row_len: usize,
    r: usize,
) -> (f32, bool) {
    #[cfg(target_arch = "x86_64")]
    {
        static FAST: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if *FAST.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
        {
            // SAFETY: the CPU supports the features `rows_update_avx2` is compiled for (checked above).
            return unsafe { rows_update_avx2(rows, coef, basis, row_len, r) };
        }
    }
    rows_update_any::<false>(rows, coef, basis, row_len, r)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_update_avx2(
    rows: &mut [f32],
    coef: &[f32],
    basis: &[f32],
    row_len: usize,
    r: usize,
) -> (f32, bool) {
    rows_update_any::<true>(rows, coef, basis, row_len, r)
}

/// Full groups of `ROWS` rows take the blocked kernel, a last partial group one row at a time.
#[inline(always)]
fn rows_update_any<const FMA: bool>(
    rows: &mut [f32],
    coef: &[f32],
    basis: &[f32],
    row_len: usize,
    r: usize,
) -> (f32, bool) {
    if rows.len() == ROWS * row_len {
        return block_update::<FMA, ROWS>(rows, coef, basis, row_len, r);
    }
    let mut acc = (0f32, true);
    for (q, row) in rows.chunks_mut(row_len).enumerate() {
        let (m, f) = block_update::<FMA, 1>(row, &coef[q * r..(q + 1) * r], basis, row_len, r);
        acc = (acc.0.max(m), acc.1 && f);
    }
    acc
}

/// The kernel for exactly `N` rows; `FMA` uses fused multiply-adds (only where the CPU has
/// them: elsewhere `mul_add` is a slow library call).
#[inline(always)]
fn block_update<const FMA: bool, const N: usize>(
    rows: &mut [f32],
    coef: &[f32],
    basis: &[f32],
    row_len: usize,
    r: usize,
) -> (f32, bool) {
    let mut max = 0f32;
    let mut finite = true;
    // Per-lane largest |delta|, and a sum of value·0 that stays 0 while every value is finite
    // (Inf·0 and NaN·0 are NaN): plain float ops, so the epilogue vectorizes.
    let mut lane_max = [0f32; BLOCK];
    let mut lane_chk = [0f32; BLOCK];
    let full = row_len / BLOCK * BLOCK;
    for start in (0..full).step_by(BLOCK) {
        let mut d = [[0f32; BLOCK]; N];
        for k in 0..r {
            let Ok(b) = <&[f32; BLOCK]>::try_from(&basis[k * row_len + start..][..BLOCK]) else {
                continue; // never: the slice is BLOCK long (a fixed length lets it vectorize)
            };
            for q in 0..N {
                let c = coef[q * r + k];
                for l in 0..BLOCK {
                    d[q][l] = if FMA {
                        b[l].mul_add(c, d[q][l])
                    } else {
                        d[q][l] + c * b[l]
                    };
                }
            }
        }
        for (q, dq) in d.iter().enumerate() {
            let Ok(out) = <&mut [f32; BLOCK]>::try_from(&mut rows[q * row_len + start..][..BLOCK])
            else {
                continue; // never, as above
            };
            for l in 0..BLOCK {
                out[l] += dq[l];
                let a = dq[l].abs();
                lane_max[l] = if a > lane_max[l] { a } else { lane_max[l] };
                lane_chk[l] += out[l] * 0.0;
            }
        }
    }
    for l in 0..BLOCK {
        max = max.max(lane_max[l]);
        finite &= lane_chk[l] == 0.0;
    }
    for q in 0..N {
        for j in full..row_len {
            let d: f32 = (0..r)
                .map(|k| coef[q * r + k] * basis[k * row_len + j])
                .sum();
            let v = &mut rows[q * row_len + j];
            *v += d;
            max = max.max(d.abs());
            finite &= v.is_finite();
        }
    }
    (max, finite)
}

/// L2 norm of each output channel of a stored weight (rows for OutIn, columns for InOut).
pub fn out_norms(w: &[f32], orient: Orientation, n_out: usize) -> Vec<f32> {
    let mut acc = vec![0f64; n_out];
    match orient {
        Orientation::OutIn => {
            let n_in = w.len() / n_out.max(1);
            for (o, row) in w.chunks_exact(n_in.max(1)).enumerate() {
                acc[o] = row.iter().map(|&x| (x as f64) * (x as f64)).sum();
            }
        }
        Orientation::InOut => {
            for row in w.chunks_exact(n_out.max(1)) {
                for (o, &x) in row.iter().enumerate() {
                    acc[o] += (x as f64) * (x as f64);
                }
            }
        }
    }
    acc.into_iter().map(|v| v.sqrt() as f32).collect()
}

/// Multiplies each output channel by `scale[o]`.
pub fn scale_out(w: &mut [f32], orient: Orientation, scale: &[f32]) {
    let n_out = scale.len();
    match orient {
        Orientation::OutIn => {
            let n_in = w.len() / n_out.max(1);
            w.par_chunks_mut(n_in.max(1))
                .zip(scale.par_iter())
                .for_each(|(row, &f)| row.iter_mut().for_each(|x| *x *= f));
        }
        Orientation::InOut => {
            w.par_chunks_mut(n_out.max(1)).for_each(|row| {
                row.iter_mut().zip(scale).for_each(|(x, &f)| *x *= f);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dense_delta(a: &Matrix, b: &Matrix, s: f32) -> Result<Matrix> {
        let mut d = vec![0f32; b.rows * a.cols];
        for o in 0..b.rows {
            for i in 0..a.cols {
                d[o * a.cols + i] = s
                    * (0..a.rows)
                        .map(|k| b.data[o * a.rows + k] * a.data[k * a.cols + i])
                        .sum::<f32>();
            }
        }
        Matrix::new(b.rows, a.cols, d)
    }

    #[test]
    fn low_rank_update_matches_dense_in_both_orientations() -> Result<(), Box<dyn std::error::Error>>
    {
        let a = Matrix::new(2, 3, vec![1., 2., 3., -1., 0.5, 4.])?;
        let b = Matrix::new(4, 2, vec![1., 0., 0., 1., 2., -1., 0.5, 0.25])?;
        let d = dense_delta(&a, &b, 0.5)?;
        let mut w = vec![1f32; 12];
        add_low_rank(&mut w, Orientation::OutIn, &a, &b, 0.5);
        assert_eq!(w, d.data.iter().map(|x| x + 1.0).collect::<Vec<_>>());
        let mut w = vec![1f32; 12];
        add_low_rank(&mut w, Orientation::InOut, &a, &b, 0.5);
        assert_eq!(
            w,
            d.transposed()
                .data
                .iter()
                .map(|x| x + 1.0)
                .collect::<Vec<_>>()
        );
        Ok(())
    }

    /// Shapes with full row groups and blocks and ragged remainders of both; the largest
    /// |delta| and the finiteness flag too.
    #[test]
    fn blocked_update_matches_dense_with_remainders() -> Result<(), Box<dyn std::error::Error>> {
        let mut seed = 7u32;
        let mut next = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        for (n_out, n_in, r) in [(37, 50, 5), (64, 33, 16), (3, 17, 1)] {
            let a = Matrix::new(r, n_in, (0..r * n_in).map(|_| next()).collect())?;
            let b = Matrix::new(n_out, r, (0..n_out * r).map(|_| next()).collect())?;
            let d = dense_delta(&a, &b, 0.7)?;
            let base: Vec<f32> = (0..n_out * n_in).map(|_| next()).collect();
            let dense_max = d.data.iter().fold(0f32, |m, x| m.max(x.abs()));
            for orient in [Orientation::OutIn, Orientation::InOut] {
                let (delta, base_o) = match orient {
                    Orientation::OutIn => (d.data.clone(), base.clone()),
                    Orientation::InOut => (d.transposed().data, base.clone()),
                };
                let mut w = base_o.clone();
                let (max, finite) = add_low_rank(&mut w, orient, &a, &b, 0.7);
                assert!(finite);
                assert!((max - dense_max).abs() <= 1e-5, "{max} vs {dense_max}");
                for ((x, b0), dl) in w.iter().zip(&base_o).zip(&delta) {
                    assert!((x - (b0 + dl)).abs() <= 1e-5, "{orient:?} {n_out}x{n_in}");
                }
                let mut w = base_o;
                w[n_out * n_in / 2] = f32::INFINITY;
                assert!(!add_low_rank(&mut w, orient, &a, &b, 0.7).1);
            }
        }
        Ok(())
    }

    #[test]
    fn half_round_trip() -> Result<(), Box<dyn std::error::Error>> {
        let v = [1.0f32, -2.5, 0.333];
        for dt in [
            DataType::Float,
            DataType::Float16,
            DataType::Bfloat16,
            DataType::Double,
        ] {
            let back = to_f32(&from_f32(&v, dt, "t")?, dt, "t")?;
            for (x, y) in v.iter().zip(&back) {
                assert!((x - y).abs() < 1e-2, "{dt}: {x} vs {y}");
            }
        }
        assert!(to_f32(&[0u8; 4], DataType::Int8, "t").is_err());
        Ok(())
    }
}

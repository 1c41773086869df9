//! LyCORIS algorithms beyond LoRA, as kohya-format files hold them: LoHa
//! (`hada_w1_a/b`, `hada_w2_a/b`, Tucker cores `hada_t1/t2` for convolutions) and LoKr
//! (`lokr_w1` or `lokr_w1_a/b`, `lokr_w2` or `lokr_w2_a/b`, Tucker core `lokr_t2`). Their delta
//! is full-rank in general, so it is computed densely, one weight at a time, in torch's layout
//! (out, in·kh·kw):
//!
//! ```text
//!   LoHa  ΔW = (w1_a·w1_b) ⊙ (w2_a·w2_b)      Tucker: einsum(t, w_b, w_a) per half
//!   LoKr  ΔW = w1 ⊗ w2                         w = whole, or w_a·w_b, or einsum(t2, w2_b, w2_a)
//! ```
//!
//! times alpha / r (r = the rank of the factors; a LoKr of two whole factors has scale 1), as
//! LyCORIS's forward applies it.

use std::collections::BTreeMap;

use rayon::prelude::*;

use super::peft::F32Tensor;
use crate::error::{Error, Result};

/// One LoKr factor: stored whole, or as the product a·b.
#[derive(Clone, Debug)]
pub enum KronFactor {
    Whole(F32Tensor),
    Product(F32Tensor, F32Tensor),
}

/// A LyCORIS module's factors.
#[derive(Clone, Debug)]
pub enum Lycoris {
    LoHa {
        w1a: F32Tensor,
        w1b: F32Tensor,
        w2a: F32Tensor,
        w2b: F32Tensor,
        /// Tucker cores (r, r, kh, kw); with them w*_a is (r, out) and w*_b (r, in).
        tucker: Option<(F32Tensor, F32Tensor)>,
    },
    LoKr {
        w1: KronFactor,
        w2: KronFactor,
        /// Tucker core (r, r, kh, kw) of a product w2; then w2_a is (r, b) and w2_b (r, d).
        t2: Option<F32Tensor>,
    },
}

impl Lycoris {
    /// A LyCORIS module from its factors by key suffix (`hada_w1_a`, `lokr_w2`, ...), as
    /// kohya files and PEFT's LoHa / LoKr adapters name them; `name` is the module, for
    /// messages.
    pub fn from_factors(
        name: &str,
        mut f: BTreeMap<String, F32Tensor>,
    ) -> std::result::Result<Lycoris, String> {
        let loha = f.keys().any(|k| k.starts_with("hada_"));
        let mut take = |k: &str| f.remove(k);
        let l = if loha {
            let (Some(w1a), Some(w1b), Some(w2a), Some(w2b)) = (
                take("hada_w1_a"),
                take("hada_w1_b"),
                take("hada_w2_a"),
                take("hada_w2_b"),
            ) else {
                return Err(format!(
                    "LoHa module '{name}' lacks one of hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b"
                ));
            };
            let tucker = match (take("hada_t1"), take("hada_t2")) {
                (Some(t1), Some(t2)) => Some((t1, t2)),
                (None, None) => None,
                _ => {
                    return Err(format!(
                        "LoHa module '{name}' has only one of hada_t1 / hada_t2"
                    ));
                }
            };
            Lycoris::LoHa {
                w1a,
                w1b,
                w2a,
                w2b,
                tucker,
            }
        } else {
            let mut factor = |n: u8| match (
                take(&format!("lokr_w{n}")),
                take(&format!("lokr_w{n}_a")),
                take(&format!("lokr_w{n}_b")),
            ) {
                (Some(w), None, None) => Ok(KronFactor::Whole(w)),
                (None, Some(a), Some(b)) => Ok(KronFactor::Product(a, b)),
                _ => Err(format!(
                    "LoKr module '{name}' needs lokr_w{n}, or lokr_w{n}_a and lokr_w{n}_b"
                )),
            };
            let (w1, w2) = (factor(1)?, factor(2)?);
            let t2 = take("lokr_t2");
            if t2.is_some() && matches!(w2, KronFactor::Whole(_)) {
                return Err(format!(
                    "LoKr module '{name}' has a Tucker core lokr_t2 beside a whole lokr_w2 (the core goes with lokr_w2_a / lokr_w2_b)"
                ));
            }
            Lycoris::LoKr { w1, w2, t2 }
        };
        if let Some(k) = f.keys().next() {
            return Err(format!(
                "key '{name}.{k}' is not a LyCORIS {} key this tool reads",
                l.name()
            ));
        }
        l.shape().map_err(|e| format!("module '{name}': {e}"))?;
        Ok(l)
    }

    /// The algorithm's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Lycoris::LoHa { .. } => "LoHa",
            Lycoris::LoKr { .. } => "LoKr",
        }
    }

    /// The rank alpha is divided by; None for a LoKr of two whole factors (scale 1).
    pub fn rank(&self) -> Option<usize> {
        match self {
            Lycoris::LoHa { w1b, .. } => w1b.shape.first().copied(),
            Lycoris::LoKr { w1, w2, .. } => match (w1, w2) {
                (KronFactor::Product(_, b), _) | (_, KronFactor::Product(_, b)) => {
                    b.shape.first().copied()
                }
                _ => None,
            },
        }
    }

    /// The rank of every low-rank product among the factors (LoHa: both halves; LoKr: each
    /// factor stored as a product), in factor order.
    pub fn ranks(&self) -> Vec<usize> {
        let rows = |t: &F32Tensor| t.shape.first().copied().unwrap_or(0);
        match self {
            Lycoris::LoHa { w1b, w2b, .. } => vec![rows(w1b), rows(w2b)],
            Lycoris::LoKr { w1, w2, .. } => [w1, w2]
                .into_iter()
                .filter_map(|f| match f {
                    KronFactor::Product(_, b) => Some(rows(b)),
                    KronFactor::Whole(_) => None,
                })
                .collect(),
        }
    }

    /// The delta's (out, in·kh·kw) and its kernel size kh·kw, from the factors' shapes.
    pub fn shape(&self) -> Result<(usize, usize)> {
        let (out, inner, kernel) = self.dims()?;
        Ok((out, inner * kernel))
    }

    /// (out, in, kh·kw).
    fn dims(&self) -> Result<(usize, usize, usize)> {
        match self {
            Lycoris::LoHa {
                w1a, w1b, tucker, ..
            } => match tucker {
                Some((t1, _)) => Ok((dim(w1a, 1)?, dim(w1b, 1)?, kernel(t1)?)),
                None => Ok((dim(w1a, 0)?, dim(w1b, 1)?, 1)),
            },
            Lycoris::LoKr { w1, w2, t2 } => {
                let (a, c) = factor_dims(w1)?;
                let (b, d, k) = match (w2, t2) {
                    (KronFactor::Whole(w), _) => (
                        dim(w, 0)?,
                        dim(w, 1)?,
                        w.shape[2..].iter().product::<usize>(),
                    ),
                    (KronFactor::Product(wa, wb), Some(t)) => {
                        (dim(wa, 1)?, dim(wb, 1)?, kernel(t)?)
                    }
                    // A conv's product w2_b is (r, d·kh·kw): the kernel is folded into d here.
                    (KronFactor::Product(wa, wb), None) => (dim(wa, 0)?, dim(wb, 1)?, 1),
                };
                Ok((a * b, c * d, k))
            }
        }
    }

    /// Checks that the factors fit together as [`Lycoris::delta`] will combine them, from their
    /// shapes alone (so that a run that only plans, `fold --dry-run`, refuses them too).
    pub fn check(&self) -> Result<()> {
        let halves = match self {
            Lycoris::LoHa {
                w1a,
                w1b,
                w2a,
                w2b,
                tucker,
            } => {
                let (h1, h2) = match tucker {
                    Some((t1, t2)) => (tucker_len(t1, w1b, w1a)?, tucker_len(t2, w2b, w2a)?),
                    None => (product_len(w1a, w1b)?, product_len(w2a, w2b)?),
                };
                (h1 == h2)
                    .then_some(())
                    .ok_or_else(|| format!("LoHa halves of different sizes ({h1} and {h2})"))
            }
            Lycoris::LoKr { w1, w2, t2 } => {
                let (a, c) = factor_dims(w1)?;
                let (out, inner, k) = self.dims()?;
                let w1_len = match w1 {
                    KronFactor::Whole(w) => w.data.len(),
                    KronFactor::Product(wa, wb) => product_len(wa, wb)?,
                };
                let w2_len = match (w2, t2) {
                    (KronFactor::Whole(w), _) => w.data.len(),
                    (KronFactor::Product(wa, wb), Some(t)) => tucker_len(t, wb, wa)?,
                    (KronFactor::Product(wa, wb), None) => product_len(wa, wb)?,
                };
                let fits =
                    a > 0 && c > 0 && w1_len == a * c && w2_len == (out / a) * (inner / c) * k;
                fits.then_some(()).ok_or_else(|| {
                    format!("LoKr factors of {w1_len} and {w2_len} values do not make a ({out}, {inner}·{k}) delta")
                })
            }
        };
        halves.map_err(Error::Target)
    }

    /// ΔW (unscaled) in torch's layout: `out` rows of `in·kh·kw` values.
    pub fn delta(&self) -> Result<Vec<f32>> {
        self.check()?;
        match self {
            Lycoris::LoHa {
                w1a,
                w1b,
                w2a,
                w2b,
                tucker,
            } => {
                let (h1, h2) = match tucker {
                    Some((t1, t2)) => {
                        (rebuild_tucker(t1, w1b, w1a)?, rebuild_tucker(t2, w2b, w2a)?)
                    }
                    None => (product(w1a, w1b)?, product(w2a, w2b)?),
                };
                Ok(h1.iter().zip(&h2).map(|(x, y)| x * y).collect())
            }
            Lycoris::LoKr { w1, w2, t2 } => {
                let (a, c) = factor_dims(w1)?;
                let w1 = match w1 {
                    KronFactor::Whole(w) => w.data.clone(),
                    KronFactor::Product(wa, wb) => product(wa, wb)?,
                };
                let (out, inner, k) = self.dims()?;
                // (a, c > 0 and the factors' sizes: `check`)
                let (b, d) = (out / a, inner / c);
                let w2_3d = matches!(w2, KronFactor::Whole(w) if w.shape.len() == 3);
                let w2 = match (w2, t2) {
                    (KronFactor::Whole(w), _) => w.data.clone(),
                    (KronFactor::Product(wa, wb), Some(t)) => rebuild_tucker(t, wb, wa)?,
                    (KronFactor::Product(wa, wb), None) => product(wa, wb)?,
                };
                let mut out_v = vec![0f32; out * inner * k];
                if w2_3d {
                    // A Conv1d's whole w2 (b, d, k): LyCORIS's make_kron (and PEFT's copy of
                    // it) gives w1 kernel axes only beside a 4-D w2, so torch.kron takes w1 as
                    // (1, a, c) and makes a (b, a·d, c·k) tensor, which the layer's (out, in, k)
                    // weight then reads as it is laid out:
                    // [j, p·d + l, i·k + q] = w1[p, i] · w2[j, l, q]
                    let plane = a * d * c * k;
                    out_v
                        .par_chunks_mut(plane.max(1))
                        .enumerate()
                        .for_each(|(j, chunk)| {
                            for p in 0..a {
                                for l in 0..d {
                                    let src = &w2[(j * d + l) * k..(j * d + l + 1) * k];
                                    let row =
                                        &mut chunk[(p * d + l) * c * k..(p * d + l + 1) * c * k];
                                    for i in 0..c {
                                        let s = w1[p * c + i];
                                        row[i * k..(i + 1) * k]
                                            .iter_mut()
                                            .zip(src)
                                            .for_each(|(o, v)| *o = s * v);
                                    }
                                }
                            }
                        });
                    return Ok(out_v);
                }
                // (w1 ⊗ w2)[i·b + j, (p·d + l)·k + q] = w1[i, p] · w2[j, l, q]
                out_v
                    .par_chunks_mut((inner * k).max(1))
                    .enumerate()
                    .for_each(|(row_i, row)| {
                        let (i, j) = (row_i / b, row_i % b);
                        let src = &w2[j * d * k..(j + 1) * d * k];
                        for p in 0..c {
                            let s = w1[i * c + p];
                            let dst = &mut row[p * d * k..(p + 1) * d * k];
                            dst.iter_mut().zip(src).for_each(|(o, v)| *o = s * v);
                        }
                    });
                Ok(out_v)
            }
        }
    }
}

fn dim(t: &F32Tensor, i: usize) -> Result<usize> {
    t.shape
        .get(i)
        .copied()
        .ok_or_else(|| Error::Target(format!("LyCORIS factor of shape {:?}", t.shape)))
}

/// kh·kw of a Tucker core (r, r, kh, kw).
fn kernel(t: &F32Tensor) -> Result<usize> {
    if t.shape.len() < 3 {
        return Err(Error::Target(format!(
            "LyCORIS Tucker core of shape {:?}",
            t.shape
        )));
    }
    Ok(t.shape[2..].iter().product())
}

/// (rows, cols) of a 2-D LoKr factor.
fn factor_dims(f: &KronFactor) -> Result<(usize, usize)> {
    match f {
        KronFactor::Whole(w) => Ok((dim(w, 0)?, dim(w, 1)?)),
        KronFactor::Product(wa, wb) => Ok((dim(wa, 0)?, dim(wb, 1)?)),
    }
}

/// The number of values of a·b ([`product`]), checking that the factors multiply.
fn product_len(a: &F32Tensor, b: &F32Tensor) -> Result<usize> {
    let (m, r) = (dim(a, 0)?, dim(a, 1)?);
    if dim(b, 0)? != r || a.data.len() != m * r {
        return Err(Error::Target(format!(
            "LyCORIS factors {:?} and {:?} do not multiply",
            a.shape, b.shape
        )));
    }
    Ok(m * (b.data.len() / r.max(1)))
}

/// a·b for a (m, r) and b (r, n…), flattened over b's trailing dimensions.
fn product(a: &F32Tensor, b: &F32Tensor) -> Result<Vec<f32>> {
    let m = dim(a, 0)?;
    let r = dim(a, 1)?;
    let n = product_len(a, b)? / m.max(1);
    let mut out = vec![0f32; m * n];
    out.par_chunks_mut(n.max(1))
        .enumerate()
        .for_each(|(i, row)| {
            for k in 0..r {
                let s = a.data[i * r + k];
                row.iter_mut()
                    .zip(&b.data[k * n..(k + 1) * n])
                    .for_each(|(o, v)| *o += s * v);
            }
        });
    Ok(out)
}

/// The number of values [`rebuild_tucker`] gives, checking that core and factors fit.
fn tucker_len(t: &F32Tensor, wb: &F32Tensor, wa: &F32Tensor) -> Result<usize> {
    let (r1, r2, k) = (dim(t, 0)?, dim(t, 1)?, kernel(t)?);
    let (inn, out) = (dim(wb, 1)?, dim(wa, 1)?);
    if dim(wb, 0)? != r2 || dim(wa, 0)? != r1 || t.data.len() != r1 * r2 * k {
        return Err(Error::Target(format!(
            "LyCORIS Tucker core {:?} does not fit factors {:?} and {:?}",
            t.shape, wb.shape, wa.shape
        )));
    }
    Ok(out * inn * k)
}

/// einsum("i j k, j r, i p -> p r k", t, wb, wa) for a core t (r1, r2, kh·kw), wb (r2, in) and
/// wa (r1, out): the (out, in, kh·kw) weight of a Tucker-decomposed factor.
fn rebuild_tucker(t: &F32Tensor, wb: &F32Tensor, wa: &F32Tensor) -> Result<Vec<f32>> {
    tucker_len(t, wb, wa)?;
    let (r1, r2, k) = (dim(t, 0)?, dim(t, 1)?, kernel(t)?);
    let (inn, out) = (dim(wb, 1)?, dim(wa, 1)?);
    // tmp[i, r, k] = Σ_j t[i, j, k] · wb[j, r]
    let mut tmp = vec![0f32; r1 * inn * k];
    for i in 0..r1 {
        for j in 0..r2 {
            for r in 0..inn {
                let w = wb.data[j * inn + r];
                for q in 0..k {
                    tmp[(i * inn + r) * k + q] += t.data[(i * r2 + j) * k + q] * w;
                }
            }
        }
    }
    // out[p, r, k] = Σ_i wa[i, p] · tmp[i, r, k]
    let mut res = vec![0f32; out * inn * k];
    res.par_chunks_mut((inn * k).max(1))
        .enumerate()
        .for_each(|(p, row)| {
            for i in 0..r1 {
                let s = wa.data[i * out + p];
                row.iter_mut()
                    .zip(&tmp[i * inn * k..(i + 1) * inn * k])
                    .for_each(|(o, v)| *o += s * v);
            }
        });
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[usize], data: Vec<f32>) -> F32Tensor {
        F32Tensor {
            shape: shape.to_vec(),
            data,
        }
    }

    #[test]
    fn lokr_is_a_kronecker_product() -> Result<()> {
        let l = Lycoris::LoKr {
            w1: KronFactor::Whole(t(&[1, 2], vec![1.0, 10.0])),
            w2: KronFactor::Whole(t(&[2, 1], vec![2.0, 3.0])),
            t2: None,
        };
        assert_eq!(l.shape()?, (2, 2));
        assert_eq!(l.delta()?, vec![2.0, 20.0, 3.0, 30.0]);
        assert_eq!(l.rank(), None);
        Ok(())
    }

    /// A Conv1d's whole w2 (b, d, k) combines as torch.kron of w1 taken as (1, a, c) with it
    /// (LyCORIS's and PEFT's make_kron unsqueeze w1 only beside a 4-D w2), not as w1 ⊗ w2 per
    /// kernel tap: the values below are torch's.
    #[test]
    fn lokr_with_a_3d_whole_w2_lays_out_as_torch_kron() -> Result<()> {
        let l = Lycoris::LoKr {
            w1: KronFactor::Whole(t(&[2, 1], vec![1.0, 10.0])),
            w2: KronFactor::Whole(t(&[1, 1, 2], vec![2.0, 3.0])),
            t2: None,
        };
        assert_eq!(l.shape()?, (2, 2));
        // torch.kron(w1[None], w2) = [[[2, 3], [20, 30]]] (1, 2, 2), read as (out 2, in 1, k 2)
        assert_eq!(l.delta()?, vec![2.0, 3.0, 20.0, 30.0]);
        let l = Lycoris::LoKr {
            w1: KronFactor::Whole(t(&[1, 2], vec![1.0, 10.0])),
            w2: KronFactor::Whole(t(&[2, 1, 2], vec![2.0, 3.0, 4.0, 5.0])),
            t2: None,
        };
        // torch.kron: (2, 1, 4) [[2, 3, 20, 30], [4, 5, 40, 50]], read as (out 2, in 2, k 2)
        assert_eq!(l.delta()?, vec![2.0, 3.0, 20.0, 30.0, 4.0, 5.0, 40.0, 50.0]);
        Ok(())
    }

    #[test]
    fn an_empty_lokr_factor_is_an_error_not_a_panic() {
        let l = Lycoris::LoKr {
            w1: KronFactor::Whole(t(&[0, 2], vec![])),
            w2: KronFactor::Whole(t(&[2, 1], vec![2.0, 3.0])),
            t2: None,
        };
        assert!(l.delta().is_err());
    }

    #[test]
    fn loha_is_a_hadamard_product_of_two_low_rank_products() -> Result<()> {
        let one = |v: f32| t(&[1, 1], vec![v]);
        let l = Lycoris::LoHa {
            w1a: t(&[2, 1], vec![1.0, 2.0]),
            w1b: t(&[1, 2], vec![3.0, 4.0]),
            w2a: t(&[2, 1], vec![1.0, 1.0]),
            w2b: t(&[1, 2], vec![2.0, 0.5]),
            tucker: None,
        };
        assert_eq!(l.delta()?, vec![6.0, 2.0, 12.0, 4.0]);
        assert_eq!(l.rank(), Some(1));
        // A 1×1 Tucker core of 1 is the plain product.
        assert_eq!(
            rebuild_tucker(&t(&[1, 1, 1], vec![1.0]), &one(3.0), &one(2.0))?,
            vec![6.0]
        );
        Ok(())
    }
}

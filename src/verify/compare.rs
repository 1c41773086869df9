//! Output comparison with numpy `allclose` semantics: an element passes when
//! `|a - b| <= atol + rtol * |b|`, where `b` is the reference (model B or the `--expect`
//! file). NaN equals NaN and infinities equal infinities of the same sign (numpy's
//! `equal_nan=True`): a model that produced NaN where the reference did is not "different".
//!
//! Default tolerances depend on the compared type (the less precise of the two) and on
//! whether CUDA ran (GPU kernels reorder reductions and use other algorithms):
//!
//! | type     | CPU atol / rtol | CUDA atol / rtol |
//! |----------|-----------------|------------------|
//! | float64  | 1e-7 / 1e-6     | 1e-6 / 1e-5      |
//! | float32  | 1e-4 / 1e-4     | 5e-4 / 5e-4      |
//! | float16  | 1e-2 / 1e-2     | 2e-2 / 2e-2      |
//! | bfloat16 | 5e-2 / 5e-2     | 1e-1 / 5e-2      |
//! | integer, bool | exact      | exact            |

use serde::Serialize;

use crate::onnx::DataType;

use super::tensor::{ArrayData, Tensors};

/// Absolute and relative tolerance.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Tolerance {
    pub atol: f64,
    pub rtol: f64,
}

/// The default tolerance for comparing values of `dtype` (see the module table).
pub fn default_tolerance(dtype: DataType, gpu: bool) -> Tolerance {
    let (atol, rtol) = match (dtype, gpu) {
        (DataType::Double, false) => (1e-7, 1e-6),
        (DataType::Double, true) => (1e-6, 1e-5),
        (DataType::Float, false) => (1e-4, 1e-4),
        (DataType::Float, true) => (5e-4, 5e-4),
        (DataType::Float16, false) => (1e-2, 1e-2),
        (DataType::Float16, true) => (2e-2, 2e-2),
        (DataType::Bfloat16, false) => (5e-2, 5e-2),
        (DataType::Bfloat16, true) => (1e-1, 5e-2),
        _ => (0.0, 0.0),
    };
    Tolerance { atol, rtol }
}

/// Of two types, the one whose default tolerance is looser (the less precise float).
fn coarser(a: DataType, b: DataType) -> DataType {
    let rank = |d: DataType| super::precision::coarseness(d).unwrap_or(0);
    if rank(a) >= rank(b) { a } else { b }
}

/// What the comparison of one output found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Every element within tolerance.
    Pass,
    /// Same shape, some elements out of tolerance.
    Differ,
    /// Different shapes.
    ShapeMismatch,
    /// Only one side has this output.
    Missing,
}

/// A side of a comparison: model A, or the reference B (model B or the `--expect` file).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    A,
    B,
}

/// One output compared.
#[derive(Clone, Debug, Serialize)]
pub struct OutputComparison {
    pub name: String,
    pub status: Status,
    pub passed: bool,
    /// The side that lacks the output (`Missing` only).
    pub missing_in: Option<Side>,
    /// Shape and type on each side (`None` where the output is missing).
    pub shape_a: Option<Vec<usize>>,
    pub shape_b: Option<Vec<usize>>,
    pub dtype_a: Option<String>,
    pub dtype_b: Option<String>,
    /// Largest |a - b| over elements finite on both sides.
    pub max_abs_diff: Option<f64>,
    /// Largest |a - b| / |b| over elements finite on both sides with b != 0.
    pub max_rel_diff: Option<f64>,
    /// Elements out of tolerance (NaN or infinity mismatches included); `None` when the values
    /// were not compared (a missing output, different shapes).
    pub mismatches: Option<usize>,
    /// Of those, the elements NaN or infinite on one side and not the same on the other,
    /// which `max_abs_diff` and `max_rel_diff` leave out.
    pub nonfinite_mismatches: Option<usize>,
    pub numel: usize,
    pub atol: f64,
    pub rtol: f64,
    /// The type whose default tolerances were taken when it is not the output's own: the
    /// less precise type the models compute in ([`ToleranceOverride::compute`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tolerance_of: Option<String>,
}

/// User overrides of the tolerances (either may be left to the default).
#[derive(Clone, Copy, Debug, Default)]
pub struct ToleranceOverride {
    pub atol: Option<f64>,
    pub rtol: Option<f64>,
    /// The least precise float type the models compute in: float outputs get the default
    /// tolerance of that type when it is looser than their own (float16 weights behind
    /// float32 inputs and outputs).
    pub compute: Option<DataType>,
}

/// Compares every output by name: A's outputs in order, then those only B has.
pub fn compare_all(
    a: &Tensors,
    b: &Tensors,
    tol: ToleranceOverride,
    gpu: bool,
) -> Vec<OutputComparison> {
    let mut out: Vec<OutputComparison> = a
        .iter()
        .map(|(name, x)| {
            let y = b.iter().find(|(n, _)| n == name).map(|(_, y)| y);
            compare(name, Some(x), y, tol, gpu)
        })
        .collect();
    for (name, y) in b {
        if !a.iter().any(|(n, _)| n == name) {
            out.push(compare(name, None, Some(y), tol, gpu));
        }
    }
    out
}

/// Compares one output; `None` on a side means that side lacks it.
pub fn compare(
    name: &str,
    a: Option<&ArrayData>,
    b: Option<&ArrayData>,
    over: ToleranceOverride,
    gpu: bool,
) -> OutputComparison {
    let dtype = match (a, b) {
        (Some(x), Some(y)) => coarser(x.dtype, y.dtype),
        (Some(x), None) | (None, Some(x)) => x.dtype,
        (None, None) => DataType::Float,
    };
    let own = dtype;
    let dtype = match over.compute {
        Some(c) if super::precision::coarseness(dtype).is_some() => coarser(dtype, c),
        _ => dtype,
    };
    let def = default_tolerance(dtype, gpu);
    // Said only where a default was taken.
    let tolerance_of =
        (dtype != own && (over.atol.is_none() || over.rtol.is_none())).then(|| dtype.name());
    let tol = Tolerance {
        atol: over.atol.unwrap_or(def.atol),
        rtol: over.rtol.unwrap_or(def.rtol),
    };
    let mut c = OutputComparison {
        name: name.to_string(),
        status: Status::Missing,
        passed: false,
        missing_in: match (a, b) {
            (None, _) => Some(Side::A),
            (_, None) => Some(Side::B),
            _ => None,
        },
        shape_a: a.map(|x| x.shape.clone()),
        shape_b: b.map(|x| x.shape.clone()),
        dtype_a: a.map(|x| x.dtype.name()),
        dtype_b: b.map(|x| x.dtype.name()),
        max_abs_diff: None,
        max_rel_diff: None,
        mismatches: None,
        nonfinite_mismatches: None,
        numel: a.or(b).map_or(0, ArrayData::numel),
        atol: tol.atol,
        rtol: tol.rtol,
        tolerance_of,
    };
    let (Some(x), Some(y)) = (a, b) else {
        return c;
    };
    // Reading bf16 expected values stored as uint16 is the caller's job (it knows the model's
    // output type); here a shape difference is simply a difference.
    if x.shape != y.shape {
        c.status = Status::ShapeMismatch;
        return c;
    }
    let stats = match (x.ints(), y.ints(), x.values(), y.values()) {
        // integers and bool: exact (64-bit values beyond 2^53 included), whatever the
        // tolerances asked for, which the report then shows as 0
        (Some(xs), Some(ys), _, _) => {
            (c.atol, c.rtol) = (0.0, 0.0);
            int_diff_stats(xs.zip(ys))
        }
        (_, _, Ok(xs), Ok(ys)) => diff_stats(xs.zip(ys), tol),
        _ => {
            // Unsupported element types were refused when the arrays were made.
            c.status = Status::Differ;
            return c;
        }
    };
    c.max_abs_diff = stats.max_abs;
    c.max_rel_diff = stats.max_rel;
    c.mismatches = Some(stats.mismatches);
    c.nonfinite_mismatches = Some(stats.nonfinite);
    c.passed = stats.mismatches == 0;
    c.status = if c.passed {
        Status::Pass
    } else {
        Status::Differ
    };
    c
}

#[derive(Default)]
struct DiffStats {
    max_abs: Option<f64>,
    max_rel: Option<f64>,
    mismatches: usize,
    nonfinite: usize,
}

/// Exact comparison of integers: every difference is a mismatch, whatever the tolerance.
fn int_diff_stats(pairs: impl Iterator<Item = (i128, i128)>) -> DiffStats {
    let mut s = DiffStats::default();
    for (a, b) in pairs {
        let d = (a - b).unsigned_abs() as f64;
        s.max_abs = Some(s.max_abs.map_or(d, |m| m.max(d)));
        if b != 0 {
            let r = d / b.unsigned_abs() as f64;
            s.max_rel = Some(s.max_rel.map_or(r, |m| m.max(r)));
        }
        s.mismatches += (a != b) as usize;
    }
    s
}

fn diff_stats(pairs: impl Iterator<Item = (f64, f64)>, tol: Tolerance) -> DiffStats {
    let mut s = DiffStats::default();
    for (a, b) in pairs {
        if !(a.is_finite() && b.is_finite()) {
            let same = (a.is_nan() && b.is_nan()) || a == b;
            s.mismatches += !same as usize;
            s.nonfinite += !same as usize;
            continue;
        }
        let d = (a - b).abs();
        s.max_abs = Some(s.max_abs.map_or(d, |m| m.max(d)));
        if b != 0.0 {
            let r = d / b.abs();
            s.max_rel = Some(s.max_rel.map_or(r, |m| m.max(r)));
        }
        s.mismatches += (d > tol.atol + tol.rtol * b.abs()) as usize;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

    fn f32s(v: &[f64]) -> crate::error::Result<ArrayData> {
        ArrayData::from_f64(DataType::Float, vec![v.len()], v)
    }

    #[test]
    fn allclose_semantics() -> TestResult {
        let over = ToleranceOverride {
            atol: Some(0.1),
            rtol: Some(0.1),
            compute: None,
        };
        // |a-b| = 0.29 <= 0.1 + 0.1*2 = 0.3 passes; 0.31 fails.
        let c = compare(
            "y",
            Some(&f32s(&[2.29])?),
            Some(&f32s(&[2.0])?),
            over,
            false,
        );
        assert!(c.passed, "{c:?}");
        let c = compare(
            "y",
            Some(&f32s(&[2.31])?),
            Some(&f32s(&[2.0])?),
            over,
            false,
        );
        assert_eq!((c.passed, c.mismatches), (false, Some(1)));
        Ok(())
    }

    #[test]
    fn nan_and_inf() -> TestResult {
        let over = ToleranceOverride::default();
        let a = f32s(&[f64::NAN, f64::INFINITY, 1.0])?;
        assert!(compare("y", Some(&a), Some(&a.clone()), over, false).passed);
        let b = f32s(&[1.0, f64::NEG_INFINITY, 1.0])?;
        let c = compare("y", Some(&a), Some(&b), over, false);
        assert_eq!((c.mismatches, c.max_abs_diff), (Some(2), Some(0.0)));
        assert_eq!(c.nonfinite_mismatches, Some(2));
        Ok(())
    }

    #[test]
    fn integers_compare_exactly() -> TestResult {
        let i64s = |v: &[i64]| {
            ArrayData::new(
                DataType::Int64,
                vec![v.len()],
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        };
        let over = ToleranceOverride {
            atol: Some(0.5),
            rtol: Some(0.5),
            compute: None,
        };
        let a = i64s(&[1 << 60, (1 << 53) + 1, -(1 << 62), 7])?;
        let b = i64s(&[(1 << 60) + 1, (1 << 53) + 2, -(1 << 62) - 1, 7])?;
        let c = compare("y", Some(&a), Some(&b), over, false);
        assert_eq!(
            (
                c.passed,
                c.mismatches,
                c.max_abs_diff,
                c.nonfinite_mismatches
            ),
            (false, Some(3), Some(1.0), Some(0))
        );
        assert!(compare("y", Some(&a), Some(&a.clone()), over, false).passed);
        Ok(())
    }

    #[test]
    fn shapes_and_missing() -> TestResult {
        let over = ToleranceOverride::default();
        let c = compare(
            "y",
            Some(&f32s(&[1.0])?),
            Some(&f32s(&[1.0, 2.0])?),
            over,
            false,
        );
        assert_eq!((c.status, c.mismatches), (Status::ShapeMismatch, None));
        let all = compare_all(&vec![("y".into(), f32s(&[1.0])?)], &vec![], over, false);
        assert_eq!(all[0].status, Status::Missing);
        assert_eq!(
            (all[0].missing_in, all[0].mismatches),
            (Some(Side::B), None)
        );
        assert!(!all[0].passed);
        Ok(())
    }

    #[test]
    fn fp16_side_loosens() {
        let t = default_tolerance(coarser(DataType::Float, DataType::Float16), false);
        assert_eq!(t, default_tolerance(DataType::Float16, false));
    }
}

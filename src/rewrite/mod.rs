//! Rewrites, each a pass over the model: `fold` merges adapters into weight initializers,
//! `inject` adds low-rank branches beside targeted nodes (built by `branch`), `unbranch` folds
//! injected branches back, `export` writes adapters out of injected models.
//! Passes decide on the read-only graph view, then edit the proto.

pub mod branch;
pub mod export;
pub mod fold;
pub mod fuse;
pub mod inject;
pub mod unbranch;
pub(crate) mod weights;

pub use export::{export_peft, serving_adapter_params};
pub use fold::{FoldOptions, FoldReport, ModuleReport, fold};
pub use fuse::fuse_shared;
pub use inject::{
    BranchReport, BranchSpec, Init, adapter_branches, fresh_branches, inject, unmerged_reference,
};
pub use unbranch::fold_branches;

use crate::adapter::{ModuleAdapter, ModuleKind};
use crate::error::{Error, Result};
use crate::target::Candidate;
use crate::tensor::Matrix;

/// Which candidates' weights an adapter module may adapt: embeddings are tables (Gather,
/// onnxruntime's EmbedLayerNormalization), 2-D LoRA factors linear layers (and onnxruntime's
/// Attention projection), 4-D ones convolutions; whole tensors any float weight. `inject`
/// also needs the candidate to be `branchable`.
pub(crate) fn accepts(m: &ModuleAdapter, c: &Candidate) -> bool {
    match m.kind {
        ModuleKind::Embedding => matches!(c.op.as_str(), "Gather" | "EmbedLayerNormalization"),
        ModuleKind::Lora => match m.a.as_ref().map(|a| a.shape.len()) {
            Some(2) => c.is_linear() || c.op == "Attention",
            _ => c.op == "Conv",
        },
        ModuleKind::Full => c.op != "MatMulNBits",
    }
}

/// A module's A (r, in) and B (out, r) as matrices, checked against a weight with `n_in`
/// inputs (times the kernel size for convolutions) and `n_out` outputs.
pub(crate) fn factors(
    m: &ModuleAdapter,
    c: &Candidate,
    n_in: usize,
    n_out: usize,
) -> Result<(Matrix, Matrix)> {
    let (Some(a), Some(b)) = (&m.a, &m.b) else {
        return Err(Error::Target(format!(
            "module '{}': missing lora_A or lora_B",
            m.path
        )));
    };
    let r = a.shape[0];
    let a_cols: usize = a.shape[1..].iter().product();
    let b_cols: usize = b.shape[1..].iter().product();
    if a_cols != n_in || b.shape[0] != n_out || b_cols != r {
        return Err(Error::Target(format!(
            "module '{}': lora_A {:?} and lora_B {:?} do not fit weight '{}' ({} {:?}: {n_in} in, {n_out} out)",
            m.path, a.shape, b.shape, c.weight, c.op, c.shape
        )));
    }
    Ok((
        Matrix::new(r, a_cols, a.data.clone())?,
        Matrix::new(b.shape[0], r, b.data.clone())?,
    ))
}

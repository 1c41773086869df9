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

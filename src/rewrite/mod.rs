//! Rewrites, each a pass over the model: `fold` merges adapters into weight initializers.
//! Passes decide on the read-only graph view, then edit the proto.

pub mod fold;
pub(crate) mod weights;

pub use fold::{FoldOptions, FoldReport, ModuleReport, fold};

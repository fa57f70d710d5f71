//! Online mining over one chunk of anchors against the whole reference set.
//!
//! Every routine here runs without autograd on a matrix of distances `d`
//! (anchors × references). Batch-all and semi-hard return the loss value of
//! the chunk with a [`Selection`] that gives its gradient with respect to
//! `d`; batch-hard returns the selected pairs.
//!
//! Two implementations give identical results: [`native`] runs on CPU tensors
//! in Rust over contiguous rows, [`portable`] uses libtorch operations and
//! runs on any device.

pub(crate) mod native;
mod parallel;
pub(crate) mod portable;

use tch::{Device, Kind, Tensor};

use crate::{Distance, Error};

/// Which implementation of the mining runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// Native Rust kernels for float32 and float64 CPU tensors, libtorch
    /// operations everywhere else.
    #[default]
    Auto,
    /// libtorch operations on every device: the path CUDA takes, available
    /// on the CPU to compare against.
    Portable,
}

/// One chunk of anchors against the reference set.
pub(crate) struct Chunk<'a> {
    /// Distances, anchors × references.
    pub d: &'a Tensor,
    /// int64 label keys of the anchors in the chunk.
    pub row_labels: &'a Tensor,
    /// int64 label keys of the references.
    pub col_labels: &'a Tensor,
    /// The reference column that is the first anchor of the chunk itself,
    /// when anchors are also references; anchor r is then column `self_col + r`.
    pub self_col: Option<i64>,
    pub distance: Distance,
}

/// Loss value and distance weights of a chunk, for batch-all and semi-hard.
pub(crate) struct Weighted {
    /// Sum of the hinge terms, a 0-d tensor of the distances' dtype.
    pub value: Tensor,
    /// Number of terms the loss averages over (int64, 0-d).
    pub count: Tensor,
    /// Batch-all: the number of valid triplets (int64, 0-d); semi-hard: `count`.
    pub valid: Tensor,
    pub selection: Selection,
}

/// What the gradient of a chunk's value with respect to `d` is made of.
pub(crate) enum Selection {
    /// ∂value/∂d, of the shape of `d`.
    Weights(Tensor),
    /// The pair weights of ∂value/∂d ([`Distance::pair_weight`]), with their row sums.
    PairWeights { weights: Tensor, row_sum: Tensor },
    /// The triplets whose hinge is positive, as indices (anchor rows within
    /// the chunk, reference columns); the value is the sum of d_ap − d_an + m
    /// over them. Only on the CPU, where their number is known without
    /// synchronising.
    Triplets {
        anchor: Vec<i64>,
        positive: Vec<i64>,
        negative: Vec<i64>,
    },
}

/// The hardest positive and negative of every anchor of a chunk.
pub(crate) struct Hardest {
    pub positive: Tensor,
    pub negative: Tensor,
    /// Anchors that have both a positive and a negative.
    pub valid: Tensor,
}

fn use_native(kernel: Kernel, d: &Tensor) -> bool {
    kernel == Kernel::Auto
        && d.device() == Device::Cpu
        && matches!(d.kind(), Kind::Float | Kind::Double)
}

/// Batch-all over one chunk.
///
/// # Errors
/// `Error::Torch` when libtorch fails (out of memory, for one).
pub(crate) fn batch_all(kernel: Kernel, chunk: &Chunk, margin: f64) -> Result<Weighted, Error> {
    if use_native(kernel, chunk.d) {
        native::batch_all(chunk, margin)
    } else {
        portable::batch_all(chunk, margin)
    }
}

/// Semi-hard over one chunk.
///
/// # Errors
/// `Error::Torch` when libtorch fails.
pub(crate) fn semihard(kernel: Kernel, chunk: &Chunk, margin: f64) -> Result<Weighted, Error> {
    if use_native(kernel, chunk.d) {
        native::semihard(chunk, margin)
    } else {
        portable::semihard(chunk, margin)
    }
}

/// The hardest positive and negative of every anchor of one chunk.
///
/// # Errors
/// `Error::Torch` when libtorch fails.
pub(crate) fn hardest(kernel: Kernel, chunk: &Chunk) -> Result<Hardest, Error> {
    if use_native(kernel, chunk.d) {
        native::hardest(chunk)
    } else {
        portable::hardest(chunk)
    }
}

#[cfg(test)]
mod tests;

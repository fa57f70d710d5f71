//! Online mining over one chunk of anchors against the whole reference set.
//!
//! Every routine here runs without autograd on a matrix of distances `d`
//! (anchors × references). Batch-all and semi-hard return the loss value of
//! the chunk with a [`Selection`] that gives its gradient with respect to
//! `d`; batch-hard returns the selected pairs.
//!
//! Two implementations select the same triplets from the same distances,
//! their hinges taken in float64: [`native`] runs on CPU tensors in Rust
//! over contiguous rows, [`portable`] uses libtorch operations and runs on
//! any device.

pub(crate) mod native;
mod parallel;
pub(crate) mod portable;

use tch::{Device, Kind, Tensor};

use crate::{Distance, Error, Interrupt};

/// Which implementation of the mining runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// Native Rust kernels for CPU tensors (float16 and bfloat16 ones are
    /// computed in float32), libtorch operations everywhere else.
    #[default]
    Auto,
    /// libtorch operations on every device: the path CUDA takes, available
    /// on the CPU to compare against.
    Portable,
}

/// The reference columns' labels, indexed once for all the chunks of a loss.
pub(crate) struct Columns {
    /// int64 label keys of the references.
    pub labels: Tensor,
    /// The columns of each label, for the native kernels (CPU labels only).
    groups: Option<native::Groups>,
}

impl Columns {
    /// # Errors
    /// `Error::Torch` when libtorch fails.
    pub(crate) fn new(labels: &Tensor) -> Result<Self, Error> {
        let labels = labels.f_contiguous()?;
        let groups = match labels.device() {
            Device::Cpu => Some(native::Groups::new(&labels)?),
            _ => None,
        };
        Ok(Columns { labels, groups })
    }

    /// The index of the columns by label that the native kernels read.
    ///
    /// # Errors
    /// `Error::Torch` for labels off the CPU, which have none.
    fn native_groups(&self) -> Result<&native::Groups, Error> {
        self.groups.as_ref().ok_or_else(|| {
            Error::Torch("internal error: native mining of labels off the CPU".into())
        })
    }
}

/// The squared norms that turn a chunk of Gram products x·y into squared
/// Euclidean distances ‖x‖² + ‖y‖² − 2x·y (unused for the cosine distance,
/// 1 − x·y of normalised points).
#[derive(Clone, Copy)]
pub(crate) struct Gram<'a> {
    /// `(rows,)`, of the anchors of the chunk.
    pub row_norms: &'a Tensor,
    /// `(references,)`.
    pub col_norms: &'a Tensor,
}

/// One chunk of anchors against the reference set.
pub(crate) struct Chunk<'a> {
    /// Distances, anchors × references, or their Gram products when `gram`
    /// is set. Scratch space: the native kernels overwrite it (batch-all
    /// returns its weights in it).
    pub d: Tensor,
    /// int64 label keys of the anchors in the chunk.
    pub row_labels: &'a Tensor,
    pub columns: &'a Columns,
    /// The reference column that is the first anchor of the chunk itself,
    /// when anchors are also references; anchor r is then column `self_col + r`.
    pub self_col: Option<i64>,
    pub distance: Distance,
    /// Set when `d` holds Gram products, which only the native kernels take
    /// ([`fuses_distances`]).
    pub gram: Option<Gram<'a>>,
    /// What the native batch-all finds and weighs the Euclidean distances
    /// too near 0 to be differentiated through `d` by ([`NearPairs`]);
    /// unused by the other kernels and distances.
    pub near: Option<Near<'a>>,
}

/// The squared norms and the points, in the frame of a chunk's distances,
/// of its anchors and of the references.
#[derive(Clone, Copy)]
pub(crate) struct Near<'a> {
    /// `(rows,)` and `(references,)`.
    pub row_norms: &'a Tensor,
    pub col_norms: &'a Tensor,
    /// `(rows, D)` and `(references, D)`.
    pub rows: &'a Tensor,
    pub cols: &'a Tensor,
}

/// Loss value and distance weights of a chunk, for batch-all and semi-hard.
pub(crate) struct Weighted {
    /// Sum of the hinge terms, a 0-d float64 tensor: a float32 one could
    /// overflow where the loss, their mean, does not.
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
    /// The pair weights of ∂value/∂d ([`Distance::pair_weight`]), with their
    /// row and column sums, and the near pairs, whose weights are 0 there.
    PairWeights {
        weights: Tensor,
        row_sum: Tensor,
        col_sum: Tensor,
        near: NearPairs,
    },
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

/// Pairs whose Euclidean distance is too near 0, against the rounding of
/// the Gram products it comes from, to be differentiated through it: their
/// weights ∂value/∂d, ascending by anchor. The gradient of Σ w·d over them
/// is taken from their exact distances ‖x − y‖ ([`add_pair_grad`]).
#[derive(Debug, Default)]
pub(crate) struct NearPairs {
    /// Anchor rows (within the chunk, or of the batch).
    pub anchor: Vec<i64>,
    /// Reference columns.
    pub reference: Vec<i64>,
    pub weight: Vec<f64>,
}

impl NearPairs {
    /// Appends the pair (anchor, reference) with weight w.
    ///
    /// # Errors
    /// [`Error::OutOfMemory`] when the lists cannot grow.
    pub(crate) fn push(&mut self, anchor: usize, reference: usize, w: f64) -> Result<(), Error> {
        crate::alloc::push(&mut self.anchor, anchor as i64)?;
        crate::alloc::push(&mut self.reference, reference as i64)?;
        crate::alloc::push(&mut self.weight, w)
    }

    /// Appends `other`'s pairs, whose anchors follow these.
    ///
    /// # Errors
    /// [`Error::OutOfMemory`] when the lists cannot grow.
    pub(crate) fn append(&mut self, other: NearPairs) -> Result<(), Error> {
        crate::alloc::extend(&mut self.anchor, other.anchor)?;
        crate::alloc::extend(&mut self.reference, other.reference)?;
        crate::alloc::extend(&mut self.weight, other.weight)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.anchor.is_empty()
    }
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

/// Whether the chunks of embeddings `x` are mined by native kernels that
/// compute the distances from Gram products themselves ([`Chunk::gram`]),
/// saving the passes over each chunk that libtorch would make.
pub(crate) fn fuses_distances(kernel: Kernel, x: &Tensor) -> bool {
    use_native(kernel, x)
}

fn check_gram(chunk: &Chunk) -> Result<(), Error> {
    if chunk.gram.is_some() {
        return Err(Error::Torch(
            "internal error: Gram products given to the portable kernels".into(),
        ));
    }
    Ok(())
}

/// Batch-all over one chunk.
///
/// # Errors
/// `Error::Torch` when libtorch fails (out of memory, for one).
pub(crate) fn batch_all(kernel: Kernel, chunk: &Chunk, margin: f64) -> Result<Weighted, Error> {
    if use_native(kernel, &chunk.d) {
        native::batch_all(chunk, margin)
    } else {
        check_gram(chunk)?;
        portable::batch_all(chunk, margin)
    }
}

/// Semi-hard over one chunk.
///
/// # Errors
/// `Error::Torch` when libtorch fails.
pub(crate) fn semihard(kernel: Kernel, chunk: &Chunk, margin: f64) -> Result<Weighted, Error> {
    if use_native(kernel, &chunk.d) {
        native::semihard(chunk, margin)
    } else {
        check_gram(chunk)?;
        portable::semihard(chunk, margin)
    }
}

/// The hardest positive and negative of every anchor of one chunk.
///
/// # Errors
/// `Error::Torch` when libtorch fails.
pub(crate) fn hardest(kernel: Kernel, chunk: &Chunk) -> Result<Hardest, Error> {
    if use_native(kernel, &chunk.d) {
        native::hardest(chunk)
    } else {
        check_gram(chunk)?;
        portable::hardest(chunk)
    }
}

/// The hardest positive and negative of every sample of a batch mined against
/// itself, by the native kernels from half of its Gram matrix, in `chunks` of
/// `step` anchors, `stop` asked between them: `points` and `norms` as in
/// [`Gram`], `columns` the batch's labels. The same picks as [`hardest`] over
/// the whole matrix.
///
/// # Errors
/// `Error::Torch` when libtorch fails or the points are not float32 or
/// float64 CPU tensors with CPU labels.
pub(crate) fn hardest_within(
    points: &Tensor,
    norms: &Tensor,
    columns: &Columns,
    distance: Distance,
    chunks: (i64, Option<Interrupt>),
) -> Result<Hardest, Error> {
    native::hardest_within(
        points,
        norms,
        &columns.labels,
        columns.native_groups()?,
        distance,
        chunks,
    )
}

pub(crate) use native::AllWithin;

/// Batch-all of a batch mined against itself, by the native kernels from half
/// of its Gram matrix, in `chunks` of `step` anchors, `stop` asked between
/// them: `points` and `norms` as in [`Gram`], `exact` the points that near
/// pairs' distances are taken from ([`NearPairs`]), `columns` the batch's
/// labels.
/// `None` when a label has more samples than these kernels take, or their
/// float32 partial sums of hinges overflowed; [`batch_all`] over chunks then
/// applies. Without `grad`, the gradient it returns is zeros, not computed.
///
/// # Errors
/// As [`hardest_within`].
pub(crate) fn batch_all_within(
    (points, norms, exact): (&Tensor, &Tensor, &Tensor),
    columns: &Columns,
    (distance, margin): (Distance, f64),
    chunks: (i64, Option<Interrupt>),
    grad: bool,
) -> Result<Option<AllWithin>, Error> {
    native::batch_all_within(
        (points, norms, exact),
        &columns.labels,
        columns.native_groups()?,
        (distance, margin),
        chunks,
        grad,
    )
}

/// Semi-hard of a batch mined against itself, by the native kernels from
/// half of its Gram matrix, as [`batch_all_within`]: the terms of
/// [`semihard`] over the whole batch, with [`Selection::Triplets`]. `None`
/// when a label has more samples than these kernels take.
///
/// # Errors
/// As [`hardest_within`].
pub(crate) fn semihard_within(
    points: &Tensor,
    norms: &Tensor,
    columns: &Columns,
    loss: (Distance, f64),
    chunks: (i64, Option<Interrupt>),
) -> Result<Option<Weighted>, Error> {
    native::semihard_within(
        points,
        norms,
        &columns.labels,
        columns.native_groups()?,
        loss,
        chunks,
    )
}

/// Adds the gradient of the selected triplets' Σ (d_ap − d_an) with respect
/// to the anchors' points `x` and the references' points `y` to `gx` and,
/// when given, `gy`, the gradient of the leading references, all or some
/// ([`Selection::Triplets`], CPU only).
///
/// # Errors
/// `Error::Torch` for tensors the native kernels do not take.
pub(crate) fn add_triplet_grad(
    distance: Distance,
    points: (&Tensor, &Tensor),
    triplets: (&[i64], &[i64], &[i64]),
    gx: &mut Tensor,
    gy: Option<&mut Tensor>,
) -> Result<(), Error> {
    native::add_triplet_grad(distance, points, triplets, gx, gy)
}

pub(crate) use native::add_pair_grad;

#[cfg(test)]
mod tests;

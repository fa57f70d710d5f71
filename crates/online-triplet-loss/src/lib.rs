//! Triplet losses with exact online mining on [`tch`] tensors.
//!
//! A valid triplet (a, p, n) has a ≠ p, yₐ = yₚ and yₙ ≠ yₐ; d is the
//! distance ([`Distance`]) and m the margin.
//!
//! - **batch-all**: Σ relu(d_ap − d_an + m) over valid triplets, divided by
//!   the number of valid triplets whose loss is > 0; also returns that number
//!   divided by the number of valid triplets. Both are 0 when there is none.
//! - **batch-hard**: for each anchor with a positive and a negative,
//!   h(maxₚ d_ap − minₙ d_an + m) with h = relu, or softplus when `soft`;
//!   the mean over those anchors, 0 when there are none.
//! - **semi-hard**: for each ordered positive pair (a, p) whose anchor has a
//!   negative, n* is the negative with the smallest d_an > d_ap, or the
//!   largest d_an if there is none; the mean of relu(d_ap − d_an* + m) over
//!   those pairs, 0 when there are none. Ties go to the lowest index.
//!
//! Batch-all and semi-hard run in O(B² log B) time and O(B·chunk) memory
//! (semi-hard's selected triplets are turned into its gradient a chunk of
//! anchors at a time): mining runs without autograd, and the gradient
//! reaches the embeddings as a weighted sum over the distance matrix. First-order gradients are exact.
//! Second derivatives are exact through batch-hard; through batch-all and
//! semi-hard they are not supported, and differentiating their gradient
//! (after a backward pass with `create_graph`) fails with libtorch's
//! "derivative for aten::_segment_reduce_backward is not implemented", from a guard that
//! keeps the gradient from being differentiated as a constant (which would
//! give 0, silently).
//!
//! ```
//! use online_triplet_loss::batch_all_triplet_loss;
//! use tch::{Device, Kind, Tensor};
//!
//! let embeddings = Tensor::randn([6, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
//! let labels = Tensor::from_slice(&[0i64, 0, 1, 1, 2, 2]);
//! let (loss, fraction_positive) = batch_all_triplet_loss(&labels, &embeddings, 1.0, false)?;
//! loss.backward();
//! assert!(f64::try_from(&fraction_positive).unwrap() <= 1.0);
//! # Ok::<(), online_triplet_loss::Error>(())
//! ```

mod alloc;
mod distance;
mod error;
mod grad;
mod hash;
mod interrupt;
mod labels;
mod losses;
pub mod metrics;
mod mining;
mod ties;

pub use distance::Distance;
pub use error::Error;
pub use interrupt::Interrupt;
pub use losses::{
    batch_all_triplet_loss, batch_hard_triplet_loss, batch_semihard_triplet_loss, Mining,
    References, Terms, TripletConfig,
};
pub use mining::Kernel;

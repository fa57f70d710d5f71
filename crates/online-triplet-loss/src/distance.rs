//! Distances between embeddings, with their gradients written out by hand so
//! that the weighted sums of the mining never go through autograd over a
//! B×B matrix.

use std::fmt;
use std::str::FromStr;

use tch::{Kind, Tensor};

use crate::Error;

/// Norms below this are treated as this when normalising for the cosine
/// distance, as `torch.nn.functional.normalize` does.
const COSINE_EPS: f64 = 1e-12;

/// The distance between two embeddings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Distance {
    /// ‖x − y‖₂.
    #[default]
    Euclidean,
    /// ‖x − y‖₂².
    Squared,
    /// 1 − cos(x, y).
    Cosine,
}

impl Distance {
    /// The distance that 0.0.6's `squared` flag selects.
    pub fn from_squared(squared: bool) -> Self {
        if squared {
            Distance::Squared
        } else {
            Distance::Euclidean
        }
    }

    /// The factor that turns the weight w of a distance d into the weight of
    /// its pair in [`Side::accumulate_grad`]: w/d for the Euclidean distance
    /// (0 at d = 0, the subgradient used), 2w for the squared one, w for the
    /// cosine one. [`Side::pair_weights`] is the same for tensors.
    pub(crate) fn pair_weight(self, w: f64, d: f64) -> f64 {
        match self {
            Distance::Euclidean if d > 0.0 => w / d,
            Distance::Euclidean => 0.0,
            Distance::Squared => 2.0 * w,
            Distance::Cosine => w,
        }
    }

    /// The name used by [`FromStr`] and the Python API.
    pub fn name(self) -> &'static str {
        match self {
            Distance::Euclidean => "euclidean",
            Distance::Squared => "squared",
            Distance::Cosine => "cosine",
        }
    }

    /// Distances between the rows of `x` and the rows of `y`, differentiable.
    /// Used where only a few pairs are needed; the gradient is 0 at zero
    /// distance.
    pub fn paired(self, x: &Tensor, y: &Tensor) -> Tensor {
        match self {
            Distance::Squared => (x - y).square().sum_dim_intlist(-1, false, None::<Kind>),
            Distance::Euclidean => {
                let sq = (x - y).square().sum_dim_intlist(-1, false, None::<Kind>);
                let positive = sq.gt(0.0);
                // sqrt is evaluated on 1 where sq is 0 so that its gradient is finite.
                sq.where_self(&positive, &sq.ones_like())
                    .sqrt()
                    .where_self(&positive, &sq.zeros_like())
            }
            Distance::Cosine => {
                let xn = normalize(x);
                let yn = normalize(y);
                1.0 - (xn * yn).sum_dim_intlist(-1, false, None::<Kind>)
            }
        }
    }
}

impl fmt::Display for Distance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Distance {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "euclidean" => Ok(Distance::Euclidean),
            "squared" => Ok(Distance::Squared),
            "cosine" => Ok(Distance::Cosine),
            other => Err(Error::invalid(
                "distance",
                format!("expected 'euclidean', 'squared' or 'cosine', got {other:?}"),
            )),
        }
    }
}

fn normalize(x: &Tensor) -> Tensor {
    let norm = x
        .linalg_norm(2.0, -1, true, None::<Kind>)
        .clamp_min(COSINE_EPS);
    x / norm
}

/// One set of embeddings, detached, with what the distance needs precomputed.
pub(crate) struct Side {
    distance: Distance,
    /// The embeddings (normalised for the cosine distance).
    points: Tensor,
    /// Squared norms for Euclidean distances, clamped norms for the cosine one.
    norms: Tensor,
}

impl Side {
    pub(crate) fn new(distance: Distance, embeddings: &Tensor) -> Self {
        let x = embeddings.detach();
        match distance {
            Distance::Euclidean | Distance::Squared => {
                let norms = x.square().sum_dim_intlist(-1, false, None::<Kind>);
                Side {
                    distance,
                    points: x,
                    norms,
                }
            }
            Distance::Cosine => {
                let norms = x
                    .linalg_norm(2.0, -1, true, None::<Kind>)
                    .clamp_min(COSINE_EPS);
                Side {
                    distance,
                    points: &x / &norms,
                    norms,
                }
            }
        }
    }

    pub(crate) fn rows(&self, start: i64, len: i64) -> Side {
        Side {
            distance: self.distance,
            points: self.points.narrow(0, start, len),
            norms: self.norms.narrow(0, start, len),
        }
    }

    /// The matrix of distances from every row of `self` to every row of `other`.
    pub(crate) fn pairwise(&self, other: &Side) -> Tensor {
        match self.distance {
            Distance::Euclidean | Distance::Squared => {
                let mut d = other
                    .norms
                    .unsqueeze(0)
                    .addmm(&(&self.points * -2.0), &other.points.tr());
                let _ = d.g_add_(&self.norms.unsqueeze(1));
                let _ = d.clamp_min_(0.0);
                if self.distance == Distance::Euclidean {
                    let _ = d.sqrt_();
                }
                d
            }
            Distance::Cosine => self
                .points
                .ones_like()
                .narrow(1, 0, 1)
                .addmm(&-&self.points, &other.points.tr()),
        }
    }

    /// `pair_weight` of every entry, for weights `w` of distances `d`.
    pub(crate) fn pair_weights(&self, w: &Tensor, d: &Tensor) -> Tensor {
        match self.distance {
            Distance::Euclidean => {
                let positive = d.gt(0.0);
                (w / d.where_self(&positive, &d.ones_like())).where_self(&positive, &d.zeros_like())
            }
            Distance::Squared => w * 2.0,
            Distance::Cosine => w.shallow_clone(),
        }
    }

    /// Adds to `grad_self` and `grad_other` the gradients of Σᵢⱼ wᵢⱼ dᵢⱼ with
    /// respect to the points of `self` and `other`, given the pair weights
    /// `p` of `w` ([`Distance::pair_weight`]) and, optionally, their row sums.
    /// For the cosine distance these are gradients with respect to the
    /// normalised points; [`Side::finish_grad`] maps them back.
    pub(crate) fn accumulate_grad(
        &self,
        other: &Side,
        p: &Tensor,
        row_sum: Option<Tensor>,
        grad_self: &mut Tensor,
        grad_other: &mut Tensor,
    ) {
        match self.distance {
            Distance::Euclidean | Distance::Squared => {
                // Σⱼ pᵢⱼ (xᵢ − yⱼ) for the anchors, Σᵢ pᵢⱼ (yⱼ − xᵢ) for the references.
                let row_sum = row_sum
                    .unwrap_or_else(|| p.sum_dim_intlist(1, false, None::<Kind>))
                    .unsqueeze(1);
                let col_sum = p.sum_dim_intlist(0, false, None::<Kind>).unsqueeze(1);
                let _ = grad_self.g_add_(&(row_sum * &self.points - p.mm(&other.points)));
                let _ = grad_other.g_add_(&(col_sum * &other.points - p.tr().mm(&self.points)));
            }
            Distance::Cosine => {
                let _ = grad_self.g_sub_(&p.mm(&other.points));
                let _ = grad_other.g_sub_(&p.tr().mm(&self.points));
            }
        }
    }

    /// Maps a gradient accumulated by [`Side::accumulate_grad`] to a gradient
    /// with respect to the original embeddings.
    pub(crate) fn finish_grad(&self, grad: Tensor) -> Tensor {
        match self.distance {
            Distance::Euclidean | Distance::Squared => grad,
            Distance::Cosine => {
                // x̂ = x / max(‖x‖, ε): the Jacobian is (I − x̂x̂ᵀ)/‖x‖ above ε and I/ε below.
                let radial = (&grad * &self.points).sum_dim_intlist(-1, true, None::<Kind>);
                let above = self.norms.gt(COSINE_EPS);
                let tangent = &grad - radial * &self.points;
                tangent.where_self(&above, &grad) / &self.norms
            }
        }
    }
}

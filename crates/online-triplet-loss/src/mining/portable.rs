//! Mining with libtorch operations, for every device.

use tch::{Kind, Tensor};

use super::{Chunk, Hardest, Selection, Weighted};
use crate::labels::masks;

fn sum_i64(t: &Tensor) -> Tensor {
    t.sum(Kind::Int64)
}

/// For anchor a and positive p, with t = d_ap + m, the negatives with
/// d_an < t are those below t in the sorted row, so Σₙ relu(t − d_an) is
/// k·t − S_k with k from a binary search and S the prefix sums.
pub(crate) fn batch_all(chunk: &Chunk, margin: f64) -> Weighted {
    let d = chunk.d;
    let (same, different) = masks(chunk.row_labels, chunk.col_labels, chunk.self_col);
    let inf = d.full_like(f64::INFINITY);
    let neg_inf = d.full_like(f64::NEG_INFINITY);

    let (sorted_neg, _) = d.where_self(&different, &inf).sort(1, false);
    let finite = sorted_neg.isfinite();
    let prefix = Tensor::cat(
        &[
            d.zeros_like().narrow(1, 0, 1),
            sorted_neg
                .where_self(&finite, &d.zeros_like())
                .cumsum(1, None::<Kind>),
        ],
        1,
    );
    let t = d + margin;
    let below = t.searchsorted(&sorted_neg, false, false, "left", None::<Tensor>);
    let hinge = &below.to_kind(d.kind()) * &t - prefix.gather(1, &below, false);
    let zero_i = below.zeros_like();
    let below = below.where_self(&same, &zero_i);
    let value = hinge.where_self(&same, &d.zeros_like()).sum(d.kind());

    // For a negative n, the active positives are those with t_p > d_an.
    let (sorted_t, _) = t.where_self(&same, &neg_inf).sort(1, false);
    let not_above = d.searchsorted(&sorted_t, false, true, "right", None::<Tensor>);
    let above = (-not_above + d.size()[1]).where_self(&different, &zero_i);

    let negatives = different.sum_dim_intlist(1, false, Kind::Int64);
    let positives = same.sum_dim_intlist(1, false, Kind::Int64);
    Weighted {
        value,
        count: sum_i64(&below),
        valid: sum_i64(&(positives * negatives)),
        selection: Selection::Weights((below - above).to_kind(d.kind())),
    }
}

/// For each positive pair (a, p), n* is the first negative above d_ap in
/// the sorted row, or the largest negative when none is above.
pub(crate) fn semihard(chunk: &Chunk, margin: f64) -> Weighted {
    let d = chunk.d;
    let (same, different) = masks(chunk.row_labels, chunk.col_labels, chunk.self_col);
    let inf = d.full_like(f64::INFINITY);
    let (sorted_neg, order) = d.where_self(&different, &inf).sort_stable(true, 1, false);
    let negatives = different.sum_dim_intlist(1, true, Kind::Int64);
    let has_negative = negatives.gt(0);
    let last = (&negatives - 1).clamp_min(0);
    // First position of the largest negative, so ties resolve to the lowest index.
    let largest = sorted_neg.gather(1, &last, false);
    let first_largest = largest.searchsorted(&sorted_neg, false, false, "left", None::<Tensor>);

    let above = d.searchsorted(&sorted_neg, false, true, "right", None::<Tensor>);
    let position = above.where_self(
        &above.lt_tensor(&negatives),
        &first_largest.expand_as(&above),
    );
    let position = position.clamp_max(d.size()[1] - 1);
    let negative = order.gather(1, &position, false);
    let d_neg = sorted_neg.gather(1, &position, false);

    let pairs = same.logical_and(&has_negative);
    let hinge = (d - &d_neg + margin)
        .relu()
        .where_self(&pairs, &d.zeros_like());
    let active = hinge.gt(0.0).to_kind(d.kind());
    let weights = active.scatter_add(1, &negative, &(-&active));
    Weighted {
        value: hinge.sum(d.kind()),
        count: sum_i64(&pairs),
        valid: sum_i64(&pairs),
        selection: Selection::Weights(weights),
    }
}

pub(crate) fn hardest(chunk: &Chunk) -> Hardest {
    let d = chunk.d;
    let (same, different) = masks(chunk.row_labels, chunk.col_labels, chunk.self_col);
    let positive = d
        .where_self(&same, &d.full_like(f64::NEG_INFINITY))
        .argmax(1, false);
    let negative = d
        .where_self(&different, &d.full_like(f64::INFINITY))
        .argmin(1, false);
    let valid = same
        .any_dim(1, false)
        .logical_and(&different.any_dim(1, false));
    Hardest {
        positive,
        negative,
        valid,
    }
}

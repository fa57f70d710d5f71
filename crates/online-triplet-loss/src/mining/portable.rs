//! Mining with libtorch operations, for every device. Shapes depend only on
//! the chunk's shape, never on its values, so nothing waits for the device.

use tch::{Kind, Tensor};

use super::{Chunk, Hardest, Selection, Weighted};
use crate::labels::masks;
use crate::Error;

/// With the anchor's positives sorted by b_p, the smallest value of the
/// dtype at least d_ap + m, a negative n is active against the positives
/// with b_p > d_an, the last P − k_n of them, k_n from a binary search, and
/// its hinge terms sum to (T_P − T_{k_n}) − (P − k_n)·d_an, T the prefix
/// sums of t_p = d_ap + m rounded, in the same order. The positive in sorted
/// place j is active against the negatives with k_n ≤ j (tied b are all
/// counted in k_n or none is): a count of the k_n (scatter-add) and its
/// running sum. Only the positives are sorted.
pub(crate) fn batch_all(chunk: &Chunk, margin: f64) -> Result<Weighted, Error> {
    let d = &chunk.d;
    let kind = d.kind();
    let (rows, n) = (d.size()[0], d.size()[1]);
    let (same, different) = masks(chunk.row_labels, &chunk.columns.labels, chunk.self_col)?;
    let positives = same.f_sum_dim_intlist(1, true, Kind::Int64)?;
    // A NaN distance is below no t_p, as in the native kernels, whatever
    // place `searchsorted` gives it.
    let negative = different.f_logical_and(&d.f_eq_tensor(d)?)?;

    // Negative n is active for positive p when d_an < d_ap + m exactly:
    // below the smallest value of the dtype at least d_ap + m (computed in
    // float64, as the native kernels do), which float32's rounding to nearest
    // can fall short of by an ulp. The hinges take t_p, d_ap + m rounded.
    // In float64 the bound is t itself, and sorting it sorts t.
    let t = d.f_where_scalarother(&same, f64::INFINITY)?;
    let (sorted_bound, order, sorted_t) = match kind {
        Kind::Double => {
            let (sorted, order) = t.f_add_scalar(margin)?.f_sort(1, false)?;
            (sorted.shallow_clone(), order, sorted)
        }
        _ => {
            let exact = t.f_to_kind(Kind::Double)?.f_add_scalar_(margin)?;
            let t = exact.f_to_kind(kind)?;
            let up = t.f_nextafter(&Tensor::f_full([], f64::INFINITY, (kind, d.device()))?)?;
            let short = t.f_to_kind(Kind::Double)?.f_lt_tensor(&exact)?;
            drop(exact);
            let (sorted_bound, order) = up.f_where_self(&short, &t)?.f_sort(1, false)?;
            let sorted_t = t.f_gather(1, &order, false)?;
            (sorted_bound, order, sorted_t)
        }
    };
    // #{bound_p ≤ d_an} for every column, and P − k_n for the negatives.
    let k = d.f_searchsorted(&sorted_bound, false, true, "right", None::<Tensor>)?;
    drop(sorted_bound);
    let active = positives
        .f_sub(&k)?
        .f_clamp_min_(0)?
        .f_where_scalarother(&negative, 0)?;
    // Sorted places that hold a positive: the first P, unless a positive's
    // distance is infinite or NaN (a loss that is NaN anyway) and sorts among
    // or after the +inf of the other columns.
    let in_place = same.f_gather(1, &order, false)?;
    let (value, mut negative_weight) = {
        let prefix = Tensor::f_cat(
            &[
                Tensor::f_zeros([rows, 1], (kind, d.device()))?,
                sorted_t
                    .f_where_scalarother(&in_place, 0.0)?
                    .f_cumsum_(1, kind)?,
            ],
            1,
        )?;
        let mut count = active.f_to_kind(kind)?;
        let terms = prefix
            .f_gather(1, &k, false)?
            .f_neg_()?
            // T_P: the total, not the prefix at place P, since a positive
            // whose bound rounds up to +inf ties with the other columns' and
            // may sort past place P.
            .f_add_(&prefix.f_narrow(1, n, 1)?)?
            .f_sub_(&count.f_mul(d)?)?
            .f_where_scalarother(&active.f_gt(0)?, 0.0)?;
        (terms.f_sum(kind)?, count.f_neg_()?)
    };
    drop(sorted_t);
    // The positive in sorted place j gets the number of negatives with k_n ≤ j.
    let below = Tensor::f_zeros([rows, n + 1], (kind, d.device()))?
        .f_scatter_add_(1, &k, &negative.f_to_kind(kind)?)?
        .f_cumsum_(1, kind)?
        .f_narrow(1, 0, n)?
        .f_where_scalarother(&in_place, 0.0)?;
    let weights = negative_weight.f_scatter_add_(1, &order, &below)?;
    let negatives = different.f_sum_dim_intlist(1, true, Kind::Int64)?;
    Ok(Weighted {
        value,
        count: active.f_sum(Kind::Int64)?,
        valid: positives.f_mul(&negatives)?.f_sum(Kind::Int64)?,
        selection: Selection::Weights(weights),
    })
}

/// For each positive pair (a, p), n* is the negative with the smallest
/// d_an > d_ap (lowest index on ties), or the largest negative when none is
/// above.
///
/// A negative's gap is the number of the anchor's positives strictly below
/// it, from a binary search in the sorted positive distances. Gaps hold
/// disjoint, increasing ranges of distances, and the negatives above d_ap
/// are those in the gaps beyond g_p, the number of positives strictly below
/// d_ap: p itself, and any positive tied with it, lies below all of them.
/// So n* is the nearest negative of those gaps, a per-gap minimum
/// (scatter-reduce) and a running minimum over the gaps instead of a sort of
/// the negatives. Gaps are numbered from the top, n − gap, so that the
/// running minimum is a prefix `cummin`.
pub(crate) fn semihard(chunk: &Chunk, margin: f64) -> Result<Weighted, Error> {
    let d = &chunk.d;
    let kind = d.kind();
    let (rows, n) = (d.size()[0], d.size()[1]);
    let (mut same, different) = masks(chunk.row_labels, &chunk.columns.labels, chunk.self_col)?;
    let index_opts = (Kind::Int64, d.device());

    // n − gap for every column, in 0..=n.
    let mut from_top = {
        let (sorted_pos, _) = d
            .f_where_scalarother(&same, f64::INFINITY)?
            .f_sort(1, false)?;
        d.f_searchsorted(&sorted_pos, false, false, "left", None::<Tensor>)?
            .f_neg_()?
            .f_add_scalar_(n)?
    };
    // Columns that are not negatives scatter +inf, which changes no minimum.
    let negative_d = d.f_where_scalarother(&different, f64::INFINITY)?;
    let nearest = Tensor::f_full([rows, n + 1], f64::INFINITY, (kind, d.device()))?
        .f_internal_scatter_reduce_(1, &from_top, &negative_d, "amin", true)?;
    // The lowest column holding each gap's minimum. A finite minimum is never
    // matched by the +inf of a column that is not a negative.
    let first = {
        let at_nearest = negative_d.f_eq_tensor(&nearest.f_gather(1, &from_top, false)?)?;
        let columns = Tensor::f_arange(n, index_opts)?
            .f_expand([rows, n], false)?
            .f_where_scalarother(&at_nearest, n)?;
        Tensor::f_full([rows, n + 1], n, index_opts)?
            .f_internal_scatter_reduce_(1, &from_top, &columns, "amin", true)?
    };
    drop(negative_d);
    // Finite minima of different gaps differ, so the gap a finite running
    // minimum comes from is unique; an infinite one means that no finite
    // negative is above, where the largest negative is the answer.
    let (d_above, above) = {
        let (running, gap) = nearest.f_cummin(1)?;
        drop(nearest);
        // The gaps beyond a positive's own: n − (gap + 1) from the top.
        let beyond = from_top.f_sub_scalar_(1)?.f_clamp_min_(0)?;
        let gap = gap.f_gather(1, &beyond, false)?;
        (
            running.f_gather(1, &beyond, false)?,
            first.f_gather(1, &gap, false)?,
        )
    };
    let largest = d
        .f_where_scalarother(&different, f64::NEG_INFINITY)?
        .f_argmax(1, true)?;
    // Where a column is not a positive pair the index is unused but must be
    // in range. Distances are not −inf: below +inf is finite.
    let negative = above
        .f_where_self(&d_above.f_lt(f64::INFINITY)?, &largest)?
        .f_clamp_max_(n - 1)?;
    drop(d_above);

    let pairs = same.f_logical_and_(&different.f_any_dim(1, true)?)?;
    let hinge = d
        .f_sub(&d.f_gather(1, &negative, false)?)?
        .f_add_scalar_(margin)?
        .f_relu_()?
        .f_where_scalarother(&pairs, 0.0)?;
    let mut weights = hinge.f_gt(0.0)?.f_to_kind(kind)?;
    let minus = weights.f_neg()?;
    let _ = weights.f_scatter_add_(1, &negative, &minus)?;
    let count = pairs.f_sum(Kind::Int64)?;
    Ok(Weighted {
        value: hinge.f_sum(kind)?,
        valid: count.shallow_clone(),
        count,
        selection: Selection::Weights(weights),
    })
}

pub(crate) fn hardest(chunk: &Chunk) -> Result<Hardest, Error> {
    let d = &chunk.d;
    let (same, different) = masks(chunk.row_labels, &chunk.columns.labels, chunk.self_col)?;
    let positive = d
        .f_where_scalarother(&same, f64::NEG_INFINITY)?
        .f_argmax(1, false)?;
    let negative = d
        .f_where_scalarother(&different, f64::INFINITY)?
        .f_argmin(1, false)?;
    let valid = same
        .f_any_dim(1, false)?
        .f_logical_and(&different.f_any_dim(1, false)?)?;
    Ok(Hardest {
        positive,
        negative,
        valid,
    })
}

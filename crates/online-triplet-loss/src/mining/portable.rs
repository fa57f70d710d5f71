//! Mining with libtorch operations, for every device. Shapes depend only on
//! the chunk's shape, never on its values, so nothing waits for the device.

use tch::{Kind, Tensor};

use super::{Chunk, Hardest, Selection, Weighted};
use crate::labels::masks;
use crate::Error;

/// For anchor a and positive p, with t = d_ap + m, the negatives with
/// d_an < t are those below t in the sorted row, so Σₙ relu(t − d_an) is
/// k·t − S_k with k from a binary search and S the prefix sums.
pub(crate) fn batch_all(chunk: &Chunk, margin: f64) -> Result<Weighted, Error> {
    let d = chunk.d;
    let kind = d.kind();
    let (same, different) = masks(chunk.row_labels, chunk.col_labels, chunk.self_col);
    let zeros = d.f_zeros_like()?;

    let (sorted_neg, _) = d
        .f_where_self(&different, &d.f_full_like(f64::INFINITY)?)?
        .f_sort(1, false)?;
    let finite = sorted_neg.f_isfinite()?;
    let prefix = Tensor::f_cat(
        &[
            zeros.f_narrow(1, 0, 1)?,
            sorted_neg
                .f_where_self(&finite, &zeros)?
                .f_cumsum(1, None::<Kind>)?,
        ],
        1,
    )?;
    let t = d.f_add_scalar(margin)?;
    let below = t.f_searchsorted(&sorted_neg, false, false, "left", None::<Tensor>)?;
    let hinge = below
        .f_to_kind(kind)?
        .f_mul(&t)?
        .f_sub(&prefix.f_gather(1, &below, false)?)?;
    let zero_i = below.f_zeros_like()?;
    let below = below.f_where_self(&same, &zero_i)?;
    let value = hinge.f_where_self(&same, &zeros)?.f_sum(kind)?;

    // For a negative n, the active positives are those with t_p > d_an.
    let (sorted_t, _) = t
        .f_where_self(&same, &d.f_full_like(f64::NEG_INFINITY)?)?
        .f_sort(1, false)?;
    let not_above = d.f_searchsorted(&sorted_t, false, true, "right", None::<Tensor>)?;
    let above = not_above
        .f_neg()?
        .f_add_scalar(d.size()[1])?
        .f_where_self(&different, &zero_i)?;

    let negatives = different.f_sum_dim_intlist(1, false, Kind::Int64)?;
    let positives = same.f_sum_dim_intlist(1, false, Kind::Int64)?;
    Ok(Weighted {
        value,
        count: below.f_sum(Kind::Int64)?,
        valid: positives.f_mul(&negatives)?.f_sum(Kind::Int64)?,
        selection: Selection::Weights(below.f_sub(&above)?.f_to_kind(kind)?),
    })
}

/// For each positive pair (a, p), n* is the negative with the smallest
/// d_an > d_ap (lowest index on ties), or the largest negative when none is
/// above.
///
/// With the anchor's positive distances sorted, a negative's gap is the
/// number of positives strictly below it. Gaps hold disjoint, increasing
/// ranges of distances, so the negatives above d_ap are those in gaps from
/// the number of positives ≤ d_ap on, and n* is the nearest negative of the
/// first such gap that is not empty: a per-gap minimum (scatter-reduce) and
/// a suffix minimum over gap numbers replace a sort of the negatives.
pub(crate) fn semihard(chunk: &Chunk, margin: f64) -> Result<Weighted, Error> {
    let d = chunk.d;
    let kind = d.kind();
    let (rows, n) = (d.size()[0], d.size()[1]);
    let (same, different) = masks(chunk.row_labels, chunk.col_labels, chunk.self_col);
    let index_opts = (Kind::Int64, d.device());

    let (sorted_pos, _) = d
        .f_where_self(&same, &d.f_full_like(f64::INFINITY)?)?
        .f_sort(1, false)?;
    // Gaps 0..=n; the other columns go to gap n + 1, which nothing reads.
    let unused = Tensor::f_full([rows, n], n + 1, index_opts)?;
    let gap = d
        .f_searchsorted(&sorted_pos, false, false, "left", None::<Tensor>)?
        .f_where_self(&different, &unused)?;
    let nearest = d
        .f_new_full([rows, n + 2], f64::INFINITY, (kind, d.device()))?
        .f_internal_scatter_reduce(1, &gap, d, "amin", true)?;
    let columns = Tensor::f_arange(n, index_opts)?.f_expand([rows, n], false)?;
    let at_nearest = d.f_eq_tensor(&nearest.f_gather(1, &gap, false)?)?;
    let first = Tensor::f_full([rows, n + 2], n, index_opts)?.f_internal_scatter_reduce(
        1,
        &gap,
        &columns.f_where_self(&at_nearest, &unused)?,
        "amin",
        true,
    )?;
    let filled =
        Tensor::f_zeros([rows, n + 2], index_opts)?.f_scatter_add(1, &gap, &gap.f_ones_like()?)?;
    // next[g]: the first non-empty gap ≥ g among 0..=n, or n + 1.
    let gap_numbers = Tensor::f_arange(n + 2, index_opts)?.f_expand([rows, n + 2], false)?;
    let (next, _) = gap_numbers
        .f_where_self(&filled.f_gt(0)?, &unused.f_narrow(1, 0, 1)?)?
        .f_narrow(1, 0, n + 1)?
        .f_flip([1])?
        .f_cummin(1)?;
    let next = next.f_flip([1])?;

    let negatives = different.f_sum_dim_intlist(1, true, Kind::Int64)?;
    let largest = d
        .f_where_self(&different, &d.f_full_like(f64::NEG_INFINITY)?)?
        .f_argmax(1, true)?;

    let above = d.f_searchsorted(&sorted_pos, false, true, "right", None::<Tensor>)?;
    let chosen = next.f_gather(1, &above, false)?;
    let found = chosen.f_le(n)?;
    let chosen = chosen.f_clamp_max(n)?;
    let negative = first
        .f_gather(1, &chosen, false)?
        .f_where_self(&found, &largest.f_expand([rows, n], false)?)?;
    // Where a positive has no pair the index may be the placeholder n.
    let negative = negative.f_clamp_max(n - 1)?;
    let d_neg = d.f_gather(1, &negative, false)?;

    let pairs = same.f_logical_and(&negatives.f_gt(0)?)?;
    let hinge = d
        .f_sub(&d_neg)?
        .f_add_scalar(margin)?
        .f_relu()?
        .f_where_self(&pairs, &d.f_zeros_like()?)?;
    let active = hinge.f_gt(0.0)?.f_to_kind(kind)?;
    let weights = active.f_scatter_add(1, &negative, &active.f_neg()?)?;
    let count = pairs.f_sum(Kind::Int64)?;
    Ok(Weighted {
        value: hinge.f_sum(kind)?,
        valid: count.shallow_clone(),
        count,
        selection: Selection::Weights(weights),
    })
}

pub(crate) fn hardest(chunk: &Chunk) -> Result<Hardest, Error> {
    let d = chunk.d;
    let (same, different) = masks(chunk.row_labels, chunk.col_labels, chunk.self_col);
    let positive = d
        .f_where_self(&same, &d.f_full_like(f64::NEG_INFINITY)?)?
        .f_argmax(1, false)?;
    let negative = d
        .f_where_self(&different, &d.f_full_like(f64::INFINITY)?)?
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

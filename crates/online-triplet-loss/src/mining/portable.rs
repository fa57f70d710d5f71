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
    let d = &chunk.d;
    let kind = d.kind();
    let (same, different) = masks(chunk.row_labels, &chunk.columns.labels, chunk.self_col);
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
/// ranges of distances, so the negatives above d_ap are those in the gaps
/// from g_p, the number of positives ≤ d_ap, on, and n* is the nearest
/// negative of all of them: a per-gap minimum (scatter-reduce) and a running
/// minimum over the gaps replace a sort of the negatives. Gap numbers are
/// stored reversed (n − gap), so that running minimum is a prefix `cummin`.
pub(crate) fn semihard(chunk: &Chunk, margin: f64) -> Result<Weighted, Error> {
    let d = &chunk.d;
    let kind = d.kind();
    let (rows, n) = (d.size()[0], d.size()[1]);
    let (same, different) = masks(chunk.row_labels, &chunk.columns.labels, chunk.self_col);
    let index_opts = (Kind::Int64, d.device());
    let inf = d.f_full_like(f64::INFINITY)?;

    let (sorted_pos, _) = d.f_where_self(&same, &inf)?.f_sort(1, false)?;
    // One search gives both counts: #{d_ap ≤ x} for positives, and for
    // negatives #{d_ap < x}, as #{d_ap ≤ the float below x}.
    let below = d.f_nextafter(&inf.f_neg()?)?;
    let gap = below.f_where_self(&different, d)?.f_searchsorted(
        &sorted_pos,
        false,
        true,
        "right",
        None::<Tensor>,
    )?;
    // Reversed gap numbers n − gap in 0..=n; other columns go to slot n + 1,
    // which nothing reads.
    let unused = Tensor::f_full([rows, n], n + 1, index_opts)?;
    let slot = gap
        .f_neg()?
        .f_add_scalar(n)?
        .f_where_self(&different, &unused)?;
    let nearest = d
        .f_new_full([rows, n + 2], f64::INFINITY, (kind, d.device()))?
        .f_internal_scatter_reduce(1, &slot, d, "amin", true)?;
    let columns = Tensor::f_arange(n, index_opts)?.f_expand([rows, n], false)?;
    let at_nearest = d.f_eq_tensor(&nearest.f_gather(1, &slot, false)?)?;
    let first = Tensor::f_full([rows, n + 2], n, index_opts)?.f_internal_scatter_reduce(
        1,
        &slot,
        &columns.f_where_self(&at_nearest, &unused)?,
        "amin",
        true,
    )?;
    // Finite minima of different gaps differ, so the slot a finite running
    // minimum comes from is unique; an infinite one means that no finite
    // negative is above, where the largest negative is the answer.
    let (running, from) = nearest.f_narrow(1, 0, n + 1)?.f_cummin(1)?;
    let own = gap.f_neg()?.f_add_scalar(n)?.f_clamp_min(0)?;
    let d_above = running.f_gather(1, &own, false)?;
    let above = first.f_gather(1, &from.f_gather(1, &own, false)?, false)?;
    let found = d_above.f_isfinite()?.f_logical_and(&above.f_lt(n)?)?;
    let largest = d
        .f_where_self(&different, &inf.f_neg()?)?
        .f_argmax(1, true)?;
    // Where a column is not a positive pair the index is unused but must be in range.
    let negative = above
        .f_where_self(&found, &largest.f_expand([rows, n], false)?)?
        .f_clamp_max(n - 1)?;
    let d_neg = d.f_gather(1, &negative, false)?;

    let has_negative = different.f_any_dim(1, true)?;
    let pairs = same.f_logical_and(&has_negative)?;
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
    let d = &chunk.d;
    let (same, different) = masks(chunk.row_labels, &chunk.columns.labels, chunk.self_col);
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

//! Mining with libtorch operations, for every device. Shapes depend only on
//! the chunk's shape, never on its values, so nothing waits for the device.

use tch::{Kind, Tensor};

use super::{Chunk, Hardest, Selection, Weighted};
use crate::labels::masks;
use crate::Error;

/// With the anchor's positives sorted by b_p, the smallest value of the
/// dtype at least d_ap + m, a negative n is active against the positives
/// with b_p > d_an, the last P − k_n of them, k_n from a binary search. The
/// positive in sorted place j is active against the c_j negatives with
/// k_n ≤ j (tied b are all counted in k_n or none is): a count of the k_n
/// (scatter-add) and its running sum, in integers. The hinge terms sum to
/// Σ_p c_p·t_p − Σ_n (P − k_n)·d_an, t_p = d_ap + m rounded, both sums in
/// float64: no running sum of distances, which has no deterministic CUDA
/// kernel (it raises under `torch.use_deterministic_algorithms`). Only the
/// positives are sorted.
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
    // can fall short of by an ulp. The hinges take t_p = d_ap + m in
    // float64, not rounded to the dtype (which would take all of a margin
    // below half an ulp of d_ap, or overflow): `sorted_t` holds them sorted
    // in float64, and the sorted d_ap in another dtype, whose t_p the sum
    // makes. In float64 the bound is t itself, and sorting it sorts t.
    let masked = d.f_where_scalarother(&same, f64::INFINITY)?;
    let (sorted_bound, order, sorted_t) = match kind {
        Kind::Double => {
            let (sorted, order) = masked.f_add_scalar(margin)?.f_sort(1, false)?;
            (sorted.shallow_clone(), order, sorted)
        }
        _ => {
            let exact = masked.f_to_kind(Kind::Double)?.f_add_scalar_(margin)?;
            let t = exact.f_to_kind(kind)?;
            let up = t.f_nextafter(&Tensor::f_full([], f64::INFINITY, (kind, d.device()))?)?;
            let short = t.f_to_kind(Kind::Double)?.f_lt_tensor(&exact)?;
            drop(exact);
            let (sorted_bound, order) = up.f_where_self(&short, &t)?.f_sort(1, false)?;
            drop(t);
            let sorted_t = masked.f_gather(1, &order, false)?;
            (sorted_bound, order, sorted_t)
        }
    };
    drop(masked);
    // #{bound_p ≤ d_an} for every column, and P − k_n for the negatives.
    let k = d.f_searchsorted(&sorted_bound, false, true, "right", None::<Tensor>)?;
    drop(sorted_bound);
    let active = positives
        .f_sub(&k)?
        .f_clamp_min_(0)?
        .f_where_scalarother(&negative, 0)?;
    // Sorted places that hold a positive: the first P, unless a positive's
    // distance is infinite or NaN (a loss that is NaN anyway) and sorts among
    // or after the +inf of the other columns, where it still counts every
    // negative with k_n at or before its place.
    let in_place = same.f_gather(1, &order, false)?;
    // The positive in sorted place j gets the number of negatives with k_n ≤ j.
    let below = Tensor::f_zeros([rows, n + 1], (Kind::Int64, d.device()))?
        .f_scatter_add_(1, &k, &negative.f_to_kind(Kind::Int64)?)?
        .f_cumsum_(1, Kind::Int64)?
        .f_narrow(1, 0, n)?
        .f_where_scalarother(&in_place, 0)?;
    // The two sums are each about count·d, and the loss their difference:
    // in float64, where float32's products are exact, neither overflows, and
    // the difference keeps float32's digits (in float32 it could come out
    // negative, or inf − inf). Masked, so that a distance no term uses (an
    // overflowed +inf, say) gives no 0·inf.
    let wide = |t: &Tensor| t.f_to_kind(Kind::Double);
    let sorted_t = match kind {
        Kind::Double => sorted_t,
        _ => wide(&sorted_t)?.f_add_scalar_(margin)?,
    };
    let value = sorted_t
        .f_mul(&wide(&below)?)?
        .f_where_scalarother(&below.f_gt(0)?, 0.0)?
        .f_sum(Kind::Double)?
        .f_sub(
            &wide(&active)?
                .f_mul(&wide(d)?)?
                .f_where_scalarother(&active.f_gt(0)?, 0.0)?
                .f_sum(Kind::Double)?,
        )?;
    drop(sorted_t);
    let weights =
        active
            .f_to_kind(kind)?
            .f_neg_()?
            .f_scatter_add_(1, &order, &below.f_to_kind(kind)?)?;
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
/// The anchor's negatives are sorted, stably, so that equal distances keep
/// their columns' order, with the other columns at +inf after them; the
/// first place holding a distance above d_ap (a binary search) holds n*.
/// On a GPU a radix sort costs the same whatever the values, and this takes
/// half to two thirds of the time of placing each negative in a gap between
/// the sorted positives and keeping each gap's minimum (scatter-reduces and a
/// running minimum; on an H200, 0.27 against 0.55 ms a 512-anchor chunk at
/// B = 4096, 1.31 against 2.09 ms at 16384), in under half the operations;
/// on the CPU, where the native kernels run, the stable sort is the dearer.
pub(crate) fn semihard(chunk: &Chunk, margin: f64) -> Result<Weighted, Error> {
    let d = &chunk.d;
    let kind = d.kind();
    let n = d.size()[1];
    let (mut same, different) = masks(chunk.row_labels, &chunk.columns.labels, chunk.self_col)?;

    let (sorted, order) = d
        .f_where_scalarother(&different, f64::INFINITY)?
        .f_sort_stable(true, 1, false)?;
    // In range also for a d_ap above every negative, whose place is n.
    let place = d
        .f_searchsorted(&sorted, false, true, "right", None::<Tensor>)?
        .f_clamp_max_(n - 1)?;
    let d_above = sorted.f_gather(1, &place, false)?;
    drop(sorted);
    let above = order.f_gather(1, &place, false)?;
    drop(order);
    let largest = d
        .f_where_scalarother(&different, f64::NEG_INFINITY)?
        .f_argmax(1, true)?;
    // Where a column is not a positive pair the index is unused. Distances
    // are not −inf: below +inf is finite, a negative above d_ap.
    let negative = above.f_where_self(&d_above.f_lt(f64::INFINITY)?, &largest)?;
    drop(d_above);

    let pairs = same.f_logical_and_(&different.f_any_dim(1, true)?)?;
    // d_ap − d_an + m in float64, as the native kernels take it: in the
    // distances' dtype a margin rounded down drops a hinge at the boundary,
    // and one near float32's largest value overflows.
    let hinge = d
        .f_gather(1, &negative, false)?
        .f_to_kind(Kind::Double)?
        .f_neg_()?
        .f_add_(d)?
        .f_add_scalar_(margin)?
        .f_relu_()?
        .f_where_scalarother(&pairs, 0.0)?;
    let mut weights = hinge.f_gt(0.0)?.f_to_kind(kind)?;
    let minus = weights.f_neg()?;
    let _ = weights.f_scatter_add_(1, &negative, &minus)?;
    let count = pairs.f_sum(Kind::Int64)?;
    Ok(Weighted {
        value: hinge.f_sum(Kind::Double)?,
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

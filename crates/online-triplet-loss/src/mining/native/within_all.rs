//! Batch-all over a batch mined against itself, from half its Gram matrix.
//!
//! Given an anchor's positives sorted by t = d_ap + m, batch-all's loss and
//! weights are sums over the anchor's negatives, each of which needs only
//! its own distance: the number of positives it is active for (d_an below
//! their t) and their hinges. So, as in [`super::within`], a chunk of
//! anchors `s..e` is multiplied with the samples from `s` on only, and the
//! product x_i·x_j of a pair i < j serves both anchors: i in the pass over
//! its row, j in the pass over its column. Their two weights go into one
//! weight matrix W whose entry (i, j), i < j, weighs both distances, so the
//! gradient takes the chunk's two products with W (its rows against the
//! columns, and back): where the whole matrix takes three products, this
//! takes three halves.
//!
//! The positive pairs are few (at most [`FEW_KEYS`] per anchor; batches
//! with larger classes take the chunked path): their distances are computed
//! apart first, to sort each anchor's keys, and their gradient, with the
//! weights k_p that the passes count, is added at the end.
//!
//! The pass over the columns runs first: for each pair i < j of other
//! labels it leaves the number of j's positives that i is active for, in a
//! byte. The pass over the rows then mines row i, whose weights overwrite
//! the products, and adds j's weight of d_ji, from that count, to each entry.
//!
//! The distance of each ordered pair is computed in the operations and
//! order of [`super::Transform::apply`] on its anchor's row, as in the
//! chunked path; only the positive pairs' products come from a loop of
//! their own instead of the gemm, so they may differ from the chunked
//! path's in the last bits.

use tch::{Kind, Tensor};

use super::within::{lanes_of, Frame, Half};
use super::{
    add_pair_grad, any_near, batch_all_few, in_blocks, is_near, near_weight, negative_pair_weight,
    real_kind, scalar, simd, view, view_mut, Groups, NativeReal, NearWeight, Real, Totals,
    FEW_KEYS, LANES,
};
use crate::mining::NearPairs;
use crate::{alloc, Distance, Error, Interrupt};

/// The loss terms of a batch mined against itself, and their gradient.
pub(crate) struct AllWithin {
    /// Σ of the positive hinges, 0-d, in float64.
    pub value: Tensor,
    /// Number of positive triplets (int64, 0-d).
    pub count: Tensor,
    /// Number of valid triplets (int64, 0-d).
    pub valid: Tensor,
    /// ∂value/∂points, `(B, D)`, in the frame of the points (for the cosine
    /// distance, with respect to the normalised points).
    pub grad: Tensor,
}

/// The sorted keys of [`LANES`] consecutive anchors, lane by lane, for the
/// column pass; lanes past an anchor's positives hold −∞, which no distance
/// is below.
#[derive(Clone, Copy)]
struct LaneKeys<T> {
    /// The smallest value of T at least t (a distance below it is active).
    below: [[T; LANES]; FEW_KEYS],
    t: [[T; LANES]; FEW_KEYS],
    /// The most positives of any of the lanes' anchors.
    width: usize,
}

/// A group of [`LANES`] anchors in the column pass: their keys and what the
/// pass has counted for them over all the chunks.
#[derive(Clone, Copy)]
struct LaneGroup<T> {
    keys: LaneKeys<T>,
    /// k of positive q of the anchor in lane l.
    k: [[i64; LANES]; FEW_KEYS],
    hinge: [f64; LANES],
}

/// Groups of [`LANES`] columns that the column pass takes at a time over
/// all the rows of a chunk: 1024 columns, whose products in a row fill one
/// 4 KiB page for float32, so consecutive rows do not each cost a TLB miss.
const TILE: usize = 64;

/// The chunk's counts c_ji (the number of positives of column j's anchor
/// that row i's sample is active for), shared by the threads of the column
/// pass, each of which writes only its own columns.
#[derive(Clone, Copy)]
struct SharedCounts {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the column pass gives each thread disjoint columns of the counts
// (see `column_pass`); nothing else reads or writes them meanwhile.
unsafe impl Send for SharedCounts {}
unsafe impl Sync for SharedCounts {}

/// The column pass over one chunk, whose products are `g` (rows of
/// `frame.width` columns): for each anchor j of the column groups `part`
/// (the first one being group `first`), the distances d_ji to the chunk's
/// samples i < j of other labels are counted against j's keys, and each
/// count c_ji is written into `counts` for the row pass.
#[inline(always)]
fn column_pass<T: Real>(
    g: &[T],
    counts: SharedCounts,
    frame: Frame<T>,
    first: usize,
    part: &mut [LaneGroup<T>],
) -> Result<(), Error> {
    let rows = g.len() / frame.width.max(1);
    // On the heap: up to 128 KiB, more than the threads' stacks should hold.
    let mut k = alloc::filled(TILE, [[T::REAL_ZERO; LANES]; FEW_KEYS])?;
    let mut hinge = [[T::REAL_ZERO; LANES]; TILE];
    for (tile_at, tile) in (0..).step_by(TILE).zip(part.chunks_mut(TILE)) {
        for (k, h) in k.iter_mut().zip(hinge.iter_mut()) {
            *k = [[T::REAL_ZERO; LANES]; FEW_KEYS];
            *h = [T::REAL_ZERO; LANES];
        }
        for r in 0..rows {
            let i = frame.s + r;
            let (label_i, row) = (frame.label[i], &g[r * frame.width..(r + 1) * frame.width]);
            for (t, group) in tile.iter().enumerate() {
                let j0 = (first + tile_at + t) * LANES;
                if j0 + LANES <= i + 1 {
                    continue;
                }
                let c0 = j0 - frame.s0;
                let v: &[T; LANES] = lanes_of(row, c0);
                let norms: &[T; LANES] = lanes_of(frame.norm, j0);
                let labels: &[i64; LANES] = lanes_of(frame.label, j0);
                let n_i = frame.norm[i];
                let mut d = [T::NAN; LANES];
                for l in 0..LANES {
                    let dj = frame.distance(v[l], norms[l], n_i);
                    d[l] = if j0 + l > i && labels[l] != label_i {
                        dj
                    } else {
                        T::NAN
                    };
                }
                let keys = &group.keys;
                let (kt, ht) = (&mut k[t], &mut hinge[t]);
                let mut c = [0u8; LANES];
                let per_key = keys.below.iter().zip(&keys.t).zip(kt.iter_mut());
                for ((below, tq), kq) in per_key.take(keys.width) {
                    for l in 0..LANES {
                        let on = d[l] < below[l];
                        let one = if on { T::REAL_ONE } else { T::REAL_ZERO };
                        c[l] += u8::from(on);
                        kq[l] = kq[l] + one;
                        ht[l] = ht[l] + if on { tq[l] - d[l] } else { T::REAL_ZERO };
                    }
                }
                let at = r * frame.width + c0;
                assert!(at + LANES <= counts.len, "counts of a whole group");
                // SAFETY: this thread alone writes columns c0..c0 + LANES
                // of the counts (its groups are disjoint from the other
                // threads'), which lie within them.
                unsafe { *(counts.ptr.add(at) as *mut [u8; LANES]) = c };
            }
        }
        for ((group, k), hinge) in tile.iter_mut().zip(&k).zip(&hinge) {
            let width = group.keys.width;
            for (total, k) in group.k.iter_mut().zip(k).take(width) {
                for (total, k) in total.iter_mut().zip(k) {
                    *total += k.get() as i64;
                }
            }
            for (total, h) in group.hinge.iter_mut().zip(hinge) {
                *total += h.get();
            }
        }
    }
    Ok(())
}

/// Batch-all of the samples `points` (their squared norms `norms` for the
/// Euclidean distances, and `exact`, the points that near pairs' distances
/// are taken from; normalised points for the cosine one) against
/// themselves, with labels `labels` indexed by `groups`, in `chunks` of
/// `step` anchors, `stop` asked between them. `None` when a label has more
/// than [`FEW_KEYS`] + 1 samples, or a float32 sum of hinges overflowed,
/// which the chunked path handles. Without `grad`, the gradient is zeros:
/// the products that make it are skipped.
///
/// # Errors
/// [`Error::Interrupted`] when `stop` asks; `Error::Torch` when libtorch
/// fails or the tensors are not float32 or float64 CPU tensors.
pub(crate) fn batch_all_within(
    (points, norms, exact): (&Tensor, &Tensor, &Tensor),
    labels: &Tensor,
    groups: &Groups,
    (distance, margin): (Distance, f64),
    chunks: (i64, Option<Interrupt>),
    grad: bool,
) -> Result<Option<AllWithin>, Error> {
    if groups.largest() > FEW_KEYS + 1 {
        return Ok(None);
    }
    let loss = (distance, margin);
    match real_kind(points.kind())? {
        NativeReal::F32 => typed::<f32>((points, norms, exact), labels, groups, loss, chunks, grad),
        NativeReal::F64 => typed::<f64>((points, norms, exact), labels, groups, loss, chunks, grad),
    }
}

/// Adds the gradient of the pairs `near` (anchor, reference, weight) of the
/// batch `exact` ([`NearPairs`]) to its gradient `grad`, and empties `near`.
///
/// # Errors
/// As [`add_pair_grad`].
fn add_near_grad(
    distance: Distance,
    exact: &Tensor,
    near: &mut Vec<(usize, usize, f64)>,
    grad: &Tensor,
) -> Result<(), Error> {
    if near.is_empty() {
        return Ok(());
    }
    near.sort_unstable_by_key(|&(a, j, _)| (a, j));
    let mut pairs = NearPairs::default();
    for (a, j, w) in near.drain(..) {
        pairs.push(a, j, w)?;
    }
    add_pair_grad(
        distance,
        (exact, exact),
        &pairs,
        &mut grad.shallow_clone(),
        None,
    )
}

fn typed<T: Real>(
    (points, norms, exact): (&Tensor, &Tensor, &Tensor),
    labels: &Tensor,
    groups: &Groups,
    (distance, margin): (Distance, f64),
    chunks: (i64, Option<Interrupt>),
    want_grad: bool,
) -> Result<Option<AllWithin>, Error> {
    let kind = points.kind();
    let half = Half::<T>::new(
        (points, norms, labels),
        groups,
        distance,
        |d| d + margin,
        chunks,
    )?;
    let (n, padded, dim, label, positives) =
        (half.n, half.padded, half.dim, &half.label, &half.positives);
    let (x, norm) = half.views()?;
    let row_of = |i: usize| &x[i * dim..(i + 1) * dim];
    let of = |a: usize| positives.of(a);
    let mut k_total = alloc::filled(positives.len(), 0i64)?;

    let mut lanes = alloc::with_capacity(padded / LANES)?;
    for g in 0..padded / LANES {
        let mut keys = LaneKeys {
            below: [[-T::INFINITY; LANES]; FEW_KEYS],
            t: [[T::REAL_ZERO; LANES]; FEW_KEYS],
            width: 0,
        };
        for l in 0..LANES {
            let a = g * LANES + l;
            if a >= n {
                continue;
            }
            for (q, p) in of(a).iter().enumerate() {
                keys.below[q][l] = T::at_least(p.key);
                keys.t[q][l] = T::put(p.key);
            }
            keys.width = keys.width.max(of(a).len());
        }
        lanes.push(LaneGroup {
            keys,
            k: [[0; LANES]; FEW_KEYS],
            hinge: [0.0; LANES],
        });
    }

    let grad = Tensor::f_zeros([padded as i64, dim as i64], (kind, half.points.device()))?;
    // Σⱼ Wᵢⱼ for each sample, as anchor and as reference, for the term
    // (Σⱼ Wᵢⱼ) xᵢ of the gradient of Euclidean distances.
    let mut coef = alloc::filled(padded, 0.0f64)?;
    let mut value = 0.0f64;
    let most = half.chunks().map(|(_, len)| len).max().unwrap_or(0);
    let mut counts = alloc::filled(most * padded, 0u8)?;
    // (anchor, reference, weight) of the pairs whose distance is near 0
    // ([`is_near`]), whose gradient is added from their exact distance.
    let mut near: Vec<(usize, usize, f64)> = Vec::new();
    for (s, len) in half.chunks() {
        let block = half.block(s, len)?;
        let frame = Frame::new(&block, norm, label, distance);
        let (s0, width) = (block.s0, block.width);
        let mut w = block.products.shallow_clone();

        // Columns: each anchor j > i against the chunk's samples i.
        let shared = SharedCounts {
            ptr: counts.as_mut_ptr(),
            len: len * width,
        };
        let products = view::<T>(&w)?;
        frame.over_columns(
            &mut lanes,
            #[inline(always)]
            |first, part| column_pass(products, shared, frame, first, part),
        )?;

        // Rows: row i is mined over its distances d_ij, whose weights then
        // overwrite the products, and each entry gets column j's weight of
        // d_ji too.
        let counts = &counts[..len * width];
        let data = view_mut::<T>(&mut w)?;
        type RowOut = (usize, [i64; FEW_KEYS], f64, f64);
        type Done<T> = Result<(Vec<RowOut>, Vec<T>, Vec<(usize, usize, f64)>), Error>;
        let done: Vec<Done<T>> = in_blocks(len, width, data, width, |range, data| {
            simd::run(
                #[inline(always)]
                || {
                    let mut out = alloc::with_capacity(range.len())?;
                    let mut col_sum = alloc::filled(width, T::REAL_ZERO)?;
                    let mut dt = alloc::filled(width, T::REAL_ZERO)?;
                    let (mut near, mut near_cols) = (Vec::new(), Vec::new());
                    for (r, w) in range.zip(data.chunks_exact_mut(width)) {
                        let i = s + r;
                        let n_i = norm[i];
                        for ((v, dt), &n_j) in w.iter_mut().zip(dt.iter_mut()).zip(&norm[s0..]) {
                            let g = *v;
                            *v = frame.distance(g, n_i, n_j);
                            *dt = frame.distance(g, n_j, n_i);
                        }
                        // Only pairs i < j < n with other labels.
                        let same = groups.of(label[i]).iter().filter(|&&j| j > i);
                        let hide = (0..=i - s0)
                            .chain(n - s0..width)
                            .chain(same.map(|&j| j - s0));
                        for j in hide {
                            w[j] = T::NAN;
                            dt[j] = T::NAN;
                        }
                        // The pairs left whose distance is near 0: their
                        // weight, −(the number of positives of i and of j
                        // each is active for), goes where `near_weight`
                        // says, from their exact distance.
                        near_cols.clear();
                        let cols = &norm[s0..s0 + width];
                        let euclidean = distance == Distance::Euclidean && want_grad;
                        if euclidean && any_near(w, n_i, cols, false) {
                            for (j, (&d, &n_j)) in w.iter().zip(cols).enumerate() {
                                if is_near(d, n_i, n_j) {
                                    alloc::push(&mut near_cols, (j, d))?;
                                }
                            }
                        }
                        let mut k = [0i64; FEW_KEYS];
                        let mut totals = Totals::default();
                        if of(i).is_empty() {
                            w.fill(T::REAL_ZERO);
                        } else {
                            batch_all_few(w, of(i), distance, &mut k, &mut totals);
                        }
                        for &(j, d) in &near_cols {
                            let keys = of(i);
                            let a = keys.len() - keys.partition_point(|q| q.key <= d.get());
                            let c = usize::from(counts[r * width + j]);
                            let weight = -((a + c) as f64);
                            // The column's weight is in, and d_ji no more.
                            dt[j] = T::NAN;
                            let pair = (row_of(i), row_of(s0 + j));
                            w[j] = match near_weight(weight, pair, (n_i, norm[s0 + j])) {
                                NearWeight::Zero => T::REAL_ZERO,
                                NearWeight::InPlace(p) => p,
                                NearWeight::Apart => {
                                    alloc::push(&mut near, (i, s0 + j, weight))?;
                                    alloc::push(&mut near, (s0 + j, i, weight))?;
                                    T::REAL_ZERO
                                }
                            };
                        }
                        // The column pass counted only the pairs i < j.
                        let after = i + 1 - s0;
                        let c = &counts[r * width + after..(r + 1) * width];
                        let mut row_sum = T::REAL_ZERO;
                        for (((w, &d), &c), cs) in w[after..]
                            .iter_mut()
                            .zip(&dt[after..])
                            .zip(c)
                            .zip(&mut col_sum[after..])
                        {
                            *w = *w + negative_pair_weight(T::of_count(c), d, distance);
                            row_sum = row_sum + *w;
                            *cs = *cs + *w;
                        }
                        out.push((i, k, totals.value, row_sum.get()));
                    }
                    Ok((out, col_sum, near))
                },
            )
        });
        for done in done {
            let (rows_out, col_sum, block_near) = done?;
            alloc::extend(&mut near, block_near)?;
            for (i, k, v, row_sum) in rows_out {
                value += v;
                coef[i] += row_sum;
                for (total, k) in k_total[positives.range(i)].iter_mut().zip(k) {
                    *total += k;
                }
            }
            for (c, v) in coef[s0..].iter_mut().zip(col_sum) {
                *c += v.get();
            }
        }

        if !want_grad {
            near.clear();
            continue;
        }
        // The chunk's pairs apart, now: they are as many as its entries, at
        // worst.
        add_near_grad(distance, exact, &mut near, &grad.f_narrow(0, 0, n as i64)?)?;
        // The gradient of Σ Wᵢⱼ dᵢⱼ: −W·x_cols for the rows, −Wᵀ·x_rows for
        // the columns ([`crate::distance::Side::accumulate_grad`]).
        let _ = grad
            .f_narrow(0, s as i64, len as i64)?
            .f_sub_(&w.f_mm(&block.cols)?)?;
        let _ = grad
            .f_narrow(0, s0 as i64, width as i64)?
            .f_addmm_(&w.f_tr()?, &block.rows.f_neg()?)?;
    }
    for (g, group) in lanes.iter().enumerate() {
        for l in 0..LANES {
            let a = g * LANES + l;
            if a >= n {
                continue;
            }
            value += group.hinge[l];
            for (q, total) in k_total[positives.range(a)].iter_mut().enumerate() {
                let (k, t) = (group.k[q][l], group.keys.t[q][l].get());
                *total += k;
                // What rounding t to T took from each active hinge
                // ([`batch_all_few`]). A t that overflowed T made the
                // hinges inf, which the chunked path takes again.
                if k > 0 && t.is_finite() {
                    value += k as f64 * (of(a)[q].key - t);
                }
            }
        }
    }

    // The positive pairs: weight k_p on d_ap, from both of their anchors.
    let pair = |a: usize, q: usize| -> f64 {
        let at = positives.range(a).start + q;
        distance.pair_weight(k_total[at] as f64, of(a)[q].d.get())
    };
    let mut grad = grad.f_narrow(0, 0, n as i64)?.f_contiguous()?;
    if want_grad {
        let g = view_mut::<T>(&mut grad)?;
        for a in 0..n {
            for (q, p) in of(a).iter().enumerate() {
                let back = of(p.j).iter().position(|o| o.j == a).unwrap_or(0);
                let weight = if distance == Distance::Euclidean && is_near(p.d, norm[a], norm[p.j])
                {
                    let at = |a: usize, q: usize| positives.range(a).start + q;
                    let weight = (k_total[at(a, q)] + k_total[at(p.j, back)]) as f64;
                    match near_weight(weight, (row_of(a), row_of(p.j)), (norm[a], norm[p.j])) {
                        NearWeight::Zero => continue,
                        NearWeight::InPlace(p) => p.get(),
                        NearWeight::Apart => {
                            alloc::push(&mut near, (a, p.j, weight))?;
                            continue;
                        }
                    }
                } else {
                    pair(a, q) + pair(p.j, back)
                };
                coef[a] += weight;
                let (weight, y) = (T::put(weight), row_of(p.j));
                for (g, &y) in g[a * dim..(a + 1) * dim].iter_mut().zip(y) {
                    *g = *g - weight * y;
                }
            }
        }
    }
    if want_grad {
        add_near_grad(distance, exact, &mut near, &grad)?;
    }
    if want_grad && distance != Distance::Cosine {
        let coef = Tensor::f_from_slice(&coef[..n])?.f_to_kind(kind)?;
        let points = half.points.f_narrow(0, 0, n as i64)?;
        let _ = grad.f_add_(&coef.f_unsqueeze(1)?.f_mul(&points)?)?;
    }
    if value.is_infinite() {
        // A lane of float32 hinges overflowed (each sums a tile's hinges
        // before float64 takes over) where their float64 sum may not: the
        // chunked kernels, which sum in float64 there, take the batch.
        return Ok(None);
    }
    let count: i64 = k_total.iter().sum();
    let valid: i64 = (0..n)
        .map(|a| of(a).len() as i64 * (n - groups.of(label[a]).len()) as i64)
        .sum();
    Ok(Some(AllWithin {
        value: scalar(value, Kind::Double)?,
        count: scalar(count, Kind::Int64)?,
        valid: scalar(valid, Kind::Int64)?,
        grad,
    }))
}

//! Mining in Rust over the contiguous rows of a CPU distance matrix, one row
//! per task. Each anchor's positives are sorted (there are few of them in a
//! P×K batch); every negative then lands in one bucket between two
//! consecutive positives with a binary search, so a row costs
//! O(B log P) and needs no B×B temporary besides the weights.

use rayon::prelude::*;
use tch::{Kind, Tensor};

use super::{Chunk, Hardest, Selection, Weighted};

trait Real: Copy + Send + Sync + 'static {
    fn get(self) -> f64;
    fn put(v: f64) -> Self;
}

impl Real for f32 {
    fn get(self) -> f64 {
        self as f64
    }
    fn put(v: f64) -> Self {
        v as f32
    }
}

impl Real for f64 {
    fn get(self) -> f64 {
        self
    }
    fn put(v: f64) -> Self {
        v
    }
}

/// A borrowed view of one contiguous CPU tensor.
///
/// # Safety
/// `t` must be contiguous, on the CPU, of element type `T`, and outlive the slice.
unsafe fn view<T>(t: &Tensor) -> &[T] {
    let n = t.numel();
    if n == 0 {
        return &[];
    }
    std::slice::from_raw_parts(t.data_ptr() as *const T, n)
}

/// # Safety
/// As [`view`], and nothing else may access `t` while the slice lives.
#[allow(clippy::mut_from_ref)]
unsafe fn view_mut<T>(t: &Tensor) -> &mut [T] {
    let n = t.numel();
    if n == 0 {
        return &mut [];
    }
    std::slice::from_raw_parts_mut(t.data_ptr() as *mut T, n)
}

/// Per-row sums, added up over rows.
#[derive(Clone, Copy, Default)]
struct Totals {
    value: f64,
    count: i64,
    valid: i64,
}

impl Totals {
    fn add(self, o: Totals) -> Totals {
        Totals {
            value: self.value + o.value,
            count: self.count + o.count,
            valid: self.valid + o.valid,
        }
    }
}

/// One anchor's row: its distances, label, and the column of the anchor
/// itself if it is among the references.
struct Row<'a, T> {
    d: &'a [T],
    label: i64,
    labels: &'a [i64],
    skip: usize,
}

impl<T: Real> Row<'_, T> {
    fn is_positive(&self, j: usize) -> bool {
        j != self.skip && self.labels[j] == self.label
    }

    /// Sorted (key(d_ap), p) over the positives.
    fn sorted_positives(&self, key: impl Fn(f64) -> f64, out: &mut Vec<(f64, usize)>) {
        out.clear();
        out.extend(
            (0..self.d.len())
                .filter(|&j| self.is_positive(j))
                .map(|j| (key(self.d[j].get()), j)),
        );
        out.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    }
}

fn run_weighted<T: Real>(
    chunk: &Chunk,
    row_fn: impl Fn(&Row<T>, &mut [T], &mut Scratch) -> Totals + Sync,
) -> Weighted {
    let d = chunk.d.contiguous();
    let row_labels = chunk.row_labels.contiguous();
    let col_labels = chunk.col_labels.contiguous();
    let weights = d.zeros_like();
    let n = d.size()[1] as usize;
    let self_col = chunk.self_col;
    // SAFETY: all tensors are contiguous CPU tensors of the element types
    // read here (checked by `use_native`), alive until the end of this
    // function, and `weights` is written only through `w`.
    let (dv, rl, cl, w) = unsafe {
        (
            view::<T>(&d),
            view::<i64>(&row_labels),
            view::<i64>(&col_labels),
            view_mut::<T>(&weights),
        )
    };
    let totals = if n == 0 {
        Totals::default()
    } else {
        dv.par_chunks(n)
            .zip(w.par_chunks_mut(n))
            .enumerate()
            .map_init(Scratch::default, |scratch, (r, (drow, wrow))| {
                let row = Row {
                    d: drow,
                    label: rl[r],
                    labels: cl,
                    skip: self_col.map_or(usize::MAX, |c| c as usize + r),
                };
                row_fn(&row, wrow, scratch)
            })
            .reduce(Totals::default, Totals::add)
    };
    let kind = d.kind();
    Weighted {
        value: Tensor::from(totals.value).to_kind(kind),
        count: Tensor::from(totals.count),
        valid: Tensor::from(totals.valid),
        selection: Selection::Weights(weights),
    }
}

#[derive(Default)]
struct Scratch {
    positives: Vec<(f64, usize)>,
    counts: Vec<i64>,
    sums: Vec<f64>,
    nearest: Vec<(f64, usize)>,
}

fn batch_all_row<T: Real>(row: &Row<T>, w: &mut [T], s: &mut Scratch, margin: f64) -> Totals {
    row.sorted_positives(|d| d + margin, &mut s.positives);
    let p = s.positives.len();
    if p == 0 {
        return Totals::default();
    }
    s.counts.clear();
    s.counts.resize(p + 1, 0);
    s.sums.clear();
    s.sums.resize(p + 1, 0.0);
    let mut negatives = 0i64;
    for (j, &dj) in row.d.iter().enumerate() {
        if row.labels[j] == row.label {
            continue;
        }
        let dj = dj.get();
        // Positives with t_p ≤ d_an come first; the rest are active for n.
        let bucket = s.positives.partition_point(|&(t, _)| t <= dj);
        w[j] = T::put(-((p - bucket) as f64));
        s.counts[bucket] += 1;
        s.sums[bucket] += dj;
        negatives += 1;
    }
    let mut totals = Totals {
        valid: p as i64 * negatives,
        ..Totals::default()
    };
    let (mut k, mut prefix) = (0i64, 0.0f64);
    for (i, &(t, j)) in s.positives.iter().enumerate() {
        k += s.counts[i];
        prefix += s.sums[i];
        totals.value += k as f64 * t - prefix;
        totals.count += k;
        w[j] = T::put(k as f64);
    }
    totals
}

/// Appends (positive, negative) for every positive pair of the row whose
/// semi-hard triplet has a positive hinge.
fn semihard_row<T: Real>(
    row: &Row<T>,
    s: &mut Scratch,
    margin: f64,
    out: &mut Vec<(i64, i64)>,
) -> Totals {
    row.sorted_positives(|d| d, &mut s.positives);
    let p = s.positives.len();
    if p == 0 {
        return Totals::default();
    }
    const NONE: (f64, usize) = (f64::INFINITY, usize::MAX);
    s.nearest.clear();
    s.nearest.resize(p + 1, NONE);
    let mut largest = (f64::NEG_INFINITY, usize::MAX);
    for (j, &dj) in row.d.iter().enumerate() {
        if row.labels[j] == row.label {
            continue;
        }
        let dj = dj.get();
        // bucket = #{d_ap < d_an}: n is semi-hard for the positives below it.
        let bucket = s.positives.partition_point(|&(sp, _)| sp < dj);
        if s.nearest[bucket].1 == usize::MAX || dj < s.nearest[bucket].0 {
            s.nearest[bucket] = (dj, j);
        }
        if largest.1 == usize::MAX || dj > largest.0 {
            largest = (dj, j);
        }
    }
    if largest.1 == usize::MAX {
        return Totals::default();
    }
    let mut totals = Totals {
        count: p as i64,
        valid: p as i64,
        ..Totals::default()
    };
    // Sweep the positives from the farthest down, keeping the nearest
    // negative of the buckets above the current positive. Buckets are
    // ordered by distance, so equal distances share a bucket and the first
    // index found there is kept.
    let mut best = NONE;
    for i in (0..p).rev() {
        let candidate = s.nearest[i + 1];
        if candidate.1 != usize::MAX && (best.1 == usize::MAX || candidate.0 < best.0) {
            best = candidate;
        }
        let (d_ap, pj) = s.positives[i];
        let (d_an, nj) = if best.1 == usize::MAX { largest } else { best };
        let hinge = d_ap - d_an + margin;
        if hinge > 0.0 {
            totals.value += hinge;
            out.push((pj as i64, nj as i64));
        }
    }
    totals
}

fn semihard_typed<T: Real>(chunk: &Chunk, margin: f64) -> Weighted {
    let d = chunk.d.contiguous();
    let row_labels = chunk.row_labels.contiguous();
    let col_labels = chunk.col_labels.contiguous();
    let n = d.size()[1] as usize;
    let self_col = chunk.self_col;
    let rows: Vec<(Totals, Vec<(i64, i64)>)> = if n == 0 {
        vec![]
    } else {
        // SAFETY: contiguous CPU tensors of the element types read here,
        // alive until the end of this function.
        let (dv, rl, cl) = unsafe {
            (
                view::<T>(&d),
                view::<i64>(&row_labels),
                view::<i64>(&col_labels),
            )
        };
        dv.par_chunks(n)
            .enumerate()
            .map_init(Scratch::default, |scratch, (r, drow)| {
                let row = Row {
                    d: drow,
                    label: rl[r],
                    labels: cl,
                    skip: self_col.map_or(usize::MAX, |c| c as usize + r),
                };
                let mut picks = Vec::new();
                let totals = semihard_row(&row, scratch, margin, &mut picks);
                (totals, picks)
            })
            .collect()
    };
    let mut totals = Totals::default();
    let (mut anchor, mut positive, mut negative) = (vec![], vec![], vec![]);
    for (r, (t, picks)) in rows.into_iter().enumerate() {
        totals = totals.add(t);
        for (p, q) in picks {
            anchor.push(r as i64);
            positive.push(p);
            negative.push(q);
        }
    }
    Weighted {
        value: Tensor::from(totals.value).to_kind(d.kind()),
        count: Tensor::from(totals.count),
        valid: Tensor::from(totals.valid),
        selection: Selection::Triplets {
            anchor: Tensor::from_slice(&anchor),
            positive: Tensor::from_slice(&positive),
            negative: Tensor::from_slice(&negative),
        },
    }
}

pub(crate) fn batch_all(chunk: &Chunk, margin: f64) -> Weighted {
    match chunk.d.kind() {
        Kind::Double => run_weighted::<f64>(chunk, |r, w, s| batch_all_row(r, w, s, margin)),
        _ => run_weighted::<f32>(chunk, |r, w, s| batch_all_row(r, w, s, margin)),
    }
}

pub(crate) fn semihard(chunk: &Chunk, margin: f64) -> Weighted {
    match chunk.d.kind() {
        Kind::Double => semihard_typed::<f64>(chunk, margin),
        _ => semihard_typed::<f32>(chunk, margin),
    }
}

fn hardest_typed<T: Real>(chunk: &Chunk) -> Hardest {
    let d = chunk.d.contiguous();
    let row_labels = chunk.row_labels.contiguous();
    let col_labels = chunk.col_labels.contiguous();
    let rows = d.size()[0] as usize;
    let n = d.size()[1] as usize;
    let mut picks = vec![(0i64, 0i64, false); rows];
    let self_col = chunk.self_col;
    if n > 0 {
        // SAFETY: contiguous CPU tensors of the element types read here,
        // alive until the end of this function.
        let (dv, rl, cl) = unsafe {
            (
                view::<T>(&d),
                view::<i64>(&row_labels),
                view::<i64>(&col_labels),
            )
        };
        dv.par_chunks(n)
            .zip(picks.par_iter_mut())
            .enumerate()
            .for_each(|(r, (drow, pick))| {
                let row = Row {
                    d: drow,
                    label: rl[r],
                    labels: cl,
                    skip: self_col.map_or(usize::MAX, |c| c as usize + r),
                };
                let (mut pos, mut neg) = (None::<(f64, usize)>, None::<(f64, usize)>);
                for (j, &dj) in drow.iter().enumerate() {
                    let dj = dj.get();
                    if row.is_positive(j) {
                        if pos.is_none_or(|(best, _)| dj > best) {
                            pos = Some((dj, j));
                        }
                    } else if row.labels[j] != row.label && neg.is_none_or(|(best, _)| dj < best) {
                        neg = Some((dj, j));
                    }
                }
                if let (Some((_, p)), Some((_, q))) = (pos, neg) {
                    *pick = (p as i64, q as i64, true);
                }
            });
    }
    let positive: Vec<i64> = picks.iter().map(|p| p.0).collect();
    let negative: Vec<i64> = picks.iter().map(|p| p.1).collect();
    let valid: Vec<bool> = picks.iter().map(|p| p.2).collect();
    Hardest {
        positive: Tensor::from_slice(&positive),
        negative: Tensor::from_slice(&negative),
        valid: Tensor::from_slice(&valid),
    }
}

pub(crate) fn hardest(chunk: &Chunk) -> Hardest {
    match chunk.d.kind() {
        Kind::Double => hardest_typed::<f64>(chunk),
        _ => hardest_typed::<f32>(chunk),
    }
}

//! Mining in Rust over the contiguous rows of a CPU distance matrix. Each
//! anchor's positives, found through an index of the columns by label
//! ([`Groups`]), are sorted (there are few of them in a P×K batch); every
//! negative then lands in one bucket between two consecutive positives
//! ([`Keys::count_below`]), so a row costs O(B log K) for K positives and needs no
//! B×B temporary besides the weights.
//!
//! Rows are split into one block per libtorch intra-op thread
//! ([`in_blocks`]).

use tch::{Device, Kind, Tensor};

use super::parallel::in_blocks;
use super::{Chunk, Hardest, Selection, Weighted};
use crate::{Distance, Error};

trait Real:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + tch::kind::Element
    + 'static
{
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

/// The columns of each label, so that a row finds its positives without
/// scanning the labels of every column.
struct Groups(std::collections::HashMap<i64, Vec<usize>>);

impl Groups {
    fn new(labels: &[i64]) -> Self {
        let mut groups = std::collections::HashMap::<i64, Vec<usize>>::new();
        for (j, &label) in labels.iter().enumerate() {
            groups.entry(label).or_default().push(j);
        }
        Groups(groups)
    }

    fn of(&self, label: i64) -> &[usize] {
        self.0.get(&label).map_or(&[], Vec::as_slice)
    }
}

/// Checks that `t` can be read as a slice of `T`: a contiguous CPU tensor
/// whose element type is `T`.
fn check_viewable<T: tch::kind::Element>(t: &Tensor) -> Result<usize, Error> {
    if t.device() != Device::Cpu || !t.is_contiguous() || t.kind() != T::KIND {
        return Err(Error::Torch(format!(
            "native mining needs a contiguous CPU tensor of {:?}, got {:?} on {:?}",
            T::KIND,
            t.kind(),
            t.device()
        )));
    }
    Ok(t.numel())
}

/// A borrowed view of one contiguous CPU tensor of element type `T`.
fn view<T: tch::kind::Element>(t: &Tensor) -> Result<&[T], Error> {
    let n = check_viewable::<T>(t)?;
    if n == 0 {
        return Ok(&[]);
    }
    // SAFETY: `t` is a contiguous CPU tensor of n elements of type T, and the
    // slice borrows `t`, which owns (a reference to) that storage.
    Ok(unsafe { std::slice::from_raw_parts(t.data_ptr() as *const T, n) })
}

/// A mutable view of a tensor that `view_mut` owns, so nothing else can
/// reach its storage while the slice lives.
fn view_mut<T: tch::kind::Element>(t: &mut Tensor) -> Result<&mut [T], Error> {
    let n = check_viewable::<T>(t)?;
    if n == 0 {
        return Ok(&mut []);
    }
    // SAFETY: as in `view`; the tensor is borrowed mutably for the slice's
    // lifetime, and its caller created it, so no other view aliases it.
    Ok(unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut T, n) })
}

/// The element types the native kernels run on.
enum NativeReal {
    F32,
    F64,
}

/// The native element type of a distance matrix: float32 or float64, and an
/// error for every other kind.
fn real_kind(kind: Kind) -> Result<NativeReal, Error> {
    match kind {
        Kind::Float => Ok(NativeReal::F32),
        Kind::Double => Ok(NativeReal::F64),
        Kind::Uint8
        | Kind::Int8
        | Kind::Int16
        | Kind::Int
        | Kind::Int64
        | Kind::Half
        | Kind::ComplexHalf
        | Kind::ComplexFloat
        | Kind::ComplexDouble
        | Kind::Bool
        | Kind::QInt8
        | Kind::QUInt8
        | Kind::QInt32
        | Kind::BFloat16
        | Kind::Float8e5m2
        | Kind::Float8e4m3fn
        | Kind::Float8e5m2fnuz
        | Kind::Float8e4m3fnuz => Err(Error::Torch(format!(
            "native mining runs on float32 or float64 distances, got {kind:?}"
        ))),
    }
}

/// Per-row sums, added up over rows.
#[derive(Clone, Copy, Default)]
struct Totals {
    value: f64,
    count: i64,
    valid: i64,
}

/// What one row of batch-all adds: its totals and the sum of its pair weights.
struct RowOut {
    totals: Totals,
    weight_sum: f64,
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
    /// The columns whose label is `label`.
    same: &'a [usize],
    skip: usize,
}

impl<T: Real> Row<'_, T> {
    /// Sorted (key(d_ap), p) over the positives, with the keys alone in `keys`.
    fn sorted_positives(
        &self,
        key: impl Fn(f64) -> f64,
        out: &mut Vec<(f64, usize)>,
        keys: &mut Vec<f64>,
    ) {
        out.clear();
        out.extend(
            self.same
                .iter()
                .filter(|&&j| j != self.skip)
                .map(|&j| (key(self.d[j].get()), j)),
        );
        out.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        keys.clear();
        keys.extend(out.iter().map(|&(k, _)| k));
    }
}

/// The distances and labels of a chunk, viewed as slices.
struct Rows<'a, T> {
    d: &'a [T],
    n: usize,
    row_labels: &'a [i64],
    col_labels: &'a [i64],
    self_col: Option<i64>,
}

impl<'a, T: Real> Rows<'a, T> {
    fn row(&self, r: usize, groups: &'a Groups) -> Row<'a, T> {
        let label = self.row_labels[r];
        Row {
            d: &self.d[r * self.n..(r + 1) * self.n],
            label,
            labels: self.col_labels,
            same: groups.of(label),
            skip: self.self_col.map_or(usize::MAX, |c| c as usize + r),
        }
    }
}

/// A row's sorted keys, for counting the keys below a value.
struct Keys<'a> {
    /// Up to eight keys, padded with NaN, which no comparison counts.
    few: Option<[f64; 8]>,
    all: &'a [f64],
}

impl<'a> Keys<'a> {
    fn new(all: &'a [f64]) -> Self {
        let few = (all.len() <= 8).then(|| {
            let mut few = [f64::NAN; 8];
            few[..all.len()].copy_from_slice(all);
            few
        });
        Keys { few, all }
    }

    /// The number of keys k with `below(k, x)`, for a comparison (`<` or
    /// `≤`) that holds on a prefix of the keys and never on NaN. A handful of
    /// keys (a P×K batch has K − 1 positives per anchor) are counted without
    /// branches, eight at once when there are at most eight: a binary search
    /// over them would mispredict at almost every step.
    fn count_below(&self, x: f64, below: impl Fn(f64, f64) -> bool) -> usize {
        match &self.few {
            Some(few) => few.iter().map(|&k| below(k, x) as usize).sum(),
            None if self.all.len() <= 32 => self.all.iter().map(|&k| below(k, x) as usize).sum(),
            None => self.all.partition_point(|&k| below(k, x)),
        }
    }
}

/// Contiguous copies of a chunk's tensors, kept alive while [`Rows`] views them.
struct Held {
    d: Tensor,
    row_labels: Tensor,
    col_labels: Tensor,
    self_col: Option<i64>,
}

impl Held {
    fn new(chunk: &Chunk) -> Result<Self, Error> {
        Ok(Held {
            d: chunk.d.f_contiguous()?,
            row_labels: chunk.row_labels.f_contiguous()?,
            col_labels: chunk.col_labels.f_contiguous()?,
            self_col: chunk.self_col,
        })
    }

    fn rows(&self) -> usize {
        self.d.size()[0] as usize
    }

    fn view<T: Real>(&self) -> Result<Rows<'_, T>, Error> {
        Ok(Rows {
            d: view::<T>(&self.d)?,
            n: self.d.size()[1] as usize,
            row_labels: view::<i64>(&self.row_labels)?,
            col_labels: view::<i64>(&self.col_labels)?,
            self_col: self.self_col,
        })
    }
}

fn batch_all_typed<T: Real>(chunk: &Chunk, margin: f64) -> Result<Weighted, Error> {
    let held = Held::new(chunk)?;
    // Every entry is written by `batch_all_row`.
    let mut weights = held.d.f_empty_like()?;
    let rows = held.view::<T>()?;
    let w = view_mut::<T>(&mut weights)?;
    let distance = chunk.distance;
    let groups = Groups::new(rows.col_labels);
    let blocks = in_blocks(held.rows(), rows.n, w, rows.n, |range, w| {
        let mut scratch = Scratch::default();
        let first = range.start;
        let mut totals = Totals::default();
        let mut sums = Vec::with_capacity(range.len());
        for r in range {
            let out = &mut w[(r - first) * rows.n..(r - first + 1) * rows.n];
            let row = batch_all_row(&rows.row(r, &groups), out, &mut scratch, margin, distance);
            totals = totals.add(row.totals);
            sums.push(T::put(row.weight_sum));
        }
        (totals, sums)
    });
    let mut totals = Totals::default();
    let mut row_sum = Vec::with_capacity(held.rows());
    for (t, sums) in blocks {
        totals = totals.add(t);
        row_sum.extend(sums);
    }
    Ok(Weighted {
        value: Tensor::from(totals.value).f_to_kind(held.d.kind())?,
        count: Tensor::from(totals.count),
        valid: Tensor::from(totals.valid),
        selection: Selection::PairWeights {
            weights,
            row_sum: Tensor::f_from_slice(&row_sum)?,
        },
    })
}

#[derive(Default)]
struct Scratch {
    positives: Vec<(f64, usize)>,
    keys: Vec<f64>,
    counts: Vec<i64>,
    sums: Vec<f64>,
    nearest: Vec<(f64, usize)>,
}

/// Rows of batch-all keep this many sets of bucket totals, filled in turn,
/// so that consecutive negatives in one bucket do not wait for each other.
const LANES: usize = 4;

/// Writes the pair weights of the row's batch-all gradient into every entry of `w`.
fn batch_all_row<T: Real>(
    row: &Row<T>,
    w: &mut [T],
    s: &mut Scratch,
    margin: f64,
    distance: Distance,
) -> RowOut {
    row.sorted_positives(|d| d + margin, &mut s.positives, &mut s.keys);
    let p = s.positives.len();
    let mut out = RowOut {
        totals: Totals::default(),
        weight_sum: 0.0,
    };
    if p == 0 {
        w.fill(T::put(0.0));
        return out;
    }
    let buckets = p + 1;
    s.counts.clear();
    s.counts.resize(LANES * buckets, 0);
    s.sums.clear();
    s.sums.resize(LANES * buckets, 0.0);
    let mut negatives = 0i64;
    let keys = Keys::new(&s.keys);
    // First the number of active positives of each negative (as a weight
    // of d_an: minus that number), then the pair weights in one pass.
    for (j, (&dj, wj)) in row.d.iter().zip(w.iter_mut()).enumerate() {
        if row.labels[j] == row.label {
            // The positives' weights are written below; the anchor's own stays 0.
            *wj = T::put(0.0);
            continue;
        }
        let dj = dj.get();
        // Positives with t_p ≤ d_an come first; the rest are active for n.
        let bucket = keys.count_below(dj, |t, d| t <= d);
        *wj = T::put(-((p - bucket) as f64));
        let at = (j % LANES) * buckets + bucket;
        s.counts[at] += 1;
        s.sums[at] += dj;
        negatives += 1;
    }
    out.weight_sum = pair_weights_in_place(w, row.d, distance);
    out.totals.valid = p as i64 * negatives;
    let (mut k, mut prefix) = (0i64, 0.0f64);
    for (i, &(t, j)) in s.positives.iter().enumerate() {
        for lane in 0..LANES {
            k += s.counts[lane * buckets + i];
            prefix += s.sums[lane * buckets + i];
        }
        out.totals.value += k as f64 * t - prefix;
        out.totals.count += k;
        let weight = distance.pair_weight(k as f64, row.d[j].get());
        w[j] = T::put(weight);
        out.weight_sum += weight;
    }
    out
}

/// Turns weights of distances into pair weights ([`Distance::pair_weight`]),
/// in place, and returns their sum.
fn pair_weights_in_place<T: Real>(w: &mut [T], d: &[T], distance: Distance) -> f64 {
    let zero = T::put(0.0);
    match distance {
        Distance::Euclidean => {
            for (w, &d) in w.iter_mut().zip(d) {
                *w = if d > zero { *w / d } else { zero };
            }
        }
        Distance::Squared => {
            let two = T::put(2.0);
            for w in w.iter_mut() {
                *w = *w * two;
            }
        }
        Distance::Cosine => {}
    }
    let mut sums = [0.0f64; 8];
    let mut blocks = w.chunks_exact(8);
    for block in &mut blocks {
        for (s, &v) in sums.iter_mut().zip(block) {
            *s += v.get();
        }
    }
    sums.iter().sum::<f64>() + blocks.remainder().iter().map(|v| v.get()).sum::<f64>()
}

/// Appends (positive, negative) for every positive pair of the row whose
/// semi-hard triplet has a positive hinge.
fn semihard_row<T: Real>(
    row: &Row<T>,
    s: &mut Scratch,
    margin: f64,
    out: &mut Vec<(i64, i64)>,
) -> Totals {
    row.sorted_positives(|d| d, &mut s.positives, &mut s.keys);
    let p = s.positives.len();
    if p == 0 {
        return Totals::default();
    }
    const NONE: (f64, usize) = (f64::INFINITY, usize::MAX);
    s.nearest.clear();
    s.nearest.resize(p + 1, NONE);
    let mut largest = (f64::NEG_INFINITY, usize::MAX);
    let keys = Keys::new(&s.keys);
    for (j, &dj) in row.d.iter().enumerate() {
        if row.labels[j] == row.label {
            continue;
        }
        let dj = dj.get();
        // bucket = #{d_ap < d_an}: n is semi-hard for the positives below it.
        let bucket = keys.count_below(dj, |sp, d| sp < d);
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

fn semihard_typed<T: Real>(chunk: &Chunk, margin: f64) -> Result<Weighted, Error> {
    let held = Held::new(chunk)?;
    let rows = held.view::<T>()?;
    let groups = Groups::new(rows.col_labels);
    let blocks = in_blocks(held.rows(), rows.n, &mut [(); 0], 0, |range, _| {
        let mut scratch = Scratch::default();
        let mut totals = Totals::default();
        let mut triplets = vec![];
        let mut picks = vec![];
        for r in range {
            picks.clear();
            totals = totals.add(semihard_row(
                &rows.row(r, &groups),
                &mut scratch,
                margin,
                &mut picks,
            ));
            triplets.extend(picks.iter().map(|&(p, q)| (r as i64, p, q)));
        }
        (totals, triplets)
    });
    let mut totals = Totals::default();
    let (mut anchor, mut positive, mut negative) = (vec![], vec![], vec![]);
    for (t, triplets) in blocks {
        totals = totals.add(t);
        for (a, p, q) in triplets {
            anchor.push(a);
            positive.push(p);
            negative.push(q);
        }
    }
    Ok(Weighted {
        value: Tensor::from(totals.value).f_to_kind(held.d.kind())?,
        count: Tensor::from(totals.count),
        valid: Tensor::from(totals.valid),
        selection: Selection::Triplets {
            anchor,
            positive,
            negative,
        },
    })
}

pub(crate) fn batch_all(chunk: &Chunk, margin: f64) -> Result<Weighted, Error> {
    match real_kind(chunk.d.kind())? {
        NativeReal::F32 => batch_all_typed::<f32>(chunk, margin),
        NativeReal::F64 => batch_all_typed::<f64>(chunk, margin),
    }
}

pub(crate) fn semihard(chunk: &Chunk, margin: f64) -> Result<Weighted, Error> {
    match real_kind(chunk.d.kind())? {
        NativeReal::F32 => semihard_typed::<f32>(chunk, margin),
        NativeReal::F64 => semihard_typed::<f64>(chunk, margin),
    }
}

/// The farthest positive and the nearest negative of the row, the lowest
/// column on ties. The positives come from the label index; only the
/// negatives need a pass over the row.
fn hardest_row<T: Real>(row: &Row<T>) -> Option<(i64, i64)> {
    let mut pos = None::<(T, usize)>;
    for &j in row.same.iter().filter(|&&j| j != row.skip) {
        let dj = row.d[j];
        if pos.is_none_or(|(best, _)| dj > best) {
            pos = Some((dj, j));
        }
    }
    let pos = pos?.1;
    let mut neg = None::<(T, usize)>;
    for (j, (&dj, &label)) in row.d.iter().zip(row.labels).enumerate() {
        if label != row.label && neg.is_none_or(|(best, _)| dj < best) {
            neg = Some((dj, j));
        }
    }
    Some((pos as i64, neg?.1 as i64))
}

fn hardest_typed<T: Real>(chunk: &Chunk) -> Result<Hardest, Error> {
    let held = Held::new(chunk)?;
    let rows = held.view::<T>()?;
    let groups = Groups::new(rows.col_labels);
    let mut picks = vec![None; held.rows()];
    in_blocks(held.rows(), rows.n, &mut picks, 1, |range, out| {
        let first = range.start;
        for r in range {
            out[r - first] = hardest_row(&rows.row(r, &groups));
        }
    });
    let positive: Vec<i64> = picks.iter().map(|p| p.map_or(0, |p| p.0)).collect();
    let negative: Vec<i64> = picks.iter().map(|p| p.map_or(0, |p| p.1)).collect();
    let valid: Vec<bool> = picks.iter().map(Option::is_some).collect();
    Ok(Hardest {
        positive: Tensor::f_from_slice(&positive)?,
        negative: Tensor::f_from_slice(&negative)?,
        valid: Tensor::f_from_slice(&valid)?,
    })
}

pub(crate) fn hardest(chunk: &Chunk) -> Result<Hardest, Error> {
    match real_kind(chunk.d.kind())? {
        NativeReal::F32 => hardest_typed::<f32>(chunk),
        NativeReal::F64 => hardest_typed::<f64>(chunk),
    }
}

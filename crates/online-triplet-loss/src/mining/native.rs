//! Mining in Rust over the contiguous rows of a CPU chunk.
//!
//! A chunk holds distances, or the Gram products x·y that each row turns
//! into distances first ([`Transform`]), so that the distance matrix is read
//! once, while it is in the cache, instead of once per libtorch operation.
//! Each anchor's positives, found through an index of the columns by label
//! ([`Groups`]), are sorted (a P×K batch has K − 1 of them). Up to
//! [`FEW_KEYS`] positives, a row is mined in blocks of [`BLOCK`] columns with
//! one branch-free pass per positive, [`LANES`] columns at a time, that the
//! compiler vectorises: the positives' own columns are set to NaN first, which
//! no comparison selects, so those passes need no labels. Rows with more
//! positives put every negative into one bucket between two consecutive
//! positives by binary search: O(B log K) per row.
//!
//! Rows are split into one block per libtorch intra-op thread
//! ([`in_blocks`]), and each block runs with the widest vector instructions
//! the CPU has ([`simd`]).

use tch::{Device, Kind, Tensor};

use super::parallel::{in_blocks, in_weighted_blocks};
use super::{Chunk, Hardest, NearPairs, Selection, Weighted};
use crate::alloc;
use crate::distance::NEAR;
use crate::hash::FastMap;
use crate::{Distance, Error};

mod within;
mod within_all;
mod within_semihard;
pub(crate) use within::hardest_within;
pub(crate) use within_all::{batch_all_within, AllWithin};
pub(crate) use within_semihard::semihard_within;

/// Columns per block of a row in the vectorised passes: a block of
/// distances and its per-column counts stay in the L1 cache.
const BLOCK: usize = 512;
/// Columns handled at once by one vectorised step.
const LANES: usize = 16;
/// Rows with at most this many positives take the vectorised passes.
const FEW_KEYS: usize = 16;

trait Real:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
    + tch::kind::Element
    + 'static
{
    const REAL_ZERO: Self;
    const REAL_ONE: Self;
    const INFINITY: Self;
    const NAN: Self;
    /// The machine epsilon, as a float64.
    const EPS: f64;
    fn get(self) -> f64;
    fn put(v: f64) -> Self;
    /// The smallest value of this type that is ≥ `v`.
    fn at_least(v: f64) -> Self;
    fn sqrt(self) -> Self;
    /// A small count, exactly.
    fn of_count(c: u8) -> Self;
}

impl Real for f32 {
    const REAL_ZERO: Self = 0.0;
    const REAL_ONE: Self = 1.0;
    const INFINITY: Self = f32::INFINITY;
    const NAN: Self = f32::NAN;
    const EPS: f64 = f32::EPSILON as f64;
    fn get(self) -> f64 {
        self as f64
    }
    fn put(v: f64) -> Self {
        v as f32
    }
    fn at_least(v: f64) -> Self {
        let f = v as f32;
        if (f as f64) < v {
            f.next_up()
        } else {
            f
        }
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    fn of_count(c: u8) -> Self {
        f32::from(c)
    }
}

impl Real for f64 {
    const REAL_ZERO: Self = 0.0;
    const REAL_ONE: Self = 1.0;
    const INFINITY: Self = f64::INFINITY;
    const NAN: Self = f64::NAN;
    const EPS: f64 = f64::EPSILON;
    fn get(self) -> f64 {
        self
    }
    fn put(v: f64) -> Self {
        v
    }
    fn at_least(v: f64) -> Self {
        v
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    fn of_count(c: u8) -> Self {
        f64::from(c)
    }
}

/// The columns of each label, so that a row finds its positives without
/// scanning the labels of every column; built once per loss.
pub(crate) struct Groups {
    columns: FastMap<i64, Vec<usize>>,
}

impl Groups {
    /// `labels`: int64 keys on the CPU.
    pub(crate) fn new(labels: &Tensor) -> Result<Self, Error> {
        let labels = labels.f_contiguous()?;
        let mut columns = FastMap::<i64, Vec<usize>>::default();
        for (j, &label) in view::<i64>(&labels)?.iter().enumerate() {
            if !columns.contains_key(&label) {
                alloc::reserve_map(&mut columns, 1)?;
            }
            alloc::push(columns.entry(label).or_default(), j)?;
        }
        Ok(Groups { columns })
    }

    fn of(&self, label: i64) -> &[usize] {
        self.columns.get(&label).map_or(&[], Vec::as_slice)
    }

    /// The number of columns of the largest label.
    pub(crate) fn largest(&self) -> usize {
        self.columns.values().map(Vec::len).max().unwrap_or(0)
    }
}

/// Checks that `t` can be read as a slice of `T`: a contiguous CPU tensor
/// whose element type is `T`, aligned for `T` (the kernels read tensors
/// libtorch allocated; a caller's may be misaligned).
fn check_viewable<T: tch::kind::Element>(t: &Tensor) -> Result<usize, Error> {
    if t.device() != Device::Cpu || !t.is_contiguous() || t.kind() != T::KIND {
        return Err(Error::Torch(format!(
            "native mining needs a contiguous CPU tensor of {:?}, got {:?} on {:?}",
            T::KIND,
            t.kind(),
            t.device()
        )));
    }
    if !(t.data_ptr() as *const T).is_aligned() {
        return Err(Error::Torch(format!(
            "internal error: native mining needs a tensor aligned for {:?}",
            T::KIND
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

/// A mutable view of a tensor whose storage the caller reaches through
/// nothing else while the slice lives (a chunk's scratch space).
fn view_mut<T: tch::kind::Element>(t: &mut Tensor) -> Result<&mut [T], Error> {
    let n = check_viewable::<T>(t)?;
    if n == 0 {
        return Ok(&mut []);
    }
    // SAFETY: as in `view`; the tensor is borrowed mutably for the slice's
    // lifetime, and a chunk's `d` is scratch space no other view reads.
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

/// How a row of the chunk becomes distances.
#[derive(Clone, Copy)]
enum Transform<'a, T> {
    /// The chunk holds distances.
    Distances,
    /// Gram products of centred points: (‖y‖² − 2x·y) + ‖x‖², clamped at 0,
    /// and its square root for the Euclidean distance. These are the
    /// operations, in the order, of [`crate::distance::Side::pairwise`].
    Euclidean {
        rows: &'a [T],
        cols: &'a [T],
        sqrt: bool,
    },
    /// Gram products of normalised points: 1 − x·y.
    Cosine,
}

impl<T: Real> Transform<'_, T> {
    #[inline(always)]
    fn apply(&self, r: usize, row: &mut [T]) {
        match *self {
            Transform::Distances => {}
            Transform::Euclidean { rows, cols, sqrt } => {
                let (x, minus_two) = (rows[r], T::put(-2.0));
                for (v, &y) in row.iter_mut().zip(cols) {
                    let s = (y + minus_two * *v) + x;
                    // `<` keeps NaN, as clamp_min does.
                    *v = if s < T::REAL_ZERO { T::REAL_ZERO } else { s };
                }
                if sqrt {
                    for v in row.iter_mut() {
                        *v = v.sqrt();
                    }
                }
            }
            Transform::Cosine => {
                for v in row.iter_mut() {
                    *v = T::REAL_ONE - *v;
                }
            }
        }
    }
}

/// A 0-d CPU tensor holding `value`: an `Err` where libtorch fails, where
/// `Tensor::from` would panic.
fn scalar(value: impl Into<tch::Scalar>, kind: Kind) -> Result<Tensor, Error> {
    Ok(Tensor::f_scalar_tensor(value, (kind, Device::Cpu))?)
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

/// One anchor's row: its distances (scratch: the kernels may overwrite
/// them), label, and the column of the anchor itself if it is a reference.
struct Row<'a, T> {
    d: &'a mut [T],
    label: i64,
    labels: &'a [i64],
    /// The columns whose label is `label`.
    same: &'a [usize],
    skip: usize,
    /// `d` holds squared Euclidean distances, whose roots are the distances.
    squared: bool,
    /// For Euclidean distances, what near pairs are found and weighed by.
    near: Option<NearFrame<'a, T>>,
}

/// The squared norms and the points, in the frame of a row's distances, of
/// its anchor and of the references: what finds and weighs its near pairs.
#[derive(Clone, Copy)]
struct NearFrame<'a, T> {
    anchor_norm: T,
    col_norms: &'a [T],
    anchor: &'a [T],
    /// The references' points, rows of `anchor.len()` values.
    cols: &'a [T],
}

impl<T: Real> NearFrame<'_, T> {
    /// Where the weight `w` of the distance from the anchor to reference `j`,
    /// a near pair, goes ([`near_weight`]).
    fn weight(&self, j: usize, w: f64) -> NearWeight<T> {
        let width = self.anchor.len();
        let y = &self.cols[j * width..(j + 1) * width];
        near_weight(w, (self.anchor, y), (self.anchor_norm, self.col_norms[j]))
    }
}

/// A positive of a row: its key (the value it is sorted by), its distance
/// and its column.
#[derive(Clone, Copy)]
struct Positive<T> {
    key: f64,
    d: T,
    j: usize,
}

impl<T: Real> Row<'_, T> {
    /// The distance that a value of `d` stands for.
    #[inline(always)]
    fn distance(&self, v: T) -> T {
        if self.squared {
            v.sqrt()
        } else {
            v
        }
    }

    /// The positives sorted by (key, column) into `out`.
    fn sorted_positives(&self, key: impl Fn(f64) -> f64, out: &mut Vec<Positive<T>>) {
        out.clear();
        out.extend(self.same.iter().filter(|&&j| j != self.skip).map(|&j| {
            let d = self.distance(self.d[j]);
            Positive {
                key: key(d.get()),
                d,
                j,
            }
        }));
        out.sort_unstable_by(|a, b| a.key.total_cmp(&b.key).then(a.j.cmp(&b.j)));
    }

    /// The number of columns with another label.
    fn negatives(&self) -> usize {
        self.d.len() - self.same.len()
    }

    /// The columns of other labels whose distance is near 0 ([`is_near`]),
    /// with their distances, into `out`: none unless the row has norms.
    /// (Batch-all weighs the positives as it goes through them.)
    ///
    /// # Errors
    /// [`Error::OutOfMemory`] when `out` cannot grow.
    fn near_columns(&self, out: &mut Vec<(usize, T)>) -> Result<(), Error> {
        out.clear();
        let Some(NearFrame {
            anchor_norm: anchor,
            col_norms: cols,
            ..
        }) = self.near
        else {
            return Ok(());
        };
        // A test of every column first, which vectorises: nearly every
        // row has no near column. The anchor's own column, at distance 0
        // from it, is left out (its weight is 0).
        let split = self.skip.min(self.d.len());
        let after = (split + 1).min(self.d.len());
        let any = |d: &[T], cols: &[T]| any_near(d, anchor, cols, self.squared);
        if !any(&self.d[..split], &cols[..split]) && !any(&self.d[after..], &cols[after..]) {
            return Ok(());
        }
        for (j, (&v, &n)) in self.d.iter().zip(cols).enumerate() {
            let d = self.distance(v);
            if is_near(d, anchor, n) && j != self.skip && self.labels[j] != self.label {
                alloc::push(out, (j, d))?;
            }
        }
        Ok(())
    }

    /// Sets the distances of the row's own label to NaN, which the
    /// vectorised passes never select, so they need no labels.
    fn hide_same(&mut self) {
        for &j in self.same {
            self.d[j] = T::NAN;
        }
    }
}

/// Below which exact distance e, relative to ε² (‖x‖² + ‖y‖²), a near pair's
/// gradient is added apart: see [`near_weight`].
const APART: f64 = (1u64 << 21) as f64;

/// Where the weight of a near pair's distance goes.
enum NearWeight<T> {
    /// Nowhere: the weight is 0.
    Zero,
    /// Into the weight matrix, as this pair weight w/e.
    InPlace(T),
    /// Apart, to [`NearPairs`].
    Apart,
}

/// Where the weight `w` of the distance of a near pair ([`is_near`]) with
/// points `x` and `y` and squared norms `n_x` and `n_y` (in the frame of its
/// distance) goes, from their exact distance e = ‖x − y‖. The weight matrix
/// gives the gradient Σ pᵢⱼ (xᵢ − yⱼ) through products, pᵢⱼ xᵢ − pᵢⱼ yⱼ,
/// whose rounding is about ε (‖x‖ + ‖y‖)/e of the term w (x − y)/e: at most
/// 2⁻¹⁰ of it while e² ≥ [`APART`]·ε²·(‖x‖² + ‖y‖²), where its pair weight
/// is w/e; below, the pair is added apart, from the embeddings' own
/// difference: also where x and y, rounded in this frame, coincide (e = 0),
/// but the embeddings differ. NaN points make no pair near.
#[inline(always)]
fn near_weight<T: Real>(w: f64, (x, y): (&[T], &[T]), (n_x, n_y): (T, T)) -> NearWeight<T> {
    if w == 0.0 {
        return NearWeight::Zero;
    }
    let e = norm_of_difference(x, y);
    if e > T::REAL_ZERO && e * e >= T::put(APART * T::EPS * T::EPS) * (n_x + n_y) {
        NearWeight::InPlace(T::put(w) / e)
    } else {
        NearWeight::Apart
    }
}

/// Whether the Euclidean distance `d` between points with squared norms
/// `n_x` and `n_y` (in the frame it was computed in) is near 0: d² <
/// [`NEAR`]·ε·(‖x‖² + ‖y‖²). Computed from the Gram product x·y, d² carries
/// an absolute error of a few ε·(‖x‖² + ‖y‖²), growing with the width, so
/// below that bound d and its gradient factor 1/d are not to be trusted
/// (near-copies can even get d = 0 and no gradient): batch-all weighs such
/// pairs by their exact distance ‖x − y‖ instead ([`near_weight`]). Above
/// it, the relative error of d is about √D/(2·NEAR), (D + 2)/(2·NEAR) at
/// worst. NaN is never near.
#[inline(always)]
fn is_near<T: Real>(d: T, n_x: T, n_y: T) -> bool {
    d * d < T::put(NEAR * T::EPS) * (n_x + n_y)
}

/// Whether any of the distances `d` (squared ones with `squared`) from an
/// anchor with squared norm `anchor` to references with squared norms
/// `cols` is near 0 ([`is_near`]): the smallest d² − bound below 0, kept in
/// [`LANES`] partial minima, as [`min_of`], so that it vectorises.
#[inline(always)]
fn any_near<T: Real>(d: &[T], anchor: T, cols: &[T], squared: bool) -> bool {
    let c = T::put(NEAR * T::EPS);
    let gap = |v: T, n: T| {
        let s = if squared { v } else { v * v };
        s - c * (anchor + n)
    };
    let mut lanes = [T::INFINITY; LANES];
    let (ds, d_rest) = d.as_chunks::<LANES>();
    let (ns, n_rest) = cols.as_chunks::<LANES>();
    for (d, n) in ds.iter().zip(ns) {
        for l in 0..LANES {
            let g = gap(d[l], n[l]);
            lanes[l] = if g < lanes[l] { g } else { lanes[l] };
        }
    }
    for (&v, &n) in d_rest.iter().zip(n_rest) {
        let g = gap(v, n);
        lanes[0] = if g < lanes[0] { g } else { lanes[0] };
    }
    lanes.iter().any(|&g| g < T::REAL_ZERO)
}

/// The first column whose label is not `label`.
fn first_negative(labels: &[i64], label: i64) -> Option<usize> {
    labels.iter().position(|&l| l != label)
}

/// The distances and labels of a chunk, viewed as slices; `d` is split
/// among the threads.
struct Rows<'a, T> {
    n: usize,
    row_labels: &'a [i64],
    col_labels: &'a [i64],
    groups: &'a Groups,
    self_col: Option<i64>,
    transform: Transform<'a, T>,
    squared: bool,
    /// The squared norms and the points of the anchors and the references,
    /// for [`Row::near`].
    near: Option<NearView<'a, T>>,
}

/// [`NearFrame`]s of the rows of a chunk.
#[derive(Clone, Copy)]
struct NearView<'a, T> {
    row_norms: &'a [T],
    col_norms: &'a [T],
    rows: &'a [T],
    cols: &'a [T],
    width: usize,
}

impl<'a, T: Real> Rows<'a, T> {
    /// Rows of squared Euclidean distances, for mining that compares
    /// distances only: the square root is monotone, so it is taken only of
    /// the values a row picks and of its ties ([`Row::distance`]).
    fn squares(mut self) -> Self {
        if let Transform::Euclidean { sqrt, .. } = &mut self.transform {
            self.squared = std::mem::replace(sqrt, false);
        }
        self
    }

    /// Row `r`, whose distances are `d`, after the transform.
    #[inline(always)]
    fn row<'b>(&'b self, r: usize, d: &'b mut [T]) -> Row<'b, T> {
        self.transform.apply(r, d);
        let label = self.row_labels[r];
        Row {
            d,
            label,
            labels: self.col_labels,
            same: self.groups.of(label),
            skip: self.self_col.map_or(usize::MAX, |c| c as usize + r),
            squared: self.squared,
            near: self.near.map(|v| NearFrame {
                anchor_norm: v.row_norms[r],
                col_norms: v.col_norms,
                anchor: &v.rows[r * v.width..(r + 1) * v.width],
                cols: v.cols,
            }),
        }
    }
}

/// A chunk's tensors, kept alive while [`Rows`] views them.
struct Held {
    d: Tensor,
    row_labels: Tensor,
    /// Set when the chunk came with its own copy of the norms.
    norms: Option<(Tensor, Tensor)>,
    /// What near pairs are found and weighed by ([`Chunk::near`]): norms
    /// and points of the anchors, and of the references.
    near: Option<[Tensor; 4]>,
    self_col: Option<i64>,
    distance: Distance,
}

impl Held {
    fn new(chunk: &Chunk) -> Result<Self, Error> {
        let d = if chunk.d.is_contiguous() {
            chunk.d.shallow_clone()
        } else {
            chunk.d.f_contiguous()?
        };
        let near = match (chunk.distance, chunk.near) {
            (Distance::Euclidean, Some(n)) => Some([
                n.row_norms.f_contiguous()?,
                n.col_norms.f_contiguous()?,
                n.rows.f_contiguous()?,
                n.cols.f_contiguous()?,
            ]),
            _ => None,
        };
        Ok(Held {
            d,
            row_labels: chunk.row_labels.f_contiguous()?,
            norms: match chunk.gram {
                Some(g) => Some((g.row_norms.f_contiguous()?, g.col_norms.f_contiguous()?)),
                None => None,
            },
            near,
            self_col: chunk.self_col,
            distance: chunk.distance,
        })
    }

    fn rows(&self) -> usize {
        self.d.size()[0] as usize
    }

    fn view<'a, T: Real>(
        &'a self,
        (groups, col_labels): (&'a Groups, &'a [i64]),
    ) -> Result<Rows<'a, T>, Error> {
        let transform = match (&self.norms, self.distance) {
            (None, _) => Transform::Distances,
            (Some(_), Distance::Cosine) => Transform::Cosine,
            (Some((rows, cols)), distance) => Transform::Euclidean {
                rows: view::<T>(rows)?,
                cols: view::<T>(cols)?,
                sqrt: distance == Distance::Euclidean,
            },
        };
        Ok(Rows {
            n: self.d.size()[1] as usize,
            row_labels: view::<i64>(&self.row_labels)?,
            col_labels,
            groups,
            self_col: self.self_col,
            transform,
            squared: false,
            near: match &self.near {
                Some([row_norms, col_norms, rows, cols]) => Some(NearView {
                    row_norms: view::<T>(row_norms)?,
                    col_norms: view::<T>(col_norms)?,
                    rows: view::<T>(rows)?,
                    cols: view::<T>(cols)?,
                    width: rows.size().get(1).copied().unwrap_or(0).max(0) as usize,
                }),
                None => None,
            },
        })
    }
}

/// The index of the chunk's columns by label, and their labels.
fn groups<'a>(chunk: &Chunk<'a>) -> Result<(&'a Groups, &'a [i64]), Error> {
    Ok((
        chunk.columns.native_groups()?,
        view::<i64>(&chunk.columns.labels)?,
    ))
}

/// The smallest of `values`, never NaN; +inf when none is below it.
#[inline(always)]
fn min_of<T: Real>(values: &[T]) -> T {
    let mut lanes = [T::INFINITY; LANES];
    let (steps, rest) = values.as_chunks::<LANES>();
    for step in steps {
        for l in 0..LANES {
            lanes[l] = if step[l] < lanes[l] {
                step[l]
            } else {
                lanes[l]
            };
        }
    }
    let mut min = T::INFINITY;
    for &v in lanes.iter().chain(rest) {
        min = if v < min { v } else { min };
    }
    min
}

/// The largest of `values`, never NaN; −inf when none is above it.
#[inline(always)]
fn max_of<T: Real>(values: &[T]) -> T {
    let mut lanes = [-T::INFINITY; LANES];
    let (steps, rest) = values.as_chunks::<LANES>();
    for step in steps {
        for l in 0..LANES {
            lanes[l] = if step[l] > lanes[l] {
                step[l]
            } else {
                lanes[l]
            };
        }
    }
    let mut max = -T::INFINITY;
    for &v in lanes.iter().chain(rest) {
        max = if v > max { v } else { max };
    }
    max
}

/// The smallest of `values` strictly above `floor`; +inf when none is.
#[inline(always)]
fn min_above<T: Real>(values: &[T], floor: T) -> T {
    let mut lanes = [T::INFINITY; LANES];
    let (steps, rest) = values.as_chunks::<LANES>();
    for step in steps {
        for l in 0..LANES {
            let v = if step[l] > floor {
                step[l]
            } else {
                T::INFINITY
            };
            lanes[l] = if v < lanes[l] { v } else { lanes[l] };
        }
    }
    let mut min = T::INFINITY;
    for &v in lanes.iter().chain(rest) {
        let v = if v > floor { v } else { T::INFINITY };
        min = if v < min { v } else { min };
    }
    min
}

/// The first position in `values` where `hit` holds, tested [`LANES`]
/// values at a time.
#[inline(always)]
fn position_where<T: Real>(values: &[T], hit: impl Fn(T) -> bool) -> Option<usize> {
    let (steps, rest) = values.as_chunks::<LANES>();
    for (k, step) in steps.iter().enumerate() {
        let mut any = false;
        for &x in step {
            any |= hit(x);
        }
        if any {
            return step.iter().position(|&x| hit(x)).map(|l| k * LANES + l);
        }
    }
    rest.iter()
        .position(|&x| hit(x))
        .map(|l| steps.len() * LANES + l)
}

struct Scratch<T> {
    positives: Vec<Positive<T>>,
    keys: Vec<f64>,
    counts: Vec<i64>,
    sums: Vec<f64>,
    nearest: Vec<(f64, usize)>,
    /// Semi-hard with many positives: the nearest negative above each.
    above: Vec<(f64, usize)>,
    /// Batch-all: the row's near columns ([`Row::near_columns`]).
    near: Vec<(usize, T)>,
}

impl<T> Scratch<T> {
    /// Room for the rows of labels of up to `largest` columns, which then
    /// never grow it.
    fn with_room(largest: usize) -> Result<Self, Error> {
        let room = largest + 1;
        Ok(Scratch {
            positives: alloc::with_capacity(room)?,
            keys: alloc::with_capacity(room)?,
            counts: alloc::with_capacity(room)?,
            sums: alloc::with_capacity(room)?,
            nearest: alloc::with_capacity(room)?,
            above: alloc::with_capacity(room)?,
            near: Vec::new(),
        })
    }
}

/// What one row of batch-all adds: its totals and the sum of its pair weights.
struct RowOut {
    totals: Totals,
    weight_sum: f64,
}

/// Batch-all: writes the pair weights of the row's gradient over its
/// distances, adds them to `col_sum`, and returns the row's totals. The
/// columns whose distance is near 0 ([`is_near`]) get the pair weight of
/// their exact distance, or 0 with their column and weight of the distance
/// put into `near` ([`near_weight`]).
///
/// # Errors
/// [`Error::OutOfMemory`] when `near` or the scratch cannot grow.
#[inline(always)]
fn batch_all_row<T: Real>(
    mut row: Row<T>,
    s: &mut Scratch<T>,
    (margin, distance): (f64, Distance),
    col_sum: &mut [T],
    near: &mut Vec<(usize, f64)>,
) -> Result<RowOut, Error> {
    row.sorted_positives(|d| d + margin, &mut s.positives);
    let p = s.positives.len();
    let mut out = RowOut {
        totals: Totals::default(),
        weight_sum: 0.0,
    };
    if p == 0 {
        row.d.fill(T::REAL_ZERO);
        return Ok(out);
    }
    row.near_columns(&mut s.near)?;
    // k_i and the sum of the hinges of positive i.
    let mut k = [0i64; FEW_KEYS];
    if p <= FEW_KEYS {
        row.hide_same();
        batch_all_few(row.d, &s.positives, distance, &mut k, &mut out.totals);
    } else {
        batch_all_many(&mut row, s, distance, &mut out.totals);
    }
    out.totals.valid = p as i64 * row.negatives() as i64;
    // The positives' weights; the anchor's own column, when it has the
    // anchor's label, gets 0 (with another label it is a negative).
    if row.labels.get(row.skip) == Some(&row.label) {
        row.d[row.skip] = T::REAL_ZERO;
    }
    // A near pair's pair weight, or 0 with the pair put apart.
    let mut weigh = |j: usize, weight: f64, frame: NearFrame<T>| -> Result<T, Error> {
        Ok(match frame.weight(j, weight) {
            NearWeight::Zero => T::REAL_ZERO,
            NearWeight::InPlace(pair) => pair,
            NearWeight::Apart => {
                alloc::push(near, (j, weight))?;
                T::REAL_ZERO
            }
        })
    };
    for (i, q) in s.positives.iter().enumerate() {
        let k = if p <= FEW_KEYS { k[i] } else { s.counts[i] };
        out.totals.count += k;
        row.d[q.j] = match row.near {
            Some(f) if is_near(q.d, f.anchor_norm, f.col_norms[q.j]) => weigh(q.j, k as f64, f)?,
            _ => T::put(distance.pair_weight(k as f64, q.d.get())),
        };
    }
    // A near negative's weight: −(the number of positives whose key t is
    // above its distance), as the passes count.
    if let Some(frame) = row.near {
        for &(j, d) in &s.near {
            let a = p - s.positives.partition_point(|q| q.key <= d.get());
            row.d[j] = weigh(j, -(a as f64), frame)?;
        }
    }
    out.weight_sum = add_columns(row.d, col_sum);
    Ok(out)
}

/// Batch-all over the distances `d` of a row whose own label's columns are
/// NaN, one vectorised pass per positive and block: `k[i]` and the hinges of
/// positive i, and −(the number of positives a negative is active for), as
/// pair weights, over the negatives' distances.
#[inline(always)]
fn batch_all_few<T: Real>(
    d: &mut [T],
    positives: &[Positive<T>],
    distance: Distance,
    k: &mut [i64; FEW_KEYS],
    totals: &mut Totals,
) {
    // Negative n is active for positive i when d_an < t_i = d_ap + m, that
    // is below the smallest T at least t_i; the hinge is t_i − d_an.
    let mut below = [T::REAL_ZERO; FEW_KEYS];
    let mut t = [T::REAL_ZERO; FEW_KEYS];
    for (i, q) in positives.iter().enumerate() {
        below[i] = T::at_least(q.key);
        t[i] = T::put(q.key);
    }
    let mut active = [T::REAL_ZERO; BLOCK];
    for block in d.chunks_mut(BLOCK) {
        let active = &mut active[..block.len()];
        active.fill(T::REAL_ZERO);
        for i in 0..positives.len() {
            let (below, t) = (below[i], t[i]);
            let mut count = [T::REAL_ZERO; LANES];
            let mut hinge = [T::REAL_ZERO; LANES];
            let mut steps = block
                .chunks_exact(LANES)
                .zip(active.chunks_exact_mut(LANES));
            for (d, a) in &mut steps {
                for l in 0..LANES {
                    let on = d[l] < below;
                    a[l] = a[l] + if on { T::REAL_ONE } else { T::REAL_ZERO };
                    count[l] = count[l] + if on { T::REAL_ONE } else { T::REAL_ZERO };
                    hinge[l] = hinge[l] + if on { t - d[l] } else { T::REAL_ZERO };
                }
            }
            let rest = block.len() - block.len() % LANES;
            for l in rest..block.len() {
                let on = block[l] < below;
                active[l] = active[l] + if on { T::REAL_ONE } else { T::REAL_ZERO };
                count[0] = count[0] + if on { T::REAL_ONE } else { T::REAL_ZERO };
                hinge[0] = hinge[0] + if on { t - block[l] } else { T::REAL_ZERO };
            }
            let active = count.iter().map(|c| c.get()).sum::<f64>();
            k[i] += active as i64;
            let key = positives[i].key;
            let mut value = hinge.iter().map(|h| h.get()).sum::<f64>();
            if value.is_infinite() {
                // A lane of float32 hinges overflowed where their float64
                // sum does not (hinges near 1e37, or t_i itself beyond
                // float32): the block's again, in float64. Hinges are not
                // negative, so nothing else sums to inf; distances that are
                // inf or NaN poison the loss anyway.
                value = block
                    .iter()
                    .filter(|&&d| d < below)
                    .map(|&d| key - d.get())
                    .sum();
            } else if active > 0.0 {
                // The hinges are t_i − d_an with t_i rounded to T: each
                // active one gets back what the rounding took (all of a
                // margin below half an ulp of d_ap).
                value += active * (key - t.get());
            }
            totals.value += value;
        }
        pair_weights(block, active, distance);
    }
}

/// Overwrites distances d with the pair weights of weights −a
/// ([`Distance::pair_weight`]).
#[inline(always)]
fn pair_weights<T: Real>(d: &mut [T], a: &[T], distance: Distance) {
    for (d, &a) in d.iter_mut().zip(a) {
        *d = negative_pair_weight(a, *d, distance);
    }
}

/// The pair weight of weight −a on distance d ([`Distance::pair_weight`]).
#[inline(always)]
fn negative_pair_weight<T: Real>(a: T, d: T, distance: Distance) -> T {
    match distance {
        Distance::Euclidean => {
            if d > T::REAL_ZERO {
                -a / d
            } else {
                T::REAL_ZERO
            }
        }
        Distance::Squared => T::put(-2.0) * a,
        Distance::Cosine => -a,
    }
}

/// Batch-all over a row with many positives: each negative goes into the
/// bucket between the positives' keys below and above it. Sets `s.counts[i]`
/// to k_i.
fn batch_all_many<T: Real>(
    row: &mut Row<T>,
    s: &mut Scratch<T>,
    distance: Distance,
    totals: &mut Totals,
) {
    let p = s.positives.len();
    s.keys.clear();
    s.keys.extend(s.positives.iter().map(|q| q.key));
    let buckets = p + 1;
    s.counts.clear();
    s.counts.resize(buckets, 0);
    s.sums.clear();
    s.sums.resize(buckets, 0.0);
    for (j, v) in row.d.iter_mut().enumerate() {
        if row.labels[j] == row.label {
            continue;
        }
        let dj = v.get();
        // Positives with t_p ≤ d_an come first; the rest are active for n.
        // A NaN distance is below none of them, as in `batch_all_few`.
        let bucket = if dj.is_nan() {
            p
        } else {
            s.keys.partition_point(|&t| t <= dj)
        };
        s.counts[bucket] += 1;
        s.sums[bucket] += dj;
        *v = T::put(distance.pair_weight(-((p - bucket) as f64), dj));
    }
    let (mut k, mut prefix) = (0i64, 0.0f64);
    for i in 0..p {
        k += s.counts[i];
        prefix += s.sums[i];
        totals.value += k as f64 * s.keys[i] - prefix;
        s.counts[i] = k;
    }
}

/// Adds `w` to `col_sum` and returns the sum of `w`.
#[inline(always)]
fn add_columns<T: Real>(w: &[T], col_sum: &mut [T]) -> f64 {
    let mut total = 0.0;
    for (w, c) in w.chunks(BLOCK).zip(col_sum.chunks_mut(BLOCK)) {
        let mut lanes = [T::REAL_ZERO; LANES];
        let mut steps = w.chunks_exact(LANES).zip(c.chunks_exact_mut(LANES));
        for (w, c) in &mut steps {
            for l in 0..LANES {
                c[l] = c[l] + w[l];
                lanes[l] = lanes[l] + w[l];
            }
        }
        let rest = w.len() - w.len() % LANES;
        for l in rest..w.len() {
            c[l] = c[l] + w[l];
            lanes[0] = lanes[0] + w[l];
        }
        total += lanes.iter().map(|v| v.get()).sum::<f64>();
    }
    total
}

/// Semi-hard: appends (positive, negative) for every positive pair of the
/// row whose triplet has a positive hinge.
#[inline(always)]
fn semihard_row<T: Real>(
    mut row: Row<T>,
    s: &mut Scratch<T>,
    margin: f64,
    out: &mut Vec<(i64, i64)>,
) -> Totals {
    row.sorted_positives(|d| d, &mut s.positives);
    let p = s.positives.len();
    if p == 0 || row.negatives() == 0 {
        return Totals::default();
    }
    let totals = Totals {
        count: p as i64,
        valid: p as i64,
        ..Totals::default()
    };
    // For each positive, in sorted order, the nearest negative strictly
    // farther (lowest column on ties), else the farthest negative.
    let mut picks = [None::<(T, usize)>; FEW_KEYS];
    let largest = if p <= FEW_KEYS {
        row.hide_same();
        semihard_few(row.d, &s.positives, &mut picks)
    } else {
        semihard_many(&row, s)
    };
    // Only NaN distances (a loss that is NaN anyway) leave no farthest.
    let largest = match largest {
        Some((d, j)) => (d.get(), j),
        None => (f64::NAN, first_negative(row.labels, row.label).unwrap_or(0)),
    };
    let mut value = 0.0;
    for (i, q) in s.positives.iter().enumerate() {
        let (d_an, n) = match (p <= FEW_KEYS, picks.get(i).copied().flatten()) {
            (true, Some((d, j))) => (d.get(), j),
            (true, None) => largest,
            (false, _) => match s.above[i] {
                (d, j) if j != usize::MAX => (d, j),
                _ => largest,
            },
        };
        let hinge = q.key - d_an + margin;
        if hinge > 0.0 {
            value += hinge;
            out.push((q.j as i64, n as i64));
        }
    }
    Totals { value, ..totals }
}

/// Semi-hard over the distances `d` of a row whose own label's columns are
/// NaN: for each positive, in `picks`, the nearest finite distance strictly
/// above its own, the lowest column on ties, and the farthest distance,
/// which this returns; `None` where there are none.
#[inline(always)]
fn semihard_few<T: Real>(
    d: &[T],
    positives: &[Positive<T>],
    picks: &mut [Option<(T, usize)>; FEW_KEYS],
) -> Option<(T, usize)> {
    let mut largest = None::<(T, usize)>;
    let mut at = 0;
    for block in d.chunks(BLOCK) {
        for (pick, q) in picks.iter_mut().zip(positives) {
            let min = min_above(block, q.d);
            if min < T::INFINITY && pick.is_none_or(|(best, _)| min < best) {
                if let Some(j) = position_where(block, |x| x == min) {
                    *pick = Some((min, at + j));
                }
            }
        }
        let max = max_of(block);
        if max > -T::INFINITY && largest.is_none_or(|(best, _)| max > best) {
            if let Some(j) = position_where(block, |x| x == max) {
                largest = Some((max, at + j));
            }
        }
        at += block.len();
    }
    largest
}

/// Semi-hard over a row with many positives: each negative goes into the
/// bucket above the positives strictly below it, and a sweep from the top
/// keeps the nearest negative above each positive in `s.above[i]`.
/// Returns the farthest negative.
fn semihard_many<T: Real>(row: &Row<T>, s: &mut Scratch<T>) -> Option<(T, usize)> {
    const NONE: (f64, usize) = (f64::INFINITY, usize::MAX);
    let p = s.positives.len();
    s.keys.clear();
    s.keys.extend(s.positives.iter().map(|q| q.key));
    s.nearest.clear();
    s.nearest.resize(p + 1, NONE);
    let mut largest = None::<(T, usize)>;
    for (j, &v) in row.d.iter().enumerate() {
        if row.labels[j] == row.label {
            continue;
        }
        let dj = v.get();
        // bucket = #{d_ap < d_an}: n is semi-hard for the positives below it.
        let bucket = s.keys.partition_point(|&sp| sp < dj);
        if s.nearest[bucket].1 == usize::MAX || dj < s.nearest[bucket].0 {
            s.nearest[bucket] = (dj, j);
        }
        if largest.is_none_or(|(b, _)| v > b) {
            largest = Some((v, j));
        }
    }
    // Sweep the positives from the farthest down. Buckets are ordered by
    // distance, so equal distances share a bucket and its first index is kept.
    let mut best = NONE;
    s.above.clear();
    s.above.resize(p, NONE);
    for i in (0..p).rev() {
        let candidate = s.nearest[i + 1];
        if candidate.1 != usize::MAX && (best.1 == usize::MAX || candidate.0 < best.0) {
            best = candidate;
        }
        s.above[i] = best;
    }
    largest
}

/// The farthest positive and the nearest negative of the row, the lowest
/// column on ties. Rows of squares ([`Rows::squares`]) are compared as they
/// are, and only each block's extreme and its ties are turned into distances.
#[inline(always)]
fn hardest_row<T: Real>(row: Row<T>) -> Option<(i64, i64)> {
    if row.negatives() == 0 {
        return None;
    }
    let (labels, label) = (row.labels, row.label);
    let (pos, neg) = extremes(row, None);
    let pos = pos?.1;
    // Only NaN or infinite distances leave none; any negative does then.
    let neg = neg
        .map(|(_, j)| j)
        .or_else(|| first_negative(labels, label))?;
    Some((pos as i64, neg as i64))
}

/// A row's farthest positive and nearest negative, as (distance, column).
type Extremes<T> = (Option<(T, usize)>, Option<(T, usize)>);

/// The farthest positive of the row (the first one, then any farther) and
/// its nearest negative with a finite distance, the lowest column on ties.
/// `pos` is the farthest positive before the row's first column, if any: the
/// row's positives continue that scan. Hides the row's own label
/// ([`Row::hide_same`]).
#[inline(always)]
fn extremes<T: Real>(mut row: Row<T>, mut pos: Option<(T, usize)>) -> Extremes<T> {
    for &j in row.same.iter().filter(|&&j| j != row.skip) {
        let dj = row.distance(row.d[j]);
        if pos.is_none_or(|(best, _)| dj > best) {
            pos = Some((dj, j));
        }
    }
    row.hide_same();
    let mut neg = None::<(T, usize)>;
    let mut at = 0;
    for block in row.d.chunks(BLOCK) {
        let min = min_of(block);
        if min < T::INFINITY {
            let d = row.distance(min);
            if neg.is_none_or(|(best, _)| d < best) {
                if let Some(j) = position_where(block, |x| row.distance(x) == d) {
                    neg = Some((d, at + j));
                }
            }
        }
        at += block.len();
    }
    (pos, neg)
}

/// Runs `block` over the rows of the chunk, one block of rows per thread,
/// inside [`simd::run`], and returns the blocks' results in row order with
/// the chunk's (overwritten) values. `block` gets the rows, its range of
/// row indices and their values; with `squares`, [`Rows::squares`].
fn mine_rows<T: Real, R: Send>(
    chunk: &Chunk,
    squares: bool,
    block: impl Fn(&Rows<T>, std::ops::Range<usize>, &mut [T]) -> R + Sync,
) -> Result<(Tensor, Vec<R>), Error> {
    let held = Held::new(chunk)?;
    let rows = held.view::<T>(groups(chunk)?)?;
    let rows = if squares { rows.squares() } else { rows };
    let mut d = held.d.shallow_clone();
    let n = rows.n;
    let blocks = in_blocks(held.rows(), n, view_mut::<T>(&mut d)?, n, |range, d| {
        simd::run(
            #[inline(always)]
            || block(&rows, range, d),
        )
    });
    Ok((d, blocks))
}

fn batch_all_typed<T: Real>(chunk: &Chunk, margin: f64) -> Result<Weighted, Error> {
    let distance = chunk.distance;
    let largest = groups(chunk)?.0.largest();
    let (weights, blocks) = mine_rows::<T, _>(
        chunk,
        false,
        #[inline(always)]
        |rows, range, d| {
            let mut s = Scratch::with_room(largest)?;
            let mut totals = Totals::default();
            let mut sums = alloc::with_capacity(range.len())?;
            let mut col_sum = alloc::filled(rows.n, T::REAL_ZERO)?;
            let (mut near, mut row_near) = (NearPairs::default(), Vec::new());
            // Plain loops: an iterator adapter's closure would be compiled
            // apart, without the vector instructions.
            for (r, d) in range.zip(d.chunks_exact_mut(rows.n.max(1))) {
                let row = rows.row(r, d);
                let loss = (margin, distance);
                let out = batch_all_row(row, &mut s, loss, &mut col_sum, &mut row_near)?;
                totals = totals.add(out.totals);
                sums.push(T::put(out.weight_sum));
                for (j, w) in row_near.drain(..) {
                    near.push(r, j, w)?;
                }
            }
            Ok::<_, Error>((totals, sums, col_sum, near))
        },
    )?;
    let n = weights.size()[1] as usize;
    let mut totals = Totals::default();
    let mut row_sum = alloc::with_capacity(weights.size()[0] as usize)?;
    let mut col_sum = alloc::filled(n, T::REAL_ZERO)?;
    let mut near = NearPairs::default();
    for block in blocks {
        let (t, sums, cols, block_near) = block?;
        totals = totals.add(t);
        row_sum.extend(sums);
        for (c, v) in col_sum.iter_mut().zip(cols) {
            *c = *c + v;
        }
        near.append(block_near)?;
    }
    Ok(Weighted {
        value: scalar(totals.value, Kind::Double)?,
        count: scalar(totals.count, Kind::Int64)?,
        valid: scalar(totals.valid, Kind::Int64)?,
        selection: Selection::PairWeights {
            weights,
            row_sum: Tensor::f_from_slice(&row_sum)?,
            col_sum: Tensor::f_from_slice(&col_sum)?,
            near,
        },
    })
}

fn semihard_typed<T: Real>(chunk: &Chunk, margin: f64) -> Result<Weighted, Error> {
    let largest = groups(chunk)?.0.largest();
    let (_, blocks) = mine_rows::<T, _>(
        chunk,
        false,
        #[inline(always)]
        |rows, range, d| {
            let mut s = Scratch::with_room(largest)?;
            let mut totals = Totals::default();
            let mut triplets = Vec::new();
            let mut picks = alloc::with_capacity(largest)?;
            for (r, d) in range.zip(d.chunks_exact_mut(rows.n.max(1))) {
                picks.clear();
                totals = totals.add(semihard_row(rows.row(r, d), &mut s, margin, &mut picks));
                alloc::extend(&mut triplets, picks.iter().map(|&(p, q)| (r as i64, p, q)))?;
            }
            Ok::<_, Error>((totals, triplets))
        },
    )?;
    let blocks = blocks.into_iter().collect::<Result<Vec<_>, Error>>()?;
    let selected = blocks.iter().map(|(_, triplets)| triplets.len()).sum();
    let mut totals = Totals::default();
    let (mut anchor, mut positive, mut negative) = (
        alloc::with_capacity(selected)?,
        alloc::with_capacity(selected)?,
        alloc::with_capacity(selected)?,
    );
    for (t, triplets) in blocks {
        totals = totals.add(t);
        for (a, p, q) in triplets {
            anchor.push(a);
            positive.push(p);
            negative.push(q);
        }
    }
    Ok(Weighted {
        value: scalar(totals.value, Kind::Double)?,
        count: scalar(totals.count, Kind::Int64)?,
        valid: scalar(totals.valid, Kind::Int64)?,
        selection: Selection::Triplets {
            anchor,
            positive,
            negative,
        },
    })
}

fn hardest_typed<T: Real>(chunk: &Chunk) -> Result<Hardest, Error> {
    let (_, blocks) = mine_rows::<T, _>(
        chunk,
        true,
        #[inline(always)]
        |rows, range, d| {
            let mut picks = alloc::with_capacity(range.len())?;
            for (r, d) in range.zip(d.chunks_exact_mut(rows.n.max(1))) {
                picks.push(hardest_row(rows.row(r, d)));
            }
            Ok::<_, Error>(picks)
        },
    )?;
    let blocks = blocks.into_iter().collect::<Result<Vec<_>, Error>>()?;
    let rows = blocks.iter().map(Vec::len).sum();
    let (mut positive, mut negative, mut valid) = (
        alloc::with_capacity(rows)?,
        alloc::with_capacity(rows)?,
        alloc::with_capacity(rows)?,
    );
    for pick in blocks.into_iter().flatten() {
        positive.push(pick.map_or(0, |p: (i64, i64)| p.0));
        negative.push(pick.map_or(0, |p| p.1));
        valid.push(pick.is_some());
    }
    Ok(Hardest {
        positive: Tensor::f_from_slice(&positive)?,
        negative: Tensor::f_from_slice(&negative)?,
        valid: Tensor::f_from_slice(&valid)?,
    })
}

/// Adds to `gx` and, when given, `gy` the gradient of Σ (d_ap − d_an) over the triplets
/// with respect to the points `x` (the anchors, rows `anchor`, ascending)
/// and `y` (the references, rows `positive` and `negative`): for the
/// Euclidean distance ±(x − y)/d (0 at d = 0), for the squared one ±2(x − y),
/// and for the cosine distance of normalised points ∓y and ∓x, which
/// [`crate::distance::Side::finish_grad`] maps back. O(triplets × D), where
/// autograd over gathered rows would copy every triplet's three rows.
///
/// Two parallel passes: over blocks of anchors, which own their rows of
/// `gx`, then over blocks of references, which own their rows of `gy`, each
/// pair found through a counting sort by reference.
///
/// # Errors
/// `Error::Torch` when a tensor is not a float32 or float64 CPU tensor of
/// the dtype of `x`, the anchors are not ascending, or an index is out of
/// range.
pub(crate) fn add_triplet_grad(
    distance: Distance,
    points: (&Tensor, &Tensor),
    (anchor, positive, negative): (&[i64], &[i64], &[i64]),
    gx: &mut Tensor,
    gy: Option<&mut Tensor>,
) -> Result<(), Error> {
    if positive.len() != anchor.len() || negative.len() != anchor.len() {
        return Err(Error::Torch("internal error: triplets out of range".into()));
    }
    let triplets = Triplets {
        anchor,
        positive,
        negative,
    };
    add_grad(distance, points, &triplets, gx, gy)
}

/// Adds the gradient of Σ w·d over the `near` pairs, from their exact
/// distances, with respect to the anchors' points `x` and the references'
/// points `y` to `gx` and, when given, `gy`, as [`add_triplet_grad`].
///
/// # Errors
/// As [`add_triplet_grad`].
pub(crate) fn add_pair_grad(
    distance: Distance,
    points: (&Tensor, &Tensor),
    near: &NearPairs,
    gx: &mut Tensor,
    gy: Option<&mut Tensor>,
) -> Result<(), Error> {
    if near.reference.len() != near.anchor.len() || near.weight.len() != near.anchor.len() {
        return Err(Error::Torch("internal error: pairs out of range".into()));
    }
    add_grad(distance, points, near, gx, gy)
}

/// Adds the gradient of Σ w·d over `pairs` to `gx` and `gy` ([`add_triplet_grad`]).
fn add_grad<P: Pairs>(
    distance: Distance,
    (x, y): (&Tensor, &Tensor),
    pairs: &P,
    gx: &mut Tensor,
    gy: Option<&mut Tensor>,
) -> Result<(), Error> {
    let (x, y) = (x.f_contiguous()?, y.f_contiguous()?);
    let width = x.size().get(1).copied().unwrap_or(0).max(0) as usize;
    let rows = |t: &Tensor| t.size()[0];
    let in_range = |v: &[i64], n: i64| v.iter().all(|&i| (0..n).contains(&i));
    let (anchors, references) = pairs.indices();
    if x.dim() != 2
        || y.dim() != 2
        || !in_range(anchors, rows(&x))
        || references.iter().any(|r| !in_range(r, rows(&y)))
        || anchors.windows(2).any(|w| w[0] > w[1])
        || gx.size() != x.size()
        || gy.as_ref().is_some_and(|gy| {
            gy.dim() != 2 || gy.size()[0] > rows(&y) || gy.size()[1] != y.size()[1]
        })
    {
        return Err(Error::Torch("internal error: pairs out of range".into()));
    }
    let shape = Shape {
        width,
        anchors: rows(&x) as usize,
        references: gy.as_ref().map_or(0, |gy| gy.size()[0]) as usize,
    };
    match real_kind(x.kind())? {
        NativeReal::F32 => pair_grad::<f32, P>(
            distance,
            (view(&x)?, view(&y)?),
            shape,
            pairs,
            (view_mut(gx)?, gy.map(view_mut).transpose()?),
        ),
        NativeReal::F64 => pair_grad::<f64, P>(
            distance,
            (view(&x)?, view(&y)?),
            shape,
            pairs,
            (view_mut(gx)?, gy.map(view_mut).transpose()?),
        ),
    }
}

/// Pairs of an anchor and a reference with the weight of their distance,
/// as row indices, ascending by anchor.
trait Pairs: Sync {
    /// The number of pairs.
    fn len(&self) -> usize;
    /// Pair k: (anchor, reference, weight).
    fn pair<T: Real>(&self, k: usize) -> (usize, usize, T);
    /// The first pair whose anchor is at least `a`.
    fn first_of(&self, a: usize) -> usize;
    /// The anchors and the lists of references, for checking them.
    fn indices(&self) -> (&[i64], Vec<&[i64]>);
}

/// Triplets as row indices, ascending by anchor: two pairs each, (anchor,
/// positive) with weight 1 and (anchor, negative) with weight −1.
struct Triplets<'a> {
    anchor: &'a [i64],
    positive: &'a [i64],
    negative: &'a [i64],
}

impl Pairs for Triplets<'_> {
    fn len(&self) -> usize {
        2 * self.anchor.len()
    }

    fn pair<T: Real>(&self, k: usize) -> (usize, usize, T) {
        let t = k / 2;
        if k.is_multiple_of(2) {
            (
                self.anchor[t] as usize,
                self.positive[t] as usize,
                T::REAL_ONE,
            )
        } else {
            (
                self.anchor[t] as usize,
                self.negative[t] as usize,
                -T::REAL_ONE,
            )
        }
    }

    fn first_of(&self, a: usize) -> usize {
        2 * self.anchor.partition_point(|&i| (i as usize) < a)
    }

    fn indices(&self) -> (&[i64], Vec<&[i64]>) {
        (self.anchor, vec![self.positive, self.negative])
    }
}

impl Pairs for NearPairs {
    fn len(&self) -> usize {
        self.anchor.len()
    }

    fn pair<T: Real>(&self, k: usize) -> (usize, usize, T) {
        (
            self.anchor[k] as usize,
            self.reference[k] as usize,
            T::put(self.weight[k]),
        )
    }

    fn first_of(&self, a: usize) -> usize {
        self.anchor.partition_point(|&i| (i as usize) < a)
    }

    fn indices(&self) -> (&[i64], Vec<&[i64]>) {
        (&self.anchor, vec![&self.reference])
    }
}

/// The rows of the points and gradients of [`pair_grad`]: `anchors` rows
/// of `x`, of which all receive a gradient, and of the references the
/// leading `references`, all of `width`.
#[derive(Clone, Copy)]
struct Shape {
    width: usize,
    anchors: usize,
    references: usize,
}

/// Row `i` of a matrix of rows of `width`.
#[inline(always)]
fn row_of<T>(m: &[T], i: usize, width: usize) -> &[T] {
    &m[i * width..(i + 1) * width]
}

/// ‖u − v‖ with [`LANES`] partial sums, so that it vectorises.
#[inline(always)]
fn norm_of_difference<T: Real>(u: &[T], v: &[T]) -> T {
    let mut lanes = [T::REAL_ZERO; LANES];
    let (us, u_rest) = u.as_chunks::<LANES>();
    let (vs, v_rest) = v.as_chunks::<LANES>();
    for (u, v) in us.iter().zip(vs) {
        for l in 0..LANES {
            lanes[l] = lanes[l] + (u[l] - v[l]) * (u[l] - v[l]);
        }
    }
    for (&u, &v) in u_rest.iter().zip(v_rest) {
        lanes[0] = lanes[0] + (u - v) * (u - v);
    }
    lanes.iter().fold(T::REAL_ZERO, |s, &v| s + v).sqrt()
}

fn pair_grad<T: Real, P: Pairs>(
    distance: Distance,
    (x, y): (&[T], &[T]),
    Shape {
        width,
        anchors,
        references,
    }: Shape,
    list: &P,
    (gx, gy): (&mut [T], Option<&mut [T]>),
) -> Result<(), Error> {
    let pairs = list.len();
    // The factor of each pair's term: the gradient of its distance with
    // respect to x is factor × (x − y), or −factor × y for the cosine one.
    let factor = |a: usize, j: usize, w: T| -> T {
        match distance {
            Distance::Squared => T::put(2.0) * w,
            Distance::Cosine => w,
            Distance::Euclidean => {
                let d = norm_of_difference(row_of(x, a, width), row_of(y, j, width));
                if d > T::REAL_ZERO {
                    w / d
                } else {
                    T::REAL_ZERO
                }
            }
        }
    };
    // Pass 1: anchors. Each block of anchors owns its rows of gx and
    // returns the factors of its pairs, which are consecutive.
    let work = width * (pairs / anchors.max(1) + 1);
    let blocks = in_blocks(anchors, work, gx, width, |range, gx| {
        simd::run(
            #[inline(always)]
            || {
                let first = list.first_of(range.start);
                let last = list.first_of(range.end);
                let mut factors = alloc::with_capacity(last - first)?;
                for k in first..last {
                    let (a, j, w) = list.pair::<T>(k);
                    let f = factor(a, j, w);
                    factors.push(f);
                    let (xa, yj) = (row_of(x, a, width), row_of(y, j, width));
                    let ga = &mut gx[(a - range.start) * width..(a - range.start + 1) * width];
                    if distance == Distance::Cosine {
                        for (g, &v) in ga.iter_mut().zip(yj) {
                            *g = *g - f * v;
                        }
                    } else {
                        for ((g, &u), &v) in ga.iter_mut().zip(xa).zip(yj) {
                            *g = *g + f * (u - v);
                        }
                    }
                }
                Ok::<_, Error>(factors)
            },
        )
    });
    let mut factors = alloc::with_capacity(pairs)?;
    for block in blocks {
        factors.extend(block?);
    }
    // Pass 2: references, through the pairs sorted by reference.
    let Some(gy) = gy else {
        return Ok(());
    };
    let mut start = alloc::filled(references + 1, 0usize)?;
    for k in 0..pairs {
        let j = list.pair::<T>(k).1;
        if j < references {
            start[j + 1] += 1;
        }
    }
    for j in 0..references {
        start[j + 1] += start[j];
    }
    let mut next = alloc::with_capacity(start.len())?;
    next.extend_from_slice(&start);
    let mut order = alloc::filled(start[references], 0usize)?;
    for k in 0..pairs {
        let j = list.pair::<T>(k).1;
        if j < references {
            order[next[j]] = k;
            next[j] += 1;
        }
    }
    in_blocks(references, work, gy, width, |range, gy| {
        simd::run(
            #[inline(always)]
            || {
                for j in range.clone() {
                    let yj = row_of(y, j, width);
                    let gj = &mut gy[(j - range.start) * width..(j - range.start + 1) * width];
                    for &k in &order[start[j]..start[j + 1]] {
                        let (a, _, _) = list.pair::<T>(k);
                        let (f, xa) = (factors[k], row_of(x, a, width));
                        if distance == Distance::Cosine {
                            for (g, &u) in gj.iter_mut().zip(xa) {
                                *g = *g - f * u;
                            }
                        } else {
                            for ((g, &u), &v) in gj.iter_mut().zip(xa).zip(yj) {
                                *g = *g - f * (u - v);
                            }
                        }
                    }
                }
            },
        )
    });
    Ok(())
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

pub(crate) fn hardest(chunk: &Chunk) -> Result<Hardest, Error> {
    match real_kind(chunk.d.kind())? {
        NativeReal::F32 => hardest_typed::<f32>(chunk),
        NativeReal::F64 => hardest_typed::<f64>(chunk),
    }
}

/// Runs code compiled for the widest vector instructions the CPU has.
pub(super) mod simd {
    /// Tests lower this to run the narrower paths on a CPU that has wider
    /// ones: 2 allows AVX-512, 1 AVX2, 0 the baseline.
    #[cfg(test)]
    pub(in crate::mining) static CEILING: std::sync::atomic::AtomicU8 =
        std::sync::atomic::AtomicU8::new(2);

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn allowed(level: u8) -> bool {
        #[cfg(test)]
        {
            level <= CEILING.load(std::sync::atomic::Ordering::Relaxed)
        }
        #[cfg(not(test))]
        {
            let _ = level;
            true
        }
    }

    /// Calls `f`, inlined into a function compiled for AVX-512 or AVX2 when
    /// the CPU has them: the kernels' loops are written to vectorise, and
    /// the baseline x86-64 target has only 128-bit SSE2. Floating-point
    /// results are the same on every path (no contraction into FMA).
    #[inline(always)]
    pub(in crate::mining) fn run<R>(f: impl FnOnce() -> R) -> R {
        #[cfg(target_arch = "x86_64")]
        {
            if allowed(2)
                && std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512dq")
            {
                // SAFETY: the CPU has the features the function is compiled for.
                return unsafe { avx512(f) };
            }
            if allowed(1) && std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: as above.
                return unsafe { avx2(f) };
            }
        }
        f()
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2")]
    unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
        f()
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
        f()
    }
}

//! Batch-hard over a batch mined against itself, from half its Gram matrix.
//!
//! The distances of a batch to itself are symmetric, so a chunk of anchors
//! `s..e` is multiplied with the samples from `s` on only: half the products
//! of the whole matrix. Its own rows are mined over those columns; its
//! columns from `e` on are mined over its rows, for the later anchors whose
//! references these rows are. Every anchor thus meets every reference once:
//! the references below its chunk first (column passes, in order), then the
//! rest (its row), which keeps the lowest column on ties.
//!
//! Each product x_i·x_j then serves both pairs (i, j) and (j, i), so these
//! distances are symmetric exactly; the whole matrix's need not be, since a
//! gemm may round x_i·x_j and x_j·x_i apart (it does here for small shapes,
//! not for 512-row chunks of 128-wide embeddings). Either way every distance
//! is computed in the order of [`Transform::apply`].

use tch::Tensor;

use super::{
    extremes, first_negative, in_blocks, in_weighted_blocks, real_kind, simd, view, view_mut,
    Extremes, Groups, NativeReal, Positive, Real, Row, Transform, LANES,
};
use crate::mining::Hardest;
use crate::{alloc, Distance, Error, Interrupt};

/// No column chosen yet.
const NONE: usize = usize::MAX;

/// The running extremes of [`LANES`] consecutive anchors, kept lane by lane so
/// that the column pass compares a whole step of anchors at once. A key is
/// what the row kernels compare: the squared distance for the Euclidean one
/// ([`super::Rows::squares`]), the distance otherwise.
#[derive(Clone, Copy)]
struct Lanes<T> {
    pos_key: [T; LANES],
    pos_d: [T; LANES],
    pos_col: [usize; LANES],
    neg_key: [T; LANES],
    neg_d: [T; LANES],
    neg_col: [usize; LANES],
}

impl<T: Real> Lanes<T> {
    fn new() -> Self {
        Lanes {
            pos_key: [-T::INFINITY; LANES],
            pos_d: [-T::INFINITY; LANES],
            pos_col: [NONE; LANES],
            neg_key: [T::INFINITY; LANES],
            neg_d: [T::INFINITY; LANES],
            neg_col: [NONE; LANES],
        }
    }

    /// Offers reference `i` at `key` to the anchor in lane `l`: the first
    /// positive, then a farther one; a nearer negative with a finite
    /// distance. Candidates come in increasing column order, so ties keep
    /// the earlier.
    #[inline(always)]
    fn offer(&mut self, l: usize, i: usize, key: T, positive: bool, squared: bool) {
        let d = if squared { key.sqrt() } else { key };
        if positive {
            if self.pos_col[l] == NONE || d > self.pos_d[l] {
                self.pos_key[l] = key;
                self.pos_d[l] = d;
                self.pos_col[l] = i;
            }
        } else if d < self.neg_d[l] {
            self.neg_key[l] = key;
            self.neg_d[l] = d;
            self.neg_col[l] = i;
        }
    }

    /// Whether the offer in lane `l` could change anything: a positive key
    /// not at most the farthest one's (NaN included, and any before the
    /// first), a negative key below the nearest one's. The square root is
    /// monotone, so nothing else can. `!(key <= farthest)` is true for a
    /// NaN key too, as it must be.
    #[inline(always)]
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    fn may_take(&self, l: usize, key: T, positive: bool) -> bool {
        if positive {
            !(key <= self.pos_key[l])
        } else {
            key < self.neg_key[l]
        }
    }
}

/// The key of anchor j against reference i from their Gram product `v`, in
/// the operations and order of [`Transform::apply`] on anchor j's row.
#[inline(always)]
pub(super) fn key_of<T: Real>(v: T, n_i: T, n_j: T, euclidean: bool) -> T {
    if euclidean {
        let s = (n_i + T::put(-2.0) * v) + n_j;
        if s < T::REAL_ZERO {
            T::REAL_ZERO
        } else {
            s
        }
    } else {
        T::REAL_ONE - v
    }
}

/// The distance from its key (the squared distance for the Euclidean one).
#[inline(always)]
pub(super) fn of_key<T: Real>(key: T, root: bool) -> T {
    if root {
        key.sqrt()
    } else {
        key
    }
}

/// The [`LANES`] values of `v` from `at` on.
#[inline(always)]
pub(super) fn lanes_of<V>(v: &[V], at: usize) -> &[V; LANES] {
    v[at..at + LANES]
        .try_into()
        .expect("a whole group of lanes")
}

/// `t` with zeros appended along its first dimension up to `rows`,
/// contiguous.
fn pad_rows(t: &Tensor, rows: usize) -> Result<Tensor, Error> {
    let mut shape = t.size();
    shape[0] = rows as i64 - shape[0];
    let zeros = Tensor::f_zeros(shape, (t.kind(), t.device()))?;
    Ok(Tensor::f_cat(&[t, &zeros], 0)?.f_contiguous()?)
}

/// A batch mined against itself by the half-matrix batch-all and semi-hard,
/// padded to whole groups of [`LANES`] samples (zero points, and a label no
/// sample has, which their passes hide anyway), with one buffer for the
/// products of its chunks of `step` anchors.
pub(super) struct Half<T> {
    /// Padded points and their norms ([`super::Transform`]).
    pub(super) points: Tensor,
    pub(super) norms: Tensor,
    /// Padded labels.
    pub(super) label: Vec<i64>,
    /// The number of samples, without the padding.
    pub(super) n: usize,
    pub(super) padded: usize,
    /// The width of the points.
    pub(super) dim: usize,
    pub(super) positives: Positives<T>,
    step: usize,
    /// Asked before every chunk but the first.
    stop: Option<Interrupt>,
    buffer: Tensor,
}

/// The chunk of anchors `s..s + len` with its products with the samples
/// from `s0` (the first of the group of `s`) on: `width` columns.
pub(super) struct Block {
    pub(super) s: usize,
    pub(super) len: usize,
    pub(super) s0: usize,
    pub(super) width: usize,
    /// `(len, width)`, in the batch's buffer.
    pub(super) products: Tensor,
    /// The anchors' points and the columns' points.
    pub(super) rows: Tensor,
    pub(super) cols: Tensor,
}

impl<T: Real> Half<T> {
    /// The batch of `points` with norms `norms` and labels `labels` indexed
    /// by `groups`, whose positives get the keys `key(d)`.
    ///
    /// # Errors
    /// `Error::Torch` when libtorch fails or the tensors are not contiguous
    /// CPU tensors of `T` (points, norms) and int64 (labels).
    pub(super) fn new(
        (points, norms, labels): (&Tensor, &Tensor, &Tensor),
        groups: &Groups,
        distance: Distance,
        key: impl Fn(f64) -> f64,
        (step, stop): (i64, Option<Interrupt>),
    ) -> Result<Self, Error> {
        let n = points.size()[0].max(0) as usize;
        let dim = points.size()[1].max(0) as usize;
        let padded = n.div_ceil(LANES) * LANES;
        let labels = labels.f_contiguous()?;
        let mut label = alloc::with_capacity(padded)?;
        label.extend_from_slice(view::<i64>(&labels)?);
        label.resize(padded, i64::MIN);
        let step = step.clamp(1, (n as i64).max(1));
        let points = pad_rows(points, padded)?;
        let norms = pad_rows(norms, padded)?;
        let positives = Positives::new(
            (view::<T>(&points)?, dim),
            view::<T>(&norms)?,
            &label[..n],
            groups,
            distance,
            key,
        )?;
        let buffer = Tensor::f_empty([step * padded as i64], (points.kind(), points.device()))?;
        Ok(Half {
            points,
            norms,
            label,
            n,
            padded,
            dim,
            positives,
            step: step as usize,
            stop,
            buffer,
        })
    }

    /// The padded points, row after row, and their norms.
    ///
    /// # Errors
    /// As [`Half::new`].
    pub(super) fn views(&self) -> Result<(&[T], &[T]), Error> {
        Ok((view::<T>(&self.points)?, view::<T>(&self.norms)?))
    }

    /// The chunks, as (first anchor, number of anchors).
    pub(super) fn chunks(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..self.n)
            .step_by(self.step)
            .map(|s| (s, self.step.min(self.n - s)))
    }

    /// The products of the chunk of `len` anchors from `s` on, in the buffer.
    ///
    /// # Errors
    /// [`Error::Interrupted`] when the interrupt asks to stop (not before
    /// the first chunk); `Error::Torch` when libtorch fails.
    pub(super) fn block(&self, s: usize, len: usize) -> Result<Block, Error> {
        if s > 0 {
            Interrupt::check(self.stop)?;
        }
        let s0 = s - s % LANES;
        let width = self.padded - s0;
        let products = self
            .buffer
            .f_narrow(0, 0, (len * width) as i64)?
            .f_view([len as i64, width as i64])?;
        let rows = self.points.f_narrow(0, s as i64, len as i64)?;
        let cols = self.points.f_narrow(0, s0 as i64, width as i64)?;
        let _ = rows.f_mm_out(&products, &cols.f_tr()?)?;
        Ok(Block {
            s,
            len,
            s0,
            width,
            products,
            rows,
            cols,
        })
    }
}

/// What the column passes read of a [`Block`]: its first anchor `s`, its
/// first column `s0` (both absolute), its rows and columns, and the
/// samples' norms and padded labels.
#[derive(Clone, Copy)]
pub(super) struct Frame<'a, T> {
    pub(super) s: usize,
    pub(super) s0: usize,
    pub(super) rows: usize,
    pub(super) width: usize,
    pub(super) norm: &'a [T],
    pub(super) label: &'a [i64],
    pub(super) euclidean: bool,
    /// The distance is the square root of the key ([`of_key`]).
    pub(super) root: bool,
}

impl<'a, T: Real> Frame<'a, T> {
    /// The distance of an anchor with norm `anchor` to a reference with norm
    /// `reference` from their product `v`, in the operations and order of
    /// [`super::Transform::apply`] on the anchor's row.
    #[inline(always)]
    pub(super) fn distance(&self, v: T, anchor: T, reference: T) -> T {
        of_key(key_of(v, reference, anchor, self.euclidean), self.root)
    }

    pub(super) fn new(block: &Block, norm: &'a [T], label: &'a [i64], distance: Distance) -> Self {
        Frame {
            s: block.s,
            s0: block.s0,
            rows: block.len,
            width: block.width,
            norm,
            label,
            euclidean: distance != Distance::Cosine,
            root: distance == Distance::Euclidean,
        }
    }

    /// Runs `pass(first, part)` over the groups of [`LANES`] columns of the
    /// block, whose states are `groups[s0 / LANES..]`, in parts split among
    /// the threads by their work (a group's anchors j against the rows
    /// i < j); `first` is the index of the first group of `part`.
    #[inline(always)]
    pub(super) fn over_columns<G: Send>(
        &self,
        groups: &mut [G],
        pass: impl Fn(usize, &mut [G]) -> Result<(), Error> + Sync,
    ) -> Result<(), Error> {
        let first = self.s0 / LANES;
        let work = |g: usize| {
            (self.s0 + (g + 1) * LANES)
                .saturating_sub(self.s)
                .min(self.rows)
        };
        let here = &mut groups[first..];
        in_weighted_blocks(
            here.len(),
            |g| work(g) * LANES,
            here,
            1,
            |range, part| {
                simd::run(
                    #[inline(always)]
                    || pass(first + range.start, part),
                )
            },
        )
        .into_iter()
        .collect()
    }
}

/// x·y in `T`, summed [`LANES`] products at a time.
#[inline(always)]
fn dot<T: Real>(x: &[T], y: &[T]) -> T {
    let mut lanes = [T::REAL_ZERO; LANES];
    let (xs, x_rest) = x.as_chunks::<LANES>();
    let (ys, y_rest) = y.as_chunks::<LANES>();
    for (a, b) in xs.iter().zip(ys) {
        for l in 0..LANES {
            lanes[l] = lanes[l] + a[l] * b[l];
        }
    }
    let mut sum = T::REAL_ZERO;
    for (&a, &b) in x_rest.iter().zip(y_rest) {
        sum = sum + a * b;
    }
    lanes.iter().fold(sum, |s, &v| s + v)
}

/// Every sample's positives (the other samples of its label), with their
/// distances, sorted by (key, column): what the half-matrix batch-all and
/// semi-hard need of an anchor before they meet its negatives, in passes
/// over its row and over its column. Their products come from a loop of
/// their own, not from the chunks' gemm.
pub(super) struct Positives<T> {
    start: Vec<usize>,
    all: Vec<Positive<T>>,
}

impl<T: Real> Positives<T> {
    /// The positives of the samples with labels `label`, indexed by
    /// `groups`, whose points are the rows of `points` (`(values, width)`)
    /// with norms `norm` as in [`key_of`]. A positive's key is `key(d)`.
    pub(super) fn new(
        (points, width): (&[T], usize),
        norm: &[T],
        label: &[i64],
        groups: &Groups,
        distance: Distance,
        key: impl Fn(f64) -> f64,
    ) -> Result<Self, Error> {
        let (euclidean, root) = (
            distance != Distance::Cosine,
            distance == Distance::Euclidean,
        );
        let row = |i: usize| &points[i * width..(i + 1) * width];
        let mut start = alloc::with_capacity(label.len() + 1)?;
        let pairs = label
            .iter()
            .map(|&l| groups.of(l).len().saturating_sub(1))
            .sum();
        let mut all: Vec<Positive<T>> = alloc::with_capacity(pairs)?;
        for (a, &l) in label.iter().enumerate() {
            start.push(all.len());
            let first = all.len();
            for &p in groups.of(l).iter().filter(|&&p| p != a) {
                let v = dot(row(p), row(a));
                let d = of_key(key_of(v, norm[p], norm[a], euclidean), root);
                all.push(Positive {
                    key: key(d.get()),
                    d,
                    j: p,
                });
            }
            all[first..].sort_unstable_by(|a, b| a.key.total_cmp(&b.key).then(a.j.cmp(&b.j)));
        }
        start.push(all.len());
        Ok(Positives { start, all })
    }

    /// Where the positives of sample `a` are among all of them.
    pub(super) fn range(&self, a: usize) -> std::ops::Range<usize> {
        self.start[a]..self.start[a + 1]
    }

    pub(super) fn of(&self, a: usize) -> &[Positive<T>] {
        &self.all[self.range(a)]
    }

    /// The number of positive pairs.
    pub(super) fn len(&self) -> usize {
        self.all.len()
    }
}

/// The chunk's rows `s..e` as references of the anchors in `blocks` (whole
/// steps of [`LANES`] anchors from `first_anchor`, all at or after `e`);
/// `g` holds the chunk's Gram products with the samples from `s` on.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn column_pass<T: Real>(
    g: &[T],
    (s, e): (usize, usize),
    first_anchor: usize,
    blocks: &mut [Lanes<T>],
    norms: &[T],
    labels: &[i64],
    (euclidean, squared): (bool, bool),
) {
    let width = norms.len() - s;
    for (r, row) in g.chunks_exact(width).take(e - s).enumerate() {
        let i = s + r;
        let (n_i, label) = (norms[i], labels[i]);
        for (b, lanes) in blocks.iter_mut().enumerate() {
            let j0 = first_anchor + b * LANES;
            let (v, n, l) = (
                &row[j0 - s..j0 - s + LANES],
                &norms[j0..j0 + LANES],
                &labels[j0..j0 + LANES],
            );
            let mut any = false;
            for k in 0..LANES {
                let key = key_of(v[k], n_i, n[k], euclidean);
                any |= lanes.may_take(k, key, l[k] == label);
            }
            if any {
                for k in 0..LANES {
                    let key = key_of(v[k], n_i, n[k], euclidean);
                    if lanes.may_take(k, key, l[k] == label) {
                        lanes.offer(k, i, key, l[k] == label, squared);
                    }
                }
            }
        }
    }
}

/// Batch-hard of the samples `points` (their squared norms `norms` for the
/// Euclidean distances; the points normalised for the cosine one) against
/// themselves, with labels `labels` indexed by `groups`, in `chunks` of
/// `step` anchors, `stop` asked between them.
///
/// # Errors
/// [`Error::Interrupted`] when `stop` asks; `Error::Torch` when libtorch
/// fails or the tensors are not float32 or float64 CPU tensors.
pub(crate) fn hardest_within(
    points: &Tensor,
    norms: &Tensor,
    labels: &Tensor,
    groups: &Groups,
    distance: Distance,
    chunks: (i64, Option<Interrupt>),
) -> Result<Hardest, Error> {
    match real_kind(points.kind())? {
        NativeReal::F32 => typed::<f32>(points, norms, labels, groups, distance, chunks),
        NativeReal::F64 => typed::<f64>(points, norms, labels, groups, distance, chunks),
    }
}

fn typed<T: Real>(
    points: &Tensor,
    norms: &Tensor,
    labels: &Tensor,
    groups: &Groups,
    distance: Distance,
    (step, stop): (i64, Option<Interrupt>),
) -> Result<Hardest, Error> {
    let b = points.size()[0];
    let n = b as usize;
    let step = step.clamp(1, b.max(1));
    let norms = norms.f_contiguous()?;
    let labels = labels.f_contiguous()?;
    let (norm, label) = (view::<T>(&norms)?, view::<i64>(&labels)?);
    let euclidean = distance != Distance::Cosine;
    let squared = distance == Distance::Euclidean;
    let mut state = alloc::filled(n.div_ceil(LANES), Lanes::<T>::new())?;
    let scratch = Tensor::f_empty([step * b], (points.kind(), points.device()))?;
    for s in (0..b).step_by(step as usize) {
        if s > 0 {
            Interrupt::check(stop)?;
        }
        let len = step.min(b - s);
        let (su, e) = (s as usize, (s + len) as usize);
        let width = n - su;
        let mut g = scratch
            .f_narrow(0, 0, len * (b - s))?
            .f_view([len, b - s])?;
        let _ = points
            .f_narrow(0, s, len)?
            .f_mm_out(&g, &points.f_narrow(0, s, b - s)?.f_tr()?)?;
        let g_view = view_mut::<T>(&mut g)?;

        // The later anchors: whole steps of lanes in parallel, the partial
        // steps at either end one anchor at a time.
        let first_whole = e.div_ceil(LANES);
        let last_whole = n / LANES;
        let columns = (euclidean, squared);
        if first_whole < last_whole {
            let whole = &mut state[first_whole..last_whole];
            let g_read: &[T] = g_view;
            in_blocks(
                whole.len(),
                len as usize * LANES,
                whole,
                1,
                |range, blocks| {
                    simd::run(
                        #[inline(always)]
                        || {
                            column_pass(
                                g_read,
                                (su, e),
                                (first_whole + range.start) * LANES,
                                blocks,
                                norm,
                                label,
                                columns,
                            )
                        },
                    )
                },
            );
        }
        let (lo, hi) = if first_whole < last_whole {
            (first_whole * LANES, last_whole * LANES)
        } else {
            (n, n)
        };
        let ends = (e..lo).chain(hi.max(e)..n);
        for j in ends {
            let lanes = &mut state[j / LANES];
            for (r, row) in g_view.chunks_exact(width).enumerate() {
                let i = su + r;
                let key = key_of(row[j - su], norm[i], norm[j], euclidean);
                let positive = label[j] == label[i];
                if lanes.may_take(j % LANES, key, positive) {
                    lanes.offer(j % LANES, i, key, positive, squared);
                }
            }
        }

        // The chunk's own rows, over the columns from s on; this overwrites g.
        let transform = if euclidean {
            Transform::Euclidean {
                rows: &norm[su..e],
                cols: &norm[su..],
                sqrt: false,
            }
        } else {
            Transform::Cosine
        };
        type Found<T> = Result<Vec<(usize, Extremes<T>)>, Error>;
        let found: Vec<Found<T>> = in_blocks(len as usize, width, g_view, width, |range, rows| {
            simd::run(
                #[inline(always)]
                || {
                    let mut same = alloc::with_capacity(groups.largest())?;
                    let mut out = alloc::with_capacity(range.len())?;
                    for (r, d) in range.zip(rows.chunks_exact_mut(width)) {
                        transform.apply(r, d);
                        let a = su + r;
                        same.clear();
                        same.extend(
                            groups
                                .of(label[a])
                                .iter()
                                .filter(|&&j| j >= su)
                                .map(|&j| j - su),
                        );
                        let row = Row {
                            d,
                            label: label[a],
                            labels: &label[su..],
                            same: &same,
                            skip: r,
                            squared,
                            near: None,
                        };
                        // The positives below s, from the column passes, come
                        // first (a NaN one among them stays, as in one scan).
                        let lanes = &state[a / LANES];
                        let before = (lanes.pos_col[a % LANES] != NONE)
                            .then_some((lanes.pos_d[a % LANES], NONE));
                        out.push((a, extremes(row, before)));
                    }
                    Ok(out)
                },
            )
        });
        for (a, (pos, neg)) in found
            .into_iter()
            .collect::<Result<Vec<_>, Error>>()?
            .into_iter()
            .flatten()
        {
            let (lanes, l) = (&mut state[a / LANES], a % LANES);
            if let Some((d, j)) = pos.filter(|&(_, j)| j != NONE) {
                lanes.pos_d[l] = d;
                lanes.pos_col[l] = j + su;
            }
            if let Some((d, j)) = neg {
                if d < lanes.neg_d[l] {
                    lanes.neg_d[l] = d;
                    lanes.neg_col[l] = j + su;
                }
            }
        }
    }

    let mut positive = alloc::with_capacity(n)?;
    let mut negative = alloc::with_capacity(n)?;
    let mut valid = alloc::with_capacity(n)?;
    for a in 0..n {
        let (lanes, l) = (&state[a / LANES], a % LANES);
        let has_negative = groups.of(label[a]).len() < n;
        let neg = match lanes.neg_col[l] {
            NONE => first_negative(label, label[a]),
            j => Some(j),
        };
        let ok = has_negative && lanes.pos_col[l] != NONE;
        valid.push(ok);
        positive.push(if ok { lanes.pos_col[l] as i64 } else { 0 });
        negative.push(if ok { neg.unwrap_or(0) as i64 } else { 0 });
    }
    Ok(Hardest {
        positive: Tensor::f_from_slice(&positive)?,
        negative: Tensor::f_from_slice(&negative)?,
        valid: Tensor::f_from_slice(&valid)?,
    })
}

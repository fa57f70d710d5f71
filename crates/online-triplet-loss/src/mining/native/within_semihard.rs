//! Semi-hard over a batch mined against itself, from half its Gram matrix.
//!
//! An anchor's picks, the nearest negative strictly farther than each of
//! its positives and its farthest negative, are running extremes over its
//! negatives, which can come in any split as long as they come in column
//! order (ties keep the lowest column). So, as in [`super::within`], a chunk
//! of anchors `s..e` is multiplied with the samples from `s` on only, and
//! the distance of a pair i < j serves both anchors: i in the pass over its
//! row, which meets the samples after it, and j in the pass over the
//! chunk's columns, which meets j's references i below it, in order. Each
//! anchor takes the column passes' candidates before its row's.
//!
//! The row pass turns the products into distances, in the operations and
//! order of [`super::Transform::apply`] on row i, and the column pass reads
//! them as they are: d_ji is d_ij, where the chunked path computes it on
//! row j (the two may differ in the last bit).
//!
//! Each anchor's positives (at most [`FEW_KEYS`]; batches with larger
//! classes take the chunked path) are computed apart first
//! ([`super::within::Positives`]), since the column passes need their
//! distances before the anchor's own chunk comes.

use tch::{Kind, Tensor};

use super::within::{lanes_of, Frame, Half};
use super::{
    first_negative, in_blocks, real_kind, scalar, semihard_few, simd, view, view_mut, Groups,
    NativeReal, Real, FEW_KEYS, LANES,
};
use crate::mining::{Selection, Weighted};
use crate::{alloc, Distance, Error, Interrupt};

/// No column yet.
const NONE: u32 = u32::MAX;

/// Groups of [`LANES`] columns that the column pass takes at a time over
/// all the rows of a chunk (512 columns).
const TILE: usize = 32;

/// The running picks of [`LANES`] consecutive anchors, lane by lane.
#[derive(Clone, Copy)]
struct Lanes<T> {
    /// The distance of positive q of the anchor in lane l, sorted; +∞ past
    /// the anchor's positives, which nothing is above.
    positive: [[T; LANES]; FEW_KEYS],
    /// The most positives of any of the lanes' anchors.
    width: usize,
    /// The nearest finite distance strictly above positive q's, and its
    /// column: +∞ and [`NONE`] until one comes.
    above: [[T; LANES]; FEW_KEYS],
    above_at: [[u32; LANES]; FEW_KEYS],
    /// The farthest negative and its column: −∞ and [`NONE`] until one comes.
    far: [T; LANES],
    far_at: [u32; LANES],
}

impl<T: Real> Lanes<T> {
    /// Offers the anchors of the lanes their distances `d` to sample `i`
    /// (NaN where it is not a negative); candidates come in increasing
    /// column order, so ties keep the earlier.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)] // lane-parallel arrays, to vectorise
    fn offer(&mut self, d: &[T; LANES], i: u32) {
        // Non-short-circuit operators, so that this test vectorises.
        let mut hit = [false; LANES];
        for l in 0..LANES {
            hit[l] = d[l] > self.far[l];
        }
        for (positive, above) in self.positive.iter().zip(&self.above).take(self.width) {
            for l in 0..LANES {
                hit[l] |= (d[l] > positive[l]) & (d[l] < above[l]);
            }
        }
        if !hit.iter().fold(false, |a, &h| a | h) {
            return;
        }
        for q in 0..self.width {
            for l in 0..LANES {
                if d[l] > self.positive[q][l] && d[l] < self.above[q][l] {
                    self.above[q][l] = d[l];
                    self.above_at[q][l] = i;
                }
            }
        }
        for l in 0..LANES {
            if d[l] > self.far[l] {
                self.far[l] = d[l];
                self.far_at[l] = i;
            }
        }
    }
}

/// Semi-hard of the samples `points` (their squared norms `norms` for the
/// Euclidean distances; normalised points for the cosine one) against
/// themselves, with labels `labels` indexed by `groups`, in `chunks` of
/// `step` anchors, `stop` asked between them: the loss terms and the selected
/// triplets, as [`super::semihard`] gives them over the whole matrix. `None`
/// when a label has more than [`FEW_KEYS`] + 1 samples, or there are 2³² or
/// more, which the chunked path handles.
///
/// # Errors
/// [`Error::Interrupted`] when `stop` asks; `Error::Torch` when libtorch
/// fails or the tensors are not float32 or float64 CPU tensors.
pub(crate) fn semihard_within(
    points: &Tensor,
    norms: &Tensor,
    labels: &Tensor,
    groups: &Groups,
    (distance, margin): (Distance, f64),
    chunks: (i64, Option<Interrupt>),
) -> Result<Option<Weighted>, Error> {
    if groups.largest() > FEW_KEYS + 1 || points.size()[0] >= i64::from(NONE) {
        return Ok(None);
    }
    let loss = (distance, margin);
    Ok(Some(match real_kind(points.kind())? {
        NativeReal::F32 => typed::<f32>(points, norms, labels, groups, loss, chunks)?,
        NativeReal::F64 => typed::<f64>(points, norms, labels, groups, loss, chunks)?,
    }))
}

/// The column pass over one chunk, whose distances are `d` (rows of
/// `frame.width` columns, left by the row pass: NaN but where i < j and the
/// labels differ): each anchor j of the groups `part` (the first being
/// group `first`) is offered its distances to the chunk's samples i < j.
#[inline(always)]
fn column_pass<T: Real>(d: &[T], frame: Frame<T>, first: usize, part: &mut [Lanes<T>]) {
    let rows = d.len() / frame.width.max(1);
    for (tile_at, tile) in (0..).step_by(TILE).zip(part.chunks_mut(TILE)) {
        for r in 0..rows {
            let i = frame.s + r;
            let row = &d[r * frame.width..(r + 1) * frame.width];
            for (t, lanes) in tile.iter_mut().enumerate() {
                let j0 = (first + tile_at + t) * LANES;
                if j0 + LANES <= i + 1 {
                    continue;
                }
                let d: [T; LANES] = *lanes_of(row, j0 - frame.s0);
                lanes.offer(&d, i as u32);
            }
        }
    }
}

/// One anchor's picks from its row: per positive and the farthest, as
/// (distance, column).
type RowPicks<T> = (usize, [Option<(T, usize)>; FEW_KEYS], Option<(T, usize)>);

fn typed<T: Real>(
    points: &Tensor,
    norms: &Tensor,
    labels: &Tensor,
    groups: &Groups,
    (distance, margin): (Distance, f64),
    chunks: (i64, Option<Interrupt>),
) -> Result<Weighted, Error> {
    let half = Half::<T>::new((points, norms, labels), groups, distance, |d| d, chunks)?;
    let (n, padded, label, positives) = (half.n, half.padded, &half.label, &half.positives);
    let (_, norm) = half.views()?;

    let mut state = alloc::with_capacity(padded / LANES)?;
    for g in 0..padded / LANES {
        let mut lanes = Lanes {
            positive: [[T::INFINITY; LANES]; FEW_KEYS],
            width: 0,
            above: [[T::INFINITY; LANES]; FEW_KEYS],
            above_at: [[NONE; LANES]; FEW_KEYS],
            far: [-T::INFINITY; LANES],
            far_at: [NONE; LANES],
        };
        for l in 0..LANES {
            let a = g * LANES + l;
            if a < n {
                for (q, p) in positives.of(a).iter().enumerate() {
                    lanes.positive[q][l] = p.d;
                }
                lanes.width = lanes.width.max(positives.of(a).len());
            }
        }
        state.push(lanes);
    }

    for (s, len) in half.chunks() {
        let block = half.block(s, len)?;
        let frame = Frame::new(&block, norm, label, distance);
        let (s0, width) = (block.s0, block.width);
        let mut g = block.products.shallow_clone();

        // Rows: each anchor i against the samples j > i. Their distances stay
        // in the buffer, NaN but for the pairs i < j of other labels, for
        // the columns; their picks wait for the columns' candidates.
        let data = view_mut::<T>(&mut g)?;
        type Found<T> = Result<Vec<RowPicks<T>>, Error>;
        let found: Vec<Found<T>> = in_blocks(len, width, data, width, |range, data| {
            simd::run(
                #[inline(always)]
                || {
                    let mut out = alloc::with_capacity(range.len())?;
                    for (r, d) in range.zip(data.chunks_exact_mut(width)) {
                        let i = s + r;
                        let n_i = norm[i];
                        for (v, &n_j) in d.iter_mut().zip(&norm[s0..]) {
                            *v = frame.distance(*v, n_i, n_j);
                        }
                        // Only samples i < j < n of other labels.
                        let same = groups.of(label[i]).iter().filter(|&&j| j > i);
                        let hide = (0..=i - s0)
                            .chain(n - s0..width)
                            .chain(same.map(|&j| j - s0));
                        for j in hide {
                            d[j] = T::NAN;
                        }
                        let mut picks = [None; FEW_KEYS];
                        let far = semihard_few(d, positives.of(i), &mut picks);
                        out.push((i, picks, far));
                    }
                    Ok(out)
                },
            )
        });
        // Columns: each anchor j > i against the chunk's samples i, over
        // the distances the rows left; these come before the anchors' own
        // rows, which hold the later columns.
        let distances = view::<T>(&g)?;
        frame.over_columns(
            &mut state,
            #[inline(always)]
            |first, part| {
                column_pass(distances, frame, first, part);
                Ok(())
            },
        )?;
        for (i, picks, far) in found
            .into_iter()
            .collect::<Result<Vec<_>, Error>>()?
            .into_iter()
            .flatten()
        {
            let (lanes, l) = (&mut state[i / LANES], i % LANES);
            for (q, pick) in picks.iter().enumerate().take(lanes.width) {
                if let Some((d, j)) = *pick {
                    if d < lanes.above[q][l] {
                        lanes.above[q][l] = d;
                        lanes.above_at[q][l] = (s0 + j) as u32;
                    }
                }
            }
            if let Some((d, j)) = far {
                if d > lanes.far[l] {
                    lanes.far[l] = d;
                    lanes.far_at[l] = (s0 + j) as u32;
                }
            }
        }
    }

    // Each positive pair's triplet, where its hinge is positive.
    // At most one triplet a positive pair.
    let most = positives.len();
    let (mut anchor, mut positive, mut negative) = (
        alloc::with_capacity(most)?,
        alloc::with_capacity(most)?,
        alloc::with_capacity(most)?,
    );
    let (mut value, mut count) = (0.0f64, 0i64);
    let label = &label[..n];
    for a in 0..n {
        let mine = positives.of(a);
        if mine.is_empty() || groups.of(label[a]).len() == n {
            continue;
        }
        count += mine.len() as i64;
        let (lanes, l) = (&state[a / LANES], a % LANES);
        // Only NaN distances (a loss that is NaN anyway) leave no farthest.
        let far = match lanes.far_at[l] {
            NONE => (f64::NAN, first_negative(label, label[a]).unwrap_or(0)),
            j => (lanes.far[l].get(), j as usize),
        };
        for (q, p) in mine.iter().enumerate() {
            let (d_an, j) = match lanes.above_at[q][l] {
                NONE => far,
                j => (lanes.above[q][l].get(), j as usize),
            };
            let hinge = p.key - d_an + margin;
            if hinge > 0.0 {
                value += hinge;
                anchor.push(a as i64);
                positive.push(p.j as i64);
                negative.push(j as i64);
            }
        }
    }
    Ok(Weighted {
        value: scalar(value, Kind::Double)?,
        count: scalar(count, Kind::Int64)?,
        valid: scalar(count, Kind::Int64)?,
        selection: Selection::Triplets {
            anchor,
            positive,
            negative,
        },
    })
}

//! Distances between embeddings, with their gradients written out by hand so
//! that the weighted sums of the mining never go through autograd over a
//! B×B matrix.

use std::fmt;
use std::str::FromStr;

use tch::{Device, Kind, Tensor};

use crate::error::caught;
use crate::losses::{check_embeddings, check_same_device};
use crate::Error;

/// Norms below this are treated as this when normalising for the cosine
/// distance, as `torch.nn.functional.normalize` does.
pub(crate) const COSINE_EPS: f64 = 1e-12;

/// How near 0, relative to ε (‖x‖² + ‖y‖²), a squared Euclidean distance
/// computed from Gram products may be before its gradient is taken from the
/// exact distance ‖x − y‖ instead: below, the products' rounding, a few
/// ε (‖x‖² + ‖y‖²), is too much of d² for 1/d, the factor of its gradient.
pub(crate) const NEAR: f64 = 16384.0;

/// How many near pairs an anchor of a chunk has, on average, at most, whose
/// gradient the libtorch path takes from their exact distance
/// ([`Side::take_near`]): a fixed budget, which needs no synchronisation,
/// and whose rows of points it gathers whether or not they are near (two a
/// pair, of D values): as many as the chunk's own rows, twice. At least
/// [`NEAR_AT_LEAST`], for small chunks.
const NEAR_PER_ROW: i64 = 2;

/// The least budget of near pairs of a chunk ([`NEAR_PER_ROW`]).
const NEAR_AT_LEAST: i64 = 1024;

/// The distance between two embeddings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Distance {
    /// ‖x − y‖₂.
    #[default]
    Euclidean,
    /// ‖x − y‖₂².
    Squared,
    /// 1 − cos(x, y).
    Cosine,
}

impl Distance {
    /// The distance that 0.0.6's `squared` flag selects.
    #[must_use]
    pub fn from_squared(squared: bool) -> Self {
        if squared {
            Distance::Squared
        } else {
            Distance::Euclidean
        }
    }

    /// The factor that turns the weight w of a distance d into the weight of
    /// its pair in [`Side::accumulate_grad`]: w/d for the Euclidean distance
    /// (0 at d = 0, the subgradient used), 2w for the squared one, w for the
    /// cosine one. [`Side::pair_weights`] is the same for tensors.
    pub(crate) fn pair_weight(self, w: f64, d: f64) -> f64 {
        match self {
            Distance::Euclidean if d > 0.0 => w / d,
            Distance::Euclidean => 0.0,
            Distance::Squared => 2.0 * w,
            Distance::Cosine => w,
        }
    }

    /// The name used by [`FromStr`] and the Python API.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Distance::Euclidean => "euclidean",
            Distance::Squared => "squared",
            Distance::Cosine => "cosine",
        }
    }

    /// Distances between the rows of `x` and the rows of `y`, differentiable
    /// (twice, too), in their dtype (computed in float32 for float16 and
    /// bfloat16). Used where only a few pairs are needed; the gradient is 0
    /// at zero distance.
    ///
    /// # Shapes
    /// `x` and `y`: `(N, D)`; the result: `(N,)`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the shapes differ or are not 2-D, when
    /// the two are on different devices, or when `x` or `y` is not a
    /// floating-point tensor (float16, bfloat16, float32 or float64) of dense
    /// layout on the CPU or a CUDA device;
    /// [`Error::Torch`] when libtorch fails.
    ///
    /// ```
    /// use online_triplet_loss::Distance;
    /// use tch::Tensor;
    ///
    /// let x = Tensor::from_slice(&[0.0f64, 0.0, 1.0, 1.0]).view([2, 2]);
    /// let y = Tensor::from_slice(&[3.0f64, 4.0, 1.0, 1.0]).view([2, 2]);
    /// let d = Distance::Euclidean.paired(&x, &y)?;
    /// assert_eq!(Vec::<f64>::try_from(&d).unwrap(), [5.0, 0.0]);
    /// assert!(Distance::Euclidean.paired(&x, &y.narrow(0, 0, 1)).is_err());
    /// # Ok::<(), online_triplet_loss::Error>(())
    /// ```
    pub fn paired(self, x: &Tensor, y: &Tensor) -> Result<Tensor, Error> {
        caught(|| self.paired_unguarded(x, y, Summation::AsTheyCome))
    }

    /// `x`, `(N, D)`, with rows of the same distances to every row, in
    /// which the rows that [`Side::tie_rows`] finds identical are identical,
    /// so that [`Distance::paired`] gives them equal distances: for the
    /// cosine distance, the rows whose norms in their side, `norms`,
    /// `(N, 1)`, are above the floor (as `tie_rows` tests them) divided by
    /// their largest magnitude in float64, in `x`'s dtype (v and 6v); the
    /// other rows, the other distances, and rows without columns, as given.
    pub(crate) fn canonical(self, x: &Tensor, norms: &Tensor) -> Result<Tensor, Error> {
        if self != Distance::Cosine || x.size().last() == Some(&0) {
            return Ok(x.shallow_clone());
        }
        let unit = norms.f_gt(COSINE_EPS)?;
        let wide = x.f_to_kind(Kind::Double)?;
        Ok(divided_where(&wide, &unit)?.f_to_kind(x.f_kind()?)?)
    }

    /// [`Distance::paired`] for the squared Euclidean and the cosine
    /// distances, each row's terms summed in increasing order: pairs whose
    /// terms are the same numbers in other coordinates (the ties of binary
    /// codes, say) get the same sum, where a vectorised sum rounds
    /// differently by position.
    pub(crate) fn paired_in_order(self, x: &Tensor, y: &Tensor) -> Result<Tensor, Error> {
        caught(|| self.paired_unguarded(x, y, Summation::Sorted))
    }

    /// [`Distance::paired`], whose failures in tch's operations that take a
    /// number panic ([`caught`]).
    fn paired_unguarded(self, x: &Tensor, y: &Tensor, terms: Summation) -> Result<Tensor, Error> {
        check_embeddings("x", x)?;
        check_embeddings("y", y)?;
        if x.dim() != 2 {
            return Err(Error::invalid(
                "x",
                format!("must be 2-D (batch, dim), got shape {:?}", x.size()),
            ));
        }
        if x.size() != y.size() {
            return Err(Error::invalid(
                "y",
                format!(
                    "must have the 2-D shape of x, got {:?} and {:?}",
                    x.size(),
                    y.size()
                ),
            ));
        }
        check_same_device("y", y, "x", x)?;
        // float16 and bfloat16 are computed in float32, as in the losses (a
        // zero row's cosine floor, 1e-12, is 0 in float16), and returned in
        // their dtype when both sides have it.
        let narrow = |t: &Tensor| matches!(t.kind(), Kind::Half | Kind::BFloat16);
        if narrow(x) || narrow(y) {
            let wide = |t: &Tensor| match narrow(t) {
                true => t.f_to_kind(Kind::Float),
                false => Ok(t.shallow_clone()),
            };
            let d = self.paired_unguarded(&wide(x)?, &wide(y)?, terms)?;
            return Ok(match x.kind() == y.kind() {
                true => d.f_to_kind(x.kind())?,
                false => d,
            });
        }
        Ok(match self {
            Distance::Squared => terms.sum(&x.f_sub(y)?.f_square()?)?,
            Distance::Euclidean => row_norms(&x.f_sub(y)?)?.f_squeeze_dim(-1)?,
            Distance::Cosine => {
                let ((xn, x_norms), (yn, y_norms)) = (unit_rows(x)?, unit_rows(y)?);
                let (xn, yn) = (&xn, &yn);
                // Between unit rows ½‖x̂ − ŷ‖², which keeps the digits of
                // close pairs: 1 − x̂·ŷ subtracts a dot product of about 1,
                // rounded to half an ulp of 1 (6e-8 in float32), from 1.
                // Rows shorter than the floor have a shorter x̂ (0 for zero
                // rows, at 1 from every row), where only 1 − x̂·ŷ is the
                // cosine distance.
                let half_square = terms.sum(&xn.f_sub(yn)?.f_square()?)?.f_mul_scalar(0.5)?;
                let one_minus_dot = terms.sum(&xn.f_mul(yn)?)?.f_neg()?.f_add_scalar(1.0)?;
                let unit = x_norms
                    .f_gt(COSINE_EPS)?
                    .f_logical_and(&y_norms.f_gt(COSINE_EPS)?)?
                    .f_squeeze_dim(-1)?;
                half_square.f_where_self(&unit, &one_minus_dot)?
            }
        })
    }
}

/// How [`Distance::paired`] sums each row's terms.
#[derive(Clone, Copy)]
enum Summation {
    AsTheyCome,
    Sorted,
}

impl Summation {
    fn sum(self, terms: &Tensor) -> Result<Tensor, Error> {
        let sum = |t: &Tensor| t.f_sum_dim_intlist(-1, false, None::<Kind>);
        Ok(match self {
            Summation::AsTheyCome => sum(terms)?,
            Summation::Sorted => sum(&terms.f_sort(-1, false)?.0)?,
        })
    }
}

impl fmt::Display for Distance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Distance {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "euclidean" => Ok(Distance::Euclidean),
            "squared" => Ok(Distance::Squared),
            "cosine" => Ok(Distance::Cosine),
            other => Err(Error::invalid(
                "distance",
                format!("expected 'euclidean', 'squared' or 'cosine', got {other:?}"),
            )),
        }
    }
}

/// The entries of a block of rows that a pass over a set of CPU embeddings
/// ([`Centre`], [`Side`]) takes at once: temporaries the size of a large
/// reference set would each cost a page fault per page (about 5× the time
/// of a pass over 65536 × 128 rows, measured), while blocks of 2 MiB in
/// float64 are reused from the heap, at a few operations a block.
const ROW_BLOCK_ELEMENTS: i64 = 1 << 18;

/// The same on other devices, where each operation is a launch and the
/// allocator reuses its memory: blocks of 128 MiB in float64, so that the
/// float64 temporaries of a pass over a large memory bank (the centre's
/// widened rows, the cosine tie rows' quotients) stay that size instead of
/// twice the bank's, at a few launches more (four blocks for 65536 × 1024).
const DEVICE_ROW_BLOCK_ELEMENTS: i64 = 1 << 24;

/// `(start, len)` of the blocks of rows of `t`, `(n, width)`: of about
/// [`ROW_BLOCK_ELEMENTS`] entries each on the CPU and
/// [`DEVICE_ROW_BLOCK_ELEMENTS`] elsewhere (at least one row each).
fn row_blocks(t: &Tensor) -> impl Iterator<Item = (i64, i64)> {
    let (n, width) = (t.size()[0], t.size().last().copied().unwrap_or(0));
    let elements = match t.device() {
        Device::Cpu => ROW_BLOCK_ELEMENTS,
        _ => DEVICE_ROW_BLOCK_ELEMENTS,
    };
    let step = (elements / width.max(1)).max(1);
    (0..n)
        .step_by(step as usize)
        .map(move |start| (start, step.min(n - start)))
}

/// The blocks of rows of `parts`, whose rows follow each other: `(part,
/// start, len, row)` for each of every part's [`row_blocks`], `row` the
/// place of the block's first row in all the rows.
fn part_blocks(parts: &[Tensor]) -> impl Iterator<Item = (&Tensor, i64, i64, i64)> {
    parts
        .iter()
        .scan(0, |row, part| {
            let first = *row;
            *row += part.size()[0];
            Some((part, first))
        })
        .flat_map(|(part, first)| {
            row_blocks(part).map(move |(start, len)| (part, start, len, first + start))
        })
}

/// The first of `parts`, and `(n, width)` of them all, whose rows follow
/// each other; an error for no parts (a loss's references are at least one).
fn rows_of(parts: &[Tensor]) -> Result<(&Tensor, (i64, i64)), Error> {
    let first = parts
        .first()
        .ok_or_else(|| Error::invalid("embeddings", "no tensor"))?;
    let n = parts.iter().map(|p| p.size()[0]).sum();
    Ok((first, (n, first.size()[1])))
}

/// `rows`, `(N, D)` with D ≥ 1, with each row that the cosine distance
/// normalises (of a norm above its floor) divided by its largest magnitude,
/// a constant for autograd (the cosine distance, and its gradient, do not
/// change with a row's scale): a quotient rounded once, so that rows that
/// are positive multiples of each other (v and 6v) become one row. In
/// float64, float32 rows of different directions stay apart (their
/// quotients differ by more than float64 rounds); float64 rows closer in
/// direction than its rounding can merge. The other rows as given.
pub(crate) fn divided_by_largest(rows: &Tensor) -> Result<Tensor, Error> {
    let unit = row_norms(&rows.f_detach()?)?.f_gt(COSINE_EPS)?;
    divided_where(rows, &unit)
}

/// `rows` with the rows where `unit`, `(N, 1)`, is set divided by their
/// largest magnitude, a constant for autograd ([`divided_by_largest`]).
fn divided_where(rows: &Tensor, unit: &Tensor) -> Result<Tensor, Error> {
    let largest = largest_magnitudes(&rows.f_detach()?)?;
    Ok(rows.f_div(&largest.f_where_scalarother(unit, 1.0)?)?)
}

/// The largest |x| of every row of `x`, `(N, 1)`, `x` with columns: NaN
/// for a row with a NaN. (Not `aminmax`, which on the CPU took five times
/// as long as `abs` and `amax` over rows of 128.)
fn largest_magnitudes(x: &Tensor) -> Result<Tensor, Error> {
    Ok(x.f_abs()?.f_amax([-1i64].as_slice(), true)?)
}

/// Adds to `gx` (rows `anchor`) and, when given, to `gy` (rows `col` below
/// its length, the leading references') the gradient of Σ w·‖x − y‖ over
/// the pairs (anchor, col, weight) of [`Side::take_near`], whose points
/// (the embeddings themselves, detached) are the rows of `x` and `y`; a
/// pair of equal points gets none. Fixed shapes; the sums go through
/// `index_put_` with accumulation, deterministic under
/// `torch.use_deterministic_algorithms`.
pub(crate) fn add_exact_pair_grad(
    (x, y): (Tensor, &Tensor),
    (anchor, col, weight): (&Tensor, &Tensor, &Tensor),
    gx: &mut Tensor,
    gy: Option<&mut Tensor>,
) -> Result<(), Error> {
    let mut diff = x;
    let _ = diff.f_sub_(y)?;
    let e = row_norms(&diff)?;
    let positive = e.f_gt(0.0)?;
    let factor = weight
        .f_unsqueeze(1)?
        .f_to_kind(diff.f_kind()?)?
        .f_div(&e.f_where_scalarother(&positive, 1.0)?)?
        .f_where_scalarother(&positive, 0.0)?;
    drop(e);
    let mut g = diff.f_mul_(&factor)?;
    let _ = gx.f_index_put_(&[Some(anchor.shallow_clone())], &g, true)?;
    if let Some(gy) = gy {
        let n = gy.size()[0];
        if n > 0 {
            // −g, where the column has a gradient row.
            let sign = col
                .f_lt(n)?
                .f_unsqueeze(1)?
                .f_to_kind(g.f_kind()?)?
                .f_neg()?;
            let _ = g.f_mul_(&sign)?;
            let _ = gy.f_index_put_(&[Some(col.f_clamp_max(n - 1)?)], &g, true)?;
        }
    }
    Ok(())
}

/// ‖x‖ of every row, `(N, 1)`, without the overflow or underflow of a plain
/// sum of squares: rows are scaled by [`row_scales`] first (a constant for
/// autograd, so the gradient is that of the norm). Differentiable twice,
/// with first and second derivatives 0 at a row of zeros (the square root is
/// taken of 1 there), where the norm's own are NaN. Small differences give
/// the Euclidean distance of a pair ([`Distance::paired`]).
pub(crate) fn row_norms(x: &Tensor) -> Result<Tensor, Error> {
    if x.size().last() == Some(&0) {
        // Zeros that stay in the graph, so that a loss of them backpropagates.
        return Ok(x.f_sum_dim_intlist(-1, true, None::<Kind>)?);
    }
    let scale = row_scales(x)?;
    let sq = x
        .f_div(&scale)?
        .f_square()?
        .f_sum_dim_intlist(-1, true, None::<Kind>)?;
    // Not "> 0": a NaN row keeps its NaN norm.
    let nonzero = sq.f_ne(0.0)?;
    Ok(sq
        .f_where_scalarother(&nonzero, 1.0)?
        .f_sqrt()?
        .f_where_scalarother(&nonzero, 0.0)?
        .f_mul(&scale)?)
}

/// The rows of `x` divided by their norms clamped at the cosine floor,
/// `(N, D)`, and those clamped norms, `(N, 1)`; differentiable.
fn unit_rows(x: &Tensor) -> Result<(Tensor, Tensor), Error> {
    let norms = clamped_norms(x)?;
    Ok((x.f_div(&norms)?, norms))
}

/// The norms of the rows of `x` clamped at the cosine floor, `(N, 1)`, that
/// [`unit_rows`] divides by; differentiable.
fn clamped_norms(x: &Tensor) -> Result<Tensor, Error> {
    Ok(row_norms(x)?.f_clamp_min(COSINE_EPS)?)
}

/// The largest magnitude of every row of `x`, `(N, 1)`, detached, raised to
/// the dtype's smallest normal number (a subnormal scale would cost the
/// gradients their digits), or 1 for rows of zeros and rows with an infinite
/// entry (whose norms are then 0 and inf, as unscaled): dividing by a tiny
/// scale would send a second derivative, 0 at zero distance, through inf·0.
/// `x` has columns.
fn row_scales(x: &Tensor) -> Result<Tensor, Error> {
    let smallest_normal = match x.f_kind()? {
        Kind::Double => f64::MIN_POSITIVE,
        Kind::Half => 6.103_515_625e-5,
        _ => f64::from(f32::MIN_POSITIVE),
    };
    let largest = largest_magnitudes(&x.f_detach()?)?;
    let usable = largest
        .f_gt(0.0)?
        .f_logical_and_(&largest.f_lt(f64::INFINITY)?)?;
    Ok(largest
        .f_clamp_min(smallest_normal)?
        .f_where_scalarother(&usable, 1.0)?)
}

/// The point Euclidean distances are taken from, so that ‖x‖² + ‖y‖² − 2x·y
/// does not cancel when the data sit far from the origin: in each column, the
/// mean of a set of embeddings rounded to a multiple of a power of two, the
/// largest at most 1/16 of the column's range (at most 1/8 of its spread, its
/// largest distance from the mean) and at least the ulp of its largest
/// magnitude in the embeddings' dtype. So it is within 1/16 of the spread of
/// the mean, and subtracting it is exact for the embeddings of the set, in
/// float64 and mostly in their dtype: data on a grid (integers, quantised or
/// binary embeddings) stay on a grid as coarse, whose distances, and their
/// ties, come out exact, as without centring. One mean in the embeddings'
/// dtype would leave a residual of about its ulp in an offset every row
/// shares (9e12 for a column of 1e20 in float32), and the Gram products of
/// such points lose every digit of their differences, silently: the mean is
/// taken in float64, in two parts. The centre is a number of the embeddings'
/// dtype (at most their largest magnitude, a multiple of a power of two at
/// least its ulp), unless a column is not finite.
pub(crate) struct Centre {
    /// `(1, D)`, float64.
    point: Tensor,
}

impl Centre {
    /// The centre of `y`, `(N, D)` in parts whose rows follow each other,
    /// taken a block of rows at a time.
    pub(crate) fn of(y: &[Tensor]) -> Result<Centre, Error> {
        let (first, (n, width)) = rows_of(y)?;
        let opts = (Kind::Double, first.device());
        if n == 0 {
            let point = Tensor::f_zeros([1, width], opts)?;
            return Ok(Centre { point });
        }
        let digits = match first.f_kind()? {
            Kind::Half => 11,
            Kind::BFloat16 => 8,
            Kind::Float => 24,
            _ => 53,
        };
        let columns = [0i64];
        // In two parts: the mean of the first block of rows, and the mean of
        // all the rows less it, whose differences are about the spread, not
        // the magnitude (a column of 1e30 would lose a few of its ulps to
        // rounding, 1e14), so that a constant column has its value as mean.
        // Each block is widened into one buffer of the call's own, where it
        // is scaled or shifted in place: no allocation a block (a fresh
        // tensor of a few MB is fresh pages, whose faults can cost more than
        // the sums).
        let rows = part_blocks(y).map(|(_, _, len, _)| len).max().unwrap_or(0);
        let buffer = Tensor::f_empty([rows, width], opts)?;
        let widened = |part: &Tensor, start: i64, len: i64| -> Result<Tensor, Error> {
            let mut block = buffer.f_narrow(0, 0, len)?;
            block.f_copy_(&part.f_narrow(0, start, len)?)?;
            Ok(block)
        };
        // The first block's sum is taken of its rows divided by 2^k, the
        // power of two at least its length, so that it cannot overflow where
        // the rows do not (a column of 1e308): dividing by a power of two
        // and multiplying back are exact (but for subnormal quotients), so
        // the mean is the same number as without the scaling, not one more
        // rounding. Not reached without a block: n > 0, so some part has
        // rows.
        let (part, start, len, _) = part_blocks(y)
            .next()
            .ok_or_else(|| Error::invalid("embeddings", "no rows"))?;
        let scale = 2f64.powi(64 - (len as u64 - 1).leading_zeros() as i32);
        let first = widened(part, start, len)?
            .f_mul_scalar_(1.0 / scale)?
            .f_sum_dim_intlist(columns.as_slice(), true, None::<Kind>)?
            .f_div_scalar(len as f64)?
            .f_mul_scalar(scale)?;
        // The differences' sum overflows only where their squares, and so
        // the distances, would anyway.
        let mut sum = Tensor::f_zeros([1, width], opts)?;
        for (part, start, len, _) in part_blocks(y) {
            let block = widened(part, start, len)?.f_sub_(&first)?;
            let _ =
                sum.f_add_(&block.f_sum_dim_intlist(columns.as_slice(), true, None::<Kind>)?)?;
        }
        let mean = sum.f_div_scalar(n as f64)?.f_add(&first)?;
        // Extremes in y's dtype, then widened: exactly those of the widened.
        // Over the parts that have rows (an empty one has no extremes).
        let extreme = |max: bool| -> Result<Tensor, Error> {
            let mut found: Option<Tensor> = None;
            for part in y.iter().filter(|p| p.size()[0] > 0) {
                let e = match max {
                    true => part.f_amax(columns.as_slice(), true)?,
                    false => part.f_amin(columns.as_slice(), true)?,
                };
                found = Some(match (found, max) {
                    (None, _) => e,
                    (Some(f), true) => f.f_maximum(&e)?,
                    (Some(f), false) => f.f_minimum(&e)?,
                });
            }
            // Not reached: n > 0, so some part has rows.
            let found = found.ok_or_else(|| Error::invalid("embeddings", "no rows"))?;
            Ok(found.f_to_kind(Kind::Double)?)
        };
        let (high, low) = (extreme(true)?, extreme(false)?);
        // v = f·2^e with 0.5 ≤ f < 1 (frexp) and v/f = 2^e exactly. For the
        // range (at most twice the spread), 2^(e − 5) is the largest power
        // of two at most range/16; for the largest magnitude, 2^(e − digits)
        // is its ulp. A constant column's 0/0 is NaN, which `fmax` skips:
        // its step is the ulp.
        let power = |v: &Tensor| -> Result<Tensor, Error> {
            let (fraction, _) = v.f_frexp()?;
            Ok(v.f_div(&fraction)?)
        };
        let range = high.f_sub(&low)?;
        let largest = high.f_maximum(&low.f_neg()?)?;
        let step = power(&range)?
            .f_mul_scalar(2f64.powi(-5))?
            .f_fmax(&power(&largest)?.f_mul_scalar(2f64.powi(-digits))?)?;
        // Multiplying and dividing by a power of two is exact. A column with
        // inf or NaN, or whose step underflows to 0, keeps its mean.
        let rounded = mean.f_div(&step)?.f_round()?.f_mul(&step)?;
        let point = rounded.f_where_self(&rounded.f_isfinite()?, &mean)?;
        Ok(Centre { point })
    }

    /// `x` less the centre, in float64.
    pub(crate) fn subtracted_from(&self, x: &Tensor) -> Result<Tensor, Error> {
        Ok(x.f_to_kind(Kind::Double)?.f_sub(&self.point)?)
    }
}

/// One set of embeddings, detached, with what the distance needs precomputed.
pub(crate) struct Side {
    distance: Distance,
    /// The embeddings less the centre shared by both sides for Euclidean
    /// distances (so that ‖x‖² + ‖y‖² − 2x·y does not cancel when the data
    /// sit far from the origin), normalised for the cosine distance.
    points: Tensor,
    /// Squared norms of `points` for Euclidean distances, clamped norms of
    /// the embeddings for the cosine one.
    norms: Tensor,
}

impl Side {
    /// The anchors' side and the references' side, detached, in one frame:
    /// Euclidean distances are invariant under translation, so both are
    /// centred on the mean reference. `y` is `None` when the references are
    /// the anchors, whose side is then computed once, and otherwise the
    /// references in parts whose rows follow each other, one side of them
    /// all (no concatenation first).
    pub(crate) fn pair(
        distance: Distance,
        x: &Tensor,
        y: Option<&[Tensor]>,
    ) -> Result<(Side, Side), Error> {
        let x = [x.f_detach()?];
        let y = y
            .map(|parts| {
                parts
                    .iter()
                    .map(Tensor::f_detach)
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?;
        let center = match distance {
            Distance::Cosine => None,
            Distance::Euclidean | Distance::Squared => {
                Some(Centre::of(y.as_deref().unwrap_or(&x))?)
            }
        };
        let side = |t: &[Tensor]| match &center {
            Some(center) => Side::centred(distance, t, center),
            None => Side::normalised(t),
        };
        let sx = side(&x)?;
        let sy = match &y {
            Some(y) => side(y)?,
            None => Side {
                distance,
                points: sx.points.shallow_clone(),
                norms: sx.norms.shallow_clone(),
            },
        };
        Ok((sx, sy))
    }

    /// `x` (in parts whose rows follow each other, of one dtype), detached,
    /// less the centre, rounded to x's dtype, with the squared norms of those
    /// points, a block of rows at a time. The centre is a number of x's
    /// dtype ([`Centre`]), so the difference is taken in that dtype, rounded
    /// once, which gives the float64 difference rounded to it: two float32
    /// numbers differ exactly in float64 unless their exponents are more
    /// than 29 apart, and then the smaller is below 2⁻²⁸ of the larger,
    /// whose rounding boundaries are 2⁻²⁴ of it away (half and bfloat16
    /// alike, with more room).
    fn centred(distance: Distance, x: &[Tensor], center: &Centre) -> Result<Side, Error> {
        let (first, (n, width)) = rows_of(x)?;
        let (kind, device) = (first.f_kind()?, first.device());
        let points = Tensor::f_empty([n, width], (kind, device))?;
        let norms = Tensor::f_empty([n], (kind, device))?;
        let point = center.point.f_to_kind(kind)?;
        for (part, start, len, row) in part_blocks(x) {
            let block = points.f_narrow(0, row, len)?;
            let _ = part.f_narrow(0, start, len)?.f_sub_out(&block, &point)?;
            norms
                .f_narrow(0, row, len)?
                .f_copy_(
                    &block
                        .f_square()?
                        .f_sum_dim_intlist(-1, false, None::<Kind>)?,
                )?;
        }
        Ok(Side {
            distance,
            points,
            norms,
        })
    }

    /// [`unit_rows`] of `x` (in parts, as [`Side::centred`]'s), detached, a
    /// block of rows at a time, each quotient written into the points.
    fn normalised(x: &[Tensor]) -> Result<Side, Error> {
        let (first, (n, width)) = rows_of(x)?;
        let opts = (first.f_kind()?, first.device());
        let points = Tensor::f_empty([n, width], opts)?;
        let norms = Tensor::f_empty([n, 1], opts)?;
        for (part, start, len, row) in part_blocks(x) {
            let block = part.f_narrow(0, start, len)?;
            let block_norms = clamped_norms(&block)?;
            let _ = block.f_div_out(&points.f_narrow(0, row, len)?, &block_norms)?;
            norms.f_narrow(0, row, len)?.f_copy_(&block_norms)?;
        }
        Ok(Side {
            distance: Distance::Cosine,
            points,
            norms,
        })
    }

    /// The rows of `raw`, the embeddings this side was made from, that
    /// [`crate::ties::Ties`] compares to find identical embeddings: the raw
    /// rows, not the normalised points, whose rounding depends on the
    /// tensor's layout. For the cosine distance, rows of one direction (v
    /// and 6v) are identical too, at 0 from each other and at equal
    /// distances from every other row, so the rows whose norm on this side
    /// is above the normalisation floor are divided by their largest
    /// magnitude in float64 (as [`divided_by_largest`]); the others, which
    /// are not unit vectors, so that their copies are not at distance 0 (a
    /// zero row is at 1 from everything), become NaN, which equals nothing.
    ///
    /// The rows are one copy this call owns of all the parts of `raw`
    /// (whose rows follow each other), which [`crate::ties::Ties`] reads in
    /// place on the CPU: not the caller's storage, which may be misaligned,
    /// a negated view, or written by another thread. For the cosine distance
    /// a float64 copy, divided in place a block of rows at a time.
    pub(crate) fn tie_rows(&self, raw: &[Tensor]) -> Result<Tensor, Error> {
        let (first, (n, width)) = rows_of(raw)?;
        // −0 and 0 are kept apart here; Ties compares them as equal.
        match self.distance {
            Distance::Euclidean | Distance::Squared => {
                let rows = Tensor::f_empty([n, width], (first.f_kind()?, first.device()))?;
                let mut row = 0;
                for part in raw {
                    let len = part.size()[0];
                    rows.f_narrow(0, row, len)?.f_copy_(&part.f_detach()?)?;
                    row += len;
                }
                Ok(rows)
            }
            Distance::Cosine => {
                let rows = Tensor::f_empty([n, width], (Kind::Double, first.device()))?;
                if width == 0 {
                    return Ok(rows);
                }
                // Not `le`: a NaN norm is no unit vector either.
                let unit = self.norms.f_gt(COSINE_EPS)?;
                // Widened, then divided in place: a quotient of mixed dtypes
                // (`div_out` of the part into the copy) took several times as
                // long on the CPU.
                for (part, start, len, row) in part_blocks(raw) {
                    let mut block = rows.f_narrow(0, row, len)?;
                    block.f_copy_(&part.f_narrow(0, start, len)?.f_detach()?)?;
                    let divisor = largest_magnitudes(&block)?
                        .f_where_scalarother(&unit.f_narrow(0, row, len)?, f64::NAN)?;
                    let _ = block.f_div_(&divisor)?;
                }
                Ok(rows)
            }
        }
    }

    pub(crate) fn rows(&self, start: i64, len: i64) -> Result<Side, Error> {
        Ok(Side {
            distance: self.distance,
            points: self.points.f_narrow(0, start, len)?,
            norms: self.norms.f_narrow(0, start, len)?,
        })
    }

    /// The rows at `index`, `(m,)`.
    pub(crate) fn select(&self, index: &Tensor) -> Result<Side, Error> {
        Ok(Side {
            distance: self.distance,
            points: self.points.f_index_select(0, index)?,
            norms: self.norms.f_index_select(0, index)?,
        })
    }

    /// A 0-d tensor of the points' dtype, NaN when the distances between the
    /// sides cannot be trusted and 0 otherwise: when an embedding is not
    /// finite, or a distance may overflow the dtype (Euclidean distances are
    /// at most 4·max‖x‖², the cosine distance takes norms), or, for Euclidean
    /// distances between two non-empty sides, when the points are so close
    /// together (every entry within the square root of the smallest normal
    /// number, 1.1e-19 in float32, of the first point's, but not all equal)
    /// that the Gram matrix rounds the distances to nothing. `other` is
    /// `None` when the references are the anchors. Non-finite embeddings
    /// reach the norms: through the shared centre and their own points
    /// (Euclidean), or their own norms (cosine), so the norms' maximum,
    /// scaled by the bound and times 0, is NaN exactly then (inf·0 and NaN·0
    /// are NaN).
    pub(crate) fn poison(&self, other: Option<&Side>) -> Result<Tensor, Error> {
        let norms = match other {
            Some(other) => Tensor::f_cat(&[&self.norms, &other.norms], 0)?,
            None => self.norms.shallow_clone(),
        };
        if norms.numel() == 0 {
            return Ok(Tensor::f_zeros([], (norms.f_kind()?, norms.device()))?);
        }
        let bound = match self.distance {
            Distance::Cosine => 1.0,
            Distance::Euclidean | Distance::Squared => 4.0,
        };
        let mut poison = norms.f_max()?.f_mul_scalar(bound)?.f_mul_scalar(0.0)?;
        if self.distance == Distance::Cosine {
            return Ok(poison);
        }
        // Distances exist only between two non-empty sides, and are all 0
        // between points of no entries.
        let empty = |side: &Side| side.points.numel() == 0;
        if empty(self) || other.is_some_and(empty) {
            return Ok(poison);
        }
        // The spread of the points about the first one (identical rows give
        // identical points, so exactly 0 for them, which a rounded centre
        // would not), and the smallest whose square is a normal number (half
        // and bfloat16 come as float32): squares that underflow cannot tell
        // such points from identical ones.
        // The largest |p − first| over a column is that of its largest or
        // its smallest entry (a rounded difference is monotone in p), so the
        // spread takes two reductions, not a temporary of every point (NaN
        // reaches both).
        let first = self.points.f_narrow(0, 0, 1)?;
        let spread = |side: &Side| -> Result<Tensor, Error> {
            let column = [0i64];
            let high = side.points.f_amax(column.as_slice(), true)?;
            let low = side.points.f_amin(column.as_slice(), true)?;
            Ok(high
                .f_sub(&first)?
                .f_abs_()?
                .f_maximum(&low.f_sub(&first)?.f_abs_()?)?
                .f_max()?)
        };
        let spread = match other {
            Some(other) => spread(self)?.f_maximum(&spread(other)?)?,
            None => spread(self)?,
        };
        let tiny = match self.points.f_kind()? {
            Kind::Double => f64::MIN_POSITIVE.sqrt(),
            _ => f64::from(f32::MIN_POSITIVE.sqrt()),
        };
        let underflow = spread.f_gt(0.0)?.f_logical_and_(&spread.f_lt(tiny)?)?;
        Ok(poison.f_masked_fill_(&underflow, f64::NAN)?)
    }

    /// The matrix of distances from every row of `self` to every row of `other`.
    pub(crate) fn pairwise(&self, other: &Side) -> Result<Tensor, Error> {
        match self.distance {
            Distance::Euclidean | Distance::Squared => {
                let mut d = other
                    .norms
                    .f_unsqueeze(0)?
                    .f_addmm(&self.points.f_mul_scalar(-2.0)?, &other.points.f_tr()?)?;
                let _ = d.f_add_(&self.norms.f_unsqueeze(1)?)?;
                let _ = d.f_clamp_min_(0.0)?;
                if self.distance == Distance::Euclidean {
                    let _ = d.f_sqrt_()?;
                }
                Ok(d)
            }
            Distance::Cosine => Ok(Tensor::f_ones(
                [1, 1],
                (self.points.kind(), self.points.device()),
            )?
            .f_addmm(&self.points.f_neg()?, &other.points.f_tr()?)?),
        }
    }

    /// `pair_weight` of every entry, for weights `w` of distances `d`.
    pub(crate) fn pair_weights(&self, w: &Tensor, d: &Tensor) -> Result<Tensor, Error> {
        Ok(match self.distance {
            Distance::Euclidean => {
                let positive = d.f_gt(0.0)?;
                w.f_div(&d.f_where_scalarother(&positive, 1.0)?)?
                    .f_where_scalarother(&positive, 0.0)?
            }
            Distance::Squared => w.f_mul_scalar(2.0)?,
            Distance::Cosine => w.shallow_clone(),
        })
    }

    /// Takes the near pairs out of the pair weights `p` of the Euclidean
    /// distances `d` from this side's rows to `other`'s, of weights `w`
    /// (∂value/∂d), and returns them as (row, column, weight) for
    /// [`add_exact_pair_grad`]: the pairs with a weight whose distance is
    /// near 0 ([`NEAR`]), up to [`NEAR_PER_ROW`] a row on average or
    /// [`NEAR_AT_LEAST`], the first in row-major order (those beyond keep
    /// their pair weight), padded to that budget with weight 0. Fixed shapes
    /// (`nonzero_static`), without synchronising with the device. `None` for
    /// the other distances.
    pub(crate) fn take_near(
        &self,
        other: &Side,
        (w, d): (&Tensor, &Tensor),
        p: &mut Tensor,
    ) -> Result<Option<(Tensor, Tensor, Tensor)>, Error> {
        let (rows, cols) = (d.size()[0], d.size()[1]);
        if self.distance != Distance::Euclidean || rows == 0 || cols == 0 {
            return Ok(None);
        }
        let eps = match d.f_kind()? {
            Kind::Double => f64::EPSILON,
            Kind::Float => f64::from(f32::EPSILON),
            Kind::Half => 2f64.powi(-10),
            Kind::BFloat16 => 2f64.powi(-7),
            kind => {
                return Err(Error::Torch(format!(
                    "internal error: distances of {kind:?}"
                )))
            }
        };
        // d² − c‖x‖² < c‖y‖², one temporary of the chunk's size.
        let scaled = |norms: &Tensor, dim: i64| norms.f_unsqueeze(dim)?.f_mul_scalar(NEAR * eps);
        let mut near = d.f_square()?;
        let _ = near.f_sub_(&scaled(&self.norms, 1)?)?;
        let mut near = near.f_lt_tensor(&scaled(&other.norms, 0)?)?;
        let _ = near.f_logical_and_(&w.f_ne(0.0)?)?;
        let total = rows * cols;
        let found = near
            .f_reshape([total])?
            .f_nonzero_static((rows * NEAR_PER_ROW).max(NEAR_AT_LEAST).min(total), total)?
            .f_squeeze_dim(1)?;
        drop(near);
        // The padding's index, `total`, falls on an entry past the matrix.
        let taken = Tensor::f_zeros([total + 1], (Kind::Bool, d.device()))?
            .f_index_fill_(0, &found, 1)?
            .f_narrow(0, 0, total)?
            .f_reshape([rows, cols])?;
        let _ = p.f_masked_fill_(&taken, 0.0)?;
        let real = found.f_lt(total)?;
        let at = found.f_clamp_max(total - 1)?;
        let weight = w
            .f_reshape([total])?
            .f_index_select(0, &at)?
            .f_where_scalarother(&real, 0.0)?;
        Ok(Some((
            at.f_floor_divide_scalar(cols)?,
            at.f_remainder(cols)?,
            weight,
        )))
    }

    /// Adds to `grad_self` and, when given, to `grad_other` (with its
    /// `col_sum`) the gradients of Σᵢⱼ wᵢⱼ dᵢⱼ with respect to the points of
    /// `self` and `other`, given the pair weights `p` of `w`
    /// ([`Distance::pair_weight`]) and, optionally, their row and column
    /// sums. For Euclidean distances the references' term Σᵢ pᵢⱼ yⱼ is left
    /// to [`Side::finish_columns`]: its weights Σᵢ pᵢⱼ are added to
    /// `col_sum`, so that a chunk updates the references' gradient once, in
    /// place. For the cosine distance these are gradients with respect to the
    /// normalised points; [`Side::finish_grad`] maps them back. Centring does
    /// not change them: Σⱼ pᵢⱼ (xᵢ − yⱼ) is the same in any frame.
    /// `grad_other` may have fewer rows than `other`: it is then the
    /// gradient of the leading ones.
    pub(crate) fn accumulate_grad(
        &self,
        other: &Side,
        p: &Tensor,
        sums: Option<(Tensor, Tensor)>,
        grad_self: &mut Tensor,
        mut grad_other: Option<(&mut Tensor, &mut Tensor)>,
    ) -> Result<(), Error> {
        // −Σᵢ pᵢⱼ xᵢ for the references, −Σⱼ pᵢⱼ yⱼ for the anchors.
        let _ = grad_self.f_sub_(&p.f_mm(&other.points)?)?;
        let leading = |t: &Tensor, rows: i64| match t.size()[1] {
            all if all == rows => Ok(t.shallow_clone()),
            _ => t.f_narrow(1, 0, rows),
        };
        let mut p_other = None;
        if let Some((grad_other, _)) = &mut grad_other {
            let p = leading(p, grad_other.size()[0])?;
            let _ = grad_other.f_addmm_(&p.f_tr()?, &self.points.f_neg()?)?;
            p_other = Some(p);
        }
        if self.distance != Distance::Cosine {
            let (rows, cols) = match sums {
                Some((rows, cols)) => (rows, Some(cols)),
                None => (p.f_sum_dim_intlist(1, false, None::<Kind>)?, None),
            };
            let _ = grad_self.f_add_(&rows.f_unsqueeze(1)?.f_mul(&self.points)?)?;
            if let (Some((_, col_sum)), Some(p)) = (grad_other, p_other) {
                let cols = match cols {
                    Some(cols) => cols.f_narrow(0, 0, col_sum.size()[0])?,
                    None => p.f_sum_dim_intlist(0, false, None::<Kind>)?,
                };
                let _ = col_sum.f_add_(&cols)?;
            }
        }
        Ok(())
    }

    /// The Gram products of the points of `self` and `other`, written into
    /// `out`, `(self rows, other rows)`; with [`Side::norms`] they give the
    /// distances ([`crate::mining::Gram`]).
    pub(crate) fn gram_into(&self, other: &Side, out: &Tensor) -> Result<(), Error> {
        let _ = self.points.f_mm_out(out, &other.points.f_tr()?)?;
        Ok(())
    }

    /// The points: centred embeddings for Euclidean distances, normalised
    /// ones for the cosine distance.
    pub(crate) fn points(&self) -> &Tensor {
        &self.points
    }

    /// The squared norms of the centred points (Euclidean distances),
    /// `(N,)`, or the clamped norms of the embeddings (cosine), `(N, 1)`.
    pub(crate) fn norms(&self) -> &Tensor {
        &self.norms
    }

    /// Adds the references' term Σᵢ pᵢⱼ yⱼ of [`Side::accumulate_grad`] to
    /// `grad`, given the column sums it collected (of its rows, the leading
    /// ones).
    pub(crate) fn finish_columns(&self, col_sum: &Tensor, grad: &mut Tensor) -> Result<(), Error> {
        if self.distance != Distance::Cosine {
            let points = self.points.f_narrow(0, 0, grad.size()[0])?;
            let _ = grad.f_add_(&col_sum.f_unsqueeze(1)?.f_mul(&points)?)?;
        }
        Ok(())
    }

    /// Maps a gradient accumulated by [`Side::accumulate_grad`] (of the
    /// leading rows when it has fewer) to a gradient with respect to the
    /// original embeddings.
    pub(crate) fn finish_grad(&self, grad: Tensor) -> Result<Tensor, Error> {
        match self.distance {
            Distance::Euclidean | Distance::Squared => Ok(grad),
            Distance::Cosine => {
                let rows = grad.size()[0];
                let (points, norms) = (
                    self.points.f_narrow(0, 0, rows)?,
                    self.norms.f_narrow(0, 0, rows)?,
                );
                // x̂ = x / max(‖x‖, ε): the Jacobian is (I − x̂x̂ᵀ)/‖x‖ above ε and I/ε below.
                let radial = grad
                    .f_mul(&points)?
                    .f_sum_dim_intlist(-1, true, None::<Kind>)?;
                let above = norms.f_gt(COSINE_EPS)?;
                let tangent = grad.f_sub(&radial.f_mul(&points)?)?;
                Ok(tangent.f_where_self(&above, &grad)?.f_div(&norms)?)
            }
        }
    }
}

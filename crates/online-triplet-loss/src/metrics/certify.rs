//! Rankings that the rounding of the Gram products does not change.
//!
//! The metrics rank by distances ‖x‖² + ‖y‖² − 2x·y computed in the
//! embeddings' dtype, whose rounding error grows with the squared norms of
//! the points, not with their distance: for classes far tighter than their
//! distance from the centre of the data (groups at ±1000 with spreads of
//! 0.1 in float32, say) it is larger than the distances within a class,
//! and the order of a query's neighbours is noise.
//!
//! Each computed distance d̃ of query q is within
//! E_q = κ·(s_q + max_j s_j) of the distance d of the embeddings, with s the
//! points' squared norms (taken as 1 for the cosine distance, whose points
//! have norm at most 1) and κ = (3D + 16)·u/(1 − (D + 2)·u)², u the unit
//! roundoff, whatever order the matrix product sums in. That is the worst
//! case, from γ_n = nu/(1 − nu), the bound of a sum of n rounded terms
//! (Higham, "Accuracy and Stability of Numerical Algorithms", §3.1):
//! - Euclidean: the squared norms are sums of D squares, within γ_D·s;
//!   `addmm` sums ‖y‖² and the D products −2x_i·y_i, within
//!   γ_{D+1}·(s_y + 2Σ|x_i·y_i|) ≤ γ_{D+1}·(s_x + 2s_y); adding ‖x‖²
//!   rounds once more, by about 2u·(s_x + s_y) at most; the points are the
//!   embeddings less a centre, rounded to the dtype, which moves the
//!   distance by about 4u·(s_x + s_y) at most. In all about
//!   (3D + 8)u·(s_x + s_y).
//! - Cosine: each norm is within about (D/2 + 4)u of the embedding's, so
//!   each normalised coordinate within (D/2 + 5)u and the product of the
//!   points within (D + 10)u of that of the unit vectors; `addmm` sums 1
//!   and the D products, within 2γ_{D+1}. In all about (3D + 12)u, and
//!   s_x + s_y = 2.
//!
//! Gaussian data come nowhere near it: the largest errors measured, over
//! 16M pairs in 64 to 1024 dimensions, were 9u·(s_q + max s). Products
//! dominated by one coordinate far larger than the others round in one
//! direction at every step and come closer: at D = 4096 in float32, one
//! coordinate of 4096 and the rest about 1 ranked a wrong neighbour first,
//! unflagged, under the earlier bound, (16 + 2√D)·u, measured on Gaussian
//! data. The worst case flags more queries of ordinary data, which costs
//! little at the depths of recall@k (a sixth more time at Market-1501's
//! scale); the deep rankings (MAP@R, mAP) soon switch to float64 from the
//! start, whose bound is 2^29 times smaller.
//!
//! Then with τ_q the depth-th smallest d̃, every true neighbour among the
//! `depth` nearest has d̃ ≤ τ_q + 2E_q (one with a larger d̃ has `depth`
//! items closer than itself), and two items whose d̃ differ by 2E_q or more
//! are in the right order (or tied). So what the metrics see of a query's
//! ranking (which of its neighbours share its label) can differ from the
//! true one only when the item after the `depth` nearest is within 2E_q of
//! the last of them, or when two of the nearest that are consecutive in
//! the computed order, one of the query's label and one not, are within
//! 2E_q of each other. Those queries alone are ranked again among the
//! items with d̃ ≤ τ_q + 2E_q, by distances computed from the differences
//! of the float64 embeddings, exact to float64's rounding, each pair's
//! terms summed in increasing order ([`Distance::paired_in_order`]) so that
//! pairs whose terms are the same numbers, the ties of binary codes say,
//! stay tied whatever coordinates hold them (for the cosine distance, rows
//! of small integers are compared as exact fractions instead,
//! [`cosine_of_codes`], and other rows are first divided by their largest
//! magnitude, so that parallel rows become one); or, when they have more
//! candidates than a thirty-second of the items (differences cost tens of
//! times what a matrix product does per entry), first by Gram distances in
//! float64 against every item, with
//! the same test and float64's u, so that each costs what a float64
//! ranking would; once an eighth of the queries have been ranked again,
//! the rest are ranked in float64 from the start. Identical items (for the
//! cosine distance, rows of one direction) stay at 0, ahead of distinct
//! ones, as in the Gram ranking.
//!
//! E_q is 0 where the Gram products are exact: integer, binary or quantised
//! embeddings (points on a grid coarse enough that no product or sum
//! rounds), and identical ones. Their ties are real, and no ranking again
//! could break them.

use std::cell::Cell;

use tch::{Kind, Tensor};

use super::largest_magnitude;
use crate::distance::{divided_by_largest, Distance, Side};
use crate::ties::Ties;
use crate::Error;

/// Entries of the float64 differences taken at a time.
const EXACT_ELEMENTS: i64 = 1 << 22;

/// A float64 side with its E_q.
type Wide = (Side, Tensor);

pub(super) struct Certify {
    /// `Squared` or `Cosine`: the distance that ranks.
    distance: Distance,
    /// The embeddings in float64, scaled by a power of two, `(N, D)`, in the
    /// order of the queries, for the distances from differences.
    rows: Tensor,
    /// For the cosine distance, whether `rows` are [`small_codes`], as given
    /// or once divided by their largest magnitude (then `rows` are the
    /// quotients), whose distances from differences are
    /// [`cosine_of_codes`]; otherwise those it takes are divided by their
    /// largest magnitude ([`divided_by_largest`]).
    codes: bool,
    /// The items' label keys, in the same order.
    keys: Tensor,
    /// With cameras, the items' (label, camera) ids: a query retrieves no
    /// item of its own pair.
    pairs: Option<Tensor>,
    /// E_q of the distances the metrics computed, float64, `(N, 1)`.
    bound: Tensor,
    /// The float64 Gram ranking, for embeddings of a narrower dtype.
    wide: Option<Wide>,
    /// The queries ranked again so far, or ranked by it from the start.
    widened: Cell<i64>,
    /// The items that are ranked, the first ones: the columns of every
    /// distance matrix.
    references: i64,
    /// Whether the queries are among them (each at +inf from itself).
    own: bool,
}

/// E_q for every item of `side`, whose Gram products are taken in `kind`:
/// 0 where those products are exact and give the distances of `rows`
/// (see [`exact_gram`]).
fn bound(
    distance: Distance,
    side: &Side,
    rows: (&Tensor, i32),
    kind: Kind,
) -> Result<Tensor, Error> {
    let points = side.points();
    let (n, width) = (points.size()[0], points.size()[1]);
    let (unit_roundoff, digits) = match kind {
        Kind::Double => (f64::EPSILON / 2.0, 53),
        _ => (f64::from(f32::EPSILON) / 2.0, 24),
    };
    let kappa = match distance != Distance::Cosine && exact_gram(points, rows, digits)? {
        true => 0.0,
        false => {
            let d = width as f64;
            let room = 1.0 - (d + 2.0) * unit_roundoff;
            // Past millions of dimensions the γ bounds fail; distances
            // are in [0, 2(s_x + s_y)] at any rate.
            match room > 0.5 {
                true => (3.0 * d + 16.0) * unit_roundoff / room.powi(2),
                false => 4.0,
            }
        }
    };
    let squared_norms = match distance {
        Distance::Cosine => Tensor::f_ones([n], (Kind::Double, points.device()))?,
        _ => side.norms().f_to_kind(Kind::Double)?,
    };
    Ok(squared_norms
        .f_add(&squared_norms.f_max()?)?
        .f_mul_scalar(kappa)?
        .f_unsqueeze(1)?)
}

/// Entries of the float64 checks of [`exact_gram`] taken at a time.
const CHECK_ELEMENTS: i64 = 1 << 20;

/// Whether every entry of `t` is an integer multiple of one power of two
/// g ≥ A / 2^`bits`, A the largest magnitude: a number of at most `bits`
/// significant bits on a grid common to all.
fn on_grid(t: &Tensor, bits: f64) -> Result<bool, Error> {
    Ok(head_on_grid(t, bits)? && grid_below(t, largest_magnitude(t)?, bits)?.is_some())
}

/// Whether the first entries of `t` are on their own grid of `bits` bits:
/// false when `t` cannot be on a grid of `bits` bits, whose step is at
/// least theirs, before a pass over all of it (embeddings of floats fail
/// here).
fn head_on_grid(t: &Tensor, bits: f64) -> Result<bool, Error> {
    let flat = t.f_reshape([-1])?;
    let head = flat.f_narrow(0, 0, CHECK_ELEMENTS.min(flat.size()[0]))?;
    Ok(grid_below(&head, largest_magnitude(&head)?, bits)?.is_some())
}

/// The grid g of [`on_grid`] for `t` of largest magnitude `largest`, if
/// `t` is on it (1 for zeros).
fn grid_below(t: &Tensor, largest: f64, bits: f64) -> Result<Option<f64>, Error> {
    if largest == 0.0 {
        return Ok(Some(1.0));
    }
    if !largest.is_finite() {
        return Ok(None);
    }
    let grid = 2f64.powi((largest.log2() - bits).ceil() as i32);
    let flat = t.f_reshape([-1])?;
    let count = flat.size()[0];
    let mut first = 0;
    while first < count {
        let m = CHECK_ELEMENTS.min(count - first);
        let units = flat
            .f_narrow(0, first, m)?
            .f_to_kind(Kind::Double)?
            .f_div_scalar(grid)?;
        if !bool::try_from(units.f_eq_tensor(&units.f_round()?)?.f_all()?)? {
            return Ok(None);
        }
        first += m;
    }
    Ok(Some(grid))
}

/// Whether `rows`, float64, are small integers times one power of two g,
/// with squared norms below 2^12·g²: their cosine distances can then be
/// compared exactly ([`cosine_of_codes`]). g is the coarsest grid that
/// holds every entry, of 6 bits at most below the largest magnitude.
fn small_codes(rows: &Tensor) -> Result<bool, Error> {
    if rows.numel() == 0 {
        return Ok(true);
    }
    if !head_on_grid(rows, 6.0)? {
        return Ok(false);
    }
    let largest = largest_magnitude(rows)?;
    for bits in 0..=6 {
        if let Some(grid) = grid_below(rows, largest, f64::from(bits))? {
            let most = f64::try_from(
                rows.f_div_scalar(grid)?
                    .f_square()?
                    .f_sum_dim_intlist(1, false, Kind::Double)?
                    .f_max()?,
            )?;
            return Ok(most < 2f64.powi(12));
        }
    }
    Ok(false)
}

/// The cosine distances of rows `x` and `y` of [`small_codes`] in a form
/// that ranks them as the cosine distance does, computed so that equal
/// cosines give equal values and distinct ones distinct values:
/// (‖x‖²‖y‖² − s·(x·y)²) / (‖x‖²‖y‖²), s the sign of x·y, that is
/// 1 − s·cos², a number of [0, 2] that grows with 1 − cos. In steps of the
/// grid every product and sum is an integer below 2^25, exact in float64,
/// and the division rounds once: equal fractions give one number, and two
/// distinct fractions of denominators below 2^24 differ by at least 2^-48,
/// sixteen ulps or more, and stay apart. 1 for a zero row, as the cosine
/// distance of the metrics has it.
fn cosine_of_codes(x: &Tensor, y: &Tensor) -> Result<Tensor, Error> {
    let sum = |t: &Tensor| t.f_sum_dim_intlist(1, false, Kind::Double);
    let dot = sum(&x.f_mul(y)?)?;
    let norms = sum(&x.f_square()?)?.f_mul(&sum(&y.f_square()?)?)?;
    let signed = dot.f_square()?.f_mul(&dot.f_sign()?)?;
    Ok(norms
        .f_sub(&signed)?
        .f_div(&norms)?
        .f_where_scalarother(&norms.f_gt(0.0)?, 1.0)?)
}

/// Whether the rows of `x`, `(N, D)`, all have one positive norm, exactly:
/// their squared norms sum without rounding in float64 and are equal. Then
/// the cosine distance of two rows, 1 − x·y/‖x‖², ranks them as the squared
/// Euclidean distance 2‖x‖² − 2x·y does, whose Gram products are exact for
/// binary and other integer codes ([`exact_gram`]): ±1 codes of any length,
/// whose normalised points round.
pub(super) fn one_norm(x: &Tensor) -> Result<bool, Error> {
    let (n, width) = (x.size()[0], x.size()[1]);
    if n == 0 || width == 0 {
        return Ok(false);
    }
    // Scaled by a power of two to a largest magnitude of about 1, so that
    // the squares of the grid's steps (2^-27 or more) neither underflow nor
    // overflow: tiny rows would otherwise all have a squared norm of 0.
    let (x, _) = super::scaled_to_one(&x.f_to_kind(Kind::Double)?)?;
    if !on_grid(&x, (53.0 - (width as f64).log2()) / 2.0)? {
        return Ok(false);
    }
    // Zero rows are at 1 from every item, not at 0 from each other.
    let squares = x.f_square()?.f_sum_dim_intlist(1, false, Kind::Double)?;
    let first = squares.f_narrow(0, 0, 1)?;
    Ok(bool::try_from(
        squares
            .f_eq_tensor(&first)?
            .f_all()?
            .f_logical_and(&first.f_gt(0.0)?.f_squeeze()?)?,
    )?)
}

/// Whether the Euclidean distances of `points` computed from their Gram
/// products are exact, and are those of `rows` (the embeddings in float64,
/// scaled by a power of two), the points being `rows` less a centre, times
/// 2^`exponent`:
/// - the points, scaled back, less `rows` is one constant in each column,
///   and that subtraction is exact (its rounding error, found by Knuth's
///   two-sum, is 0): the centring and the rounding to the dtype rounded
///   nothing;
/// - the points are all multiples of a power of two g at least
///   √(4D)·A/2^(digits/2), A the largest magnitude: every product, sum and
///   distance is then a multiple of g² below 2^digits·g², exact in a dtype
///   of `digits` digits.
///
/// So for integer, binary or quantised embeddings, and identical ones
/// (A = 0), whose ties are real and no ranking again can break.
fn exact_gram(
    points: &Tensor,
    (rows, exponent): (&Tensor, i32),
    digits: i32,
) -> Result<bool, Error> {
    let (n, width) = (points.size()[0], points.size()[1]);
    if n == 0 || width == 0 {
        return Ok(true);
    }
    if !on_grid(
        points,
        f64::from(digits / 2) - (4.0 * width as f64).sqrt().log2(),
    )? {
        return Ok(false);
    }
    let step = (CHECK_ELEMENTS / width).max(1);
    let mut shift: Option<Tensor> = None;
    let mut first = 0;
    while first < n {
        let m = step.min(n - first);
        let block = points.f_narrow(0, first, m)?.f_to_kind(Kind::Double)?;
        // Two-sum of a + b, a the point scaled back and b = −row.
        let a = block
            .f_mul_scalar(2f64.powi(-(exponent / 2)))?
            .f_mul_scalar(2f64.powi(-(exponent - exponent / 2)))?;
        let b = rows.f_narrow(0, first, m)?.f_neg()?;
        let sum = a.f_add(&b)?;
        let b_part = sum.f_sub(&a)?;
        let a_part = sum.f_sub(&b_part)?;
        let error = a.f_sub(&a_part)?.f_add(&b.f_sub(&b_part)?)?;
        if !bool::try_from(error.f_eq(0.0)?.f_all()?)? {
            return Ok(false);
        }
        let shift = shift.get_or_insert(sum.f_narrow(0, 0, 1)?);
        if !bool::try_from(sum.f_eq_tensor(shift)?.f_all()?)? {
            return Ok(false);
        }
        first += m;
    }
    Ok(true)
}

impl Certify {
    /// `side` holds the points whose Gram products rank, in `kind`, made
    /// from `frame`, the float64 points before rounding to `kind`: `rows`,
    /// the embeddings in float64 scaled by a power of two, less a centre
    /// (for Euclidean distances), times 2^`exponent`; `keys` are the
    /// labels' keys, `pairs` the (label, camera) ids with cameras, the
    /// first `references` items are ranked, and `own` says whether the
    /// queries are among them.
    pub(super) fn new(
        distance: Distance,
        (rows, frame, exponent): (Tensor, &Tensor, i32),
        (keys, pairs, references, own): (&Tensor, Option<Tensor>, i64, bool),
        side: &Side,
        kind: Kind,
    ) -> Result<Certify, Error> {
        let wide = match kind {
            Kind::Double => None,
            _ => {
                let (wide, _) = Side::pair(distance, frame, None)?;
                let bound = bound(distance, &wide, (&rows, exponent), Kind::Double)?;
                Some((wide, bound))
            }
        };
        let bound = bound(distance, side, (&rows, exponent), kind)?;
        // The cosine distance does not see a row's scale: codes times a
        // factor of their own (normalised multi-hot or ternary codes, codes
        // times 0.1) are codes again once divided by their largest entry.
        let (rows, codes) = match distance {
            Distance::Cosine if small_codes(&rows)? => (rows, true),
            Distance::Cosine => {
                // The first rows first: embeddings of floats fail there,
                // before a float64 copy of them all is made.
                let dims = rows.size()[1].max(1);
                let head = rows.f_narrow(0, 0, rows.size()[0].min(CHECK_ELEMENTS / dims + 1))?;
                match small_codes(&divided_by_largest(&head)?)? {
                    true => {
                        let divided = divided_by_largest(&rows)?;
                        match small_codes(&divided)? {
                            true => (divided, true),
                            false => (rows, false),
                        }
                    }
                    false => (rows, false),
                }
            }
            _ => (rows, false),
        };
        Ok(Certify {
            distance,
            codes,
            keys: keys.shallow_clone(),
            pairs,
            bound,
            rows,
            wide,
            widened: Cell::new(0),
            references,
            own,
        })
    }

    /// [`finish`] of the distances `d` of queries `query` to the references,
    /// with the items of a query's own (label, camera) at +inf.
    pub(super) fn finish(
        &self,
        d: Tensor,
        query: &Tensor,
        ties: Option<&Ties>,
    ) -> Result<Tensor, Error> {
        let mut d = finish(d, query, ties, self.own)?;
        if let Some(pairs) = &self.pairs {
            let excluded = pairs
                .f_index_select(0, query)?
                .f_unsqueeze(1)?
                .f_eq_tensor(&pairs.f_narrow(0, 0, self.references)?.f_unsqueeze(0)?)?;
            let _ = d.f_masked_fill_(&excluded, f64::INFINITY)?;
        }
        Ok(d)
    }

    /// Whether the items `columns`, `(m, c)`, are of the own (label,
    /// camera) of queries `query`, `(m,)`; `None` without cameras.
    fn excluded(&self, query: &Tensor, columns: &Tensor) -> Result<Option<Tensor>, Error> {
        let Some(pairs) = &self.pairs else {
            return Ok(None);
        };
        Ok(Some(
            pairs
                .f_index_select(0, &columns.f_reshape([-1])?)?
                .f_view_as(columns)?
                .f_eq_tensor(&pairs.f_index_select(0, query)?.f_unsqueeze(1)?)?,
        ))
    }

    /// The float64 side to rank the next chunk with from the start, once
    /// more than an eighth of the `done` queries have been ranked again:
    /// for data whose neighbours are often closer together than the
    /// dtype's rounding (MAP@R looking deep into overlapping classes, say),
    /// ranking again would cost more than ranking in float64 alone (on the
    /// CPU, a query ranked again from differences cost about twice what
    /// its float64 ranking does, and that about 1.4 times its float32 one).
    pub(super) fn wide_side(&self, done: i64) -> Option<&Side> {
        match &self.wide {
            Some((side, _)) if done > 0 && 8 * self.widened.get() > done => Some(side),
            _ => None,
        }
    }

    /// The float64 side, for embeddings of a narrower dtype.
    pub(super) fn wide(&self) -> Option<&Side> {
        self.wide.as_ref().map(|(side, _)| side)
    }

    /// Whether each of `nearest`, `(m, depth)`, shares the label of the query
    /// it is a neighbour of, `queries`, `(m,)`, and is neither that query
    /// nor of its camera (each of which only ranks at +inf, after every
    /// item that counts).
    pub(super) fn relevance(&self, nearest: &Tensor, queries: &Tensor) -> Result<Tensor, Error> {
        let relevant = self.same_label(nearest, queries)?;
        match self.excluded(queries, nearest)? {
            Some(excluded) => Ok(relevant.f_logical_and(&excluded.f_logical_not()?)?),
            None => Ok(relevant),
        }
    }

    /// Whether each of the first `n` items shares the label of each of
    /// `queries`, `(m,)`: `(m, n)`.
    fn of_label(&self, queries: &Tensor, n: i64) -> Result<Tensor, Error> {
        Ok(self
            .keys
            .f_narrow(0, 0, n)?
            .f_unsqueeze(0)?
            .f_eq_tensor(&self.keys.f_index_select(0, queries)?.f_unsqueeze(1)?)?)
    }

    fn same_label(&self, nearest: &Tensor, queries: &Tensor) -> Result<Tensor, Error> {
        let queries = queries.f_unsqueeze(1)?;
        Ok(self
            .keys
            .f_index_select(0, &nearest.f_reshape([-1])?)?
            .f_view_as(nearest)?
            .f_eq_tensor(
                &self
                    .keys
                    .f_index_select(0, &queries.f_squeeze_dim(1)?)?
                    .f_unsqueeze(1)?,
            )?
            .f_logical_and(&nearest.f_ne_tensor(&queries)?)?)
    }

    /// The `depth` nearest references of queries `queries`, `(m,)`, whose
    /// distances to them are `d`, `(m, n)`: their distances and the next
    /// one's, in order, `(m, min(depth + 1, n))`, and whether each of the
    /// `depth` shares the query's label ([`Certify::relevance`]), the items
    /// at equal distances ranked as [`pessimistic`] orders them.
    pub(super) fn nearest(
        &self,
        d: &Tensor,
        depth: i64,
        queries: &Tensor,
    ) -> Result<(Tensor, Tensor), Error> {
        let n = d.size()[1];
        let k = (depth + 1).min(n);
        let (values, columns) = d.f_topk(k, 1, false, true)?;
        let relevant = self.relevance(&columns, queries)?;
        // The items at the distance of the last of the k can go on past
        // them; that matters where they reach into the `depth` nearest.
        // Items at +inf count for nothing (a query itself, the items of
        // its camera), so every item at a finite distance that shares the
        // query's label is relevant.
        let last = values.f_narrow(1, k - 1, 1)?;
        let finite = last.f_lt(f64::INFINITY)?;
        let cut = k < n
            && bool::try_from(
                values
                    .f_narrow(1, depth - 1, 1)?
                    .f_eq_tensor(&last)?
                    .f_logical_and_(&finite)?
                    .f_any()?,
            )?;
        let whole = match cut {
            true => {
                let tied = d.f_eq_tensor(&last)?.f_logical_and_(&finite)?;
                let same = self.of_label(queries, n)?;
                let count = |t: &Tensor| t.f_sum_dim_intlist(1, true, Kind::Int64);
                Some((count(&tied)?, count(&tied.f_logical_and(&same)?)?))
            }
            false => None,
        };
        let relevant = pessimistic(&values, &relevant, whole)?.f_narrow(1, 0, depth)?;
        Ok((values, relevant))
    }

    /// The bound of distances `d` of `len` queries, and the float64 side to
    /// rank them again by Gram products, where they are of a narrower dtype.
    /// Distances in float64 for embeddings of a narrower dtype come from the
    /// float64 side already, and count as ranked by it, so that the next
    /// chunks are too.
    fn bounds(&self, d: &Tensor, len: i64) -> Result<(&Tensor, Option<&Wide>), Error> {
        Ok(match (&self.wide, d.f_kind()?) {
            (Some((_, bound)), Kind::Double) => {
                self.widened.set(self.widened.get() + len);
                (bound, None)
            }
            (wide, _) => (&self.bound, wide.as_ref()),
        })
    }

    /// The places in the whole ranking, from 1, of the items that share the
    /// label of queries `queries`, `(m,)`, in order, `(m, most)`, +inf past
    /// each query's own R_q; `d` are their distances to the references, as
    /// [`Certify::finish`] makes them, and `most` is the largest R_q among
    /// them. The places that ordering the whole ranking as
    /// [`Certify::nearest`] does would give, found without ordering it: with
    /// the query's R_q distances to its own label sorted, r_1 ≤ … ≤ r_R, the
    /// j-th of those items is at place j + c_j, c_j the number of items of
    /// other labels at a finite distance at most r_j (ties rank those
    /// first), each counted after one binary search among the R_q: O(n log
    /// R_q) a query rather than a sort's O(n log n). An item of another
    /// label within the rounding bound of one of the query's items is
    /// placed among them by distances from differences (`exact`), it alone
    /// with the query's R_q: where distances tie (binary codes, say), not
    /// the whole ranking.
    pub(super) fn places(
        &self,
        d: &Tensor,
        queries: &Tensor,
        most: i64,
        ties: Option<&Ties>,
    ) -> Result<Tensor, Error> {
        let (m, n) = (d.size()[0], d.size()[1]);
        let device = d.device();
        let (bound, _) = self.bounds(d, m)?;
        let d = d.f_to_kind(Kind::Double)?;
        // The query itself and the items of its camera are at +inf.
        let finite = d.f_lt(f64::INFINITY)?;
        let mut same = self.of_label(queries, n)?;
        let other = same.f_logical_not()?.f_logical_and_(&finite)?;
        let (sorted, matches) = d
            .f_where_scalarother(&same.f_logical_and_(&finite)?, f64::INFINITY)?
            .f_topk(most, 1, false, true)?;
        drop(same);
        // The number of the query's matches strictly closer than each item.
        let mut below = d.f_searchsorted(&sorted, false, false, "left", None::<Tensor>)?;
        // Items of other labels within the slack of the query's matches on
        // either side of them, placed among the matches again by distances
        // from differences.
        let slack = bound.f_index_select(0, queries)?.f_mul_scalar(2.0)?;
        let side = |value: f64| Tensor::f_full([m, 1], value, (Kind::Double, device));
        let edges = Tensor::f_cat(
            &[
                side(f64::NEG_INFINITY)?,
                sorted.shallow_clone(),
                side(f64::INFINITY)?,
            ],
            1,
        )?;
        let mut close = d
            .f_sub(&edges.f_gather(1, &below, false)?)?
            .f_lt_tensor(&slack)?
            .f_logical_or_(
                &edges
                    .f_gather(1, &below.f_add_scalar(1)?, false)?
                    .f_sub(&d)?
                    .f_lt_tensor(&slack)?,
            )?;
        drop((d, edges));
        let _ = close.f_logical_and_(&other)?;
        let rows = close.f_any_dim(1, false)?.f_nonzero()?.f_squeeze_dim(1)?;
        if rows.size()[0] > 0 {
            let close = close.f_index_select(0, &rows)?;
            let queries = queries.f_index_select(0, &rows)?;
            let width = i64::try_from(close.f_sum_dim_intlist(1, false, Kind::Int64)?.f_max()?)?;
            let (_, columns) = close
                .f_to_kind(Kind::Uint8)?
                .f_topk(width, 1, true, false)?;
            let unsure = close.f_gather(1, &columns, false)?;
            let (matching, _) = self
                .exact(&queries, &matches.f_index_select(0, &rows)?, ties)?
                .f_where_scalarother(
                    &sorted.f_index_select(0, &rows)?.f_lt(f64::INFINITY)?,
                    f64::INFINITY,
                )?
                .f_sort(1, false)?;
            let mut counted = below.f_index_select(0, &rows)?;
            let exact = self
                .exact(&queries, &columns, ties)?
                .f_searchsorted(&matching, false, false, "left", None::<Tensor>)?
                .f_where_self(&unsure, &counted.f_gather(1, &columns, false)?)?;
            let _ = counted.f_scatter_(1, &columns, &exact)?;
            let _ = below.f_index_copy_(0, &rows, &counted)?;
        }
        drop(close);
        let count = Tensor::f_zeros([m, most + 1], (Kind::Int64, device))?
            .f_scatter_add_(1, &below, &other.f_to_kind(Kind::Int64)?)?
            .f_cumsum(1, Kind::Int64)?
            .f_narrow(1, 0, most)?;
        Ok(count
            .f_add(&Tensor::f_arange_start(1, most + 1, (Kind::Int64, device))?.f_unsqueeze(0)?)?
            .f_to_kind(Kind::Double)?
            .f_where_scalarother(&sorted.f_lt(f64::INFINITY)?, f64::INFINITY)?)
    }

    /// The chunk of queries `queries`, `(m,)`, has computed distances `d` to
    /// the references (+inf to itself when it is one, and to the items of
    /// its own label and camera, as [`Certify::finish`] makes them);
    /// `values` are its `depth + 1` smallest (or all of them if fewer), in
    /// order, and `relevant` says which of the first `depth` share the
    /// query's label, as [`Certify::nearest`] ranks them. Returns the same
    /// for the rows ranked again where the rounding could have changed
    /// what the metrics see, or `None` when it could not for any query of
    /// the chunk.
    pub(super) fn ranked(
        &self,
        d: &Tensor,
        queries: &Tensor,
        (values, relevant): (&Tensor, &Tensor),
        ties: Option<&Ties>,
    ) -> Result<Option<Tensor>, Error> {
        let len = relevant.size()[0];
        let depth = relevant.size()[1];
        let (bound, wide) = self.bounds(d, len)?;
        let slack = bound.f_index_select(0, queries)?.f_mul_scalar(2.0)?;
        let values = values.f_to_kind(Kind::Double)?;
        let rows = unsure(&values, relevant, &slack)?;
        if rows.size()[0] == 0 {
            return Ok(None);
        }
        if wide.is_some() {
            self.widened.set(self.widened.get() + rows.size()[0]);
        }
        let mut ranked = relevant.f_contiguous()?.f_detach_copy()?;
        let global = queries.f_index_select(0, &rows)?;
        let pick = |t: &Tensor, at: &Tensor| t.f_index_select(0, at);
        let (mut d, mut values, mut slack) =
            (pick(d, &rows)?, pick(&values, &rows)?, pick(&slack, &rows)?);
        let (mut rows, mut global) = (rows, global);
        let n = d.size()[1];
        let mut width = candidates(&d, &values, &slack, depth)?;
        // Differences to many candidates cost more than a float64 Gram
        // ranking (a matrix product, against every item).
        if let Some((wide, bound)) = wide.filter(|_| width * 32 > n) {
            let d_wide = wide
                .select(&global)?
                .pairwise(&wide.rows(0, self.references)?)?;
            d = self.finish(d_wide, &global, ties)?;
            let (near, relevant) = self.nearest(&d, depth, &global)?;
            let _ = ranked.f_index_copy_(0, &rows, &relevant)?;
            slack = pick(bound, &global)?.f_mul_scalar(2.0)?;
            let still = unsure(&near, &relevant, &slack)?;
            if still.size()[0] == 0 {
                return Ok(Some(ranked));
            }
            d = pick(&d, &still)?;
            values = pick(&near, &still)?;
            slack = pick(&slack, &still)?;
            rows = pick(&rows, &still)?;
            global = pick(&global, &still)?;
            width = candidates(&d, &values, &slack, depth)?;
        }
        // Every item at the distance of the `depth`-th nearest is among
        // the candidates (see `candidates`), so the order of ties below
        // needs no item beyond them.
        let (_, candidates) = d.f_topk(width, 1, false, true)?;
        drop(d);
        let count = rows.size()[0];
        let dims = self.rows.size()[1].max(1);
        let step = (EXACT_ELEMENTS / (width * dims)).max(1);
        let mut first = 0;
        while first < count {
            let m = step.min(count - first);
            let columns = candidates.f_narrow(0, first, m)?;
            let queries = global.f_narrow(0, first, m)?;
            let exact = self.exact(&queries, &columns, ties)?;
            let (sorted, order) = exact.f_sort(1, false)?;
            let columns = columns.f_gather(1, &order, false)?;
            let relevant = pessimistic(&sorted, &self.relevance(&columns, &queries)?, None)?
                .f_narrow(1, 0, depth)?;
            let _ = ranked.f_index_copy_(0, &rows.f_narrow(0, first, m)?, &relevant)?;
            first += m;
        }
        Ok(Some(ranked))
    }

    /// The distances from queries `query`, `(m,)`, to items `columns`,
    /// `(m, c)`, from the differences of their float64 embeddings: 0 between
    /// identical items, at least the smallest positive float64 between
    /// distinct ones, +inf from a query to itself and, with cameras, to the
    /// items of its own label and camera.
    fn exact(
        &self,
        query: &Tensor,
        columns: &Tensor,
        ties: Option<&Ties>,
    ) -> Result<Tensor, Error> {
        let (m, c) = (columns.size()[0], columns.size()[1]);
        let dims = self.rows.size()[1];
        // Rows of the cosine distance but codes, each divided by its largest
        // magnitude ([`divided_by_largest`]).
        let pick = |index: &Tensor| -> Result<Tensor, Error> {
            let rows = self.rows.f_index_select(0, index)?;
            match self.distance == Distance::Cosine && !self.codes {
                true => divided_by_largest(&rows),
                false => Ok(rows),
            }
        };
        let from = pick(query)?.f_unsqueeze(1)?;
        // In blocks of columns, so that a row of many candidates stays
        // within the pieces' size too.
        let block = (EXACT_ELEMENTS / (m * dims).max(1)).max(1);
        let mut parts = Vec::new();
        let mut first = 0;
        while first < c {
            let b = block.min(c - first);
            let to = pick(&columns.f_narrow(1, first, b)?.f_reshape([-1])?)?;
            let from = from
                .f_expand([m, b, dims], false)?
                .f_reshape([m * b, dims])?;
            let d = match self.codes {
                true => cosine_of_codes(&from, &to)?,
                false => self.distance.paired_in_order(&from, &to)?,
            };
            parts.push(d.f_view([m, b])?);
            first += b;
        }
        let exact = Tensor::f_cat(&parts, 1)?;
        let identical = match ties {
            Some(ties) => Some(ties.identical_pairs(query, columns)?),
            None => None,
        };
        let mut exact = apart(exact, identical.as_ref())?;
        let own = columns.f_eq_tensor(&query.f_unsqueeze(1)?)?;
        let _ = exact.f_masked_fill_(&own, f64::INFINITY)?;
        if let Some(excluded) = self.excluded(query, columns)? {
            let _ = exact.f_masked_fill_(&excluded, f64::INFINITY)?;
        }
        Ok(exact)
    }
}

/// `relevant`, `(m, k)`, whether each of the k nearest items of m queries,
/// at distances `values` (in order), shares the query's label, with the
/// items of each run of equal distances reordered so that those that do
/// not come first. With that order of ties no score is higher than with
/// any other, so tied rankings (integer, binary or quantised embeddings,
/// copies, a collapsed model) cannot raise a score, and the scores do not
/// depend on the order of the items. `whole`: the number of items at the
/// last of the values of each row, `(m, 1)`, and of those sharing the
/// query's label, where that run goes on past the k (0 and 0 where the
/// last value is +inf). No item at +inf is relevant.
///
/// The relevant items of a run of equal distances that ends before place
/// E, R of them, take places E − R to E − 1: only each row's relevant
/// items are placed (a few among thousands of items for a whole ranking),
/// with a binary search each.
fn pessimistic(
    values: &Tensor,
    relevant: &Tensor,
    whole: Option<(Tensor, Tensor)>,
) -> Result<Tensor, Error> {
    let k = values.size()[1];
    if k < 2 {
        return Ok(relevant.shallow_clone());
    }
    // Only rows with a run of equal finite distances can change.
    let next = values.f_narrow(1, 1, k - 1)?;
    let rows = next
        .f_eq_tensor(&values.f_narrow(1, 0, k - 1)?)?
        .f_logical_and_(&next.f_lt(f64::INFINITY)?)?
        .f_any_dim(1, false)?
        .f_nonzero()?
        .f_squeeze_dim(1)?;
    if rows.size()[0] == 0 {
        return Ok(relevant.shallow_clone());
    }
    let device = values.device();
    let pick = |t: &Tensor| t.f_index_select(0, &rows);
    let sorted = pick(values)?.f_contiguous()?;
    let of_label = pick(relevant)?;
    let m = sorted.size()[0];
    let last = sorted.f_narrow(1, k - 1, 1)?.f_contiguous()?;
    // Column k takes the writes that place nothing.
    let mut placed = Tensor::f_zeros([m, k + 1], (Kind::Bool, device))?;
    let most = i64::try_from(of_label.f_sum_dim_intlist(1, false, Kind::Int64)?.f_max()?)?;
    if most > 0 {
        // Each row's relevant items by place, padded with k: topk of the
        // mask finds them in no order, so their places are sorted.
        let (_, at) = of_label
            .f_to_kind(Kind::Uint8)?
            .f_topk(most, 1, true, false)?;
        let found = of_label.f_gather(1, &at, false)?;
        let (at, _) = at.f_where_scalarother(&found, k)?.f_sort(1, false)?;
        let found = at.f_lt(k)?;
        let w = sorted
            .f_gather(1, &at.f_clamp_max(k - 1)?, false)?
            .f_where_scalarother(&found, f64::INFINITY)?;
        // One past the run of each, and how many of the relevant items
        // at that distance are it or after it.
        let end = w.f_searchsorted(&sorted, false, true, "right", None::<Tensor>)?;
        let from = w
            .f_searchsorted(&w, false, true, "right", None::<Tensor>)?
            .f_sub(&Tensor::f_arange(most, (Kind::Int64, device))?)?;
        let mut counted = found;
        if whole.is_some() {
            let _ = counted.f_logical_and_(&w.f_ne_tensor(&last)?)?;
        }
        let place = end.f_sub(&from)?.f_where_scalarother(&counted, k)?;
        let _ = placed.f_scatter_value_(1, &place, 1)?;
    }
    let mut placed = placed.f_narrow(1, 0, k)?;
    if let Some((count, matching)) = whole {
        // The run at the last value: its relevant items are the last of
        // its count, wherever they were among the k.
        let begin = last.f_searchsorted(&sorted, false, false, "left", None::<Tensor>)?;
        let end = begin.f_add(&pick(&count)?)?;
        let first = end.f_sub(&pick(&matching)?)?;
        let place = Tensor::f_arange(k, (Kind::Int64, device))?.f_unsqueeze(0)?;
        let _ = placed.f_logical_or_(
            &place
                .f_ge_tensor(&first)?
                .f_logical_and_(&place.f_lt_tensor(&end)?)?,
        )?;
    }
    let mut out = relevant.f_contiguous()?.f_detach_copy()?;
    let _ = out.f_index_copy_(0, &rows, &placed)?;
    Ok(out)
}

/// The most items within `slack`, `(m, 1)`, of the `depth`-th nearest in
/// any row of `d`, `(m, n)`, whose nearest are `values` (float64): the
/// candidates for the `depth` nearest. The threshold is raised by a few
/// ulps of the distances' dtype so that rounding it does not lower it.
fn candidates(d: &Tensor, values: &Tensor, slack: &Tensor, depth: i64) -> Result<i64, Error> {
    let threshold = values
        .f_narrow(1, depth - 1, 1)?
        .f_add(slack)?
        .f_mul_scalar(1.0 + f64::powi(2.0, -20))?
        .f_to_kind(d.f_kind()?)?;
    let width = d
        .f_le_tensor(&threshold)?
        .f_sum_dim_intlist(1, false, Kind::Int64)?
        .f_max()?;
    Ok(i64::try_from(width)?.max(depth))
}

/// The rows of `values`, `(m, k)`, the distances of m queries to their
/// nearest items in order (`depth` of them, or one more), whose ranking as
/// the metrics see it (`relevant`, `(m, depth)`) the rounding within
/// `slack`, `(m, 1)`, could have changed.
fn unsure(values: &Tensor, relevant: &Tensor, slack: &Tensor) -> Result<Tensor, Error> {
    let (m, depth) = (relevant.size()[0], relevant.size()[1]);
    // An item beyond the `depth` nearest within the slack of the last.
    let mut unsure = match values.size()[1] > depth {
        true => values
            .f_narrow(1, depth, 1)?
            .f_sub(&values.f_narrow(1, depth - 1, 1)?)?
            .f_lt_tensor(slack)?
            .f_squeeze_dim(1)?,
        false => Tensor::f_zeros([m], (Kind::Bool, values.device()))?,
    };
    // Consecutive neighbours, one of the query's label and one not, within
    // the slack of each other.
    if depth > 1 {
        let next = |t: &Tensor| t.f_narrow(1, 1, depth - 1);
        let previous = |t: &Tensor| t.f_narrow(1, 0, depth - 1);
        let mut close = next(values)?
            .f_sub(&previous(values)?)?
            .f_lt_tensor(slack)?;
        let flips = next(relevant)?.f_ne_tensor(&previous(relevant)?)?;
        let flipped = close.f_logical_and_(&flips)?.f_any_dim(1, false)?;
        let _ = unsure.f_logical_or_(&flipped)?;
    }
    Ok(unsure.f_nonzero()?.f_squeeze_dim(1)?)
}

/// The distances `d` of queries `query`, `(m,)`, to the references, with
/// the ties' rules of the metrics: identical items at 0, distinct ones at
/// least the dtype's smallest positive normal number (a cosine distance can
/// round to 0 or below), and, when the queries are among the references
/// (`own`), a query at +inf from itself.
fn finish(d: Tensor, query: &Tensor, ties: Option<&Ties>, own: bool) -> Result<Tensor, Error> {
    let mut d = match ties {
        Some(ties) => {
            let (d, identical) = ties.applied_to_rows(&d, query)?;
            apart(d, Some(&identical))?
        }
        None => apart(d, None)?,
    };
    if own {
        let _ = d.f_scatter_value_(1, &query.f_unsqueeze(1)?, f64::INFINITY)?;
    }
    Ok(d)
}

/// `d` with the distances of distinct items at or below 0 raised to the
/// smallest positive normal number of its dtype and those of `identical`
/// pairs 0.
fn apart(mut d: Tensor, identical: Option<&Tensor>) -> Result<Tensor, Error> {
    let mut apart = d.f_le(0.0)?;
    if let Some(identical) = identical {
        let _ = apart.f_logical_and_(&identical.f_logical_not()?)?;
    }
    let tiny = match d.f_kind()? {
        Kind::Double => f64::MIN_POSITIVE,
        _ => f64::from(f32::MIN_POSITIVE),
    };
    let _ = d.f_masked_fill_(&apart, tiny)?;
    if let Some(identical) = identical {
        let _ = d.f_masked_fill_(identical, 0.0)?;
    }
    Ok(d)
}

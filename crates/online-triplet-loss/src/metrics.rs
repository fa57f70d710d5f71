//! Retrieval metrics: recall@k, MAP@R (Musgrave et al., "A Metric Learning
//! Reality Check", 2020), the mean average precision over the whole
//! ranking and mINP.
//!
//! Every item is a query against all the *other* items. For a query q, R_q
//! is the number of other items with q's label; queries with R_q = 0 have
//! nothing to retrieve and are skipped by every metric. With a reference set
//! (a gallery, [`RetrievalConfig::scores`]), the items are queries ranked
//! against the references alone, and R_q is the number of references with
//! q's label. With cameras ([`Items::cameras`]), as person
//! re-identification evaluates, a query retrieves no item of its own label
//! from its own camera: those items count neither in R_q nor in the ranking.
//!
//! - **recall@k**: the fraction of queries that have an item of their label
//!   among their k nearest other items. A k above the number of items a
//!   query can retrieve counts all of them.
//! - **MAP@R**: the mean over queries of
//!   AP@R = (1/R) Σ_{i ≤ R} P(i)·rel(i), where rel(i) is 1 when the i-th
//!   nearest other item has the query's label and P(i) is the fraction of
//!   the i nearest with it.
//! - **mAP**, the mean average precision over the whole ranking, as
//!   re-identification benchmarks report it: the same sum over every item
//!   ranked, not only the R nearest.
//! - **mINP**, the mean inverse negative penalty (Ye et al., 2021): the mean
//!   over queries of R_q / rank_q, rank_q the place of q's last relevant
//!   item in its whole ranking.
//!
//! All are exact: every query is ranked against every item it can retrieve,
//! with no approximate search. Distances are computed in the embeddings' dtype
//! (float32 for half precision), from the Gram matrix of the embeddings
//! centred on their mean (Euclidean, taken and subtracted in float64) and
//! scaled by a power of two, or normalised (cosine); where their rounding
//! could change which of a query's neighbours share its label (classes far
//! tighter than their distance from the centre of the data, or than the
//! dtype's digits), that query is ranked again in float64, from the
//! embeddings' differences where Gram products in float64 are not enough
//! either (`certify`). Those have the last word, exact only to float64's
//! rounding: distances closer than about D·2⁻⁵³ relative can tie or swap,
//! and so can cosine distances of rows that are not small integers and
//! differ by less than normalising them rounds (rows of small integers,
//! squared norms below 4096 steps, 0/1 codes of up to 4095 bits say, and
//! rows that are such once divided by their largest entry, normalised
//! multi-hot codes say, are compared exactly as fractions when all the
//! items are such, and parallel rows keep their ties). The
//! bound on the rounding
//! assumes IEEE products: on a GPU that allows TF32 for float32 matrix
//! products, rank in float64 ([`RetrievalConfig::float64`]; the Python
//! package does). Items of one norm, exactly (±1 codes, k-hot codes of one
//! k), rank by the cosine distance as by the squared Euclidean one, which
//! ranks them instead: its products do not round for them. Queries are
//! processed in chunks against all M items they can retrieve, so memory
//! stays O(M·chunk); the time is O(Q·M·D) for the distances plus
//! O(Q·(M + K log K)) for the selection of Q queries, with K = max(k, R_q);
//! the whole rankings of the mean average precision and mINP take
//! O(Q·M log R_q), each item of another label placed among the query's R_q
//! by a binary search, with no sort. Queries are sorted by R_q so that a
//! chunk selects only as many neighbours as its own queries need. Identical
//! items are at distance exactly 0 from each other (but for the cosine
//! distance zero rows, and rows of norm below 1e-12 times the largest entry
//! of all the items, which are first scaled by a power of two to about 1:
//! as `torch.nn.functional.normalize` does, they are divided by 1e-12, not
//! their norm, so a zero row is at 1 from everything and a tiny row at
//! 1 − (norm / 1e-12)·cos), ahead
//! of every distinct item, and at equal distances from every other item;
//! under the cosine distance so are rows of one direction (v and 6v), whose
//! cosine distance is 0 as a copy's is.
//! Items at equal distances from a query rank with those it does not
//! retrieve as matches first: no score is higher than with any other order
//! of the ties, so ties (integer, binary or quantised embeddings, copies, a
//! collapsed model) never raise a score, the scores do not depend on the
//! order of the items, and every metric, whatever its depth, sees the same
//! ranking.
//!
//! ```
//! use online_triplet_loss::metrics::{mean_average_precision_at_r, recall_at_k};
//! use online_triplet_loss::Distance;
//! use tch::Tensor;
//!
//! // Two tight clusters on a line, labelled 0 and 1, with one stray 1.
//! let embeddings = Tensor::from_slice(&[0.0f32, 0.1, 0.2, 5.0, 5.1, 0.17]).view([6, 1]);
//! let labels = Tensor::from_slice(&[0i64, 0, 0, 1, 1, 1]);
//! let recall = recall_at_k(&embeddings, &labels, &[1, 5], Distance::Euclidean)?;
//! assert_eq!(recall.len(), 2);
//! assert!(recall[0] < recall[1]);
//! let map = mean_average_precision_at_r(&embeddings, &labels, Distance::Euclidean)?;
//! assert!(map > 0.0 && map < 1.0);
//! # Ok::<(), online_triplet_loss::Error>(())
//! ```

mod certify;

use tch::{Kind, Tensor};

use crate::distance::{Centre, Distance, Side};
use crate::error::caught;
use crate::grad;
use crate::labels::{common, domain, keys, ANCHOR_NAN_KEYS, REFERENCE_NAN_KEYS};
use crate::losses::{check_ids, check_pair, check_same_device};
use crate::mining::Kernel;
use crate::ties::Ties;
use crate::Error;
use certify::Certify;

/// Also at the crate's root, where the losses take it too.
pub use crate::Interrupt;

/// Queries are ranked against this many distances at a time, unless set.
const CHUNK_ELEMENTS: i64 = 1 << 22;

/// Options of the retrieval metrics.
///
/// ```
/// use online_triplet_loss::metrics::RetrievalConfig;
/// use online_triplet_loss::Distance;
/// use tch::{Device, Kind, Tensor};
///
/// let embeddings = Tensor::randn([100, 8], (Kind::Float, Device::Cpu));
/// let labels = Tensor::arange(100, (Kind::Int64, Device::Cpu)).remainder(5);
/// let scores = RetrievalConfig::new(Distance::Cosine)
///     .chunk_size(16)
///     .evaluate(&embeddings, &labels, &[1, 10])?;
/// assert_eq!(scores.queries, 100);
/// assert!(scores.recall[1] >= scores.recall[0]);
/// # Ok::<(), online_triplet_loss::Error>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RetrievalConfig {
    /// The distance that ranks neighbours. Euclidean and squared Euclidean
    /// rank alike.
    pub distance: Distance,
    /// Queries ranked at a time; `None` picks a size that keeps each chunk's
    /// distance matrix near 4M elements.
    pub chunk_size: Option<i64>,
    /// Asked before each chunk of queries whether to stop; see
    /// [`RetrievalConfig::interrupt`].
    pub interrupt: Option<Interrupt>,
    /// Rank in float64 whatever the embeddings' dtype: on a GPU that allows
    /// TF32 for float32 matrix products, whose rounding the certified
    /// float32 ranking does not bound (the Python package sets it there).
    pub float64: bool,
}

/// The result of [`RetrievalConfig::evaluate`].
#[derive(Clone, Debug, PartialEq)]
pub struct Retrieval {
    /// recall@k for each k asked for, in the order asked.
    pub recall: Vec<f64>,
    /// MAP@R.
    pub map_at_r: f64,
    /// The number of queries averaged over: those with R_q > 0.
    pub queries: i64,
}

/// A set of items to rank: embeddings, their class labels and, for person
/// re-identification, their cameras.
#[derive(Clone, Copy, Debug)]
pub struct Items<'a> {
    /// `(N, D)`, floating point.
    pub embeddings: &'a Tensor,
    /// `(N,)`, class ids.
    pub labels: &'a Tensor,
    /// `(N,)`, camera ids: a query retrieves no item of its own label from
    /// its own camera. `None` for no such rule.
    pub cameras: Option<&'a Tensor>,
}

impl<'a> Items<'a> {
    /// `embeddings` `(N, D)` and their `labels` `(N,)`, without cameras.
    #[must_use]
    pub fn new(embeddings: &'a Tensor, labels: &'a Tensor) -> Self {
        Items {
            embeddings,
            labels,
            cameras: None,
        }
    }

    /// The items' cameras, `(N,)`, integer ids (or floats holding them).
    #[must_use]
    pub fn cameras(mut self, cameras: &'a Tensor) -> Self {
        self.cameras = Some(cameras);
        self
    }
}

/// Which mean average precision [`RetrievalConfig::scores`] gives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AveragePrecision {
    /// MAP@R: each query's average precision over its R_q nearest.
    AtR,
    /// mAP: over the whole ranking, as re-identification benchmarks report
    /// it. Every query is ranked against every item, in O(N log R_q) time.
    Full,
}

/// The result of [`RetrievalConfig::scores`]; more measures may be added.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Scores {
    /// recall@k for each k asked for, in the order asked.
    pub recall: Vec<f64>,
    /// The mean average precision asked for.
    pub average_precision: Option<f64>,
    /// With [`AveragePrecision::Full`], mINP, the mean inverse negative
    /// penalty (Ye et al., 2021): the mean over queries of R_q / the rank
    /// of q's last relevant item, which tells how far down the ranking the
    /// hardest match lies.
    pub inverse_negative_penalty: Option<f64>,
    /// The number of queries averaged over: those with R_q > 0.
    pub queries: i64,
}

/// What one pass over the queries accumulates.
struct Sums {
    hits: Vec<f64>,
    average_precision: f64,
    /// Of whole rankings only.
    inverse_negative_penalty: f64,
    queries: i64,
}

impl Sums {
    fn recall(&self) -> Vec<f64> {
        self.hits.iter().map(|h| h / self.queries as f64).collect()
    }

    fn mean_average_precision(&self) -> f64 {
        self.average_precision / self.queries as f64
    }

    fn mean_inverse_negative_penalty(&self) -> f64 {
        self.inverse_negative_penalty / self.queries as f64
    }
}

impl RetrievalConfig {
    /// An evaluation that ranks by `distance`, in the embeddings' dtype
    /// (float32 for half precision), in chunks of queries of about 4M
    /// distances (`2^22`), that no interrupt stops; the methods below change
    /// each.
    #[must_use]
    pub fn new(distance: Distance) -> Self {
        RetrievalConfig {
            distance,
            chunk_size: None,
            interrupt: None,
            float64: false,
        }
    }

    /// Ranks in float64 whatever the embeddings' dtype; see the field
    /// `float64`.
    #[must_use]
    pub fn float64(mut self, float64: bool) -> Self {
        self.float64 = float64;
        self
    }

    /// Ranks `rows` queries at a time; a value below 1 is refused when the
    /// metrics are computed.
    #[must_use]
    pub fn chunk_size(mut self, rows: i64) -> Self {
        self.chunk_size = Some(rows);
        self
    }

    /// Asks `stop` before each chunk of queries, and ends the evaluation
    /// with [`Error::Interrupted`] when it returns `true`. An evaluation of
    /// 100k items takes tens of seconds on a few cores; the Python package
    /// checks for Ctrl-C here.
    ///
    /// ```
    /// use online_triplet_loss::metrics::{Interrupt, RetrievalConfig};
    /// use online_triplet_loss::{Distance, Error};
    /// use tch::Tensor;
    ///
    /// let embeddings = Tensor::from_slice(&[0.0f32, 0.1, 5.0, 5.1]).view([4, 1]);
    /// let labels = Tensor::from_slice(&[0i64, 0, 1, 1]);
    /// let config = RetrievalConfig::new(Distance::Euclidean).interrupt(Interrupt(|| true));
    /// assert_eq!(config.recall_at_k(&embeddings, &labels, &[1]), Err(Error::Interrupted));
    /// ```
    #[must_use]
    pub fn interrupt(mut self, stop: Interrupt) -> Self {
        self.interrupt = Some(stop);
        self
    }

    /// recall@k for each of `ks`, in that order.
    ///
    /// # Shapes
    /// `embeddings` `(N, D)`, floating point (ranked in float32 for half
    /// precision), `labels` `(N,)` on any device.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the argument for empty or
    /// non-positive `ks`, a `chunk_size` below 1, embeddings that are not
    /// 2-D, floating point and finite or hold no item, labels that are not
    /// 1-D class ids of the embeddings' length, and labels no two items
    /// share (no query); [`Error::Torch`] when libtorch fails (out of
    /// memory, say); [`Error::Interrupted`] when the
    /// [`RetrievalConfig::interrupt`] asks to stop.
    pub fn recall_at_k(
        &self,
        embeddings: &Tensor,
        labels: &Tensor,
        ks: &[i64],
    ) -> Result<Vec<f64>, Error> {
        Ok(self
            .scores(Items::new(embeddings, labels), None, ks, None)?
            .recall)
    }

    /// MAP@R.
    ///
    /// # Shapes
    /// As [`RetrievalConfig::recall_at_k`].
    ///
    /// # Errors
    /// As [`RetrievalConfig::recall_at_k`] (which has `ks`).
    pub fn mean_average_precision_at_r(
        &self,
        embeddings: &Tensor,
        labels: &Tensor,
    ) -> Result<f64, Error> {
        Ok(self
            .pass_over(Items::new(embeddings, labels), &[], AveragePrecision::AtR)?
            .mean_average_precision())
    }

    /// The mean average precision over the whole ranking, re-identification's
    /// mAP: the mean over queries of AP = (1/R_q) Σ_i P(i)·rel(i), i over
    /// every item ranked. Every query is ranked against every item, in
    /// O(N log R_q) time (no sort: see the module's documentation).
    ///
    /// # Shapes
    /// As [`RetrievalConfig::recall_at_k`].
    ///
    /// # Errors
    /// As [`RetrievalConfig::recall_at_k`] (which has `ks`).
    pub fn mean_average_precision(
        &self,
        embeddings: &Tensor,
        labels: &Tensor,
    ) -> Result<f64, Error> {
        Ok(self
            .pass_over(Items::new(embeddings, labels), &[], AveragePrecision::Full)?
            .mean_average_precision())
    }

    /// mINP, the mean inverse negative penalty of re-identification (Ye et
    /// al., 2021): the mean over queries of R_q / rank_q, rank_q the place
    /// of q's last relevant item in its whole ranking (the ratio is 1 when
    /// every relevant item comes first). Every query is ranked against
    /// every item, in O(N log R_q) time; [`RetrievalConfig::scores`] with
    /// [`AveragePrecision::Full`] gives it beside the mAP.
    ///
    /// # Shapes
    /// As [`RetrievalConfig::recall_at_k`].
    ///
    /// # Errors
    /// As [`RetrievalConfig::recall_at_k`] (which has `ks`).
    pub fn mean_inverse_negative_penalty(
        &self,
        embeddings: &Tensor,
        labels: &Tensor,
    ) -> Result<f64, Error> {
        Ok(self
            .pass_over(Items::new(embeddings, labels), &[], AveragePrecision::Full)?
            .mean_inverse_negative_penalty())
    }

    /// One pass over `items`, each against the others, for recall at `ks`
    /// and `precision`.
    fn pass_over(
        &self,
        items: Items,
        ks: &[i64],
        precision: AveragePrecision,
    ) -> Result<Sums, Error> {
        caught(|| self.scan(items, None, ks, Some(precision)))
    }

    /// recall@k for each of `ks` and MAP@R, in one pass over the distances.
    /// `ks` may be empty (MAP@R alone), unlike for
    /// [`RetrievalConfig::recall_at_k`], whose result would be empty.
    ///
    /// # Shapes
    /// As [`RetrievalConfig::recall_at_k`].
    ///
    /// # Errors
    /// As [`RetrievalConfig::recall_at_k`], but `ks` may be empty.
    pub fn evaluate(
        &self,
        embeddings: &Tensor,
        labels: &Tensor,
        ks: &[i64],
    ) -> Result<Retrieval, Error> {
        let sums = self.pass_over(Items::new(embeddings, labels), ks, AveragePrecision::AtR)?;
        Ok(Retrieval {
            recall: sums.recall(),
            map_at_r: sums.mean_average_precision(),
            queries: sums.queries,
        })
    }

    /// recall@k for each of `ks` and, with `precision`, the mean average
    /// precision of the `queries` against the `gallery` alone, or without
    /// one of each item against the others: the general form of the other
    /// methods. With a gallery, R_q counts the gallery items of q's label,
    /// and a query identical to a gallery item finds it at distance 0.
    /// With cameras ([`Items::cameras`], on both sets or neither), a query
    /// retrieves no item of its own label from its own camera, as person
    /// re-identification benchmarks (Market-1501, DukeMTMC-reID, MSMT17)
    /// evaluate: those items are not counted in R_q, nor ranked.
    ///
    /// # Shapes
    /// `queries` `(Q, D)` embeddings and `(Q,)` labels and cameras;
    /// `gallery` `(G, D)` embeddings on the queries' device, `(G,)` labels
    /// and cameras. The embeddings are ranked in the wider of their two
    /// dtypes (float32 for half precision).
    ///
    /// # Errors
    /// As [`RetrievalConfig::recall_at_k`] (`ks` may be empty when an
    /// average precision is asked for), and
    /// [`Error::InvalidArgument`] naming the argument (`ref_embeddings`,
    /// `ref_labels`, `cameras`, `ref_cameras`) for a gallery that does not
    /// fit the queries (another width or device), that is the queries'
    /// embeddings themselves, or cameras on one set only or not of its
    /// length; naming `labels` when no query has an item to retrieve.
    ///
    /// ```
    /// use online_triplet_loss::metrics::{AveragePrecision, Items, RetrievalConfig};
    /// use online_triplet_loss::Distance;
    /// use tch::Tensor;
    ///
    /// let queries = Tensor::from_slice(&[0.0f32, 5.2, 0.2]).view([3, 1]);
    /// let labels = Tensor::from_slice(&[0i64, 1, 1]);
    /// let gallery = Tensor::from_slice(&[0.1f32, 5.0, 5.1, 9.0]).view([4, 1]);
    /// let gallery_labels = Tensor::from_slice(&[0i64, 1, 1, 2]);
    /// let config = RetrievalConfig::new(Distance::Euclidean);
    /// let (q, g) = (Items::new(&queries, &labels), Items::new(&gallery, &gallery_labels));
    /// let scores = config.scores(q, Some(g), &[1, 2], None)?;
    /// assert_eq!(scores.recall, vec![2.0 / 3.0, 1.0]);
    /// // 5.2 (camera 0) may not retrieve 5.1 (label 1, camera 0), nor 0.2
    /// // (camera 1) 5.0, and finds 5.1 second, after 0.1.
    /// let cameras = Tensor::from_slice(&[0i64, 0, 1]);
    /// let gallery_cameras = Tensor::from_slice(&[1i64, 1, 0, 0]);
    /// let q = q.cameras(&cameras);
    /// let g = g.cameras(&gallery_cameras);
    /// let scores = config.scores(q, Some(g), &[1], Some(AveragePrecision::Full))?;
    /// assert_eq!(scores.recall, vec![2.0 / 3.0]);
    /// assert_eq!(scores.average_precision, Some((1.0 + 1.0 + 0.5) / 3.0));
    /// // 0.2's one match is second: mINP (1 + 1 + 1/2) / 3 too.
    /// assert_eq!(scores.inverse_negative_penalty, Some((1.0 + 1.0 + 0.5) / 3.0));
    /// # Ok::<(), online_triplet_loss::Error>(())
    /// ```
    pub fn scores(
        &self,
        queries: Items,
        gallery: Option<Items>,
        ks: &[i64],
        precision: Option<AveragePrecision>,
    ) -> Result<Scores, Error> {
        if ks.is_empty() && precision.is_none() {
            return Err(Error::invalid(
                "ks",
                "must hold at least one k when no average precision is asked for",
            ));
        }
        let sums = caught(|| self.scan(queries, gallery, ks, precision))?;
        Ok(Scores {
            recall: sums.recall(),
            average_precision: precision.map(|_| sums.mean_average_precision()),
            inverse_negative_penalty: (precision == Some(AveragePrecision::Full))
                .then(|| sums.mean_inverse_negative_penalty()),
            queries: sums.queries,
        })
    }

    fn validate(&self, queries: Items, references: Option<Items>, ks: &[i64]) -> Result<(), Error> {
        if let Some(rows) = self.chunk_size {
            if rows < 1 {
                return Err(Error::invalid(
                    "chunk_size",
                    format!("must be >= 1, got {rows}"),
                ));
            }
        }
        if let Some(&k) = ks.iter().find(|&&k| k < 1) {
            return Err(Error::invalid(
                "ks",
                format!("every k must be >= 1, got {k}"),
            ));
        }
        let embeddings = queries.embeddings;
        check_items(queries, ["embeddings", "labels", "cameras"])?;
        if let Some(references) = references {
            check_items(references, ["ref_embeddings", "ref_labels", "ref_cameras"])?;
            match (queries.cameras, references.cameras) {
                (Some(_), None) => {
                    return Err(Error::invalid("ref_cameras", "must be given with cameras"))
                }
                (None, Some(_)) => {
                    return Err(Error::invalid("cameras", "must be given with ref_cameras"))
                }
                _ => {}
            }
            let y = references.embeddings;
            let (d, rd) = (embeddings.size()[1], y.size()[1]);
            if d != rd {
                return Err(Error::invalid(
                    "ref_embeddings",
                    format!("must have the embedding size of embeddings ({d}), got {rd}"),
                ));
            }
            check_same_device("ref_embeddings", y, "embeddings", embeddings)?;
            let same_storage = y.numel() > 0
                && y.data_ptr() == embeddings.data_ptr()
                && y.f_kind()? == embeddings.f_kind()?
                && y.size() == embeddings.size()
                && y.stride() == embeddings.stride();
            if same_storage {
                return Err(Error::invalid(
                    "ref_embeddings",
                    "is embeddings itself, so every query would find itself at distance 0; \
                     to rank each item against the others, give no ref_embeddings",
                ));
            }
        }
        Ok(())
    }

    /// Ranks every query with R_q > 0 against the references (all other
    /// items without them) and sums its hits for each of `ks` and, with a
    /// `precision`, its average precision.
    fn scan(
        &self,
        queries: Items,
        references: Option<Items>,
        ks: &[i64],
        precision: Option<AveragePrecision>,
    ) -> Result<Sums, Error> {
        self.validate(queries, references, ks)?;
        let embeddings = queries.embeddings;
        let device = embeddings.device();
        // float32 for half precision; float64 if either set is.
        let widest = |t: &Tensor| -> Result<Kind, Error> {
            Ok(match t.f_kind()? {
                Kind::Double => Kind::Double,
                _ => Kind::Float,
            })
        };
        let kind = if self.float64 {
            Kind::Double
        } else {
            match references {
                Some(y) if widest(y.embeddings)? == Kind::Double => Kind::Double,
                _ => widest(embeddings)?,
            }
        };
        let items = Ordered::new(queries, references, kind)?;
        let (q0, g) = (items.first_query, items.references);
        let sorted_r = &items.sorted_r;
        let first = sorted_r.partition_point(|&r| r == 0) as i64;
        let queries = sorted_r.len() as i64 - first;
        if queries == 0 {
            let cameras = match items.pairs {
                Some(_) => " from another camera",
                None => "",
            };
            return Err(Error::invalid(
                "labels",
                match references {
                    None => format!(
                        "no item shares its label with another item{cameras}, so there is no \
                         query to evaluate"
                    ),
                    Some(_) => format!(
                        "no query's label is among ref_labels{cameras}, so there is no query to \
                         evaluate"
                    ),
                },
            ));
        }
        let x = items.embeddings;
        let (keys, pairs, others) = (items.keys, items.pairs, items.others);
        let ranking = match self.distance {
            // The square root does not change the order.
            Distance::Euclidean | Distance::Squared => Distance::Squared,
            // Nor, between items of one norm, the change to a distance whose
            // products do not round for integer codes.
            Distance::Cosine if certify::one_norm(&x)? => Distance::Squared,
            Distance::Cosine => Distance::Cosine,
        };
        // The items a query can retrieve: the references but itself. At
        // least one, since some query has a reference of its label.
        let retrievable = if references.is_some() { g } else { g - 1 };
        let k_max = ks.iter().copied().max().unwrap_or(0).min(retrievable);
        let step = self
            .chunk_size
            .unwrap_or_else(|| (CHUNK_ELEMENTS / g).max(1));

        let (scaled, (frame, exponent)) = normalised_frame(&x, ranking == Distance::Squared)?;
        let points = frame.f_to_kind(kind)?;
        grad::no_grad(|| {
            let (side, _) = Side::pair(ranking, &points, None)?;
            // Copies among the embeddings as given: rounding the centred
            // frame back to the dtype can merge rows that differ. The
            // references come first, so a reference's first copy is one.
            // Under the cosine distance, rows of one direction (v and 6v)
            // are copies too.
            let rows = side.tie_rows(std::slice::from_ref(&x))?;
            drop(x);
            let ties = match Ties::find(&rows, &rows, Some(0), true, Kernel::Auto)? {
                Some(ties) => Some(ties.leading_columns(g)?),
                None => None,
            };
            drop(rows);
            let certify = Certify::new(
                ranking,
                (scaled, &frame, exponent),
                (&keys, pairs, g, references.is_none()),
                &side,
                kind,
            )?;
            drop(frame);
            let opts = (Kind::Int64, device);
            let mut hits = ks
                .iter()
                .map(|_| Tensor::f_zeros([], opts))
                .collect::<Result<Vec<_>, _>>()?;
            let mut average_precision = Tensor::f_zeros([], (Kind::Double, device))?;
            let mut inverse_negative_penalty = Tensor::f_zeros([], (Kind::Double, device))?;
            let mut start = first;
            while start < first + queries {
                Interrupt::check(self.interrupt)?;
                let len = step.min(first + queries - start);
                // In float64 from the start once enough queries have needed
                // it, and for whole rankings, where some two neighbours of
                // different relevance almost always lie within float32's
                // rounding of each other: every query would be ranked again.
                let ranking_side = match precision {
                    Some(AveragePrecision::Full) => certify.wide(),
                    _ => certify.wide_side(start - first),
                }
                .unwrap_or(&side);
                let item = q0 + start;
                let query_items = Tensor::f_arange_start(item, item + len, opts)?;
                let d = ranking_side
                    .rows(item, len)?
                    .pairwise(&ranking_side.rows(0, g)?)?;
                let d = certify.finish(d, &query_items, ties.as_ref())?;
                let r_last = sorted_r[(start + len - 1) as usize];
                let r = others.f_narrow(0, start, len)?;
                if precision == Some(AveragePrecision::Full) {
                    // The place of each of the query's R_q items in its
                    // whole ranking, in order, +inf past them: R_q ≥ 1.
                    let places = certify.places(&d, &query_items, r_last, ties.as_ref())?;
                    drop(d);
                    let nearest = places.f_narrow(1, 0, 1)?;
                    for (sum, &k) in hits.iter_mut().zip(ks) {
                        let _ = sum.f_add_(&nearest.f_le(k as f64)?.f_sum(Kind::Int64)?)?;
                    }
                    // The precision at the j-th is j / its place; mINP takes
                    // R_q / the place of the last.
                    let r_wide = r.f_to_kind(Kind::Double)?;
                    let ap = Tensor::f_arange_start(1, r_last + 1, (Kind::Double, device))?
                        .f_unsqueeze(0)?
                        .f_div(&places)?
                        .f_sum_dim_intlist(1, false, Kind::Double)?
                        .f_div(&r_wide)?;
                    let _ = average_precision.f_add_(&ap.f_sum(Kind::Double)?)?;
                    let last = places
                        .f_gather(1, &r.f_sub_scalar(1)?.f_unsqueeze(1)?, false)?
                        .f_squeeze_dim(1)?;
                    let _ = inverse_negative_penalty
                        .f_add_(&r_wide.f_div(&last)?.f_sum(Kind::Double)?)?;
                    start += len;
                    continue;
                }
                let depth = match precision {
                    Some(AveragePrecision::AtR) => k_max.max(r_last),
                    _ => k_max,
                }
                .min(retrievable);
                // rel(i): the i-th nearest shares the query's label.
                let (values, relevant) = certify.nearest(&d, depth, &query_items)?;
                let relevant = certify
                    .ranked(&d, &query_items, (&values, &relevant), ties.as_ref())?
                    .unwrap_or(relevant);
                drop(d);
                for (sum, &k) in hits.iter_mut().zip(ks) {
                    let top = relevant.f_narrow(1, 0, k.min(depth))?;
                    let _ = sum.f_add_(&top.f_any_dim(1, false)?.f_sum(Kind::Int64)?)?;
                }
                if precision == Some(AveragePrecision::AtR) {
                    let r = r.f_to_kind(Kind::Double)?;
                    let rank = Tensor::f_arange_start(1, depth + 1, (Kind::Double, device))?;
                    let rel = relevant
                        .f_logical_and(&rank.f_unsqueeze(0)?.f_le_tensor(&r.f_unsqueeze(1)?)?)?;
                    // Hits so far counted in integers: a floating running sum
                    // has no deterministic CUDA kernel.
                    let precision = rel
                        .f_cumsum(1, Kind::Int64)?
                        .f_to_kind(Kind::Double)?
                        .f_div(&rank.f_unsqueeze(0)?)?;
                    let ap = precision
                        .f_where_scalarother(&rel, 0.0)?
                        .f_sum_dim_intlist(1, false, Kind::Double)?
                        .f_div(&r)?;
                    let _ = average_precision.f_add_(&ap.f_sum(Kind::Double)?)?;
                }
                start += len;
            }
            Ok(Sums {
                hits: hits
                    .iter()
                    .map(|h| i64::try_from(h).map(|h| h as f64))
                    .collect::<Result<_, _>>()?,
                average_precision: f64::try_from(&average_precision)?,
                inverse_negative_penalty: f64::try_from(&inverse_negative_penalty)?,
                queries,
            })
        })
    }
}

/// The items of an evaluation in the order it ranks them: the references
/// first, columns `0..references` of every distance matrix, then the
/// queries sorted by R_q (the skipped ones first, then chunks whose last
/// query needs the most neighbours), from `first_query`. Without a
/// reference set the items are both: `first_query` is 0 and `references`
/// all of them.
struct Ordered {
    /// `(N, D)`, detached.
    embeddings: Tensor,
    /// int64 label keys, `(N,)`, on the embeddings' device.
    keys: Tensor,
    /// With cameras, an int64 id of each item's (label, camera), `(N,)`: a
    /// query retrieves no item of its own pair.
    pairs: Option<Tensor>,
    /// R_q of the queries in their order, `(Q,)`.
    others: Tensor,
    /// The same on the host.
    sorted_r: Vec<i64>,
    first_query: i64,
    references: i64,
}

impl Ordered {
    /// The `queries` and `references`, embeddings in `kind`.
    fn new(queries: Items, references: Option<Items>, kind: Kind) -> Result<Ordered, Error> {
        let x = queries.embeddings;
        let device = x.device();
        let x = x.f_detach()?.f_to_kind(kind)?;
        let (x_keys, x_cams, y) = match references {
            None => {
                let d = domain(queries.labels, "labels")?;
                let cams = match queries.cameras {
                    Some(c) => Some(
                        keys(c, domain(c, "cameras")?, REFERENCE_NAN_KEYS)?.f_to_device(device)?,
                    ),
                    None => None,
                };
                let keys = keys(queries.labels, d, REFERENCE_NAN_KEYS)?.f_to_device(device)?;
                (keys, cams, None)
            }
            Some(r) => {
                // NaN labels and cameras of the queries and of the
                // references take keys from two ranges, so that none meet.
                let d = common(
                    (domain(queries.labels, "labels")?, queries.labels, "labels"),
                    (domain(r.labels, "ref_labels")?, r.labels, "ref_labels"),
                )?;
                let x_keys = keys(queries.labels, d, ANCHOR_NAN_KEYS)?.f_to_device(device)?;
                let y_keys = keys(r.labels, d, REFERENCE_NAN_KEYS)?.f_to_device(device)?;
                let (x_cams, y_cams) = match (queries.cameras, r.cameras) {
                    (Some(a), Some(b)) => {
                        let d = common(
                            (domain(a, "cameras")?, a, "cameras"),
                            (domain(b, "ref_cameras")?, b, "ref_cameras"),
                        )?;
                        (
                            Some(keys(a, d, ANCHOR_NAN_KEYS)?.f_to_device(device)?),
                            Some(keys(b, d, REFERENCE_NAN_KEYS)?.f_to_device(device)?),
                        )
                    }
                    _ => (None, None),
                };
                let y = r.embeddings.f_detach()?.f_to_kind(kind)?;
                (x_keys, x_cams, Some((y, y_keys, y_cams)))
            }
        };
        // Label keys and, with cameras, (label, camera) ids of the
        // references, then of the queries.
        let (y_keys, y_cams) = match &y {
            Some((_, k, c)) => (k.shallow_clone(), c.as_ref().map(Tensor::shallow_clone)),
            None => (
                x_keys.shallow_clone(),
                x_cams.as_ref().map(Tensor::shallow_clone),
            ),
        };
        let g = y_keys.size()[0];
        let pairs = match (&y_cams, &x_cams) {
            (Some(y_cams), Some(x_cams)) => Some(pair_ids(
                (
                    &Tensor::f_cat(&[&y_keys, &x_keys], 0)?,
                    &Tensor::f_cat(&[y_cams, x_cams], 0)?,
                ),
                g,
            )?),
            _ => None,
        };
        // R_q: the references of q's label (less those of its pair), less
        // q itself when it is one.
        let mut others = counts_in(&y_keys, &x_keys)?;
        if let Some((y_pairs, x_pairs)) = &pairs {
            others = others.f_sub(&counts_in(y_pairs, x_pairs)?)?;
        } else if y.is_none() {
            others = others.f_sub_scalar(1)?;
        }
        let (sorted_r, order) = others.f_sort_stable(true, 0, false)?;
        let pick = |t: &Tensor| t.f_index_select(0, &order);
        let (x, x_keys) = (pick(&x)?, pick(&x_keys)?);
        let x_pairs = match &pairs {
            Some((_, x_pairs)) => Some(pick(x_pairs)?),
            None => None,
        };
        let (embeddings, keys, pairs, first_query) = match (y, pairs) {
            (Some((y, y_keys, _)), pairs) => (
                Tensor::f_cat(&[&y, &x], 0)?,
                Tensor::f_cat(&[&y_keys, &x_keys], 0)?,
                match (pairs, x_pairs) {
                    (Some((y_pairs, _)), Some(x_pairs)) => {
                        Some(Tensor::f_cat(&[&y_pairs, &x_pairs], 0)?)
                    }
                    _ => None,
                },
                g,
            ),
            (None, _) => (x, x_keys, x_pairs, 0),
        };
        Ok(Ordered {
            references: match first_query {
                0 => embeddings.size()[0],
                g => g,
            },
            embeddings,
            keys,
            pairs,
            sorted_r: crate::alloc::to_vec::<i64>(&sorted_r)?,
            others: sorted_r,
            first_query,
        })
    }
}

/// For each of `of`, the number of entries of `reference` equal to it: a
/// binary search among the distinct entries.
fn counts_in(reference: &Tensor, of: &Tensor) -> Result<Tensor, Error> {
    if reference.numel() == 0 {
        return Ok(of.f_zeros_like()?);
    }
    let (values, _, counts) = reference.f_internal_unique2(true, false, true)?;
    let at = of
        .f_searchsorted(&values, false, false, "left", None::<Tensor>)?
        .f_clamp_max_(values.size()[0] - 1)?;
    let found = values.f_index_select(0, &at)?.f_eq_tensor(of)?;
    Ok(counts
        .f_index_select(0, &at)?
        .f_where_scalarother(&found, 0)?)
}

/// An int64 id for each (label key, camera key) of `keys` and `cameras`,
/// equal exactly when both are, split into the first `g` (the references)
/// and the rest: label and camera keys are each numbered densely, and the
/// pair is their product index.
fn pair_ids((keys, cameras): (&Tensor, &Tensor), g: i64) -> Result<(Tensor, Tensor), Error> {
    let (_, label_ids, _) = keys.f_internal_unique2(true, true, false)?;
    let (distinct, camera_ids, _) = cameras.f_internal_unique2(true, true, false)?;
    let pairs = label_ids
        .f_mul_scalar(distinct.size()[0])?
        .f_add(&camera_ids)?;
    let n = pairs.size()[0];
    Ok((pairs.f_narrow(0, 0, g)?, pairs.f_narrow(0, g, n - g)?))
}

/// Checks one set of items, `names` those of its embeddings, labels and
/// cameras: as the losses check theirs, and non-empty and finite.
fn check_items(
    items: Items,
    [emb_name, label_name, camera_name]: [&'static str; 3],
) -> Result<(), Error> {
    let embeddings = items.embeddings;
    check_pair(emb_name, embeddings, label_name, items.labels)?;
    let n = embeddings.size()[0];
    if let Some(cameras) = items.cameras {
        check_ids(camera_name, cameras, emb_name, n)?;
    }
    if n == 0 {
        return Err(Error::invalid(emb_name, "must hold at least one item"));
    }
    let finite = bool::try_from(embeddings.f_isfinite()?.f_all()?)?;
    if !finite {
        return Err(Error::invalid(
            emb_name,
            "must be finite, got NaN or infinite values",
        ));
    }
    Ok(())
}

/// recall@k for each of `ks`, in that order; see the [module](self) docs.
///
/// # Shapes
/// As [`RetrievalConfig::recall_at_k`].
///
/// # Errors
/// As [`RetrievalConfig::recall_at_k`].
pub fn recall_at_k(
    embeddings: &Tensor,
    labels: &Tensor,
    ks: &[i64],
    distance: Distance,
) -> Result<Vec<f64>, Error> {
    RetrievalConfig::new(distance).recall_at_k(embeddings, labels, ks)
}

/// The mean average precision over the whole ranking; see
/// [`RetrievalConfig::mean_average_precision`].
///
/// # Shapes
/// As [`RetrievalConfig::mean_average_precision`].
///
/// # Errors
/// As [`RetrievalConfig::mean_average_precision`].
///
/// ```
/// use online_triplet_loss::metrics::mean_average_precision;
/// use online_triplet_loss::Distance;
/// use tch::Tensor;
///
/// // The module example's items: the stray 1 is nearer the 0s than the 1s.
/// let embeddings = Tensor::from_slice(&[0.0f32, 0.1, 0.2, 5.0, 5.1, 0.17]).view([6, 1]);
/// let labels = Tensor::from_slice(&[0i64, 0, 0, 1, 1, 1]);
/// let map = mean_average_precision(&embeddings, &labels, Distance::Euclidean)?;
/// assert!((map - 479.0 / 720.0).abs() < 1e-12);
/// # Ok::<(), online_triplet_loss::Error>(())
/// ```
pub fn mean_average_precision(
    embeddings: &Tensor,
    labels: &Tensor,
    distance: Distance,
) -> Result<f64, Error> {
    RetrievalConfig::new(distance).mean_average_precision(embeddings, labels)
}

/// mINP, the mean inverse negative penalty; see
/// [`RetrievalConfig::mean_inverse_negative_penalty`].
///
/// # Shapes
/// As [`RetrievalConfig::mean_inverse_negative_penalty`].
///
/// # Errors
/// As [`RetrievalConfig::mean_inverse_negative_penalty`].
///
/// ```
/// use online_triplet_loss::metrics::mean_inverse_negative_penalty;
/// use online_triplet_loss::Distance;
/// use tch::Tensor;
///
/// // The module example's items: the stray 1 finds its last match 5th.
/// let embeddings = Tensor::from_slice(&[0.0f32, 0.1, 0.2, 5.0, 5.1, 0.17]).view([6, 1]);
/// let labels = Tensor::from_slice(&[0i64, 0, 0, 1, 1, 1]);
/// let minp = mean_inverse_negative_penalty(&embeddings, &labels, Distance::Euclidean)?;
/// assert!((minp - 28.0 / 45.0).abs() < 1e-12);
/// # Ok::<(), online_triplet_loss::Error>(())
/// ```
pub fn mean_inverse_negative_penalty(
    embeddings: &Tensor,
    labels: &Tensor,
    distance: Distance,
) -> Result<f64, Error> {
    RetrievalConfig::new(distance).mean_inverse_negative_penalty(embeddings, labels)
}

/// MAP@R; see the [module](self) docs.
///
/// # Shapes
/// As [`RetrievalConfig::mean_average_precision_at_r`].
///
/// # Errors
/// As [`RetrievalConfig::mean_average_precision_at_r`].
pub fn mean_average_precision_at_r(
    embeddings: &Tensor,
    labels: &Tensor,
    distance: Distance,
) -> Result<f64, Error> {
    RetrievalConfig::new(distance).mean_average_precision_at_r(embeddings, labels)
}

/// `x` in float64 scaled by a power of two that brings its largest
/// magnitude near 1, which changes no ranking: squared distances then
/// neither overflow nor underflow, and no digit changes (but of entries it
/// takes below the normal range). Returned with the frame the Gram products
/// are taken in: with `centre`, for the translation-invariant Euclidean
/// distances, the scaled `x` centred on its mean and scaled again (the first
/// scaling keeps the mean from overflowing), so that an offset every item
/// shares (a constant column of 1e30 beside entries near 1, say) leaves
/// their differences, which scaling by the offset alone would take below
/// the normal range; else the scaled `x` again.
fn normalised_frame(x: &Tensor, centre: bool) -> Result<(Tensor, (Tensor, i32)), Error> {
    let (scaled, _) = scaled_to_one(&x.f_to_kind(Kind::Double)?)?;
    let frame = match centre {
        true => {
            scaled_to_one(&Centre::of(std::slice::from_ref(&scaled))?.subtracted_from(&scaled)?)?
        }
        false => (scaled.shallow_clone(), 0),
    };
    Ok((scaled, frame))
}

/// The largest magnitude of `t`'s entries, 0 for none.
fn largest_magnitude(t: &Tensor) -> Result<f64, Error> {
    if t.numel() == 0 {
        return Ok(0.0);
    }
    Ok(f64::try_from(t.f_abs()?.f_max()?.f_to_kind(Kind::Double)?)?)
}

/// `t` times the power of two 2^e that brings its largest magnitude into
/// [1, 2), and e. Applied in two halves, each a number of the dtype: 2^1074
/// is not a float64.
fn scaled_to_one(t: &Tensor) -> Result<(Tensor, i32), Error> {
    let largest = largest_magnitude(t)?;
    if largest == 0.0 {
        return Ok((t.shallow_clone(), 0));
    }
    let exponent = -(largest.log2().floor() as i32);
    let scaled = t
        .f_mul_scalar(2f64.powi(exponent / 2))?
        .f_mul_scalar(2f64.powi(exponent - exponent / 2))?;
    Ok((scaled, exponent))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// Brute force over f64 distances, sorting every query's neighbours.
    fn brute(points: &[Vec<f64>], labels: &[i64], ks: &[i64]) -> (Vec<f64>, f64) {
        let n = points.len();
        let mut hits = vec![0.0; ks.len()];
        let (mut ap_sum, mut queries) = (0.0, 0.0);
        for q in 0..n {
            let mut others: Vec<(f64, i64)> = (0..n)
                .filter(|&j| j != q)
                .map(|j| {
                    let d: f64 = points[q]
                        .iter()
                        .zip(&points[j])
                        .map(|(a, b)| (a - b) * (a - b))
                        .sum();
                    (d, labels[j])
                })
                .collect();
            // Equal distances rank the items of other labels first.
            let key = |o: &(f64, i64)| (o.0, o.1 == labels[q]);
            others.sort_by(|a, b| key(a).partial_cmp(&key(b)).unwrap());
            let r = others.iter().filter(|o| o.1 == labels[q]).count();
            if r == 0 {
                continue;
            }
            queries += 1.0;
            for (h, &k) in hits.iter_mut().zip(ks) {
                if others.iter().take(k as usize).any(|o| o.1 == labels[q]) {
                    *h += 1.0;
                }
            }
            let (mut found, mut ap) = (0.0, 0.0);
            for (i, o) in others.iter().take(r).enumerate() {
                if o.1 == labels[q] {
                    found += 1.0;
                    ap += found / (i + 1) as f64;
                }
            }
            ap_sum += ap / r as f64;
        }
        (hits.iter().map(|h| h / queries).collect(), ap_sum / queries)
    }

    #[test]
    fn matches_brute_force_across_chunk_sizes() {
        tch::manual_seed(3);
        let (n, dim) = (57, 5);
        let x = Tensor::randn([n, dim], (Kind::Double, Device::Cpu));
        // Classes of sizes 1 (skipped) to 12.
        let labels: Vec<i64> = (0..n).map(|i| (i * i) % 11).collect();
        let points: Vec<Vec<f64>> = (0..n)
            .map(|i| Vec::<f64>::try_from(x.get(i)).unwrap())
            .collect();
        let ks = [1, 2, 5, 100];
        let (recall, map) = brute(&points, &labels, &ks);
        let label_tensor = Tensor::from_slice(&labels);
        assert_evaluates_to(&x, &label_tensor, &ks, &[1, 4, 56, 1000], (&recall, map));
    }

    #[test]
    fn ties_rank_other_labels_first() {
        // Small integers: most distances tie, and k = 1, 2 and 5 cut
        // through runs of them.
        tch::manual_seed(7);
        let (n, dim) = (50, 2);
        let x =
            Tensor::randint_low(0, 3, [n, dim], (Kind::Int64, Device::Cpu)).to_kind(Kind::Double);
        let labels: Vec<i64> = (0..n).map(|i| (i * 7) % 4).collect();
        let points: Vec<Vec<f64>> = (0..n)
            .map(|i| Vec::<f64>::try_from(x.get(i)).unwrap())
            .collect();
        let ks = [1, 2, 5];
        let (recall, map) = brute(&points, &labels, &ks);
        let label_tensor = Tensor::from_slice(&labels);
        assert_evaluates_to(&x, &label_tensor, &ks, &[1, 7, 1000], (&recall, map));
    }

    /// mAP and mINP over whole rankings by brute force: every other item
    /// sorted by `distance` (f64), equal distances with the items of other
    /// labels first.
    fn brute_whole(
        points: &[Vec<f64>],
        labels: &[i64],
        distance: impl Fn(&[f64], &[f64]) -> f64,
    ) -> (f64, f64) {
        let n = points.len();
        let (mut ap_sum, mut inp_sum, mut queries) = (0.0, 0.0, 0.0);
        for q in 0..n {
            let mut others: Vec<(f64, bool)> = (0..n)
                .filter(|&j| j != q)
                .map(|j| (distance(&points[q], &points[j]), labels[j] == labels[q]))
                .collect();
            others.sort_by(|a, b| a.partial_cmp(b).unwrap());
            let (mut found, mut ap, mut last) = (0.0, 0.0, 0.0);
            for (i, o) in others.iter().enumerate() {
                if o.1 {
                    found += 1.0;
                    ap += found / (i + 1) as f64;
                    last = (i + 1) as f64;
                }
            }
            if found > 0.0 {
                queries += 1.0;
                ap_sum += ap / found;
                inp_sum += found / last;
            }
        }
        (ap_sum / queries, inp_sum / queries)
    }

    #[test]
    fn whole_rankings_match_brute_force() {
        tch::manual_seed(11);
        let n = 60;
        let labels: Vec<i64> = (0..n).map(|i| (i * 5) % 7).collect();
        let label_tensor = Tensor::from_slice(&labels);
        let opts = (Kind::Double, Device::Cpu);
        let squared =
            |a: &[f64], b: &[f64]| -> f64 { a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum() };
        // 1 − cos as half the squared distance of the unit vectors.
        let cosine = |a: &[f64], b: &[f64]| -> f64 {
            let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
            let (na, nb) = (norm(a), norm(b));
            0.5 * a
                .iter()
                .zip(b)
                .map(|(x, y)| (x / na - y / nb) * (x / na - y / nb))
                .sum::<f64>()
        };
        let signs = Tensor::randn([n, 12], opts).sign();
        // The same codes, rows scaled by powers of two: cosine distances
        // equal, norms not.
        let scales = Tensor::randint_low(-2, 3, [n, 1], (Kind::Int64, Device::Cpu))
            .to_kind(Kind::Double)
            .exp2();
        let cases = [
            ("gaussian", Tensor::randn([n, 5], opts), Distance::Euclidean),
            (
                "small integers",
                Tensor::randint_low(0, 3, [n, 2], (Kind::Int64, Device::Cpu)).to_kind(Kind::Double),
                Distance::Euclidean,
            ),
            ("sign codes", signs.shallow_clone(), Distance::Cosine),
            ("scaled sign codes", &signs * &scales, Distance::Cosine),
        ];
        for (name, x, distance) in cases {
            let points: Vec<Vec<f64>> = (0..n)
                .map(|i| Vec::<f64>::try_from(x.get(i)).unwrap())
                .collect();
            let (map, minp) = match distance {
                Distance::Cosine => brute_whole(&points, &labels, cosine),
                _ => brute_whole(&points, &labels, squared),
            };
            for chunk in [1, 7, 1000] {
                let got = RetrievalConfig::new(distance)
                    .chunk_size(chunk)
                    .scores(
                        Items::new(&x, &label_tensor),
                        None,
                        &[1],
                        Some(AveragePrecision::Full),
                    )
                    .unwrap();
                let (got_map, got_minp) = (
                    got.average_precision.unwrap(),
                    got.inverse_negative_penalty.unwrap(),
                );
                assert!(
                    (got_map - map).abs() < 1e-12,
                    "{name}, chunk {chunk}: {got_map} vs {map}"
                );
                assert!(
                    (got_minp - minp).abs() < 1e-12,
                    "{name}, chunk {chunk}: {got_minp} vs {minp}"
                );
            }
        }
    }

    /// `evaluate` gives `recall` and `map` for every chunk size of `chunks`.
    fn assert_evaluates_to(
        x: &Tensor,
        labels: &Tensor,
        ks: &[i64],
        chunks: &[i64],
        (recall, map): (&[f64], f64),
    ) {
        for &chunk in chunks {
            let got = RetrievalConfig::new(Distance::Euclidean)
                .chunk_size(chunk)
                .evaluate(x, labels, ks)
                .unwrap();
            for (a, b) in got.recall.iter().zip(recall) {
                assert!((a - b).abs() < 1e-12, "chunk {chunk}: {a} vs {b}");
            }
            assert!((got.map_at_r - map).abs() < 1e-12, "chunk {chunk}");
        }
    }

    #[test]
    fn tight_classes_far_from_the_centre_match_brute_force_in_float32() {
        // Groups at ±1000 in every entry, spreads of 0.05: float32 Gram
        // distances are off by more than the distances within a group.
        tch::manual_seed(5);
        let (n, dim) = (80, 8);
        let labels: Vec<i64> = (0..n).map(|i| (i * 7) % 10).collect();
        let label_tensor = Tensor::from_slice(&labels);
        let sign = Tensor::from_slice(&labels)
            .remainder(2)
            .to_kind(Kind::Double)
            .f_mul_scalar(2000.0)
            .unwrap()
            .f_sub_scalar(1000.0)
            .unwrap()
            .unsqueeze(1);
        let offsets = Tensor::randn([10, dim], (Kind::Double, Device::Cpu)) * 0.05;
        let x = (sign
            + offsets.index_select(0, &label_tensor)
            + Tensor::randn([n, dim], (Kind::Double, Device::Cpu)) * 0.05)
            .to_kind(Kind::Float);
        let points: Vec<Vec<f64>> = (0..n)
            .map(|i| Vec::<f64>::try_from(x.get(i).to_kind(Kind::Double)).unwrap())
            .collect();
        let ks = [1, 3];
        let (recall, map) = brute(&points, &labels, &ks);
        assert!(recall[0] > 0.3 && map < 0.99, "{recall:?} {map}");
        assert_evaluates_to(&x, &label_tensor, &ks, &[3, 80], (&recall, map));
    }

    #[test]
    fn scores_name_what_does_not_fit() {
        let x = Tensor::from_slice(&[0.0f32, 1.0, 2.0, 3.0]).view([4, 1]);
        let labels = Tensor::from_slice(&[0i64, 0, 1, 1]);
        let cameras = Tensor::from_slice(&[0i64, 1, 0, 1]);
        let gallery = x.f_add_scalar(0.5).unwrap();
        let config = RetrievalConfig::new(Distance::Euclidean);
        let named = |result: Result<Scores, Error>| match result {
            Err(Error::InvalidArgument { argument, .. }) => argument,
            other => panic!("{other:?}"),
        };
        let (q, g) = (Items::new(&x, &labels), Items::new(&gallery, &labels));
        let q_cams = q.cameras(&cameras);
        assert_eq!(
            named(config.scores(q_cams, Some(g), &[1], None)),
            "ref_cameras"
        );
        let g_cams = g.cameras(&cameras);
        assert_eq!(named(config.scores(q, Some(g_cams), &[1], None)), "cameras");
        let short = cameras.narrow(0, 0, 3);
        assert_eq!(
            named(config.scores(q.cameras(&short), None, &[1], None)),
            "cameras"
        );
        assert_eq!(named(config.scores(q, Some(g), &[], None)), "ks");
        assert_eq!(
            named(config.scores(q, Some(q), &[1], None)),
            "ref_embeddings"
        );
        // Each item's own camera holds no other item of its label: no query.
        let same = Tensor::from_slice(&[0i64, 0, 1, 1]);
        assert_eq!(
            named(config.scores(q.cameras(&same), None, &[1], None)),
            "labels"
        );
        let scores = config.scores(q_cams, Some(g_cams), &[1], Some(AveragePrecision::Full));
        assert_eq!(scores.unwrap().queries, 4);
    }

    #[test]
    fn rejects_bad_input_without_panicking() {
        let x = Tensor::zeros([4, 2], (Kind::Float, Device::Cpu));
        let labels = Tensor::from_slice(&[0i64, 0, 1, 1]);
        let distinct = Tensor::from_slice(&[0i64, 1, 2, 3]);
        let cases = [
            recall_at_k(&x, &labels, &[0], Distance::Euclidean),
            recall_at_k(&x, &labels, &[], Distance::Euclidean),
            recall_at_k(&x.view([8]), &labels, &[1], Distance::Euclidean),
            recall_at_k(&x, &labels.narrow(0, 0, 3), &[1], Distance::Euclidean),
            recall_at_k(&(x.ones_like() / 0.0), &labels, &[1], Distance::Euclidean),
            recall_at_k(&x, &distinct, &[1], Distance::Euclidean),
        ];
        for case in cases {
            assert!(
                matches!(case, Err(Error::InvalidArgument { .. })),
                "{case:?}"
            );
        }
    }
}

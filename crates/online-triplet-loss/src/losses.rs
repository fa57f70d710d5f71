//! The three triplet losses and their configuration.

use tch::{Kind, Tensor};

use crate::distance::{Distance, Side};
use crate::labels::label_keys;
use crate::mining::{self, Chunk, Kernel, Selection};
use crate::ties::Ties;
use crate::Error;

/// Anchors are mined against this many distances at a time, unless set.
const CHUNK_ELEMENTS: i64 = 1 << 22;

/// How triplets are selected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mining {
    /// Every valid triplet.
    All,
    /// The farthest positive and the nearest negative of every anchor.
    Hard,
    /// For every positive pair, the nearest negative farther than the positive.
    SemiHard,
}

/// A reference set that anchors are mined against instead of their own batch.
#[derive(Clone, Copy, Debug)]
pub struct References<'a> {
    /// Reference embeddings, `(M, D)`.
    pub embeddings: &'a Tensor,
    /// Their labels, `(M,)`.
    pub labels: &'a Tensor,
    /// `Some(k)` when the anchors are also references: anchor `i` is
    /// reference `k + i` and is never its own positive.
    pub anchor_offset: Option<i64>,
}

/// Options of the triplet losses.
///
/// ```
/// use online_triplet_loss::{Distance, TripletConfig};
/// use tch::{Kind, Tensor};
///
/// let embeddings = Tensor::randn([8, 4], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
/// let labels = Tensor::from_slice(&[0i64, 0, 1, 1, 2, 2, 3, 3]);
/// let loss = TripletConfig::new(0.2)
///     .distance(Distance::Cosine)
///     .soft(true)
///     .batch_hard(&labels, &embeddings)?;
/// loss.backward();
/// assert_eq!(embeddings.grad().size(), vec![8, 4]);
/// # Ok::<(), online_triplet_loss::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TripletConfig {
    /// The margin m, finite and ≥ 0.
    pub margin: f64,
    /// The distance between embeddings.
    pub distance: Distance,
    /// Batch-hard only: softplus instead of relu as the hinge.
    pub soft: bool,
    /// Which implementation mines.
    pub kernel: Kernel,
    /// Anchors mined at a time; `None` picks a size that keeps each chunk's
    /// distance matrix near 4M elements.
    pub chunk_size: Option<i64>,
}

impl Default for TripletConfig {
    fn default() -> Self {
        TripletConfig::new(1.0)
    }
}

/// The unnormalised parts of a loss, for callers that combine several
/// batches (distributed training) before dividing.
#[derive(Debug)]
pub struct Terms {
    /// The sum of the per-term losses, differentiable.
    pub sum: Tensor,
    /// How many terms the loss averages over (int64, 0-d): positive
    /// triplets for batch-all, valid anchors for batch-hard, valid positive
    /// pairs for semi-hard.
    pub count: Tensor,
    /// Batch-all: the number of valid triplets; otherwise equal to `count`.
    pub valid: Tensor,
}

impl Terms {
    /// `sum / max(count, 1)`.
    pub fn mean(&self) -> Tensor {
        &self.sum / self.count.clamp_min(1).to_kind(self.sum.kind())
    }

    /// `count / max(valid, 1)`: the fraction of positive triplets for batch-all.
    pub fn fraction(&self) -> Tensor {
        self.count.to_kind(self.sum.kind()) / self.valid.clamp_min(1).to_kind(self.sum.kind())
    }
}

impl TripletConfig {
    /// Euclidean distance, relu hinge, automatic kernel and chunking.
    pub fn new(margin: f64) -> Self {
        TripletConfig {
            margin,
            distance: Distance::Euclidean,
            soft: false,
            kernel: Kernel::Auto,
            chunk_size: None,
        }
    }

    pub fn distance(mut self, distance: Distance) -> Self {
        self.distance = distance;
        self
    }

    pub fn soft(mut self, soft: bool) -> Self {
        self.soft = soft;
        self
    }

    pub fn kernel(mut self, kernel: Kernel) -> Self {
        self.kernel = kernel;
        self
    }

    pub fn chunk_size(mut self, rows: i64) -> Self {
        self.chunk_size = Some(rows);
        self
    }

    /// Batch-all loss and the fraction of valid triplets with a positive loss.
    pub fn batch_all(
        &self,
        labels: &Tensor,
        embeddings: &Tensor,
    ) -> Result<(Tensor, Tensor), Error> {
        let terms = self.terms(Mining::All, labels, embeddings, None)?;
        let kind = embeddings.kind();
        Ok((terms.mean().to_kind(kind), terms.fraction().to_kind(kind)))
    }

    /// Batch-hard loss.
    pub fn batch_hard(&self, labels: &Tensor, embeddings: &Tensor) -> Result<Tensor, Error> {
        let terms = self.terms(Mining::Hard, labels, embeddings, None)?;
        Ok(terms.mean().to_kind(embeddings.kind()))
    }

    /// Semi-hard loss.
    pub fn batch_semihard(&self, labels: &Tensor, embeddings: &Tensor) -> Result<Tensor, Error> {
        let terms = self.terms(Mining::SemiHard, labels, embeddings, None)?;
        Ok(terms.mean().to_kind(embeddings.kind()))
    }

    /// The unnormalised loss of `embeddings` as anchors, mined against
    /// `references` or, when `None`, against the batch itself.
    pub fn terms(
        &self,
        mining: Mining,
        labels: &Tensor,
        embeddings: &Tensor,
        references: Option<&References>,
    ) -> Result<Terms, Error> {
        self.validate(labels, embeddings, references)?;
        let kind = match embeddings.kind() {
            Kind::Half | Kind::BFloat16 => Kind::Float,
            k => k,
        };
        let device = embeddings.device();
        let x = embeddings.to_kind(kind);
        let x_labels = label_keys(labels, "labels")?.to_device(device);
        let (y, y_labels, self_col) = match references {
            Some(r) => (
                r.embeddings.to_kind(kind),
                label_keys(r.labels, "ref_labels")?.to_device(device),
                r.anchor_offset,
            ),
            None => (x.shallow_clone(), x_labels.shallow_clone(), Some(0)),
        };
        let ties = tch::no_grad(|| Ties::find(&x, &y, self_col, references.is_none(), self.kernel));
        let sides = Sides {
            x: &x,
            x_labels: &x_labels,
            y: &y,
            y_labels: &y_labels,
            self_col,
            ties,
        };
        let terms = match mining {
            Mining::Hard => self.hard_terms(&sides)?,
            Mining::All | Mining::SemiHard => self.weighted_terms(mining, &sides)?,
        };
        // NaN or ±Inf anywhere in the inputs makes the loss NaN, even when
        // no triplet uses that sample.
        let guard = (&x * 0.0).sum(kind) + (&y * 0.0).sum(kind);
        Ok(Terms {
            sum: terms.sum + guard,
            ..terms
        })
    }

    fn validate(
        &self,
        labels: &Tensor,
        embeddings: &Tensor,
        references: Option<&References>,
    ) -> Result<(), Error> {
        if !self.margin.is_finite() || self.margin < 0.0 {
            return Err(Error::invalid(
                "margin",
                format!("must be finite and >= 0, got {}", self.margin),
            ));
        }
        if let Some(rows) = self.chunk_size {
            if rows < 1 {
                return Err(Error::invalid(
                    "chunk_size",
                    format!("must be >= 1, got {rows}"),
                ));
            }
        }
        if embeddings.dim() == 1 && labels.dim() == 2 {
            return Err(Error::invalid(
                "embeddings",
                format!(
                    "got a 1-D tensor of shape {:?} while labels is 2-D of shape {:?}: the \
                     arguments look swapped; the order is (labels, embeddings)",
                    embeddings.size(),
                    labels.size()
                ),
            ));
        }
        check_pair("embeddings", embeddings, "labels", labels)?;
        if let Some(r) = references {
            check_pair("ref_embeddings", r.embeddings, "ref_labels", r.labels)?;
            let (d, rd) = (embeddings.size()[1], r.embeddings.size()[1]);
            if d != rd {
                return Err(Error::invalid(
                    "ref_embeddings",
                    format!("must have the embedding size of embeddings ({d}), got {rd}"),
                ));
            }
            if r.embeddings.device() != embeddings.device() {
                return Err(Error::invalid(
                    "ref_embeddings",
                    format!(
                        "must be on the device of embeddings ({:?}), got {:?}",
                        embeddings.device(),
                        r.embeddings.device()
                    ),
                ));
            }
            if let Some(offset) = r.anchor_offset {
                let (n, m) = (embeddings.size()[0], r.embeddings.size()[0]);
                if offset < 0 || offset + n > m {
                    return Err(Error::invalid(
                        "anchor_offset",
                        format!(
                            "anchors {offset}..{} fall outside the {m} references",
                            offset + n
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn rows_per_chunk(&self, references: i64) -> i64 {
        self.chunk_size
            .unwrap_or_else(|| (CHUNK_ELEMENTS / references.max(1)).max(1))
    }

    fn weighted_terms(&self, mining: Mining, s: &Sides) -> Result<Terms, Error> {
        let kind = s.x.kind();
        let zero_i = Tensor::zeros([], (Kind::Int64, s.x.device()));
        let mut value = Tensor::zeros([], (kind, s.x.device()));
        let mut count = zero_i.shallow_clone();
        let mut valid = zero_i.copy();
        let (n, m) = (s.x.size()[0], s.y.size()[0]);
        let (sx, sy) =
            tch::no_grad(|| (Side::new(self.distance, s.x), Side::new(self.distance, s.y)));
        let mut triplets: (Vec<i64>, Vec<i64>, Vec<i64>) = (vec![], vec![], vec![]);
        let (gx, gy) = tch::no_grad(|| -> Result<_, Error> {
            let gx = s.x.detach().zeros_like();
            let mut gy = s.y.detach().zeros_like();
            if m > 0 {
                let step = self.rows_per_chunk(m);
                for start in (0..n).step_by(step as usize) {
                    let len = step.min(n - start);
                    let rows = sx.rows(start, len);
                    let d = s.distances(&rows, &sy, start);
                    let row_labels = s.x_labels.narrow(0, start, len);
                    let chunk = Chunk {
                        d: &d,
                        row_labels: &row_labels,
                        col_labels: s.y_labels,
                        self_col: s.self_col.map(|c| c + start),
                        distance: self.distance,
                    };
                    let out = match mining {
                        Mining::All => mining::batch_all(self.kernel, &chunk, self.margin),
                        _ => mining::semihard(self.kernel, &chunk, self.margin),
                    }?;
                    value += out.value;
                    count += out.count;
                    valid += out.valid;
                    match out.selection {
                        Selection::Weights(w) => {
                            let mut gx_rows = gx.narrow(0, start, len);
                            let p = rows.pair_weights(&w, &d);
                            rows.accumulate_grad(&sy, &p, None, &mut gx_rows, &mut gy);
                        }
                        Selection::PairWeights { weights, row_sum } => {
                            let mut gx_rows = gx.narrow(0, start, len);
                            rows.accumulate_grad(
                                &sy,
                                &weights,
                                Some(row_sum),
                                &mut gx_rows,
                                &mut gy,
                            );
                        }
                        Selection::Triplets {
                            anchor,
                            positive,
                            negative,
                        } => {
                            triplets.0.extend(anchor.iter().map(|a| a + start));
                            triplets.1.extend(positive);
                            triplets.2.extend(negative);
                        }
                    }
                }
            }
            Ok((sx.finish_grad(gx), sy.finish_grad(gy)))
        })?;
        // The loss is linear in the selected distances, so its gradient with
        // respect to the embeddings is (gx, gy) plus that of the selected
        // triplets; the surrogates carry it through autograd without
        // changing the value.
        let mut sum = value + surrogate(s.x, &gx) + surrogate(s.y, &gy);
        if !triplets.0.is_empty() {
            let anchors = s.x.index_select(0, &Tensor::from_slice(&triplets.0));
            let d_ap = self.distance.paired(
                &anchors,
                &s.y.index_select(0, &Tensor::from_slice(&triplets.1)),
            );
            let d_an = self.distance.paired(
                &anchors,
                &s.y.index_select(0, &Tensor::from_slice(&triplets.2)),
            );
            let selected = (d_ap - d_an).sum(kind);
            sum += &selected - selected.detach();
        }
        Ok(Terms { sum, count, valid })
    }

    fn hard_terms(&self, s: &Sides) -> Result<Terms, Error> {
        let kind = s.x.kind();
        let device = s.x.device();
        let (n, m) = (s.x.size()[0], s.y.size()[0]);
        if n == 0 || m == 0 {
            let zero = Tensor::zeros([], (Kind::Int64, device));
            return Ok(Terms {
                sum: Tensor::zeros([], (kind, device)),
                count: zero.shallow_clone(),
                valid: zero,
            });
        }
        // Written in place: per-chunk tensors kept alive between the chunks'
        // distance matrices would fragment the heap.
        let positive = Tensor::zeros([n], (Kind::Int64, device));
        let negative = positive.zeros_like();
        let valid = Tensor::zeros([n], (Kind::Bool, device));
        tch::no_grad(|| -> Result<(), Error> {
            let sx = Side::new(self.distance, s.x);
            let sy = Side::new(self.distance, s.y);
            let step = self.rows_per_chunk(m);
            for start in (0..n).step_by(step as usize) {
                let len = step.min(n - start);
                let d = s.distances(&sx.rows(start, len), &sy, start);
                let row_labels = s.x_labels.narrow(0, start, len);
                let chunk = Chunk {
                    d: &d,
                    row_labels: &row_labels,
                    col_labels: s.y_labels,
                    self_col: s.self_col.map(|c| c + start),
                    distance: self.distance,
                };
                let h = mining::hardest(self.kernel, &chunk)?;
                positive.narrow(0, start, len).copy_(&h.positive);
                negative.narrow(0, start, len).copy_(&h.negative);
                valid.narrow(0, start, len).copy_(&h.valid);
            }
            Ok(())
        })?;
        let d_ap = self.distance.paired(s.x, &s.y.index_select(0, &positive));
        let d_an = self.distance.paired(s.x, &s.y.index_select(0, &negative));
        let z = d_ap - d_an + self.margin;
        let hinge = if self.soft { z.softplus() } else { z.relu() };
        let sum = hinge.where_self(&valid, &hinge.zeros_like()).sum(kind);
        let count = valid.sum(Kind::Int64);
        Ok(Terms {
            sum,
            valid: count.shallow_clone(),
            count,
        })
    }
}

struct Sides<'a> {
    x: &'a Tensor,
    x_labels: &'a Tensor,
    y: &'a Tensor,
    y_labels: &'a Tensor,
    self_col: Option<i64>,
    ties: Option<Ties>,
}

impl Sides<'_> {
    /// Distances from anchors `start..start + rows.len()` to every reference.
    fn distances(&self, rows: &Side, references: &Side, start: i64) -> Tensor {
        let d = rows.pairwise(references);
        match &self.ties {
            Some(ties) => ties.apply(&d, start),
            None => d,
        }
    }
}

fn surrogate(x: &Tensor, grad: &Tensor) -> Tensor {
    let s = (x * grad).sum(x.kind());
    &s - s.detach()
}

fn check_pair(
    emb_name: &'static str,
    embeddings: &Tensor,
    label_name: &'static str,
    labels: &Tensor,
) -> Result<(), Error> {
    if embeddings.dim() != 2 {
        return Err(Error::invalid(
            emb_name,
            format!(
                "must be 2-D (batch, dim), got shape {:?}",
                embeddings.size()
            ),
        ));
    }
    if !embeddings.is_floating_point() {
        return Err(Error::invalid(
            emb_name,
            format!("must be floating point, got dtype {:?}", embeddings.kind()),
        ));
    }
    if labels.dim() != 1 {
        return Err(Error::invalid(
            label_name,
            format!("must be 1-D (batch,), got shape {:?}", labels.size()),
        ));
    }
    let (n, l) = (embeddings.size()[0], labels.size()[0]);
    if n != l {
        return Err(Error::invalid(
            label_name,
            format!("has {l} entries but {emb_name} has {n} rows"),
        ));
    }
    Ok(())
}

/// Batch-all triplet loss, as in online_triplet_loss 0.0.6: returns the loss
/// and the fraction of valid triplets whose loss is positive.
pub fn batch_all_triplet_loss(
    labels: &Tensor,
    embeddings: &Tensor,
    margin: f64,
    squared: bool,
) -> Result<(Tensor, Tensor), Error> {
    TripletConfig::new(margin)
        .distance(Distance::from_squared(squared))
        .batch_all(labels, embeddings)
}

/// Batch-hard triplet loss, as in online_triplet_loss 0.0.6 but averaged
/// over the anchors that have a positive and a negative.
pub fn batch_hard_triplet_loss(
    labels: &Tensor,
    embeddings: &Tensor,
    margin: f64,
    squared: bool,
) -> Result<Tensor, Error> {
    TripletConfig::new(margin)
        .distance(Distance::from_squared(squared))
        .batch_hard(labels, embeddings)
}

/// Semi-hard triplet loss (FaceNet).
pub fn batch_semihard_triplet_loss(
    labels: &Tensor,
    embeddings: &Tensor,
    margin: f64,
    squared: bool,
) -> Result<Tensor, Error> {
    TripletConfig::new(margin)
        .distance(Distance::from_squared(squared))
        .batch_semihard(labels, embeddings)
}

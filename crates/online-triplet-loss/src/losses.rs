//! The three triplet losses and their configuration.

use tch::{Device, Kind, Tensor};

use crate::distance::{add_exact_pair_grad, Distance, Side};
use crate::error::{caught, dtype_name};
use crate::grad;
use crate::labels::{common, domain, keys, keys_on, ANCHOR_NAN_KEYS, REFERENCE_NAN_KEYS};
use crate::mining::{self, Chunk, Columns, Gram, Hardest, Kernel, Near, Selection};
use crate::ties::Ties;
use crate::{Error, Interrupt};

/// Anchors are mined against this many distances at a time, unless set...
const CHUNK_ELEMENTS: i64 = 1 << 22;
/// ... and at least this many anchors: every chunk's product packs the whole
/// reference set again and batch-all's updates the whole (M, D) gradient of
/// the references, so thin chunks of a large batch would spend their time
/// there (measured: 512 beats 256 at B = 16384, while taller chunks than
/// 4M elements are slower at B = 4096).
const MIN_CHUNK_ROWS: i64 = 512;
/// A batch mined against itself takes the half-matrix kernels of batch-all
/// and semi-hard when it spans at least these many chunks: over c chunks the
/// half computes (c + 1)/2c of the products, and their passes over columns
/// cost more than the row passes they replace. Measured on a 2-core CPU,
/// D = 128: batch-all gains from 4 chunks on (B = 4096: 65 against 79 ms;
/// at one chunk, B = 2048, it loses), semi-hard, whose gradient takes no
/// product, only from 16 (B = 8192: 121 against 128 ms; B = 4096, 4
/// chunks: 42 against 37 ms; B = 16384: 405 against 517 ms).
const HALF_MIN_CHUNKS_ALL: i64 = 4;
const HALF_MIN_CHUNKS_SEMIHARD: i64 = 16;

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
    /// Reference embeddings, `(M, D)` in all: one tensor, or parts whose
    /// rows follow each other (a batch, then a memory bank), the references
    /// that `Tensor::cat` of them would hold, without that concatenation's
    /// gradient: batch-all and semi-hard compute the references' gradient
    /// only for the rows up to the end of the last part that requires grad,
    /// so constant parts (a memory bank) go last.
    pub embeddings: &'a [&'a Tensor],
    /// Their labels, `(M,)`.
    pub labels: &'a Tensor,
    /// `Some(k)` when the anchors are also references: anchor `i` is
    /// reference `k + i`, one sample, never paired with itself. Its row
    /// there may hold other values (a stale entry of a memory bank): the
    /// anchor's own values give its distances and ties. Another label there
    /// makes the loss and every gradient it sends NaN (found without
    /// synchronising with the device).
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
    /// The margin m, ≥ 0 and finite in the loss's dtype (that of the embeddings).
    pub margin: f64,
    /// The distance between embeddings.
    pub distance: Distance,
    /// Batch-hard only: softplus instead of relu as the hinge.
    pub soft: bool,
    /// Which implementation mines.
    pub kernel: Kernel,
    /// Anchors mined at a time; `None` picks a size that keeps each chunk's
    /// distance matrix near 4M elements, with at least 512 anchors.
    pub chunk_size: Option<i64>,
    /// Asked between chunks of anchors whether to stop; see
    /// [`TripletConfig::interrupt`].
    pub interrupt: Option<Interrupt>,
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
    /// The sum of the per-term losses, differentiable, in float64: in the
    /// loss's dtype it could overflow where their mean does not.
    pub sum: Tensor,
    /// How many terms the loss averages over (int64, 0-d): positive
    /// triplets for batch-all, valid anchors for batch-hard, valid positive
    /// pairs for semi-hard.
    pub count: Tensor,
    /// Batch-all: the number of valid triplets; otherwise equal to `count`.
    pub valid: Tensor,
    /// ∂sum/∂margin (0-d, not differentiable, in the dtype the loss is
    /// computed in: float32 for half-precision embeddings): the number of
    /// terms whose hinge is active, or the sum of the softplus slopes for a
    /// soft batch-hard loss.
    pub margin_grad: Tensor,
}

impl Terms {
    fn check(&self) -> Result<(), Error> {
        for (name, t) in [
            ("sum", &self.sum),
            ("count", &self.count),
            ("valid", &self.valid),
            ("margin_grad", &self.margin_grad),
        ] {
            if !t.defined() {
                return Err(Error::invalid(name, "must be a defined tensor"));
            }
        }
        let device = self.sum.device();
        for (name, t) in [
            ("sum", &self.sum),
            ("count", &self.count),
            ("valid", &self.valid),
            ("margin_grad", &self.margin_grad),
        ] {
            if !is_strided(t) {
                return Err(Error::invalid(name, "must be a dense (strided) tensor"));
            }
            if t.dim() != 0 {
                return Err(Error::invalid(
                    name,
                    format!("must be a 0-d tensor, got shape {:?}", t.size()),
                ));
            }
            // libtorch's other device types (meta, MPS, …) read as Mps.
            if t.device() != device || !matches!(device, Device::Cpu | Device::Cuda(_)) {
                return Err(Error::invalid(
                    name,
                    if name == "sum" {
                        "must be on the CPU or a CUDA device"
                    } else {
                        "must be on the device of sum"
                    },
                ));
            }
        }
        if !self.sum.is_floating_point() {
            return Err(Error::invalid("sum", "must be floating point"));
        }
        for (name, t) in [("count", &self.count), ("valid", &self.valid)] {
            let kind = t.f_kind().map_err(|_| {
                Error::invalid(name, "has a dtype this library cannot read; must be int64")
            })?;
            if kind != Kind::Int64 {
                return Err(Error::invalid(
                    name,
                    format!("must be an int64 tensor, got dtype {}", dtype_name(kind)),
                ));
            }
        }
        Ok(())
    }

    /// `sum / max(count, 1)`, in the dtype of `sum` (float64 from
    /// [`TripletConfig::terms`]; the losses cast it to the embeddings').
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when a field is not a 0-d tensor or `sum`
    /// is not floating point; [`Error::Torch`] when libtorch fails. The
    /// values are not read (that would wait for the device): counts below 0,
    /// which no loss gives, give a quotient of their sign.
    pub fn mean(&self) -> Result<Tensor, Error> {
        self.check()?;
        // Dividing by an int64 tensor casts it to the dtype of `sum`.
        caught(|| Ok(self.sum.f_div(&self.count.f_clamp_min(1)?)?))
    }

    /// `count / max(valid, 1)` in the dtype of `sum`: the fraction of
    /// positive triplets for batch-all; NaN when `sum` is NaN (non-finite
    /// embeddings, say), whose counts mean nothing. A sum that overflowed to
    /// inf keeps its fraction.
    ///
    /// # Errors
    /// As [`Terms::mean`].
    pub fn fraction(&self) -> Result<Tensor, Error> {
        self.check()?;
        let kind = self.sum.f_kind()?;
        caught(|| {
            Ok(self
                .count
                .f_to_kind(kind)?
                .f_div(&self.valid.f_clamp_min(1)?)?
                .f_where_scalarother(&self.sum.f_detach()?.f_isnan()?.f_logical_not()?, f64::NAN)?)
        })
    }
}

impl TripletConfig {
    /// Euclidean distance, relu hinge, automatic kernel and chunking. A
    /// margin that is negative, not finite or beyond the embeddings' dtype
    /// is refused when a loss is computed.
    #[must_use]
    pub fn new(margin: f64) -> Self {
        TripletConfig {
            margin,
            distance: Distance::Euclidean,
            soft: false,
            kernel: Kernel::Auto,
            chunk_size: None,
            interrupt: None,
        }
    }

    /// The distance that mines and enters the hinge.
    #[must_use]
    pub fn distance(mut self, distance: Distance) -> Self {
        self.distance = distance;
        self
    }

    /// Batch-hard's soft margin, log(1 + exp(d_ap − d_an)), in place of the
    /// relu hinge; batch-all and semi-hard ignore it.
    #[must_use]
    pub fn soft(mut self, soft: bool) -> Self {
        self.soft = soft;
        self
    }

    /// Which implementation mines; see [`Kernel`].
    #[must_use]
    pub fn kernel(mut self, kernel: Kernel) -> Self {
        self.kernel = kernel;
        self
    }

    /// Mines `rows` anchors at a time, which bounds the memory to
    /// O(rows · references); by default about 4M distances a chunk, and at
    /// least 512 anchors. A value below 1 is refused when a loss is
    /// computed.
    #[must_use]
    pub fn chunk_size(mut self, rows: i64) -> Self {
        self.chunk_size = Some(rows);
        self
    }

    /// Asks `stop` before each chunk of anchors but the first is mined, and
    /// ends the loss with [`Error::Interrupted`] when it returns `true`. A
    /// batch of 65536 takes 5 to 14 seconds on two cores; the Python package
    /// checks for Ctrl-C here. A batch of one chunk is never asked.
    ///
    /// ```
    /// use online_triplet_loss::{Error, Interrupt, TripletConfig};
    /// use tch::{Device, Kind, Tensor};
    ///
    /// let embeddings = Tensor::randn([8, 4], (Kind::Float, Device::Cpu));
    /// let labels = Tensor::from_slice(&[0i64, 0, 1, 1, 2, 2, 3, 3]);
    /// let config = TripletConfig::new(0.2).chunk_size(4).interrupt(Interrupt(|| true));
    /// assert_eq!(config.batch_hard(&labels, &embeddings).err(), Some(Error::Interrupted));
    /// ```
    #[must_use]
    pub fn interrupt(mut self, stop: Interrupt) -> Self {
        self.interrupt = Some(stop);
        self
    }

    /// Batch-all loss and the fraction of valid triplets with a positive loss.
    ///
    /// # Shapes
    /// `labels`: `(B,)`; `embeddings`: `(B, D)`; both results are 0-d, in
    /// the dtype of `embeddings`.
    ///
    /// # Errors
    /// As [`TripletConfig::terms`].
    pub fn batch_all(
        &self,
        labels: &Tensor,
        embeddings: &Tensor,
    ) -> Result<(Tensor, Tensor), Error> {
        let terms = self.terms(Mining::All, labels, embeddings, None)?;
        let kind = embeddings.f_kind()?;
        Ok((
            terms.mean()?.f_to_kind(kind)?,
            terms.fraction()?.f_to_kind(kind)?,
        ))
    }

    /// Batch-hard loss.
    ///
    /// # Shapes
    /// `labels`: `(B,)`; `embeddings`: `(B, D)`; the loss is 0-d, in the
    /// dtype of `embeddings`.
    ///
    /// # Errors
    /// As [`TripletConfig::terms`].
    pub fn batch_hard(&self, labels: &Tensor, embeddings: &Tensor) -> Result<Tensor, Error> {
        let terms = self.terms(Mining::Hard, labels, embeddings, None)?;
        Ok(terms.mean()?.f_to_kind(embeddings.f_kind()?)?)
    }

    /// Semi-hard loss.
    ///
    /// # Shapes
    /// `labels`: `(B,)`; `embeddings`: `(B, D)`; the loss is 0-d, in the
    /// dtype of `embeddings`.
    ///
    /// # Errors
    /// As [`TripletConfig::terms`].
    pub fn batch_semihard(&self, labels: &Tensor, embeddings: &Tensor) -> Result<Tensor, Error> {
        let terms = self.terms(Mining::SemiHard, labels, embeddings, None)?;
        Ok(terms.mean()?.f_to_kind(embeddings.f_kind()?)?)
    }

    /// The unnormalised loss of `embeddings` as anchors, mined against
    /// `references` or, when `None`, against the batch itself.
    ///
    /// Non-finite values anywhere in the embeddings or references, Euclidean
    /// (or squared) distances whose squares may overflow the dtype (float32
    /// embeddings ≳ 1e19 apart), cosine distances of rows whose norm
    /// overflows, and Euclidean (or squared) distances of embeddings so
    /// close together that the squares of their differences underflow
    /// (every entry within 1.1e-19 of the first embedding's in float32,
    /// 1.5e-154 in float64, but not all equal) make `sum` NaN and every
    /// gradient it sends NaN, even where no triplet uses them: never a
    /// quietly wrong number.
    ///
    /// # Shapes
    /// `labels`: `(B,)`, integer, bool or floating point; `embeddings`:
    /// `(B, D)`, float16, bfloat16 (computed in float32), float32 or
    /// float64, on the CPU or a CUDA device; references: `(M, D)` on the
    /// device of `embeddings`, and `(M,)`. Labels on the CPU with CUDA
    /// embeddings are copied to the device as a queued copy, not one that
    /// waits for the device (CUDA may still stage a copy from pageable
    /// memory in step with the stream; pinned labels avoid that).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the argument for a margin that is
    /// negative, not finite, or above the largest value of the embeddings'
    /// dtype (the loss's), a chunk size below 1, shapes that do not
    /// match, unsupported dtypes, layouts or devices, an `anchor_offset`
    /// outside the references, or integer labels beyond ±2⁵³ that meet
    /// floating-point labels (the anchors' and the references' of different
    /// kinds: checked by reading one flag from the device, the one
    /// synchronisation with a CUDA device, in this mixed case only), or a
    /// forward-mode AD tangent on an input of batch-all or semi-hard (whose
    /// gradients are computed for reverse mode only);
    /// [`Error::Torch`] when libtorch fails (out of memory, say);
    /// [`Error::OutOfMemory`] when a buffer of the native CPU kernels cannot
    /// be allocated; [`Error::Interrupted`] when the
    /// [`TripletConfig::interrupt`] asks to stop.
    pub fn terms(
        &self,
        mining: Mining,
        labels: &Tensor,
        embeddings: &Tensor,
        references: Option<&References>,
    ) -> Result<Terms, Error> {
        caught(|| self.terms_with(mining, labels, embeddings, references, None))
    }

    /// [`TripletConfig::terms`] with a learnable margin: `margin`, a
    /// one-element floating-point tensor on any device holding the value of
    /// [`TripletConfig::margin`], receives the gradient of `sum`. Batch-hard
    /// uses it in its hinge, so every derivative is exact; batch-all and
    /// semi-hard add the exact first derivative. Batch-hard takes the
    /// tensor's value; for batch-all and semi-hard, which mine with
    /// [`TripletConfig::margin`], a tensor holding another value (in the
    /// dtype the loss computes in: float32 for float16, bfloat16 and float32
    /// embeddings) makes `sum` and its gradients NaN; for batch-hard, a
    /// negative, infinite or NaN value does (checked on the tensor's device,
    /// without synchronising). A CPU margin with CUDA embeddings is read as
    /// a number in the forward pass, without waiting for the device; its
    /// gradient is copied back to the CPU in the backward pass, which waits,
    /// as for any CPU tensor in a CUDA graph. A CUDA margin with CPU
    /// embeddings is copied to the CPU, which waits.
    ///
    /// # Shapes
    /// As [`TripletConfig::terms`]; `margin` holds one element (`()`,
    /// `(1,)`, …).
    ///
    /// # Errors
    /// As [`TripletConfig::terms`], and [`Error::InvalidArgument`] when
    /// `margin` is not a one-element floating-point tensor.
    ///
    /// ```
    /// use online_triplet_loss::{Mining, TripletConfig};
    /// use tch::{Device, Kind, Tensor};
    ///
    /// // Integer points, whose distances are exact.
    /// let x = Tensor::from_slice(&[0.0f32, 1.0, 5.0, 7.0]).view([4, 1]);
    /// let labels = Tensor::from_slice(&[0i64, 0, 1, 1]);
    /// let margin = Tensor::from_slice(&[5.0f32]).reshape([]).set_requires_grad(true);
    /// let config = TripletConfig::new(5.0);
    /// let terms = config.terms_with_margin(Mining::Hard, &labels, &x, None, &margin)?;
    /// // Hinges 1 − 5 + 5, 1 − 4 + 5, 2 − 4 + 5 and 2 − 6 + 5 over 4 anchors.
    /// assert_eq!(f64::try_from(&terms.mean()?)?, 1.75);
    /// terms.sum.backward();
    /// assert_eq!(f64::try_from(&margin.grad())?, 4.0);
    /// # Ok::<(), online_triplet_loss::Error>(())
    /// ```
    pub fn terms_with_margin(
        &self,
        mining: Mining,
        labels: &Tensor,
        embeddings: &Tensor,
        references: Option<&References>,
        margin: &Tensor,
    ) -> Result<Terms, Error> {
        caught(|| self.terms_with(mining, labels, embeddings, references, Some(margin)))
    }

    fn terms_with(
        &self,
        mining: Mining,
        labels: &Tensor,
        embeddings: &Tensor,
        references: Option<&References>,
        margin: Option<&Tensor>,
    ) -> Result<Terms, Error> {
        self.validate(labels, embeddings, references)?;
        if let Some(m) = margin {
            if !m.defined() {
                return Err(Error::invalid("margin", "must be a defined tensor"));
            }
            check_placement("margin", m)?;
            if m.numel() != 1 || !m.is_floating_point() {
                return Err(Error::invalid(
                    "margin",
                    format!(
                        "must be a one-element floating-point tensor, got shape {:?}",
                        m.size()
                    ),
                ));
            }
            if m.device() != Device::Cpu && m.device() != embeddings.device() {
                return Err(Error::invalid(
                    "margin",
                    "must be on the CPU or the device of embeddings",
                ));
            }
        }
        if mining != Mining::Hard {
            let parts = references.map_or(&[][..], |r| r.embeddings);
            let inputs = [("embeddings", Some(embeddings)), ("margin", margin)]
                .into_iter()
                .chain(parts.iter().map(|&t| ("ref_embeddings", Some(t))));
            for (name, t) in inputs {
                if let Some(t) = t.filter(|t| t.defined()) {
                    if grad::has_tangent(t)? {
                        return Err(Error::invalid(
                            name,
                            "carries a forward-mode AD tangent: batch-all and semi-hard compute \
                             their gradient for reverse mode only; use backward, or batch-hard, \
                             which supports both",
                        ));
                    }
                }
            }
        }
        let kind = match embeddings.f_kind()? {
            Kind::Half | Kind::BFloat16 => Kind::Float,
            k => k,
        };
        let device = embeddings.device();
        let x = embeddings.f_to_kind(kind)?;
        let x_domain = domain(labels, "labels")?;
        // The references in the loss's dtype, part by part (the anchors
        // when there are none), never concatenated: their gradients are each
        // part's own ([`Sides::poisoned`], [`Sides::reference_rows`]).
        let (parts, y_labels, self_col) = match references {
            Some(r) => {
                let d = common(
                    (x_domain, labels, "labels"),
                    (domain(r.labels, "ref_labels")?, r.labels, "ref_labels"),
                )?;
                let y_labels = keys_on(keys(r.labels, d, REFERENCE_NAN_KEYS)?, device)?;
                // An anchor that is reference k + i gets that reference's
                // NaN key, so it is neither its own positive nor negative.
                let nan_keys = match r.anchor_offset {
                    Some(k) => REFERENCE_NAN_KEYS + k,
                    None => ANCHOR_NAN_KEYS,
                };
                let x_labels = keys_on(keys(labels, d, nan_keys)?, device)?;
                let parts = r
                    .embeddings
                    .iter()
                    .map(|t| t.f_to_kind(kind))
                    .collect::<Result<Vec<_>, _>>()?;
                (parts, (x_labels, y_labels), r.anchor_offset)
            }
            None => {
                let k = keys_on(keys(labels, x_domain, REFERENCE_NAN_KEYS)?, device)?;
                (vec![x.shallow_clone()], (k.shallow_clone(), k), Some(0))
            }
        };
        let (x_labels, y_labels) = y_labels;
        let (ties, (sx, sy), mut poison) = grad::no_grad(|| -> Result<_, Error> {
            // The references, unless they are the anchors themselves.
            let y_apart = references.map(|_| parts.as_slice());
            let (sx, sy) = Side::pair(self.distance, &x, y_apart)?;
            let same = references.is_none();
            let ty = sy.tie_rows(&parts)?;
            let tx = match same {
                true => ty.shallow_clone(),
                false => sx.tie_rows(std::slice::from_ref(&x))?,
            };
            let ties = Ties::find(&tx, &ty, self_col, same, self.kernel)?;
            let mut poison = sx.poison(y_apart.map(|_| &sy))?;
            // Anchor i is reference k + i, one sample: with another label
            // there it would be its own negative. That poisons the loss
            // (read on the host, the check would synchronise).
            if let (Some(_), Some(k)) = (references, self_col) {
                let n = x.size()[0];
                let other = y_labels
                    .f_narrow(0, k, n)?
                    .f_ne_tensor(&x_labels)?
                    .f_any()?;
                let _ = poison.f_masked_fill_(&other, f64::NAN)?;
            }
            Ok((ties, (sx, sy), poison))
        })?;
        // Batch-all and semi-hard mine with the config's margin and take the
        // tensor's gradient: a tensor that does not hold the config's margin
        // (in the dtype the loss computes in; NaN, say) poisons the loss
        // rather than mixing the two (read on the host, it would
        // synchronise). Batch-hard's mining has no margin: it takes the
        // tensor's value, which must be finite and >= 0 like the config's, as
        // given, in its own dtype, into hinges taken in float64 (a float64
        // 1e39 is a margin); a NaN reaches its value by itself, but not its
        // gradients (relu's slope at NaN is 0).
        //
        // The margin as given, for batch-hard's hinges, and in the wider of
        // the loss's dtype and its own, for the surrogates that carry its
        // gradient: a float64 margin stays float64 (m − m is NaN where the
        // cast to float32 overflowed), a float16 one is widened (its
        // gradient, counts over counts, would be rounded, or lost below
        // float16's range, before the cast back).
        let (margin, surrogate_margin) = match margin {
            Some(m) => {
                let given = m.f_reshape([])?;
                // A 0-d CPU tensor takes part in another device's operations
                // as a number, read on the host; copying it there would wait
                // for the device. (Its gradient comes back with a copy from
                // the device, in the backward pass, as for any CPU tensor.)
                let given = match given.device() {
                    d if d == device => given,
                    Device::Cpu => Tensor::f_zeros([], (given.f_kind()?, device))?.f_add(&given)?,
                    _ => given.f_to_device(device)?,
                };
                let m = given.f_to_kind(kind)?;
                let refused = match mining {
                    Mining::All | Mining::SemiHard => m.f_detach()?.f_ne(self.margin)?,
                    Mining::Hard => {
                        let given = given.f_detach()?;
                        given
                            .f_isfinite()?
                            .f_logical_not_()?
                            .f_logical_or_(&given.f_lt(0.0)?)?
                    }
                };
                let _ = poison.f_masked_fill_(&refused, f64::NAN)?;
                let wide = match given.f_kind()? {
                    Kind::Double => given.shallow_clone(),
                    _ => m,
                };
                (Some(given), Some(wide))
            }
            None => (None, None),
        };
        let guard = match mining {
            Mining::Hard => None,
            Mining::All | Mining::SemiHard => {
                let y_apart = parts.iter().filter(|_| references.is_some());
                let sources: Vec<_> = [Some(&x), surrogate_margin.as_ref()]
                    .into_iter()
                    .chain(y_apart.map(Some))
                    .collect();
                first_order_guard(&sources)?
            }
        };
        let wants_grad =
            (x.requires_grad() || parts.iter().any(Tensor::requires_grad)) && grad::enabled()?;
        // With references apart, the rows up to the end of the last part
        // that requires grad.
        let ref_grad = match references {
            _ if !wants_grad => None,
            None => Some(x.size()[0]),
            Some(_) => {
                let (mut start, mut end) = (0, None);
                for part in &parts {
                    start += part.size()[0];
                    if part.requires_grad() {
                        end = Some(start);
                    }
                }
                end
            }
        };
        let sides = Sides {
            x: &x,
            x_labels: &x_labels,
            parts: &parts,
            y_labels: &y_labels,
            self_col,
            y_is_x: references.is_none(),
            ties,
            sx,
            sy,
            poison,
            guard,
            wants_grad,
            ref_grad,
        };
        let mut terms = match mining {
            Mining::Hard => self.hard_terms(&sides, margin.as_ref())?,
            Mining::All | Mining::SemiHard => self.weighted_terms(mining, &sides)?,
        };
        if let (Some(m), Mining::All | Mining::SemiHard) = (&surrogate_margin, mining) {
            let term = first_order_surrogate(m, &terms.margin_grad, sides.guard.as_ref())?;
            terms.sum = terms.sum.f_add(&term.f_to_kind(kind)?)?;
        }
        // The weighted losses carry the poison in their gradients already.
        if mining == Mining::Hard {
            terms.sum = sides.poisoned(terms.sum, None, None)?;
        }
        if let Some(m) = &surrogate_margin {
            let term = surrogate(m, &sides.poison)?;
            terms.sum = terms.sum.f_add(&term.f_to_kind(kind)?)?;
        }
        Ok(terms)
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
                format!("must be finite and >= 0, got {:?}", self.margin),
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
        // Only dense tensors have a shape to show (a nested one's dim is 2).
        if embeddings.dim() == 1
            && labels.dim() == 2
            && is_strided(embeddings)
            && is_strided(labels)
        {
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
        let (largest, dtype) = largest_finite(embeddings.kind());
        if self.margin > largest {
            return Err(Error::invalid(
                "margin",
                format!(
                    "must be at most {largest:e}, the largest {dtype}, the loss's dtype, got {:e}",
                    self.margin
                ),
            ));
        }
        if let Some(r) = references {
            if r.embeddings.is_empty() {
                return Err(Error::invalid(
                    "ref_embeddings",
                    "must hold at least one tensor (of 0 rows for no references)",
                ));
            }
            let mut m = 0i64;
            for part in r.embeddings {
                check_matrix("ref_embeddings", part)?;
                let (d, rd) = (embeddings.size()[1], part.size()[1]);
                if d != rd {
                    return Err(Error::invalid(
                        "ref_embeddings",
                        format!("must have the embedding size of embeddings ({d}), got {rd}"),
                    ));
                }
                check_same_device("ref_embeddings", part, "embeddings", embeddings)?;
                m += part.size()[0];
            }
            check_ids("ref_labels", r.labels, "ref_embeddings", m)?;
            if let Some(offset) = r.anchor_offset {
                let n = embeddings.size()[0];
                let end = offset.checked_add(n).filter(|&end| offset >= 0 && end <= m);
                if end.is_none() {
                    return Err(Error::invalid(
                        "anchor_offset",
                        format!(
                            "the {n} anchors starting at reference {offset} fall outside \
                             the {m} references"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn rows_per_chunk(&self, references: i64) -> i64 {
        self.chunk_size
            .unwrap_or_else(|| (CHUNK_ELEMENTS / references.max(1)).max(MIN_CHUNK_ROWS))
    }

    fn weighted_terms(&self, mining: Mining, s: &Sides) -> Result<Terms, Error> {
        let columns = Columns::new(s.y_labels)?;
        if mining == Mining::All && self.half_matrix(s, HALF_MIN_CHUNKS_ALL) {
            if let Some(terms) = self.all_within_terms(s, &columns)? {
                return Ok(terms);
            }
        }
        let kind = s.x.f_kind()?;
        let device = s.x.device();
        let (n, m) = (s.x.size()[0], s.y_rows());
        let (value, count, valid, active, gx, gy) = grad::no_grad(|| -> Result<_, Error> {
            // Semi-hard's selected triplets (anchor, positive, negative) from
            // the half-matrix kernels, on the CPU (at most 16 an anchor).
            let mut triplets: (Vec<i64>, Vec<i64>, Vec<i64>) = (vec![], vec![], vec![]);
            // Totals over the chunks, from the first chunk's.
            let (mut value, mut count, mut valid) = (None, None, None);
            // Semi-hard: the number of pairs whose hinge is active.
            let mut active = None;
            // Contiguous whatever the strides of the embeddings.
            let mut gx = Tensor::f_zeros(s.x.size(), (kind, device))?;
            // The references' gradient and the column sums of its weights
            // ([`Side::accumulate_grad`]), for the leading rows that need it.
            let mut gy = match s.ref_grad {
                Some(rows) => Some((
                    Tensor::f_zeros([rows, s.x.size()[1]], (kind, device))?,
                    Tensor::f_zeros([rows], (kind, device))?,
                )),
                None => None,
            };
            // The points that the gradients of selected pairs are taken from.
            let mut exact = ExactPoints::default();
            let within = match mining {
                Mining::SemiHard if self.half_matrix(s, HALF_MIN_CHUNKS_SEMIHARD) => {
                    let (points, norms) = (s.sx.points(), s.sx.norms());
                    let loss = (self.distance, self.margin);
                    let step = self.rows_per_chunk(m);
                    mining::semihard_within(points, norms, &columns, loss, (step, self.interrupt))?
                }
                _ => None,
            };
            if let Some(out) = within {
                let Selection::Triplets {
                    anchor,
                    positive,
                    negative,
                } = out.selection
                else {
                    return Err(Error::Torch(
                        "internal error: semi-hard mining returned weights".into(),
                    ));
                };
                value = Some(out.value);
                count = Some(out.count);
                valid = Some(out.valid);
                active = Some(Tensor::f_full([], anchor.len() as f64, (kind, device))?);
                triplets = (anchor, positive, negative);
            } else if m > 0 {
                let step = self.rows_per_chunk(m);
                let scratch = s.scratch(self.kernel, step.min(n), m)?;
                for start in (0..n).step_by(step as usize) {
                    if start > 0 {
                        Interrupt::check(self.interrupt)?;
                    }
                    let len = step.min(n - start);
                    let rows = s.sx.rows(start, len)?;
                    let (d, gram) = s.chunk(&rows, start, scratch.as_ref())?;
                    let row_labels = s.x_labels.f_narrow(0, start, len)?;
                    let chunk = Chunk {
                        d: d.shallow_clone(),
                        row_labels: &row_labels,
                        columns: &columns,
                        self_col: s.self_col.map(|c| c + start),
                        distance: self.distance,
                        gram,
                        near: s.wants_grad.then_some(Near {
                            row_norms: rows.norms(),
                            col_norms: s.sy.norms(),
                            rows: rows.points(),
                            cols: s.sy.points(),
                        }),
                    };
                    let out = match mining {
                        Mining::All => mining::batch_all(self.kernel, &chunk, self.margin)?,
                        _ => mining::semihard(self.kernel, &chunk, self.margin)?,
                    };
                    add_to(&mut value, out.value)?;
                    add_to(&mut count, out.count)?;
                    add_to(&mut valid, out.valid)?;
                    match out.selection {
                        Selection::Weights(w) => {
                            if mining == Mining::SemiHard {
                                // +1 at the positive of each active pair, −1s at its negative.
                                add_to(&mut active, w.f_relu()?.f_sum(kind)?)?;
                            }
                            if !s.wants_grad {
                                continue;
                            }
                            let mut gx_rows = gx.f_narrow(0, start, len)?;
                            let mut p = rows.pair_weights(&w, &d)?;
                            let near = rows.take_near(&s.sy, (&w, &d), &mut p)?;
                            rows.accumulate_grad(
                                &s.sy,
                                &p,
                                None,
                                &mut gx_rows,
                                gy.as_mut().map(|(g, c)| (g, c)),
                            )?;
                            if let Some((row, col, weight)) = near {
                                // The pairs' own rows of the embeddings.
                                let anchor = row.f_add_scalar(start)?;
                                let x = s.x.f_detach()?.f_index_select(0, &anchor)?;
                                let y = s.reference_rows(&col)?.f_detach()?;
                                add_exact_pair_grad(
                                    (x, &y),
                                    (&anchor, &col, &weight),
                                    &mut gx,
                                    gy.as_mut().map(|(gy, _)| gy),
                                )?;
                            }
                        }
                        Selection::PairWeights {
                            weights,
                            row_sum,
                            col_sum: cols,
                            mut near,
                        } => {
                            if mining == Mining::SemiHard {
                                return Err(Error::Torch(
                                    "internal error: semi-hard mining returned pair weights".into(),
                                ));
                            }
                            if !s.wants_grad {
                                continue;
                            }
                            let mut gx_rows = gx.f_narrow(0, start, len)?;
                            rows.accumulate_grad(
                                &s.sy,
                                &weights,
                                Some((row_sum, cols)),
                                &mut gx_rows,
                                gy.as_mut().map(|(g, c)| (g, c)),
                            )?;
                            if !near.is_empty() {
                                for a in &mut near.anchor {
                                    *a += start;
                                }
                                mining::add_pair_grad(
                                    self.distance,
                                    exact.get(s, self.distance)?,
                                    &near,
                                    &mut gx,
                                    gy.as_mut().map(|(gy, _)| gy),
                                )?;
                            }
                        }
                        Selection::Triplets {
                            mut anchor,
                            positive,
                            negative,
                        } => {
                            let len = anchor.len() as f64;
                            add_to(&mut active, Tensor::f_full([], len, (kind, device))?)?;
                            if !s.wants_grad || anchor.is_empty() {
                                continue;
                            }
                            // Chunk by chunk: with few classes a batch has
                            // about B²/2 positive pairs, each a triplet.
                            for a in &mut anchor {
                                *a += start;
                            }
                            mining::add_triplet_grad(
                                self.distance,
                                exact.get(s, self.distance)?,
                                (&anchor, &positive, &negative),
                                &mut gx,
                                gy.as_mut().map(|(gy, _)| gy),
                            )?;
                        }
                    }
                }
            }
            if s.wants_grad && !triplets.0.is_empty() {
                mining::add_triplet_grad(
                    self.distance,
                    exact.get(s, self.distance)?,
                    (&triplets.0, &triplets.1, &triplets.2),
                    &mut gx,
                    gy.as_mut().map(|(gy, _)| gy),
                )?;
            }
            let zero = |kind: Kind| Tensor::f_zeros([], (kind, device));
            let value = value.map_or_else(|| zero(Kind::Double), Ok)?;
            let count = count.map_or_else(|| zero(Kind::Int64), Ok)?;
            let valid = valid.map_or_else(|| zero(Kind::Int64), Ok)?;
            let active = match mining {
                Mining::All => count.f_to_kind(kind)?,
                _ => active.map_or_else(|| zero(kind), Ok)?,
            };
            let gy = match gy {
                Some((mut gy, col_sum)) => {
                    s.sy.finish_columns(&col_sum, &mut gy)?;
                    Some(s.sy.finish_grad(gy)?)
                }
                None => None,
            };
            Ok((value, count, valid, active, s.sx.finish_grad(gx)?, gy))
        })?;
        // The loss is linear in the selected distances, so its gradient with
        // respect to the embeddings is (gx, gy); the surrogates carry it
        // through autograd without changing the value. They stay two when
        // the references are the anchors: c·gx + c·gy, not c·(gx + gy), is
        // what autograd gives the same loss with references passed apart.
        let sum = match s.wants_grad {
            true => s.poisoned(value, Some(&gx), gy.as_ref())?,
            false => s.poisoned(value, None, None)?,
        };
        Ok(Terms {
            sum,
            count,
            valid,
            margin_grad: active,
        })
    }

    /// Whether the batch is mined against itself by the native kernels from
    /// half its Gram matrix: references that are the anchors, no identical
    /// embeddings, native kernels, and at least `min_chunks` chunks.
    fn half_matrix(&self, s: &Sides, min_chunks: i64) -> bool {
        let b = s.y_rows();
        s.y_is_x
            && s.ties.is_none()
            && mining::fuses_distances(self.kernel, s.x)
            && b >= min_chunks.saturating_mul(self.rows_per_chunk(b))
    }

    /// Batch-all of a batch against itself from half its Gram matrix
    /// ([`mining::batch_all_within`]); `None` for batches it does not take.
    fn all_within_terms(&self, s: &Sides, columns: &Columns) -> Result<Option<Terms>, Error> {
        let kind = s.x.f_kind()?;
        let step = self.rows_per_chunk(s.y_rows());
        let found = grad::no_grad(|| -> Result<_, Error> {
            let (points, norms) = (s.sx.points(), s.sx.norms());
            let exact = s.x.f_detach()?;
            let Some(out) = mining::batch_all_within(
                (points, norms, &exact),
                columns,
                (self.distance, self.margin),
                (step, self.interrupt),
                s.wants_grad,
            )?
            else {
                return Ok(None);
            };
            Ok(Some((
                out.value,
                out.count,
                out.valid,
                s.sx.finish_grad(out.grad)?,
            )))
        })?;
        let Some((value, count, valid, gx)) = found else {
            return Ok(None);
        };
        Ok(Some(Terms {
            sum: s.poisoned(value, s.wants_grad.then_some(&gx), None)?,
            margin_grad: count.f_to_kind(kind)?,
            count,
            valid,
        }))
    }

    fn hard_terms(&self, s: &Sides, margin: Option<&Tensor>) -> Result<Terms, Error> {
        let kind = s.x.f_kind()?;
        let device = s.x.device();
        let (n, m) = (s.x.size()[0], s.y_rows());
        if n == 0 || m == 0 {
            let zero = Tensor::f_zeros([], (Kind::Int64, device))?;
            return Ok(Terms {
                sum: Tensor::f_zeros([], (Kind::Double, device))?,
                count: zero.shallow_clone(),
                valid: zero,
                margin_grad: Tensor::f_zeros([], (kind, device))?,
            });
        }
        let Hardest {
            positive,
            negative,
            valid,
        } = grad::no_grad(|| -> Result<Hardest, Error> {
            let step = self.rows_per_chunk(m);
            let columns = Columns::new(s.y_labels)?;
            if self.half_matrix(s, 0) {
                let (points, norms) = (s.sx.points(), s.sx.norms());
                return mining::hardest_within(
                    points,
                    norms,
                    &columns,
                    self.distance,
                    (step, self.interrupt),
                );
            }
            let scratch = s.scratch(self.kernel, step.min(n), m)?;
            let mine = |start: i64, len: i64| -> Result<Hardest, Error> {
                let rows = s.sx.rows(start, len)?;
                let (d, gram) = s.chunk(&rows, start, scratch.as_ref())?;
                let row_labels = s.x_labels.f_narrow(0, start, len)?;
                let chunk = Chunk {
                    d,
                    row_labels: &row_labels,
                    columns: &columns,
                    self_col: s.self_col.map(|c| c + start),
                    distance: self.distance,
                    gram,
                    near: None,
                };
                mining::hardest(self.kernel, &chunk)
            };
            if n <= step {
                return mine(0, n);
            }
            // Written in place: per-chunk tensors kept alive between the
            // chunks' distance matrices would fragment the heap.
            let positive = Tensor::f_zeros([n], (Kind::Int64, device))?;
            let negative = positive.f_zeros_like()?;
            let valid = Tensor::f_zeros([n], (Kind::Bool, device))?;
            for start in (0..n).step_by(step as usize) {
                if start > 0 {
                    Interrupt::check(self.interrupt)?;
                }
                let len = step.min(n - start);
                let h = mine(start, len)?;
                positive.f_narrow(0, start, len)?.f_copy_(&h.positive)?;
                negative.f_narrow(0, start, len)?.f_copy_(&h.negative)?;
                valid.f_narrow(0, start, len)?.f_copy_(&h.valid)?;
            }
            Ok(Hardest {
                positive,
                negative,
                valid,
            })
        })?;
        // d_ap and d_an in one pass: the anchors twice against their
        // positives, then their negatives. Canonical rows, so that a positive
        // and a negative of one direction under the cosine distance, tied in
        // the mining, are one row here too: z is the margin exactly.
        let x = self.distance.canonical(s.x, s.sx.norms())?;
        let picked = Tensor::f_cat(&[&positive, &negative], 0)?;
        let d = self.distance.paired(
            &x.f_expand([2, n, x.size()[1]], false)?
                .f_reshape([2 * n, -1])?,
            &self.distance.canonical(
                &s.reference_rows(&picked)?,
                &s.sy.norms().f_index_select(0, &picked)?,
            )?,
        )?;
        // In float64, as the mining's hinges: a margin below an ulp of the
        // distances still counts, and one near the dtype's largest value
        // does not overflow the loss.
        let d = d.f_to_kind(Kind::Double)?;
        let gap = d.f_narrow(0, 0, n)?.f_sub(&d.f_narrow(0, n, n)?)?;
        let z = match margin {
            Some(m) => gap.f_add(m)?,
            None => gap.f_add_scalar(self.margin)?,
        };
        let hinge = if self.soft {
            softplus(&z)?
        } else {
            z.f_relu()?
        };
        let terms = hinge.f_where_scalarother(&valid, 0.0)?;
        let margin_grad = grad::no_grad(|| -> Result<Tensor, Error> {
            Ok(if self.soft {
                z.f_detach()?
                    .f_sigmoid()?
                    .f_where_scalarother(&valid, 0.0)?
                    .f_sum(kind)?
            } else {
                // A hinge is positive exactly where its slope is 1.
                terms.f_detach()?.f_gt(0.0)?.f_sum(kind)?
            })
        })?;
        let sum = terms.f_sum(Kind::Double)?;
        let count = valid.f_sum(Kind::Int64)?;
        Ok(Terms {
            sum,
            valid: count.shallow_clone(),
            count,
            margin_grad,
        })
    }
}

struct Sides<'a> {
    x: &'a Tensor,
    x_labels: &'a Tensor,
    /// The references in parts whose rows follow each other, through which
    /// their gradients go (`[x]` when they are the anchors).
    parts: &'a [Tensor],
    y_labels: &'a Tensor,
    self_col: Option<i64>,
    /// The references are the anchors themselves (`parts` is `[x]`).
    y_is_x: bool,
    ties: Option<Ties>,
    /// The anchors and the references, detached, in the frame of the distance.
    sx: Side,
    sy: Side,
    /// 0, or NaN when an input is not finite or a distance overflows
    /// ([`Side::poison`]).
    poison: Tensor,
    /// For batch-all and semi-hard, whose gradients are exact to first order
    /// only: [`first_order_guard`] of the embeddings, the references and the
    /// margin tensor.
    guard: Option<Tensor>,
    /// Whether autograd records this call and the anchors or the references
    /// require grad: otherwise batch-all and semi-hard compute no gradient
    /// for them (under `torch.no_grad`, a validation loss), only the value.
    wants_grad: bool,
    /// For how many leading references batch-all and semi-hard compute a
    /// gradient, when autograd wants one: all when they are the anchors;
    /// with references apart, up to the end of the last part that requires
    /// grad (none for a memory bank alone, the batch's rows for a batch
    /// followed by a memory bank).
    ref_grad: Option<i64>,
}

impl Sides<'_> {
    /// `value` plus the poison, differentiable: its gradient is `gx` plus the
    /// poison with respect to the anchors, and `gy` with respect to the
    /// references, plus the poison when they are apart. A `None` gradient is
    /// one the caller's own graph gives; the poison alone is added to it.
    /// So NaN reaches the loss and every gradient, also of samples that no
    /// triplet uses. Gradients given here are exact to first order only: a
    /// second derivative through them fails ([`first_order_surrogate`]).
    /// A tensor of which no derivative can be asked gets no term, a pass
    /// over a reference set saved (the poison is NaN where its entries are
    /// not finite, so the value is the same).
    fn poisoned(
        &self,
        value: Tensor,
        gx: Option<&Tensor>,
        gy: Option<&Tensor>,
    ) -> Result<Tensor, Error> {
        let weighted = |t: &Tensor, g: &Tensor| -> Result<Option<Tensor>, Error> {
            if !grad::differentiable(t)? {
                return Ok(None);
            }
            Ok(Some(match gx {
                Some(_) => first_order_surrogate(t, g, self.guard.as_ref())?,
                None => surrogate(t, g)?,
            }))
        };
        let p = &self.poison;
        let gx = match gx {
            Some(g) => g.f_add(p)?,
            None => p.shallow_clone(),
        };
        let mut sum = value.f_add(p)?;
        if let Some(term) = weighted(self.x, &gx)? {
            sum = sum.f_add(&term)?;
        }
        // When the references are the anchors, x's poison reaches them all.
        if self.y_is_x {
            if let Some(term) = gy.map(|gy| weighted(self.x, gy)).transpose()?.flatten() {
                sum = sum.f_add(&term)?;
            }
            return Ok(sum);
        }
        let gy = match gy {
            Some(g) => g.f_add(p)?,
            None => p.shallow_clone(),
        };
        let mut start = 0;
        for part in self.parts {
            let rows = part.size()[0];
            // The parts past the rows of a computed gradient require no
            // grad ([`Sides::ref_grad`]).
            let g = match gy.dim() {
                0 => Some(gy.shallow_clone()),
                _ => (start + rows <= gy.size()[0])
                    .then(|| gy.f_narrow(0, start, rows))
                    .transpose()?,
            };
            start += rows;
            if let Some(term) = g.map(|g| weighted(part, &g)).transpose()?.flatten() {
                sum = sum.f_add(&term)?;
            }
        }
        Ok(sum)
    }

    /// [`ExactPoints`]: the anchors and the references, detached, in the
    /// anchors' dtype, for Euclidean distances; the sides' points otherwise.
    fn exact_points(&self, distance: Distance) -> Result<(Tensor, Tensor), Error> {
        if distance != Distance::Euclidean {
            return Ok((
                self.sx.points().shallow_clone(),
                self.sy.points().shallow_clone(),
            ));
        }
        let kind = self.x.f_kind()?;
        let x = self.x.f_detach()?;
        let y = match self.parts {
            [one] => one.f_detach()?,
            parts => Tensor::f_cat(parts, 0)?.f_detach()?,
        };
        Ok((x, y.f_to_kind(kind)?))
    }

    /// The number of references.
    fn y_rows(&self) -> i64 {
        self.parts.iter().map(|p| p.size()[0]).sum()
    }

    /// Rows `index` of the references, differentiable with respect to each
    /// part: each part's rows from the part itself, no gradient of a
    /// concatenation.
    fn reference_rows(&self, index: &Tensor) -> Result<Tensor, Error> {
        if let [one] = self.parts {
            return Ok(one.f_index_select(0, index)?);
        }
        let mut rows: Option<Tensor> = None;
        let mut start = 0;
        for part in self.parts {
            let len = part.size()[0];
            if len > 0 {
                let local = index.f_sub_scalar(start)?;
                let taken = part.f_index_select(0, &local.f_clamp(0, len - 1)?)?;
                rows = Some(match rows {
                    None => taken,
                    Some(rows) => {
                        let inside = local.f_ge(0)?.f_logical_and(&local.f_lt(len)?)?;
                        taken.f_where_self(&inside.f_unsqueeze(1)?, &rows)?
                    }
                });
            }
            start += len;
        }
        // Not reached: a reference row is indexed, so some part has rows.
        rows.ok_or_else(|| Error::invalid("ref_embeddings", "no rows"))
    }

    /// Distances from anchors `start..start + rows.len()` to every reference.
    fn distances(&self, rows: &Side, start: i64) -> Result<Tensor, Error> {
        let d = rows.pairwise(&self.sy)?;
        match &self.ties {
            Some(ties) => ties.apply(&d, start),
            None => Ok(d),
        }
    }

    /// A buffer for the Gram products of the chunks, `(rows, m)`, when the
    /// native kernels compute the distances from them: always, unless the
    /// kernel is the portable one or identical embeddings need their
    /// distances rewritten ([`Ties`]).
    fn scratch(&self, kernel: Kernel, rows: i64, m: i64) -> Result<Option<Tensor>, Error> {
        if self.ties.is_some() || !mining::fuses_distances(kernel, self.x) {
            return Ok(None);
        }
        Ok(Some(Tensor::f_empty(
            [rows, m],
            (self.x.f_kind()?, self.x.device()),
        )?))
    }

    /// The chunk of anchors `start..start + rows.len()`: their Gram products
    /// in `scratch` with the norms that make them distances, or the distances.
    fn chunk<'s>(
        &'s self,
        rows: &'s Side,
        start: i64,
        scratch: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Gram<'s>>), Error> {
        match scratch {
            Some(buffer) => {
                let out = buffer.f_narrow(0, 0, rows.norms().size()[0])?;
                rows.gram_into(&self.sy, &out)?;
                let gram = Gram {
                    row_norms: rows.norms(),
                    col_norms: self.sy.norms(),
                };
                Ok((out, Some(gram)))
            }
            None => Ok((self.distances(rows, start)?, None)),
        }
    }
}

/// The points whose differences give the exact Euclidean distances of the
/// pairs whose gradient is taken apart (semi-hard's triplets, batch-all's
/// near pairs): the embeddings themselves, whose centred copies in the
/// sides may have lost the last bits of the difference of two near rows.
/// The sides' points for the other distances. Made once, when first needed.
#[derive(Default)]
struct ExactPoints(Option<(Tensor, Tensor)>);

impl ExactPoints {
    fn get(&mut self, s: &Sides, distance: Distance) -> Result<(&Tensor, &Tensor), Error> {
        if self.0.is_none() {
            self.0 = Some(s.exact_points(distance)?);
        }
        match &self.0 {
            Some((x, y)) => Ok((x, y)),
            None => Err(Error::Torch("internal error: no exact points".into())),
        }
    }
}

/// Adds a chunk's `t` to a running total, which the first chunk's starts
/// (out of place: a chunk's tensors may share storage with each other).
fn add_to(total: &mut Option<Tensor>, t: Tensor) -> Result<(), Error> {
    *total = Some(match total.take() {
        Some(sum) => sum.f_add(&t)?,
        None => t,
    });
    Ok(())
}

/// A term whose value is 0 and whose gradient with respect to `x` is `grad`.
fn surrogate(x: &Tensor, grad: &Tensor) -> Result<Tensor, Error> {
    Ok(x.f_sub(&x.f_detach()?)?.f_mul(grad)?.f_sum(x.f_kind()?)?)
}

/// [`surrogate`] times `guard` ([`first_order_guard`]), for a gradient that
/// is exact to first order only: `grad` is a constant, so a second
/// derivative through it would come out 0, silently.
fn first_order_surrogate(
    x: &Tensor,
    grad: &Tensor,
    guard: Option<&Tensor>,
) -> Result<Tensor, Error> {
    let term = surrogate(x, grad)?;
    match guard {
        Some(guard) => Ok(term.f_mul(&guard.f_to_kind(term.f_kind()?)?)?),
        None => Ok(term),
    }
}

/// 1, with a first derivative of 0 (both exact), through libtorch's
/// `segment_reduce` of one element of each source that requires grad, times
/// 0: its backward, `_segment_reduce_backward`, has no derivative, so a
/// gradient carrying it fails when it is differentiated with respect to any
/// source, with libtorch's "derivative for aten::_segment_reduce_backward is
/// not implemented" (on torch 2.11 to 2.15; `cdist`, which served before,
/// is twice differentiable from 2.14). Forward-mode AD through it raises
/// too. `None` when no source requires grad. In float64, which it takes
/// for every dtype; `unsafe` skips the checks of its lengths, which read
/// them on the host.
fn first_order_guard(sources: &[Option<&Tensor>]) -> Result<Option<Tensor>, Error> {
    let mut points = Vec::new();
    for t in sources.iter().flatten() {
        if t.requires_grad() && t.numel() > 0 {
            points.push(
                t.f_flatten(0, -1)?
                    .f_narrow(0, 0, 1)?
                    .f_to_kind(Kind::Double)?,
            );
        }
    }
    if points.is_empty() {
        return Ok(None);
    }
    // Times 0 first: finite points sum to 0 whatever their size.
    let points = Tensor::f_cat(&points, 0)?.f_mul_scalar(0.0)?;
    let lengths = Tensor::f_full([1], points.size()[0], (Kind::Int64, points.device()))?;
    Ok(Some(
        Tensor::f_segment_reduce(&points, "sum", Some(&lengths), None, None, 0, true, 0.0)?
            .f_sum(Kind::Double)?
            .f_mul_scalar(0.0)?
            .f_add_scalar(1.0)?,
    ))
}

/// The dtype, layout and device of embeddings the losses compute on.
pub(crate) fn check_embeddings(name: &'static str, embeddings: &Tensor) -> Result<(), Error> {
    if !embeddings.defined() {
        return Err(Error::invalid(name, "must be a defined tensor"));
    }
    let kind = embeddings
        .f_kind()
        .map_err(|_| Error::invalid(name, "has a dtype this library cannot read; pass float32"))?;
    match kind {
        Kind::Half | Kind::BFloat16 | Kind::Float | Kind::Double => {}
        Kind::Uint8
        | Kind::Int8
        | Kind::Int16
        | Kind::Int
        | Kind::Int64
        | Kind::Bool
        | Kind::ComplexHalf
        | Kind::ComplexFloat
        | Kind::ComplexDouble
        | Kind::QInt8
        | Kind::QUInt8
        | Kind::QInt32
        | Kind::Float8e5m2
        | Kind::Float8e4m3fn
        | Kind::Float8e5m2fnuz
        | Kind::Float8e4m3fnuz => {
            return Err(Error::invalid(
                name,
                format!(
                    "must be floating point (float16, bfloat16, float32 or float64), got dtype {}",
                    dtype_name(kind)
                ),
            ))
        }
    }
    check_placement(name, embeddings)
}

/// The largest finite value of the loss's dtype for floating-point
/// embeddings of dtype `kind`, whose loss comes back in their dtype (under
/// autocast the Python package passes float32 embeddings), and the dtype's
/// name: a margin above it makes every hinge infinite. A smaller one can
/// still overflow the sum of the hinges, to a loss of inf.
fn largest_finite(kind: Kind) -> (f64, &'static str) {
    match kind {
        // (2 − 2^−10)·2^15 and (2 − 2^−7)·2^127.
        Kind::Half => (65504.0, "float16"),
        Kind::BFloat16 => (3.389_531_389_251_535_5e38, "bfloat16"),
        Kind::Float => (f64::from(f32::MAX), "float32"),
        _ => (f64::MAX, "float64"),
    }
}

/// Whether `t` has the strided layout, asked without copying it (a
/// `contiguous` copy of an expanded tensor may not fit in memory) and
/// without a libtorch error on strided tensors (its message takes
/// milliseconds to build): a view of a strided tensor as its own shape
/// always exists; the compressed layouts (CSR, CSC, BSR, BSC) have none. A
/// nested tensor has no sizes, so nothing here asks for them (tch's `size`
/// would panic): `view_as` reads them inside libtorch, whose error is an
/// `Err`.
fn is_strided(t: &Tensor) -> bool {
    !(t.is_sparse() || t.is_mkldnn()) && t.f_view_as(t).is_ok()
}

/// That a defined tensor `t` is dense (strided) and on the CPU or a CUDA
/// device.
pub(crate) fn check_placement(name: &'static str, t: &Tensor) -> Result<(), Error> {
    if !is_strided(t) {
        return Err(Error::invalid(name, "must be a dense (strided) tensor"));
    }
    match t.device() {
        Device::Cpu | Device::Cuda(_) => Ok(()),
        // libtorch's other device types (meta, MPS, XPU, …) all read as Mps here.
        Device::Mps | Device::Vulkan => {
            Err(Error::invalid(name, "must be on the CPU or a CUDA device"))
        }
    }
}

/// Beyond this, log(1 + eˣ) is x in float64 (e⁻⁴⁰ is below half its ulp
/// at 40), and eˣ is finite in float32.
const SOFTPLUS_LINEAR: f64 = 40.0;

/// log(1 + eˣ), differentiable twice, with the slope σ(x). libtorch's
/// softplus returns x itself above 20, where float64 still holds e⁻²⁰
/// (2e-9): a value off by a million ulps and a slope of exactly 1. The
/// exponential takes x clamped, so that the branch not taken stays finite
/// and sends no NaN back.
fn softplus(x: &Tensor) -> Result<Tensor, Error> {
    let smooth = x.f_clamp_max(SOFTPLUS_LINEAR)?.f_exp()?.f_log1p()?;
    Ok(x.f_where_self(&x.f_gt(SOFTPLUS_LINEAR)?, &smooth)?)
}

/// That `t` (the argument `name`) is on the device of `other` (the argument
/// `other_name`).
pub(crate) fn check_same_device(
    name: &'static str,
    t: &Tensor,
    other_name: &str,
    other: &Tensor,
) -> Result<(), Error> {
    if t.device() != other.device() {
        return Err(Error::invalid(
            name,
            format!(
                "must be on the device of {other_name} ({:?}), got {:?}",
                other.device(),
                t.device()
            ),
        ));
    }
    Ok(())
}

/// Checks 2-D floating-point `embeddings` and their `labels`, the names
/// those of the arguments.
pub(crate) fn check_pair(
    emb_name: &'static str,
    embeddings: &Tensor,
    label_name: &'static str,
    labels: &Tensor,
) -> Result<(), Error> {
    check_matrix(emb_name, embeddings)?;
    check_ids(label_name, labels, emb_name, embeddings.size()[0])
}

/// Checks embeddings `(N, D)` ([`check_embeddings`], and 2-D).
fn check_matrix(name: &'static str, embeddings: &Tensor) -> Result<(), Error> {
    check_embeddings(name, embeddings)?;
    if embeddings.dim() != 2 {
        return Err(Error::invalid(
            name,
            format!(
                "must be 2-D (batch, dim), got shape {:?}",
                embeddings.size()
            ),
        ));
    }
    Ok(())
}

/// Checks `ids` (class labels, or the metrics' camera ids) of the `n` rows
/// of the embeddings `emb_name`: a dense `(n,)` tensor of a dtype that
/// holds ids.
pub(crate) fn check_ids(
    name: &'static str,
    ids: &Tensor,
    emb_name: &'static str,
    n: i64,
) -> Result<(), Error> {
    domain(ids, name)?;
    if !is_strided(ids) {
        return Err(Error::invalid(name, "must be a dense (strided) tensor"));
    }
    if ids.dim() != 1 {
        return Err(Error::invalid(
            name,
            format!("must be 1-D (batch,), got shape {:?}", ids.size()),
        ));
    }
    let l = ids.size()[0];
    if n != l {
        return Err(Error::invalid(
            name,
            format!("has {l} entries but {emb_name} has {n} rows"),
        ));
    }
    Ok(())
}

/// Batch-all triplet loss, as in online_triplet_loss 0.0.6: returns the loss
/// and the fraction of valid triplets whose loss is positive.
/// [`TripletConfig::batch_all`] with the Euclidean distance, or the squared
/// one when `squared`.
///
/// # Shapes
/// `labels`: `(B,)`; `embeddings`: `(B, D)`; both results are 0-d, in the
/// dtype of `embeddings`.
///
/// # Errors
/// As [`TripletConfig::terms`]: a margin that is negative or not finite in
/// the embeddings' dtype, labels or embeddings of the wrong shape, dtype,
/// layout or device, and a failure in libtorch.
///
/// ```
/// use online_triplet_loss::batch_all_triplet_loss;
/// use tch::Tensor;
///
/// let labels = Tensor::from_slice(&[0i64, 0, 1, 1]);
/// let embeddings = Tensor::from_slice(&[0.0f32, 0.0, 0.1, 0.0, 0.3, 0.0, 2.0, 0.0]).view([4, 2]);
/// // Anchor 0's negative at 0.3 is inside the margin of 0.5 beyond its positive at 0.1.
/// let (loss, fraction) = batch_all_triplet_loss(&labels, &embeddings, 0.5, false)?;
/// assert!(f64::try_from(&loss)? > 0.0);
/// assert!(f64::try_from(&fraction)? > 0.0 && f64::try_from(&fraction)? < 1.0);
/// assert!(batch_all_triplet_loss(&labels, &embeddings, -1.0, false).is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
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
/// [`TripletConfig::batch_hard`] with the Euclidean distance, or the squared
/// one when `squared`.
///
/// # Shapes
/// `labels`: `(B,)`; `embeddings`: `(B, D)`; the loss is 0-d, in the dtype
/// of `embeddings`.
///
/// # Errors
/// As [`batch_all_triplet_loss`].
///
/// ```
/// use online_triplet_loss::batch_hard_triplet_loss;
/// use tch::Tensor;
///
/// let labels = Tensor::from_slice(&[0i64, 0, 1, 1]);
/// let embeddings = Tensor::from_slice(&[0.0f64, 1.0, 3.0, 4.0]).view([4, 1]);
/// // Anchor 1: hardest positive at 1, hardest negative at 2: 1 − 2 + 1.5;
/// // anchor 0: 1 − 3 + 1.5 < 0, no loss.
/// let loss = batch_hard_triplet_loss(&labels, &embeddings, 1.5, false)?;
/// let want = (0.0 + 0.5 + 0.5 + 0.0) / 4.0; // anchors 0, 1, 2, 3
/// assert!((f64::try_from(&loss)? - want).abs() < 1e-12);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
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

/// Semi-hard triplet loss (FaceNet): for each positive pair, the nearest
/// negative farther than the positive, or the farthest negative when none
/// is. [`TripletConfig::batch_semihard`] with the Euclidean distance, or the
/// squared one when `squared`.
///
/// # Shapes
/// `labels`: `(B,)`; `embeddings`: `(B, D)`; the loss is 0-d, in the dtype
/// of `embeddings`.
///
/// # Errors
/// As [`batch_all_triplet_loss`].
///
/// ```
/// use online_triplet_loss::batch_semihard_triplet_loss;
/// use tch::Tensor;
///
/// // Every negative is farther than every positive by more than the margin.
/// let labels = Tensor::from_slice(&[0i64, 0, 1, 1]);
/// let embeddings = Tensor::from_slice(&[0.0f32, 0.1, 5.0, 5.1]).view([4, 1]);
/// let loss = batch_semihard_triplet_loss(&labels, &embeddings, 1.0, false)?;
/// assert_eq!(f64::try_from(&loss)?, 0.0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
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

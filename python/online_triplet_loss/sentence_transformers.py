r"""Drop-in replacements for sentence-transformers' batch triplet losses.

Change one import line and an ST training script runs on this package's exact
O(B² log B) mining::

    # from sentence_transformers.sentence_transformer.losses import BatchAllTripletLoss
    from online_triplet_loss.sentence_transformers import BatchAllTripletLoss

    loss = BatchAllTripletLoss(model)           # ST's arguments and defaults
    trainer = SentenceTransformerTrainer(model=model, train_dataset=ds, loss=loss)

The four classes take ST's arguments (``model``, ``distance_metric=``,
``margin=``, with ST's defaults: Euclidean distance, margin 5) and embed the
first column of ``sentence_features`` with ``model``, as ST's losses do; the
loss itself is :func:`~online_triplet_loss.losses.batch_all_triplet_loss`,
:func:`~online_triplet_loss.losses.batch_hard_triplet_loss` or
:func:`~online_triplet_loss.losses.batch_semihard_triplet_loss`.

On batches where every anchor has a positive and a negative (P ≥ 2 classes of
K ≥ 2 samples, as ``BatchSamplers.GROUP_BY_LABEL`` gives) the values and
gradients are ST's, up to rounding, except at exact ties: a hinge exactly at
0 sends no gradient here (ST's sends a slope of 1, or ½ in semi-hard), and
among tied distances (integer embeddings, parallel items under the cosine
distance) the one mined can differ. Elsewhere this package's definitions hold:

- batch-hard and the soft margin average over the anchors that have both a
  positive and a negative; ST averages over every anchor, so an anchor without
  a positive adds relu(m − min_n d_an) (softplus(−min_n d_an) for the soft
  margin) and, in a one-class batch, every anchor adds m (softplus(0) = log 2);
- semi-hard with a single class is 0 here; ST gives the mean of d_ap + m;
- with no positive pair at all (every label distinct) every loss is 0 here;
  ST's batch-all and semi-hard give 0 too, its batch-hard the mean of
  relu(m − min_n d_an) (0 only when every anchor's nearest negative is at
  least m away) and its soft margin the mean of softplus(−min_n d_an) > 0;
- batch-all counts triplets with a loss > 0 (ST: > 1e-16) and divides by that
  count (ST: count + 1e-16);
- the soft margin is log(1 + e^z) with slope sigmoid(z) at every z; ST's is
  torch's softplus, which returns z itself above 20 (e^-20, 2e-9, lower; a
  slope of 1), a difference float32 does not hold;
- margins must be ≥ 0 and finite in the loss's dtype (a ``ValueError`` otherwise);
- float16/bfloat16 embeddings are computed in float32 for every distance and
  the loss is returned in float32, as ST does for its Euclidean distances (its
  cosine distance computes and returns their dtype);
- embeddings must be on the CPU or a CUDA device (MPS, XPU and other devices
  are a ``ValueError``);
- second derivatives (``create_graph=True`` then a gradient of the gradient)
  through batch-all and semi-hard raise a ``RuntimeError`` (batch-hard and the
  soft margin support them), and so do ``torch.func`` transforms (``vmap``,
  ``grad``) through every loss.

sentence-transformers is an optional dependency:
``pip install "online_triplet_loss[sentence-transformers]"``. Importing
:mod:`online_triplet_loss` never imports it.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, Sequence, Union

import torch
from torch import Tensor, nn

try:
    from sentence_transformers.sentence_transformer.losses import (
        BatchHardTripletLoss as _STBatchHardTripletLoss,
        BatchHardTripletLossDistanceFunction,
    )
except ImportError as err:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "online_triplet_loss.sentence_transformers needs sentence-transformers >= 6.0; install it "
        'with: pip install "online_triplet_loss[sentence-transformers]"'
    ) from err

from ._validation import check_margin, check_tensor
from .losses import (
    batch_all_triplet_loss, batch_hard_triplet_loss, batch_semihard_triplet_loss, _keep_margin_on_cpu,
)

__all__ = [
    "BatchAllTripletLoss",
    "BatchHardTripletLoss",
    "BatchSemiHardTripletLoss",
    "BatchHardSoftMarginTripletLoss",
    "BatchHardTripletLossDistanceFunction",
]

_ACCEPTED_METRICS = (
    "BatchHardTripletLossDistanceFunction.euclidean_distance (alias eucledian_distance), "
    "functools.partial(BatchHardTripletLossDistanceFunction.euclidean_distance, squared=True) "
    "or BatchHardTripletLossDistanceFunction.cosine_distance"
)

_HERMANS_2017 = """
@misc{hermans2017defense,
    title={In Defense of the Triplet Loss for Person Re-Identification},
    author={Alexander Hermans and Lucas Beyer and Bastian Leibe},
    year={2017},
    eprint={1703.07737},
    archivePrefix={arXiv},
    primaryClass={cs.CV}
}
"""

_SCHROFF_2015 = """
@inproceedings{schroff2015facenet,
    title={FaceNet: A Unified Embedding for Face Recognition and Clustering},
    author={Florian Schroff and Dmitry Kalenichenko and James Philbin},
    booktitle={Proceedings of the IEEE Conference on Computer Vision and Pattern Recognition},
    year={2015},
    pages={815--823}
}
"""


def _distance_name(distance_metric: object) -> str:
    """This package's name for one of ST's distance functions."""
    metrics = BatchHardTripletLossDistanceFunction
    if distance_metric is metrics.euclidean_distance:
        return "euclidean"
    if distance_metric is metrics.cosine_distance:
        return "cosine"
    if (
        isinstance(distance_metric, functools.partial)
        and distance_metric.func is metrics.euclidean_distance
        and not distance_metric.args
        and set(distance_metric.keywords) <= {"squared"}
        and distance_metric.keywords.get("squared", False) in (True, False)
    ):
        return "squared" if distance_metric.keywords.get("squared", False) else "euclidean"
    raise ValueError(f"distance_metric: expected {_ACCEPTED_METRICS}; got {distance_metric!r}")


def _at_least_float32(embeddings: Tensor) -> Tensor:
    """float16 and bfloat16 embeddings as float32, as ST's Euclidean distances
    take them: the loss comes back in float32 (a float16 one is infinite past
    65504, which squared distances between embeddings of norm 200 pass)."""
    check_tensor("embeddings", embeddings)
    return embeddings.float() if embeddings.dtype in (torch.float16, torch.bfloat16) else embeddings


def _flat(labels: Tensor) -> Tensor:
    """Labels of any shape, as ST takes them, as one dimension."""
    check_tensor("labels", labels)
    return labels.reshape(-1)


class _SentenceTransformerTripletLoss(nn.Module):
    """Embeds the first input column with ``model`` and applies the loss
    through ST's method for it, which a subclass may override, as on ST's."""

    citation = _HERMANS_2017

    def __init__(self, model: nn.Module, distance_metric: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        # A child named `model`, which ST's trainer replaces by its wrapped
        # model (DDP, torch.compile): ST's triplet losses keep theirs as
        # `sentence_embedder`, which it does not replace.
        self.model = model
        self.distance_metric = distance_metric

    @property
    def distance_metric(self) -> Callable[[Tensor], Tensor]:
        """ST's distance function; setting it (as on ST's losses) checks it
        and changes the distance computed."""
        return self._distance_metric

    @distance_metric.setter
    def distance_metric(self, value: Callable[[Tensor], Tensor]) -> None:
        self.distance = _distance_name(value)
        self._distance_metric = value

    @property
    def sentence_embedder(self) -> nn.Module:
        """The model, under the attribute name ST's triplet losses use."""
        return self.model

    def __setattr__(self, name: str, value: Any) -> None:
        # nn.Module stores a module set as an attribute without asking the
        # class's properties: ``loss.sentence_embedder = other`` would add a
        # second child and leave the model in use unchanged, and a module as
        # ``distance_metric`` would skip its check.
        if name == "distance_metric":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__("model" if name == "sentence_embedder" else name, value)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # ST's trainer moves the loss to the model's device. ST's semi-hard
        # loss names its margin `margin`, the others `triplet_margin`.
        super()._apply(fn, recurse)
        for name in ("triplet_margin", "margin"):
            _keep_margin_on_cpu(self, name)
        return self

    def forward(self, sentence_features: Sequence[Dict[str, Tensor]], labels: Tensor) -> Tensor:
        embeddings = self.model(sentence_features[0])["sentence_embedding"]
        return self.compute_loss_from_embeddings([embeddings], labels)

    def compute_loss_from_embeddings(self, embeddings: List[Tensor], labels: Tensor) -> Tensor:
        """The loss of ``embeddings[0]``, :math:`(B, D)`, with ``labels`` of
        :math:`B` elements (any shape, as in ST), from ST's method of the
        loss (``batch_all_triplet_loss``, say)."""
        raise NotImplementedError

    def get_config_dict(self) -> Dict[str, Any]:
        return {"distance_metric": getattr(self.distance_metric, "__name__", str(self.distance_metric))}

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.get_config_dict().items())


def _number(margin: Any) -> Any:
    """A tensor or NumPy margin as the number it holds (its value now, for a
    learned one): the model card writes the configuration as JSON."""
    if isinstance(margin, Tensor):
        return "(learned, on meta)" if margin.is_meta else float(margin.detach())
    if hasattr(margin, "dtype") and hasattr(margin, "item"):
        return float(margin)
    return margin


class BatchAllTripletLoss(_SentenceTransformerTripletLoss):
    r"""sentence-transformers' ``BatchAllTripletLoss`` on
    :func:`~online_triplet_loss.losses.batch_all_triplet_loss`: the mean of
    :math:`\max(d_{ap} - d_{an} + m, 0)` over the valid triplets with a loss
    above 0, in :math:`O(B^2 \log B)` time and without ST's :math:`B \times
    B(K-1)` (ST ≥ 6.2) or :math:`B^3` (ST < 6.2) tensors.

    Args:
        model: the SentenceTransformer whose ``"sentence_embedding"`` output is
            mined.
        distance_metric: ``BatchHardTripletLossDistanceFunction.euclidean_distance``
            (default), the same with ``functools.partial(..., squared=True)``, or
            ``BatchHardTripletLossDistanceFunction.cosine_distance``.
        margin: :math:`m`, :math:`\ge 0` and finite in the loss's dtype. Default: 5, as in ST.

    Shape:
        - ``forward(sentence_features, labels)``: ``labels`` has one class id
          per example of ``sentence_features[0]``; output: scalar.

    Example::

        >>> import torch
        >>> model = torch.nn.Identity()  # stands in for a SentenceTransformer here
        >>> loss = BatchAllTripletLoss(model, margin=0.5)
        >>> trainer = SentenceTransformerTrainer(model=model, train_dataset=ds, loss=loss)  # doctest: +SKIP
        >>> labels = torch.tensor([0, 0, 1, 1, 2, 2])
        >>> value = loss.compute_loss_from_embeddings([torch.randn(6, 8)], labels)
    """

    def __init__(
        self,
        model: nn.Module,
        distance_metric: Callable[[Tensor], Tensor] = BatchHardTripletLossDistanceFunction.euclidean_distance,
        margin: Union[float, Tensor] = 5,
    ) -> None:
        super().__init__(model, distance_metric)
        check_margin(margin)
        self.triplet_margin = margin

    def compute_loss_from_embeddings(self, embeddings: List[Tensor], labels: Tensor) -> Tensor:
        return self.batch_all_triplet_loss(labels, embeddings[0])

    def batch_all_triplet_loss(self, labels: Tensor, embeddings: Tensor) -> Tensor:
        """The loss of ``embeddings``, :math:`(B, D)`, with ``labels`` of :math:`B` elements."""
        return batch_all_triplet_loss(
            _flat(labels), _at_least_float32(embeddings), self.triplet_margin, distance=self.distance
        )[0]

    def get_config_dict(self) -> Dict[str, Any]:
        return {**super().get_config_dict(), "margin": _number(self.triplet_margin)}


class BatchHardTripletLoss(_SentenceTransformerTripletLoss):
    r"""sentence-transformers' ``BatchHardTripletLoss`` on
    :func:`~online_triplet_loss.losses.batch_hard_triplet_loss`: the mean over
    anchors with a positive and a negative of
    :math:`\max(\max_p d_{ap} - \min_n d_{an} + m, 0)`.

    ST averages over every anchor instead (see the module documentation); on
    batches where each anchor has a positive and a negative the two agree.

    Args:
        model: the SentenceTransformer whose ``"sentence_embedding"`` output is
            mined.
        distance_metric: ``BatchHardTripletLossDistanceFunction.euclidean_distance``
            (default), the same with ``functools.partial(..., squared=True)``, or
            ``BatchHardTripletLossDistanceFunction.cosine_distance``.
        margin: :math:`m`, :math:`\ge 0` and finite in the loss's dtype. Default: 5, as in ST.

    Shape:
        - ``forward(sentence_features, labels)``: ``labels`` has one class id
          per example of ``sentence_features[0]``; output: scalar.

    Example::

        >>> import torch
        >>> model = torch.nn.Identity()  # stands in for a SentenceTransformer here
        >>> from sentence_transformers.sentence_transformer.losses import BatchHardTripletLossDistanceFunction
        >>> loss = BatchHardTripletLoss(model, BatchHardTripletLossDistanceFunction.cosine_distance,
        ...                             margin=0.5)
        >>> labels = torch.tensor([0, 0, 1, 1, 2, 2])
        >>> value = loss.compute_loss_from_embeddings([torch.randn(6, 8)], labels)
    """

    # ST's static helpers (its O(B³) masks), for code that calls them.
    get_triplet_mask = staticmethod(_STBatchHardTripletLoss.get_triplet_mask)
    get_anchor_positive_triplet_mask = staticmethod(
        _STBatchHardTripletLoss.get_anchor_positive_triplet_mask
    )
    get_anchor_negative_triplet_mask = staticmethod(
        _STBatchHardTripletLoss.get_anchor_negative_triplet_mask
    )

    def __init__(
        self,
        model: nn.Module,
        distance_metric: Callable[[Tensor], Tensor] = BatchHardTripletLossDistanceFunction.euclidean_distance,
        margin: Union[float, Tensor] = 5,
    ) -> None:
        super().__init__(model, distance_metric)
        check_margin(margin)
        self.triplet_margin = margin

    def compute_loss_from_embeddings(self, embeddings: List[Tensor], labels: Tensor) -> Tensor:
        return self.batch_hard_triplet_loss(labels, embeddings[0])

    def batch_hard_triplet_loss(self, labels: Tensor, embeddings: Tensor) -> Tensor:
        """The loss of ``embeddings``, :math:`(B, D)`, with ``labels`` of :math:`B` elements."""
        return batch_hard_triplet_loss(
            _flat(labels), _at_least_float32(embeddings), self.triplet_margin, distance=self.distance
        )

    def get_config_dict(self) -> Dict[str, Any]:
        return {**super().get_config_dict(), "margin": _number(self.triplet_margin)}


class BatchHardSoftMarginTripletLoss(BatchHardTripletLoss):
    r"""sentence-transformers' ``BatchHardSoftMarginTripletLoss`` on
    :func:`~online_triplet_loss.losses.batch_hard_triplet_loss` with
    ``soft=True`` and margin 0: the mean over anchors with a positive and a
    negative of :math:`\log(1 + e^{\max_p d_{ap} - \min_n d_{an}})`, finite for
    any finite distances (ST < 6.2 computes ``log1p(exp(x))``, which is
    infinite in float32 once :math:`x > 88.7`).

    Args:
        model: the SentenceTransformer whose ``"sentence_embedding"`` output is
            mined.
        distance_metric: ``BatchHardTripletLossDistanceFunction.euclidean_distance``
            (default), the same with ``functools.partial(..., squared=True)``, or
            ``BatchHardTripletLossDistanceFunction.cosine_distance``.

    Shape:
        - ``forward(sentence_features, labels)``: ``labels`` has one class id
          per example of ``sentence_features[0]``; output: scalar.

    Example::

        >>> import torch
        >>> model = torch.nn.Identity()  # stands in for a SentenceTransformer here
        >>> loss = BatchHardSoftMarginTripletLoss(model)
        >>> labels = torch.tensor([0, 0, 1, 1, 2, 2])
        >>> value = loss.compute_loss_from_embeddings([torch.randn(6, 8)], labels)
    """

    def __init__(
        self,
        model: nn.Module,
        distance_metric: Callable[[Tensor], Tensor] = BatchHardTripletLossDistanceFunction.euclidean_distance,
    ) -> None:
        # ST's ``triplet_margin`` (5, from batch-hard), which the soft margin does not use.
        super().__init__(model, distance_metric)

    def compute_loss_from_embeddings(self, embeddings: List[Tensor], labels: Tensor) -> Tensor:
        return self.batch_hard_triplet_soft_margin_loss(labels, embeddings[0])

    def batch_hard_triplet_soft_margin_loss(self, labels: Tensor, embeddings: Tensor) -> Tensor:
        """The loss of ``embeddings``, :math:`(B, D)`, with ``labels`` of :math:`B` elements."""
        return batch_hard_triplet_loss(
            _flat(labels), _at_least_float32(embeddings), 0.0, distance=self.distance, soft=True
        )

    def get_config_dict(self) -> Dict[str, Any]:
        config = super().get_config_dict()
        del config["margin"]
        return config


class BatchSemiHardTripletLoss(_SentenceTransformerTripletLoss):
    r"""sentence-transformers' ``BatchSemiHardTripletLoss`` on
    :func:`~online_triplet_loss.losses.batch_semihard_triplet_loss` (FaceNet's
    semi-hard negatives, as TF Addons' ``TripletSemiHardLoss``): for each
    positive pair, the closest negative farther than the positive, or the
    farthest negative if there is none.

    Args:
        model: the SentenceTransformer whose ``"sentence_embedding"`` output is
            mined.
        distance_metric: ``BatchHardTripletLossDistanceFunction.euclidean_distance``
            (default), the same with ``functools.partial(..., squared=True)``, or
            ``BatchHardTripletLossDistanceFunction.cosine_distance``.
        margin: :math:`m`, :math:`\ge 0` and finite in the loss's dtype. Default: 5, as in ST.

    Shape:
        - ``forward(sentence_features, labels)``: ``labels`` has one class id
          per example of ``sentence_features[0]``; output: scalar.

    Example::

        >>> import torch
        >>> model = torch.nn.Identity()  # stands in for a SentenceTransformer here
        >>> import functools
        >>> from sentence_transformers.sentence_transformer.losses import BatchHardTripletLossDistanceFunction
        >>> squared = functools.partial(BatchHardTripletLossDistanceFunction.euclidean_distance,
        ...                             squared=True)
        >>> loss = BatchSemiHardTripletLoss(model, distance_metric=squared, margin=0.5)
        >>> labels = torch.tensor([0, 0, 1, 1, 2, 2])
        >>> value = loss.compute_loss_from_embeddings([torch.randn(6, 8)], labels)
    """

    citation = _SCHROFF_2015

    def __init__(
        self,
        model: nn.Module,
        distance_metric: Callable[[Tensor], Tensor] = BatchHardTripletLossDistanceFunction.euclidean_distance,
        margin: Union[float, Tensor] = 5,
    ) -> None:
        super().__init__(model, distance_metric)
        check_margin(margin)
        self.margin = margin

    def compute_loss_from_embeddings(self, embeddings: List[Tensor], labels: Tensor) -> Tensor:
        return self.batch_semi_hard_triplet_loss(labels, embeddings[0])

    def batch_semi_hard_triplet_loss(self, labels: Tensor, embeddings: Tensor) -> Tensor:
        """The loss of ``embeddings``, :math:`(B, D)`, with ``labels`` of :math:`B` elements."""
        return batch_semihard_triplet_loss(
            _flat(labels), _at_least_float32(embeddings), self.margin, distance=self.distance
        )

    def get_config_dict(self) -> Dict[str, Any]:
        return {**super().get_config_dict(), "margin": _number(self.margin)}

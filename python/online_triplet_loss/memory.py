r"""Cross-batch memory (XBM; Wang et al., "Cross-Batch Memory for Embedding
Learning", CVPR 2020): mine each batch against the embeddings of past batches
too."""

from __future__ import annotations

import numbers
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .distributed import DistributedTripletLoss
from .losses import BatchAllTripletLoss, BatchHardTripletLoss, BatchSemiHardTripletLoss, _TripletLoss, loss_and_fraction
from ._validation import check_tensor

__all__ = ["CrossBatchMemory"]

_TripletModule = Union[
    BatchAllTripletLoss, BatchHardTripletLoss, BatchSemiHardTripletLoss, DistributedTripletLoss
]



class CrossBatchMemory(nn.Module):
    r"""Wraps a triplet loss so that every batch is mined against a memory of
    past embeddings as well as against itself.

    The memory is a FIFO queue of the last ``memory_size`` embeddings seen,
    detached, with their labels. ``forward(embeddings, labels)``:

    1. computes the wrapped loss with the batch as anchors and
       :math:`\text{cat}(\text{batch}, \text{memory})` as the reference set that
       positives and negatives are drawn from; an anchor is never its own
       positive, and the memory never holds the current batch;
    2. then enqueues the batch, dropping the oldest entries beyond
       ``memory_size``.

    Wrapping a :class:`~online_triplet_loss.distributed.DistributedTripletLoss`
    makes the memory global: under a process group of several ranks, each
    rank passes its own batch, the loss is that of the global batch (all
    ranks' batches, concatenated in rank order) against itself and the
    memory, and the whole global batch is enqueued, so the memory is the same
    on every rank. :math:`N` ranks then take the steps that one process with
    the wrapped loss would take on the concatenated batches: the same loss on
    every rank and, with :class:`~torch.nn.parallel.DistributedDataParallel`,
    the same parameters. Every rank must call ``forward`` together. Without a
    group of several ranks it is the same as wrapping the inner loss.

    Gradients reach the current batch (as anchors and as references) and
    never the memory. The loss keeps the wrapped module's normalisation:
    batch-all averages over the positive triplets, batch-hard over the
    anchors with a positive and a negative, semi-hard over the positive pairs.
    Nothing in ``forward`` synchronises with the device, apart from what a
    :class:`~online_triplet_loss.distributed.DistributedTripletLoss` does on
    several ranks (gathering the batch sizes, once for the loss and once to
    enqueue the global batch).

    The memory's dtype and device are those of the first batch (or of the
    module after ``.to()`` when ``embedding_dim`` is given); later batches are
    stored in that dtype and must be on that device. Labels must keep the
    dtype of the first batch's. The memory is saved in ``state_dict``.

    XBM works once the embeddings drift slowly; the paper starts it after a
    warm-up. To delay it, call the wrapped loss directly for the first steps,
    or :meth:`enqueue` without using the loss.

    Args:
        loss: a :class:`BatchAllTripletLoss`, :class:`BatchHardTripletLoss`,
            :class:`BatchSemiHardTripletLoss` (its ``margin``, ``distance`` and
            ``soft`` are used) or a
            :class:`~online_triplet_loss.distributed.DistributedTripletLoss`
            wrapping one of them (for a memory shared by all ranks).
        memory_size: the capacity of the memory, :math:`\ge 1`.
        embedding_dim: the embedding size :math:`D`; by default that of the first
            batch. Giving it allocates the memory at once (as float32).

    Shape:
        - embeddings: :math:`(B, D)`, floating point; with a distributed loss,
          this rank's batch, :math:`(B_r, D)`.
        - labels: :math:`(B)`, class ids (:math:`(B_r)` likewise).
        - Output: scalar.

    Example::

        >>> from online_triplet_loss import BatchHardTripletLoss
        >>> criterion = CrossBatchMemory(BatchHardTripletLoss(margin=0.2), memory_size=64)
        >>> for _ in range(3):
        ...     embeddings = torch.randn(16, 8, requires_grad=True)
        ...     loss = criterion(embeddings, torch.randint(0, 4, (16,)))
        ...     loss.backward()
        >>> criterion.num_stored
        48
    """

    def __init__(
        self,
        loss: _TripletModule,
        *,
        memory_size: int,
        embedding_dim: Optional[int] = None,
    ) -> None:
        super().__init__()
        if not isinstance(loss, (_TripletLoss, DistributedTripletLoss)):
            raise ValueError(
                "loss: must be a BatchAllTripletLoss, BatchHardTripletLoss, "
                f"BatchSemiHardTripletLoss or DistributedTripletLoss, got {loss!r}"
            )
        self.loss = loss
        self.memory_size = _positive_int("memory_size", memory_size)
        if embedding_dim is not None:
            embedding_dim = _positive_int("embedding_dim", embedding_dim)
        self.embedding_dim = embedding_dim
        # A ring buffer: `_next` is where the next entry goes, `_count` how many
        # are stored. Both live on the host, so bookkeeping never syncs.
        self._next = 0
        self._count = 0
        self.register_buffer("memory_embeddings", None)
        self.register_buffer("memory_labels", None)
        if embedding_dim is not None:
            self.memory_embeddings = torch.zeros(self.memory_size, embedding_dim)

    def extra_repr(self) -> str:
        return f"memory_size={self.memory_size}, embedding_dim={self.embedding_dim}, stored={self._count}"

    @property
    def num_stored(self) -> int:
        """The number of embeddings stored, at most ``memory_size``."""
        return self._count

    @property
    def memory(self) -> Tuple[Tensor, Tensor]:
        """The stored ``(embeddings, labels)``, oldest first."""
        if self._count == 0 or self.memory_labels is None:
            dim = 0 if self.embedding_dim is None else self.embedding_dim
            empty = torch.empty(0, dim)
            return empty, torch.empty(0, dtype=torch.long)
        order = self._order()
        return self.memory_embeddings[order], self.memory_labels[order]

    def _order(self) -> Union[slice, Tensor]:
        if self._count < self.memory_size:
            return slice(0, self._count)
        return torch.cat([
            torch.arange(self._next, self.memory_size),
            torch.arange(0, self._next),
        ]).to(self.memory_embeddings.device)

    def reset(self) -> None:
        """Empties the memory, keeping its buffers."""
        self._next = 0
        self._count = 0

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """The loss of the batch against itself and the memory; then enqueues
        the batch (with a distributed loss, the global batch).

        Args:
            embeddings: the batch, :math:`(B, D)`; with a distributed loss,
                this rank's.
            labels: their labels, :math:`(B)`.

        Returns:
            The loss, a scalar in the dtype of ``embeddings``.
        """
        self._check_batch(embeddings, labels)
        if isinstance(self.loss, DistributedTripletLoss):
            return self._forward_distributed(embeddings, labels)
        if self._count == 0:
            ref_embeddings, ref_labels = embeddings, labels
        else:
            stored = slice(0, self._count)
            ref_embeddings = torch.cat(
                [embeddings, self.memory_embeddings[stored].to(embeddings.dtype)]
            )
            ref_labels = torch.cat([labels, self.memory_labels[stored].to(labels.device)])
        loss, _ = loss_and_fraction(
            self.loss.mining,
            labels,
            embeddings,
            self.loss.margin,
            distance=self.loss.distance,
            soft=self.loss.soft,
            ref_embeddings=ref_embeddings,
            ref_labels=ref_labels,
            anchor_offset=0,
        )
        self.enqueue(embeddings, labels)
        return loss

    def _forward_distributed(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        extra_embeddings = extra_labels = None
        if self._count > 0:
            # The same slice (ring order) as the plain path, so that both
            # paths see the references in the same order and agree exactly.
            stored = slice(0, self._count)
            extra_embeddings = self.memory_embeddings[stored]
            extra_labels = self.memory_labels[stored]
        loss = self.loss(
            embeddings, labels, extra_embeddings=extra_embeddings, extra_labels=extra_labels
        )
        with torch.no_grad():
            all_embeddings, all_labels, _ = self.loss.gather(embeddings.detach(), labels)
        self.enqueue(all_embeddings, all_labels)
        return loss

    @torch.no_grad()
    def enqueue(self, embeddings: Tensor, labels: Tensor) -> None:
        """Adds a batch to the memory (detached), dropping the oldest entries
        beyond ``memory_size``. It stores what it is given: with a distributed
        loss, pass the global batch (see
        :meth:`~online_triplet_loss.distributed.DistributedTripletLoss.gather`)
        to keep the memory the same on every rank.

        Args:
            embeddings: :math:`(B, D)`.
            labels: :math:`(B)`.
        """
        self._check_batch(embeddings, labels)
        if self.memory_labels is None:
            self._allocate(embeddings, labels)
        batch = embeddings.shape[0]
        if batch >= self.memory_size:
            # Only the newest memory_size entries survive.
            self.memory_embeddings.copy_(embeddings[batch - self.memory_size :])
            self.memory_labels.copy_(labels[batch - self.memory_size :])
            self._next, self._count = 0, self.memory_size
            return
        end = self._next + batch
        first = min(end, self.memory_size) - self._next
        self.memory_embeddings[self._next : self._next + first] = embeddings[:first]
        self.memory_labels[self._next : self._next + first] = labels[:first]
        if first < batch:  # wraps around
            self.memory_embeddings[: batch - first] = embeddings[first:]
            self.memory_labels[: batch - first] = labels[first:]
        self._next = end % self.memory_size
        self._count = min(self._count + batch, self.memory_size)

    def _allocate(self, embeddings: Tensor, labels: Tensor) -> None:
        if self.memory_embeddings is None:
            self.embedding_dim = embeddings.shape[1]
            self.memory_embeddings = embeddings.new_zeros(self.memory_size, self.embedding_dim)
        self.memory_labels = labels.new_zeros(self.memory_size, device=self.memory_embeddings.device)

    def _check_batch(self, embeddings: Tensor, labels: Tensor) -> None:
        check_tensor("embeddings", embeddings)
        check_tensor("labels", labels)
        if embeddings.dim() != 2 or not embeddings.is_floating_point():
            raise ValueError(
                "embeddings: must be a 2-D floating point tensor, got shape "
                f"{tuple(embeddings.shape)} and dtype {embeddings.dtype}"
            )
        if labels.shape != embeddings.shape[:1]:
            raise ValueError(
                f"labels: must have shape ({embeddings.shape[0]},) to match embeddings, "
                f"got {tuple(labels.shape)}"
            )
        if self.embedding_dim is not None and embeddings.shape[1] != self.embedding_dim:
            raise ValueError(
                f"embeddings: must have {self.embedding_dim} columns like the memory, "
                f"got shape {tuple(embeddings.shape)}"
            )
        memory = self.memory_embeddings
        if memory is not None and embeddings.device != memory.device:
            raise ValueError(
                f"embeddings: must be on the memory's device ({memory.device}), got {embeddings.device}"
            )
        if self.memory_labels is not None and labels.dtype != self.memory_labels.dtype:
            raise ValueError(
                f"labels: must keep the dtype of the first batch's ({self.memory_labels.dtype}), "
                f"got {labels.dtype}"
            )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        # The buffers are allocated lazily; take their shape from the saved state.
        for name in ("memory_embeddings", "memory_labels"):
            saved = state_dict.get(prefix + name)
            if saved is not None and getattr(self, name) is None:
                setattr(self, name, torch.empty_like(saved))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def get_extra_state(self) -> Dict[str, Any]:
        return {"next": self._next, "count": self._count, "embedding_dim": self.embedding_dim}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        self._next = int(state["next"])
        self._count = int(state["count"])
        self.embedding_dim = state["embedding_dim"]


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}: must be an int >= 1, got {value!r}")
    return int(value)

"""Invalid arguments: a ValueError whose message names the argument.

Every case runs through the three public functions, and the module forms
where the argument exists there.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import pytest
import torch

from helpers import LOSSES, function_loss, make_module
from online_triplet_loss import (
    BatchAllTripletLoss,
    BatchHardTripletLoss,
    BatchSemiHardTripletLoss,
    _core,
    batch_all_triplet_loss,
    batch_hard_triplet_loss,
    batch_semihard_triplet_loss,
)
from online_triplet_loss import losses as losses_mod

FUNCTIONS = {
    "all": batch_all_triplet_loss,
    "hard": batch_hard_triplet_loss,
    "semihard": batch_semihard_triplet_loss,
}
MODULES = {"all": BatchAllTripletLoss, "hard": BatchHardTripletLoss, "semihard": BatchSemiHardTripletLoss}

LABELS = torch.tensor([0, 0, 1, 1])
EMB = torch.randn(4, 3)


def raises_naming(*names):
    """pytest.raises(ValueError) whose message mentions every name."""

    class _Ctx:
        def __enter__(self):
            self._ctx = pytest.raises(ValueError)
            self.info = self._ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            suppressed = self._ctx.__exit__(*exc)
            msg = str(self.info.value)
            for name in names:
                assert name in msg, f"message {msg!r} does not name {name!r}"
            return suppressed

    return _Ctx()


# ------------------------------------------------------------------ shapes


@pytest.mark.parametrize("mining", LOSSES)
@pytest.mark.parametrize("shape", [(4,), (4, 3, 1), ()], ids=["1d", "3d", "0d"])
def test_embeddings_not_2d(mining, shape):
    emb = torch.randn(shape)
    with raises_naming("embeddings"):
        FUNCTIONS[mining](LABELS, emb, 0.1)
    with raises_naming("embeddings"):
        MODULES[mining]()(emb, LABELS)


@pytest.mark.parametrize("mining", LOSSES)
@pytest.mark.parametrize("shape", [(4, 1), (2, 2), ()], ids=["4x1", "2x2", "0d"])
def test_labels_not_1d(mining, shape):
    labels = torch.zeros(shape, dtype=torch.long)
    with raises_naming("labels"):
        FUNCTIONS[mining](labels, EMB, 0.1)
    with raises_naming("labels"):
        MODULES[mining]()(EMB, labels)


@pytest.mark.parametrize("mining", LOSSES)
@pytest.mark.parametrize("n_labels", [3, 5, 0])
def test_lengths_differ(mining, n_labels):
    labels = torch.zeros(n_labels, dtype=torch.long)
    with raises_naming("labels"):
        FUNCTIONS[mining](labels, EMB, 0.1)
    with raises_naming("labels"):
        MODULES[mining]()(EMB, labels)


@pytest.mark.parametrize("mining", LOSSES)
@pytest.mark.parametrize("label_dtype", [torch.long, torch.float32])
def test_swapped_arguments(mining, label_dtype):
    """(embeddings, labels) given to a function that takes (labels, embeddings)."""
    labels = LABELS.to(label_dtype)
    with raises_naming("embeddings", "labels"):
        FUNCTIONS[mining](EMB, labels, 0.1)
    # the module takes (embeddings, labels): swapped there too
    with raises_naming("embeddings", "labels"):
        MODULES[mining]()(labels, EMB)


@pytest.mark.parametrize("mining", LOSSES)
def test_integer_embeddings(mining):
    with raises_naming("embeddings"):
        FUNCTIONS[mining](LABELS, torch.ones(4, 3, dtype=torch.long), 0.1)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.uint32, torch.uint64])
@pytest.mark.parametrize("mining", LOSSES)
def test_unsupported_label_dtype(mining, dtype):
    """The message quotes the dtype, for labels and reference labels alike."""
    with raises_naming("labels", str(dtype)):
        FUNCTIONS[mining](torch.zeros(4, dtype=dtype), EMB, 0.1)
    with raises_naming("ref_labels", str(dtype)):
        FUNCTIONS[mining](LABELS, EMB, 0.1, ref_embeddings=EMB,
                          ref_labels=torch.zeros(4, dtype=dtype))


# ------------------------------------------------------------------ margin


BAD_MARGINS = [-1.0, -1e-12, float("nan"), float("inf"), -float("inf"), "1.0", None, True,
               torch.tensor([1.0, 2.0]), torch.tensor(-0.5), torch.tensor(float("nan")),
               np.array(-1.0), np.array(True), np.array([True]), np.array([0.5, 0.6]),
               np.array([-0.5])]


@pytest.mark.parametrize("mining", LOSSES)
@pytest.mark.parametrize("margin", BAD_MARGINS, ids=repr)
def test_bad_margin(mining, margin):
    with raises_naming("margin"):
        FUNCTIONS[mining](LABELS, EMB, margin)
    with raises_naming("margin"):
        MODULES[mining](margin=margin)


@pytest.mark.parametrize("margin", [0, 0.0, 2, np.float64(0.5), np.float32(0.5), torch.tensor(0.5),
                                    torch.tensor([0.5]), np.array(0.5), np.array([0.5]),
                                    np.array([[0.5]], dtype=np.float32)], ids=repr)
def test_good_margin_types(margin):
    for mining in LOSSES:
        loss = function_loss(mining, LABELS, EMB, margin, "euclidean")
        assert math.isfinite(float(loss))
        assert MODULES[mining](margin=margin).margin == float(getattr(margin, "item", lambda: margin)())


@pytest.mark.parametrize("mining", LOSSES)
@pytest.mark.parametrize("dtype, largest", [(torch.float16, 65504.0), (torch.bfloat16, torch.finfo(torch.bfloat16).max),
                                            (torch.float32, torch.finfo(torch.float32).max)], ids=str)
def test_margin_beyond_the_loss_dtype(mining, dtype, largest):
    """A finite margin that the loss's dtype (the embeddings') cannot hold
    would make every hinge infinite: refused, naming the dtype (found by
    review: 1e39 with float32 embeddings gave a loss of inf, with no
    error). The largest finite value itself is taken."""
    emb = EMB.to(dtype)
    above = largest * (1 + 2 ** -20)
    with pytest.raises(ValueError, match=rf"margin: must be at most .*the largest {str(dtype)[6:]}, the loss's dtype"):
        FUNCTIONS[mining](LABELS, emb, above)
    with pytest.raises(ValueError, match="margin: must be at most"):
        MODULES[mining](margin=torch.nn.Parameter(torch.tensor(above, dtype=torch.float64)))(emb, LABELS)
    FUNCTIONS[mining](LABELS, emb, largest)
    # Under autocast the loss is float32 (the embeddings are cast to it).
    if dtype is torch.float16:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert MODULES[mining](margin=above)(emb, LABELS).dtype == torch.float32
            with pytest.raises(ValueError, match="the largest float32, the loss's dtype"):
                MODULES[mining](margin=1e39)(emb, LABELS)


def test_core_rejects_bad_margin_itself():
    """The Rust core checks the margin too (for callers of _core)."""
    for margin in (-1.0, float("nan"), float("inf")):
        with raises_naming("margin"):
            _core.triplet_terms("all", LABELS, EMB, margin, "euclidean", False)


# ------------------------------------------------------------- distance


@pytest.mark.parametrize("mining", LOSSES)
@pytest.mark.parametrize("distance", ["manhattan", "Euclidean", "", "cos"])
def test_unknown_distance(mining, distance):
    with raises_naming("distance"):
        FUNCTIONS[mining](LABELS, EMB, 0.1, distance=distance)
    with raises_naming("distance"):
        MODULES[mining](distance=distance)


@pytest.mark.parametrize("mining", LOSSES)
def test_module_distance_none(mining):
    """The functions read distance=None as "from squared"; a Module has no
    squared flag, and its distance is one of the three names."""
    with raises_naming("distance", "None"):
        MODULES[mining](distance=None)


def test_core_unknown_distance_and_mining():
    with raises_naming("distance"):
        _core.triplet_terms("all", LABELS, EMB, 0.1, "manhattan", False)
    with raises_naming("mining", "hardest"):
        _core.triplet_terms("hardest", LABELS, EMB, 0.1, "euclidean", False)


@pytest.mark.parametrize("mining", LOSSES)
@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_squared_true_contradicts_distance(mining, distance):
    with raises_naming("squared", "distance"):
        FUNCTIONS[mining](LABELS, EMB, 0.1, squared=True, distance=distance)
    with raises_naming("squared", "distance"):
        FUNCTIONS[mining](LABELS, EMB, 0.1, True, distance=distance)


@pytest.mark.parametrize("mining", LOSSES)
def test_squared_true_with_distance_squared_is_fine(mining):
    a = FUNCTIONS[mining](LABELS, EMB, 0.1, squared=True, distance="squared")
    b = FUNCTIONS[mining](LABELS, EMB, 0.1, distance="squared")
    assert torch.equal(torch.stack(a) if isinstance(a, tuple) else a,
                       torch.stack(b) if isinstance(b, tuple) else b)


@pytest.mark.parametrize("squared", ["yes", 2, None, 0.5])
def test_bad_squared(squared):
    for mining in LOSSES:
        with raises_naming("squared"):
            FUNCTIONS[mining](LABELS, EMB, 0.1, squared)


# --------------------------------------------------------- non-tensor inputs


NON_TENSORS = [[0, 0, 1, 1], np.array([0, 0, 1, 1]), (0, 0, 1, 1), None, 3]


@pytest.mark.parametrize("mining", LOSSES)
@pytest.mark.parametrize("value", NON_TENSORS, ids=lambda v: type(v).__name__)
def test_non_tensor_labels(mining, value):
    with raises_naming("labels"):
        FUNCTIONS[mining](value, EMB, 0.1)
    with raises_naming("labels"):
        MODULES[mining]()(EMB, value)


@pytest.mark.parametrize("mining", LOSSES)
@pytest.mark.parametrize("value", [EMB.tolist(), EMB.numpy(), None, 1.0], ids=lambda v: type(v).__name__)
def test_non_tensor_embeddings(mining, value):
    with raises_naming("embeddings"):
        FUNCTIONS[mining](LABELS, value, 0.1)
    with raises_naming("embeddings"):
        MODULES[mining]()(value, LABELS)


# ---------------------------------------------------------- reference sets


REF_EMB = torch.randn(5, 3)
REF_LABELS = torch.tensor([0, 1, 2, 0, 1])


@pytest.mark.parametrize("mining", LOSSES)
def test_ref_embeddings_without_ref_labels(mining):
    with raises_naming("ref_embeddings", "ref_labels"):
        FUNCTIONS[mining](LABELS, EMB, 0.1, ref_embeddings=REF_EMB)
    with raises_naming("ref_embeddings", "ref_labels"):
        FUNCTIONS[mining](LABELS, EMB, 0.1, ref_labels=REF_LABELS)
    with raises_naming("ref_embeddings", "ref_labels"):
        MODULES[mining]()(EMB, LABELS, ref_embeddings=REF_EMB)


def test_core_ref_embeddings_without_ref_labels():
    with raises_naming("ref_embeddings", "ref_labels"):
        _core.triplet_terms("all", LABELS, EMB, 0.1, "euclidean", False, REF_EMB, None)
    with raises_naming("ref_embeddings", "ref_labels"):
        _core.triplet_terms("all", LABELS, EMB, 0.1, "euclidean", False, None, REF_LABELS)


@pytest.mark.parametrize("mining", LOSSES)
def test_ref_dim_mismatch(mining):
    with raises_naming("ref_embeddings"):
        FUNCTIONS[mining](LABELS, EMB, 0.1, ref_embeddings=torch.randn(5, 4), ref_labels=REF_LABELS)
    with raises_naming("ref_embeddings"):
        MODULES[mining]()(EMB, LABELS, ref_embeddings=torch.randn(5, 2), ref_labels=REF_LABELS)


@pytest.mark.parametrize("mining", LOSSES)
def test_ref_shapes(mining):
    with raises_naming("ref_embeddings"):
        FUNCTIONS[mining](LABELS, EMB, 0.1, ref_embeddings=torch.randn(5), ref_labels=REF_LABELS)
    with raises_naming("ref_labels"):
        FUNCTIONS[mining](LABELS, EMB, 0.1, ref_embeddings=REF_EMB, ref_labels=REF_LABELS[:4])
    with raises_naming("ref_labels"):
        FUNCTIONS[mining](LABELS, EMB, 0.1, ref_embeddings=REF_EMB, ref_labels=REF_LABELS[None])
    with raises_naming("ref_embeddings"):
        FUNCTIONS[mining](LABELS, EMB, 0.1, ref_embeddings=REF_EMB.long(), ref_labels=REF_LABELS)


@pytest.mark.parametrize("mining", LOSSES)
def test_ref_parts(mining):
    """ref_embeddings in parts: each part is checked, and the labels and the
    anchor offset against all their rows."""
    head, tail = REF_EMB[:2], REF_EMB[2:]
    bad_parts = [
        [],
        (),
        [head, tail.tolist()],
        [head, torch.randn(3, 4)],
        [head, torch.randn(3)],
        [head, tail.long()],
        [head, {"rows": tail}],
    ]
    for parts in bad_parts:
        with raises_naming("ref_embeddings"):
            FUNCTIONS[mining](LABELS, EMB, 0.1, ref_embeddings=parts, ref_labels=REF_LABELS)
        with raises_naming("ref_embeddings"):
            MODULES[mining]()(EMB, LABELS, ref_embeddings=parts, ref_labels=REF_LABELS)
    with raises_naming("ref_labels"):
        FUNCTIONS[mining](LABELS, EMB, 0.1, ref_embeddings=[head, tail, head],
                          ref_labels=REF_LABELS)
    with raises_naming("anchor_offset"):
        FUNCTIONS[mining](LABELS, EMB, 0.1, ref_embeddings=(EMB, head), ref_labels=REF_LABELS[:-1],
                          anchor_offset=3)
    # Parts that are right: the anchors' rows reach into the second part.
    loss = FUNCTIONS[mining](LABELS, EMB, 0.1, ref_embeddings=(EMB[:1], EMB[1:], head),
                             ref_labels=torch.cat([LABELS, REF_LABELS[:2]]), anchor_offset=0)
    assert loss[0].isfinite() if mining == "all" else loss.isfinite()


class _Parts(NamedTuple):
    batch: torch.Tensor
    bank: torch.Tensor


class _PartList(list):
    pass


@pytest.mark.parametrize("mining", LOSSES)
def test_ref_parts_in_a_sequence_subclass(mining):
    """A namedtuple or a list subclass of parts is taken as the tuple of its
    items (the namedtuple's constructor takes fields, not an iterable)."""
    head, tail = REF_EMB[:2], REF_EMB[2:]
    want = FUNCTIONS[mining](LABELS, EMB, 0.1, ref_embeddings=(head, tail), ref_labels=REF_LABELS)
    for parts in (_Parts(head, tail), _PartList([head, tail])):
        got = FUNCTIONS[mining](LABELS, EMB, 0.1, ref_embeddings=parts, ref_labels=REF_LABELS)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        module = MODULES[mining]()
        torch.testing.assert_close(module(EMB, LABELS, ref_embeddings=parts, ref_labels=REF_LABELS),
                                   module(EMB, LABELS, ref_embeddings=(head, tail),
                                          ref_labels=REF_LABELS), rtol=0, atol=0)


@pytest.mark.parametrize("mining", LOSSES)
def test_ref_non_tensor(mining):
    with raises_naming("ref_embeddings"):
        FUNCTIONS[mining](LABELS, EMB, 0.1, ref_embeddings=REF_EMB.tolist(), ref_labels=REF_LABELS)
    with raises_naming("ref_labels"):
        FUNCTIONS[mining](LABELS, EMB, 0.1, ref_embeddings=REF_EMB, ref_labels=REF_LABELS.tolist())


@pytest.mark.parametrize("mining", LOSSES)
@pytest.mark.parametrize("offset", [2**70, 2**63, -2**70, -1])
def test_anchor_offset_out_of_range_beside_0d_tensors(mining, offset):
    """Found by review: with 0-d embeddings or a 0-d reference part the
    offset's range check was skipped, and one beyond int64 met the binding
    as a bare OverflowError before the shape's error."""
    for embeddings, parts in ((torch.tensor(1.0), REF_EMB), (EMB, (REF_EMB[:2], torch.tensor(1.0)))):
        with raises_naming("anchor_offset"):
            FUNCTIONS[mining](LABELS, embeddings, 0.1, ref_embeddings=parts, ref_labels=REF_LABELS,
                              anchor_offset=offset)


@pytest.mark.parametrize("offset", [-1, 2, 10])
def test_anchor_offset_out_of_range(offset):
    # 4 anchors in 5 references: offsets 0 and 1 fit.
    with raises_naming("anchor_offset"):
        losses_mod.terms("all", LABELS, EMB, 0.1, ref_embeddings=REF_EMB, ref_labels=REF_LABELS,
                         anchor_offset=offset)


def test_errors_leave_no_partial_state():
    """A rejected call does not poison later calls (e.g. autograd state)."""
    x = EMB.clone().requires_grad_(True)
    with pytest.raises(ValueError):
        batch_all_triplet_loss(LABELS, x, -1.0)
    loss, _ = batch_all_triplet_loss(LABELS, x, 1.0)
    loss.backward()
    assert torch.isfinite(x.grad).all()


def test_make_module_helper_covers_every_loss():
    for mining in LOSSES:
        assert isinstance(make_module(mining, 0.1, "euclidean"), MODULES[mining])


@pytest.mark.parametrize("mining", LOSSES)
def test_module_swapped_arguments_message_gives_the_module_order(mining):
    """The modules take (embeddings, labels); a hint about the argument order
    must give that order, not the functions' (labels, embeddings)."""
    with pytest.raises(ValueError) as info:
        MODULES[mining]()(LABELS, EMB)
    msg = str(info.value)
    assert "embeddings" in msg and "labels" in msg
    assert "order is (labels, embeddings)" not in msg, msg

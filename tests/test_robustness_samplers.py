"""PKSampler reads class ids by value (issue 11, item 5): a list of 0-d
tensors (``[dataset[i][1] for i in ...]``), 0-d arrays and numpy scalars
give the classes that the plain ints give."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from online_triplet_loss import PKSampler

LABELS = [3, 1, 3, 0, 1, 3, 0, 2, 2, 1, 0, 3, 2]


def _containers(values):
    """The same labels in every form a caller may hand over."""
    ints = [int(v) for v in values]
    dataset = TensorDataset(torch.zeros(len(ints), 2), torch.tensor(ints))
    return {
        "ints": ints,
        "0-d int64 tensors": [torch.tensor(v) for v in ints],
        "0-d int32 tensors": [torch.tensor(v, dtype=torch.int32) for v in ints],
        "0-d float tensors": [torch.tensor(float(v)) for v in ints],
        "dataset items": [dataset[i][1] for i in range(len(ints))],
        "1-D tensor": torch.tensor(ints),
        "uint8 tensor": torch.tensor(ints, dtype=torch.uint8),
        "numpy array": np.array(ints),
        "numpy int32 scalars": [np.int32(v) for v in ints],
        "numpy float scalars": [np.float64(v) for v in ints],
        "0-d arrays": [np.array(v) for v in ints],
        "floats": [float(v) for v in ints],
        "mixed": [torch.tensor(v) if i % 3 == 0 else np.int64(v) if i % 3 == 1 else v
                  for i, v in enumerate(ints)],
        "tuple": tuple(ints),
    }


CONTAINERS = _containers(LABELS)


@pytest.mark.parametrize("name", sorted(CONTAINERS))
@pytest.mark.parametrize("p, k", [(2, 2), (4, 3), (3, 1)])
def test_every_label_form_gives_the_batches_of_plain_ints(name, p, k):
    expected = PKSampler(LABELS, p, k, seed=4)
    sampler = PKSampler(CONTAINERS[name], p, k, seed=4)
    assert sampler.num_classes == len(set(LABELS)) == expected.num_classes
    for epoch in (0, 1):
        expected.set_epoch(epoch), sampler.set_epoch(epoch)
        batches = list(sampler)
        assert batches == list(expected)
        for batch in batches:
            assert len({LABELS[i] for i in batch}) == p


@pytest.mark.parametrize("bad, shape", [
    ([torch.tensor([1]), torch.tensor([2])], r"\(1,\)"),
    ([torch.zeros(2), torch.zeros(2)], r"\(2,\)"),
    ([np.array([1, 2])], r"\(2,\)"),
    (np.zeros((3, 1)), r"\(3, 1\)"),
])
def test_elements_that_are_not_scalars_are_refused(bad, shape):
    with pytest.raises(ValueError, match=f"labels: must be 1-D.*{shape}"):
        PKSampler(bad, 1, 1)


@pytest.mark.parametrize("labels", [{0, 1, 2}, frozenset({0, 1}), {0: "a", 1: "b"}, {"x": 0}.keys()],
                         ids=["set", "frozenset", "dict", "keys"])
def test_unordered_or_keyed_containers_are_refused(labels):
    # The sampler yields positions in labels: a set's order, or a mapping's
    # keys, are not the dataset's samples (found by review: taken silently).
    with pytest.raises(ValueError, match="^labels: must be a sequence of class ids, one per sample"):
        PKSampler(labels, 1, 1)


def _unreadable_labels():
    labels = torch.tensor([0, 0, 1, 1])
    yield "meta", labels.to("meta"), "labels: must hold values, got a tensor on the meta device"
    yield "sparse", labels.to_sparse(), "labels: must be a dense .strided. tensor, got layout torch.sparse_coo"
    yield "nested", torch.nested.nested_tensor([labels[:2], labels[2:]]), \
        "labels: must be a dense .strided. tensor, got a nested tensor"
    yield "quantized", torch.quantize_per_tensor(labels.float(), 1.0, 0, torch.quint8), \
        r"labels: must hold class ids, got a quantized tensor \(torch.quint8\)"
    yield "meta elements", [torch.tensor(0, device="meta")] * 4, "labels: must hold values, got a tensor on"


@pytest.mark.parametrize("name, labels, match", list(_unreadable_labels()), ids=lambda v: v if isinstance(v, str) else "")
def test_tensors_without_readable_values_are_refused_by_name(name, labels, match):
    """Found by review: these raised torch's own errors (a meta tensor's
    "Cannot copy out of meta tensor", a sparse one's missing storage, a
    quantized one's "load_scalar: invalid type")."""
    with pytest.raises(ValueError, match=match):
        PKSampler(labels, 1, 2)


def test_tensors_whose_values_can_be_read_are_still_class_ids():
    """What the refusals above must not catch: complex tensors (as complex
    lists and arrays are), and 0-d quantized elements, which ``item`` reads."""
    labels = [0, 0, 1, 1, 2, 2]
    want = list(PKSampler(labels, 2, 2, seed=3))
    assert list(PKSampler(torch.tensor(labels).to(torch.complex64), 2, 2, seed=3)) == want
    quantized = [torch.quantize_per_tensor(torch.tensor(float(v)), 1.0, 0, torch.quint8) for v in labels]
    assert list(PKSampler(quantized, 2, 2, seed=3)) == want


def test_nan_labels_are_distinct_classes():
    labels = torch.tensor([0.0, float("nan"), 0.0, float("nan"), 1.0, 1.0])
    for form in (labels, list(labels), labels.numpy()):
        assert PKSampler(form, 1, 2).num_classes == 4
    # One NaN object repeated: a dict would find it by identity.
    nan = float("nan")
    for form in ([nan, nan, 1.0, 1.0], [math.nan, 0, math.nan, 0], [np.nan] * 3 + [2, 2]):
        sampler = PKSampler(form, 1, 2)
        assert sampler.num_classes == len(form) - 1
        assert all(len({form[i] if form[i] == form[i] else i for i in batch}) == 1
                   for batch in sampler)


def test_settings_are_read_only_and_the_epoch_is_checked():
    # The number of batches is counted from p, k and world_size at
    # construction: changing one afterwards gave batches of other sizes, or
    # len() out of step with the iteration (found by review).
    sampler = PKSampler([i % 4 for i in range(64)], 2, 4, rank=1, world_size=2, seed=3)
    before = list(sampler)
    for name in ("p", "k", "seed", "rank", "world_size"):
        with pytest.raises(AttributeError):
            setattr(sampler, name, 1)
    assert (sampler.p, sampler.k, sampler.seed, sampler.rank, sampler.world_size) == (2, 4, 3, 1, 2)
    assert list(sampler) == before and len(sampler) == len(before)
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="^epoch: "):
            sampler.epoch = bad
    sampler.epoch = 2
    again = PKSampler([i % 4 for i in range(64)], 2, 4, rank=1, world_size=2, seed=3)
    again.set_epoch(2)
    assert list(sampler) == list(again)


def test_a_sampler_pickled_with_plain_attributes_loads():
    sampler = PKSampler([i % 4 for i in range(64)], 2, 4, rank=1, world_size=2, seed=3)
    sampler.set_epoch(2)
    old = dict(sampler.__dict__)
    for name in ("p", "k", "seed", "rank", "world_size", "epoch"):
        old[name] = old.pop("_" + name)
    loaded = PKSampler.__new__(PKSampler)
    loaded.__setstate__(old)
    assert len(loaded) == len(sampler) and list(loaded) == list(sampler)
    assert (loaded.p, loaded.k, loaded.seed, loaded.rank, loaded.world_size, loaded.epoch) == (2, 4, 3, 1, 2, 2)


def test_an_epoch_too_big_for_memory_names_k():
    """A k no memory can hold fails when the epoch is built, with Python's
    MemoryError (empty, naming nothing) turned into one that names k; the
    sampler still works at a size that fits."""
    from online_triplet_loss import HostOutOfMemoryError

    sampler = PKSampler([0, 1, 2], p=3, k=2**40)
    assert len(sampler) == 1 and sampler.batch_size == 3 * 2**40
    with pytest.raises(HostOutOfMemoryError, match=r"^k: an epoch of 1 batches of p \* k = 3 \* 1099511627776 "):
        next(iter(sampler))
    assert isinstance(HostOutOfMemoryError("x"), MemoryError)
    assert [len(batch) for batch in PKSampler([0, 1, 2], p=3, k=4)] == [12]


@pytest.mark.parametrize("world_size", [2**40, 2**62])
def test_an_epoch_too_big_for_memory_because_of_world_size_names_it(world_size):
    """Every rank builds the whole epoch, rounded up to a multiple of
    world_size: a world_size that makes it bigger than the host's memory is
    named, at once (before, it filled the memory for minutes and then blamed k)."""
    from online_triplet_loss import HostOutOfMemoryError

    sampler = PKSampler([0, 0, 1, 1, 2, 2], p=1, k=1, world_size=world_size)
    assert len(sampler) == 1
    with pytest.raises(HostOutOfMemoryError,
                       match=rf"^world_size: an epoch of {world_size} batches .* 6 of the data's "
                             rf"rounded up to a multiple of world_size={world_size}"):
        next(iter(sampler))
    assert len(list(PKSampler([0, 0, 1, 1, 2, 2], p=1, k=1, world_size=8))) == 1
    # A k whose epoch fits no host whatever the world_size is named, not world_size.
    with pytest.raises(HostOutOfMemoryError, match=r"^k: an epoch of 2 batches"):
        next(iter(PKSampler([0, 0], p=1, k=2**40, world_size=2)))

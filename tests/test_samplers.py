"""PKSampler: the invariants of every batch and every epoch."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from online_triplet_loss import PKSampler


def class_sizes(labels):
    return collections.Counter(labels)


def check_epoch(labels, batches, p, k):
    """Every invariant of one epoch's batches (of one rank or of all)."""
    sizes = class_sizes(labels)
    for batch in batches:
        assert len(batch) == p * k
        groups = [batch[i:i + k] for i in range(0, p * k, k)]
        classes = []
        for group in groups:
            group_labels = {labels[i] for i in group}
            assert len(group_labels) == 1, f"a group of k mixes classes: {group}"
            (label,) = group_labels
            classes.append(label)
            counts = collections.Counter(group)
            if sizes[label] >= k:
                assert max(counts.values()) == 1, f"class {label} of {sizes[label]} >= k repeats: {group}"
            else:
                # a small class: all of its samples, repeated as evenly as possible
                assert len(counts) == sizes[label]
                assert max(counts.values()) - min(counts.values()) <= 1
        assert len(set(classes)) == p, f"classes repeat in a batch: {classes}"


LABEL_SETS = {
    "balanced": [c for c in range(12) for _ in range(8)],
    "uneven": [i % 7 for i in range(100)] + [7] * 3 + [8] * 40 + [9],
    "dominant": [0] * 100 + [1] * 3 + [2] * 2 + [3] * 9,
    "strings": ["cat", "dog", "cow", "dog", "cat", "owl", "owl", "cat", "dog", "cow"] * 3,
}


@pytest.mark.parametrize("name", sorted(LABEL_SETS))
@pytest.mark.parametrize("p, k", [(2, 1), (3, 4), (4, 5)])
@pytest.mark.parametrize("world_size", [1, 3])
def test_batches_epochs_and_len(name, p, k, world_size):
    labels = LABEL_SETS[name]
    epoch_union = []
    for rank in range(world_size):
        sampler = PKSampler(labels, p, k, seed=7, rank=rank, world_size=world_size)
        for epoch in range(3):
            sampler.set_epoch(epoch)
            batches = list(sampler)
            assert len(batches) == len(sampler) > 0
            check_epoch(labels, batches, p, k)
            if epoch == 1:
                epoch_union.extend(batches)
    # the ranks together cover every index (and so every class) in an epoch
    assert {i for batch in epoch_union for i in batch} == set(range(len(labels)))


def test_len_formula():
    labels = LABEL_SETS["uneven"]
    # groups of k=5: 3 for each of classes 0..6 (15 or 14 samples), 1 for class 7
    # (3 samples), 8 for class 8 (40), 1 for class 9 (1)
    groups = sum(-(-n // 5) for n in class_sizes(labels).values())
    assert groups == 31
    assert len(PKSampler(labels, 4, 5)) == max(-(-groups // 4), 8)
    assert len(PKSampler(labels, 4, 5, world_size=4)) == -(-max(-(-groups // 4), 8) // 4)
    # a dominant class sets the number of batches: one of its groups per batch
    assert len(PKSampler(LABEL_SETS["dominant"], 2, 4)) == 25


def test_no_fill_when_everything_divides_and_ranks_are_disjoint():
    labels = LABEL_SETS["balanced"]  # 12 classes x 8
    seen = []
    lengths = set()
    for rank in range(3):
        sampler = PKSampler(labels, p=4, k=4, seed=1, rank=rank, world_size=3)
        batches = list(sampler)
        lengths.add(len(batches))
        seen.extend(i for batch in batches for i in batch)
    assert lengths == {2}
    # 24 groups in 6 batches over 3 ranks: each index exactly once, so no two
    # ranks share a batch or an index
    assert sorted(seen) == list(range(len(labels)))


def test_ranks_split_the_single_process_epoch():
    labels = LABEL_SETS["uneven"]
    whole = PKSampler(labels, 3, 4, seed=5)
    whole.set_epoch(2)
    parts = []
    world_size = 2
    assert len(whole) % world_size == 0  # else the padded epochs would differ
    for rank in range(world_size):
        sampler = PKSampler(labels, 3, 4, seed=5, rank=rank, world_size=world_size)
        sampler.set_epoch(2)
        parts.append(list(sampler))
    assert len(parts[0]) == len(parts[1]) == len(whole) // 2
    assert sorted(map(tuple, parts[0] + parts[1])) == sorted(map(tuple, whole))
    assert not set(map(tuple, parts[0])) & set(map(tuple, parts[1]))


def test_every_class_every_epoch_and_balance():
    labels = LABEL_SETS["dominant"]
    sampler = PKSampler(labels, 2, 4, seed=3)
    for epoch in range(5):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        counts = collections.Counter(labels[batch[0]] for batch in batches)
        counts.update(labels[batch[4]] for batch in batches)
        assert set(counts) == {0, 1, 2, 3}
        assert counts[0] == 25  # the big class, once per batch
        assert sum(counts.values()) == 50


@pytest.mark.parametrize("others", [5, 300])
def test_fill_classes_are_absent_distinct_and_uniform(others):
    """One class sets the number of batches, so nearly every place beside it
    is filled: with classes, distinct, not already in the batch, drawn
    uniformly (by listing the absent classes when few, by redrawing when
    most are absent)."""
    p, k = 4, 2
    labels = [0] * 2000 + [c for c in range(1, others + 1) for _ in range(2)]
    sampler = PKSampler(labels, p=p, k=k, seed=3)
    counts = collections.Counter()
    for batch in sampler:
        classes = [labels[i] for i in batch[::k]]
        assert len(set(classes)) == p and 0 in classes
        counts.update(c for c in classes if c != 0)
    assert set(counts) == set(range(1, others + 1))
    # Each other class: its one group, plus fill drawn uniformly.
    total = sum(counts.values())
    expected = total / others
    chi2 = sum((n - expected) ** 2 / expected for n in counts.values())
    # mean others - 1, sd sqrt(2 (others - 1)): a wide bound that a biased draw
    # (one class always, or the first ones favoured) far exceeds.
    assert chi2 < (others - 1) + 8 * (2 * (others - 1)) ** 0.5, chi2


def test_determinism_and_set_epoch():
    labels = LABEL_SETS["uneven"]
    a = PKSampler(labels, 4, 3, seed=11)
    b = PKSampler(labels, 4, 3, seed=11)
    first = list(a)
    assert first == list(b) == list(a)  # same seed, same epoch: same batches
    a.set_epoch(1)
    second = list(a)
    assert second != first
    a.set_epoch(0)
    assert list(a) == first
    assert list(PKSampler(labels, 4, 3, seed=12)) != first


def test_label_containers_and_dataloader():
    base = [3, 1, 3, 2, 1, 2, 3, 1, 2, 2]
    expected = list(PKSampler(base, 2, 2, seed=4))
    for labels in (torch.tensor(base), np.array(base), tuple(base), [float(x) for x in base]):
        assert list(PKSampler(labels, 2, 2, seed=4)) == expected
    x = torch.arange(10.0)[:, None]
    y = torch.tensor(base)
    loader = DataLoader(TensorDataset(x, y), batch_sampler=PKSampler(y, 2, 2, seed=4))
    got = [batch_x[:, 0].long().tolist() for batch_x, _ in loader]
    assert got == expected
    assert len(loader) == len(expected)


def test_small_classes_repeat_evenly():
    labels = [0, 1, 1, 2, 2, 2, 2, 2, 2, 2]
    sampler = PKSampler(labels, 3, 5, seed=0)
    for batch in sampler:
        groups = {labels[batch[i]]: batch[i:i + 5] for i in range(0, 15, 5)}
        assert sorted(groups[0]) == [0] * 5
        assert sorted(collections.Counter(groups[1]).values()) == [2, 3]
        assert len(set(groups[2])) == 5


def test_properties():
    sampler = PKSampler(LABEL_SETS["balanced"], 4, 3, seed=2, rank=1, world_size=2)
    assert (sampler.p, sampler.k, sampler.batch_size, sampler.num_classes) == (4, 3, 12, 12)
    assert (sampler.rank, sampler.world_size, sampler.seed, sampler.epoch) == (1, 2, 2, 0)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        (([0, 0, 1], 3, 2), {}, r"p: must be at most the number of classes \(2\), got 3"),
        (([0, 0, 1], 0, 2), {}, "p: must be an int >= 1, got 0"),
        (([0, 0, 1], 2, 0), {}, "k: must be an int >= 1, got 0"),
        (([0, 0, 1], 2, True), {}, "k: must be an int >= 1, got True"),
        (([0, 0, 1], 2.0, 2), {}, r"p: must be an int >= 1, got 2.0"),
        (([], 1, 1), {}, "labels: must hold at least one sample"),
        ((torch.zeros(2, 2), 1, 1), {}, r"labels: must be 1-D, got a tensor of shape \(2, 2\)"),
        ((np.zeros((2, 2)), 1, 1), {}, "labels: must be 1-D and hold hashable class ids"),
        (("abc", 1, 1), {}, "labels: must be a sequence of class ids, got 'abc'"),
        ((5, 1, 1), {}, "labels: must be a sequence of class ids, got int"),
        (([0, 1], 1, 1), dict(rank=2, world_size=2), r"rank: must be < world_size \(2\), got 2"),
        (([0, 1], 1, 1), dict(rank=-1), "rank: must be an int >= 0, got -1"),
        (([0, 1], 1, 1), dict(world_size=0), "world_size: must be an int >= 1, got 0"),
        (([0, 1], 1, 1), dict(seed="0"), "seed: must be an int, got '0'"),
    ],
)
def test_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        PKSampler(*args, **kwargs)


def test_set_epoch_errors():
    sampler = PKSampler([0, 1], 1, 1)
    for bad in (-1, 1.5, "2", None):
        with pytest.raises(ValueError, match="epoch: must be an int >= 0"):
            sampler.set_epoch(bad)

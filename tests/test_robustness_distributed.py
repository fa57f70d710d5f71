"""DistributedTripletLoss with ranks that disagree (issue 11, item 10): a
dtype or width that differs between ranks raised inside gloo (or aborted the
process); now every rank raises a ValueError naming the argument, and the
group stays usable."""

from __future__ import annotations

import datetime
import math
import os

import pytest
import torch
import torch.distributed as dist

from online_triplet_loss import BatchAllTripletLoss, BatchHardTripletLoss, BatchSemiHardTripletLoss
from online_triplet_loss import CrossBatchMemory, batch_all_triplet_loss
from online_triplet_loss.distributed import DistributedTripletLoss
from test_distributed import _start

MAKERS = [lambda: BatchAllTripletLoss(margin=0.5), lambda: BatchHardTripletLoss(margin=0.5),
          lambda: BatchSemiHardTripletLoss(margin=0.5)]

# (name, what the message names, rank 0's (dtype, width, label dtype), rank 1's)
MISMATCHES = [
    ("float32 vs float64", "embeddings: every rank of the group must pass the same dtype",
     (torch.float32, 3, torch.int64), (torch.float64, 3, torch.int64)),
    ("float64 vs bfloat16", "embeddings: every rank of the group must pass the same dtype",
     (torch.float64, 3, torch.int64), (torch.bfloat16, 3, torch.int64)),
    ("width 3 vs 4", "embeddings: every rank of the group must pass the same width",
     (torch.float32, 3, torch.int64), (torch.float32, 4, torch.int64)),
    ("int64 vs int32 labels", "labels: every rank of the group must pass the same dtype",
     (torch.float32, 3, torch.int64), (torch.float32, 3, torch.int32)),
    ("int64 vs float labels", "labels: every rank of the group must pass the same dtype",
     (torch.float32, 3, torch.int64), (torch.float32, 3, torch.float32)),
]


def _inputs(rank, spec, rows):
    dtype, width, label_dtype = spec
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(rows, width, generator=g).to(dtype).requires_grad_(True)
    return x, torch.tensor([0, 1, 0, 2, 1][:rows]).to(label_dtype)


def _worker(rank, world, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for name, message, *specs in MISMATCHES:
            for make in MAKERS:
                for wrap in ("loss", "memory", "gather"):
                    x, y = _inputs(rank, specs[rank], 4 + rank)
                    criterion = DistributedTripletLoss(make())
                    call = {
                        "loss": lambda: criterion(x, y),
                        "memory": lambda: CrossBatchMemory(criterion, memory_size=8)(x, y),
                        "gather": lambda: criterion.gather(x, y),
                    }[wrap]
                    for grad_mode in (True, False):
                        with torch.set_grad_enabled(grad_mode):
                            try:
                                call()
                            except ValueError as err:
                                assert message in str(err), (name, rank, str(err))
                                assert f"on rank {1 - rank}" in str(err), str(err)
                            else:
                                raise AssertionError(f"{name} {wrap}: rank {rank} did not raise")
                            assert torch.is_grad_enabled() == grad_mode
                    # The group still works: a matching call goes through on both ranks.
                    x, y = _inputs(rank, specs[0], 4 + rank)
                    loss = criterion(x, y)
                    loss.backward()
                    assert torch.isfinite(loss) and x.grad is not None
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_mismatched_ranks_raise_value_error_on_every_rank(tmp_path):
    assert dist.is_available(), "torch.distributed is required"
    _start(_worker, (2, os.path.join(str(tmp_path), "init")), 2)


@pytest.mark.parametrize("extra_dtype", [torch.float32, torch.float64, torch.int32, torch.int64])
@pytest.mark.parametrize("label_dtype", [torch.int64, torch.float64, torch.uint8])
def test_extra_labels_keep_their_values(label_dtype, extra_dtype):
    """Extra references whose labels have another dtype: a float label 1.5 is
    no class 1 (it was truncated to the anchors' integer dtype before), and
    1.0 is class 1. Checked against the float64 reference on the values."""
    import reference

    assert not dist.is_initialized()
    g = torch.Generator().manual_seed(2)
    labels = torch.tensor([0, 1, 1, 2, 3]).to(label_dtype)
    extra_values = [1.5, 1.0, 2.5, 0.0, 3.0, 2.0] if extra_dtype.is_floating_point else [1, 0, 5, 2]
    extra_labels = torch.tensor(extra_values).to(extra_dtype)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    extra = torch.randn(len(extra_values), 3, generator=g, dtype=torch.float64)
    for mining, make in zip(("all", "hard", "semihard"), MAKERS):
        got = DistributedTripletLoss(make())(x, labels, extra_embeddings=extra,
                                              extra_labels=extra_labels)
        expected = reference.reference_terms(
            mining, labels.double(), x, 0.5, ref_embeddings=torch.cat([x, extra]),
            ref_labels=torch.cat([labels.double(), extra_labels.double()]), anchor_offset=0).loss
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def _global_batch(rank, seed):
    """Nine float64 rows and their labels, and this rank's rows of them
    (four on rank 0, five on rank 1)."""
    g = torch.Generator().manual_seed(seed)
    full_x = torch.randn(9, 3, generator=g, dtype=torch.float64)
    full_y = torch.tensor([0, 1, 0, 2, 1, 2, 0, 1, 2])
    return full_x, full_y, [slice(0, 4), slice(4, 9)][rank]


def _worker_after_review(rank, world, init_file):
    """Found by review: a learnable margin's gradient, ranks whose embeddings
    do not all require grad, a memory whose checks one rank fails after the
    first step, int16 labels, and second derivatives."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        full_x, full_y, rows = _global_batch(rank, seed=7)
        for make in MAKERS:
            # The margin's gradient is the single-process one, on every rank.
            loss = make()
            loss.margin = torch.nn.Parameter(torch.tensor(0.7, dtype=torch.float64))
            x = full_x[rows].clone().requires_grad_(True)
            DistributedTripletLoss(loss)(x, full_y[rows]).backward()
            single = make()
            single.margin = torch.nn.Parameter(torch.tensor(0.7, dtype=torch.float64))
            single(full_x, full_y).backward()
            torch.testing.assert_close(loss.margin.grad, single.margin.grad, rtol=1e-12, atol=1e-14)
            # Its second derivative raises, as the embeddings' does.
            x = full_x[rows].clone()
            (dm,) = torch.autograd.grad(DistributedTripletLoss(loss)(x, full_y[rows]), loss.margin,
                                        create_graph=True)
            with pytest.raises(RuntimeError, match="second derivatives"):
                torch.autograd.grad(dm, loss.margin)
            # int16 labels, which gloo cannot gather, give the int64 result.
            criterion = DistributedTripletLoss(make())
            want = criterion(full_x[rows], full_y[rows])
            got = criterion(full_x[rows], full_y[rows].to(torch.int16))
            torch.testing.assert_close(got, want, rtol=0, atol=0)
            # A rank whose embeddings do not require grad: both raise.
            x = full_x[rows].clone().requires_grad_(rank == 0)
            with pytest.raises(ValueError, match="requires_grad") as err:
                criterion(x, full_y[rows])
            assert f"on rank {1 - rank}" in str(err.value)
            # Second derivatives raise on every rank instead of being wrong.
            x = full_x[rows].clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(criterion(x, full_y[rows]), x, create_graph=True)
            with pytest.raises(RuntimeError, match="second derivatives"):
                torch.autograd.grad(grad.square().sum(), x)
            # A filled memory, then one rank's labels change dtype: both raise.
            memory = CrossBatchMemory(DistributedTripletLoss(make()), memory_size=16)
            memory(full_x[rows].clone().requires_grad_(True), full_y[rows])
            labels = full_y[rows].to(torch.int32 if rank == 1 else torch.int64)
            with pytest.raises(ValueError, match="labels: every rank of the group must pass the same dtype"):
                memory(full_x[rows].clone().requires_grad_(True), labels)
            # All ranks change it: the memory refuses on every rank.
            with pytest.raises(ValueError, match="labels: must keep the dtype of the first batch's"):
                memory(full_x[rows].clone().requires_grad_(True), full_y[rows].to(torch.int32))
            # Labels of the wrong length on one rank: it says why, the other
            # that the rank's input does not match; neither waits.
            labels = full_y[rows][:-1] if rank == 1 else full_y[rows]
            for call in (lambda: criterion(full_x[rows].clone().requires_grad_(True), labels),
                         lambda: memory(full_x[rows].clone().requires_grad_(True), labels)):
                match = ("labels: must be 1-D with one entry" if rank == 1
                         else "labels: rank 1 of the group raised a ValueError for its labels")
                with pytest.raises(ValueError, match=match):
                    call()
            # The group still works.
            memory(full_x[rows].clone().requires_grad_(True), full_y[rows]).backward()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_review_findings_on_two_ranks(tmp_path):
    assert dist.is_available(), "torch.distributed is required"
    _start(_worker_after_review, (2, os.path.join(str(tmp_path), "init")), 2)


def _worker_settings(rank, world, init_file):
    """Ranks whose loss settings, extra references or memories differ: one
    rank raised while the others waited in a collective (or the process
    aborted inside gloo), or every rank computed a different, meaningless
    loss. Now every rank raises a ValueError that says what differs."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        g = torch.Generator().manual_seed(3)
        full_x = torch.randn(9, 3, generator=g, dtype=torch.float64)
        full_y = torch.tensor([0, 1, 0, 2, 1, 2, 0, 1, 2])
        rows = [slice(0, 4), slice(4, 9)][rank]
        x, y = full_x[rows].clone().requires_grad_(True), full_y[rows]
        extra = (torch.randn(3, 3, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2]))
        mine = rank == 0

        def learnable(dtype):
            return torch.nn.Parameter(torch.tensor(0.5, dtype=dtype))

        def loss(cls=BatchAllTripletLoss, **kw):
            return DistributedTripletLoss(cls(**{"margin": 0.5, **kw}))

        def stored(memory_size=8, rows_stored=4):
            memory = CrossBatchMemory(loss(), memory_size=memory_size)
            if mine:
                memory.enqueue(full_x[:rows_stored], full_y[:rows_stored])
            return memory

        cases = [
            ("loss.mining", lambda: loss(BatchAllTripletLoss if mine else BatchHardTripletLoss)(x, y)),
            ("loss.margin", lambda: loss(margin=0.5 if mine else 5.0)(x, y)),
            ("loss.distance", lambda: loss(distance="euclidean" if mine else "cosine")(x, y)),
            ("loss.soft", lambda: loss(BatchHardTripletLoss, soft=mine)(x, y)),
            ("loss.margin (learnable", lambda: loss(
                margin=learnable(torch.float64) if mine else 0.5)(x, y)),
            ("loss.margin (learnable", lambda: loss(
                margin=learnable(torch.float64 if mine else torch.float32))(x, y)),
            ("extra_embeddings (rows)", lambda: loss()(
                x, y, **(dict(extra_embeddings=extra[0], extra_labels=extra[1]) if mine else {}))),
            ("extra_embeddings (dtype)", lambda: loss()(
                x, y, extra_embeddings=extra[0].to(torch.float64 if mine else torch.float32),
                extra_labels=extra[1])),
            ("extra_labels (dtype)", lambda: loss()(
                x, y, extra_embeddings=extra[0],
                extra_labels=extra[1].to(torch.int64 if mine else torch.int32))),
            ("extra_embeddings and extra_labels", lambda: loss()(
                x, y, extra_embeddings=extra[0], **(dict(extra_labels=extra[1]) if not mine else {}))),
            ("extra_embeddings", lambda: loss()(
                x, y, extra_embeddings=extra[0][:, : 2 if mine else 3], extra_labels=extra[1])),
            ("margin", lambda: _with_margin(loss(), -1.0 if mine else 0.5)(x, y)),
            ("soft", lambda: _with(loss(BatchHardTripletLoss), soft="yes" if mine else False)(x, y)),
            ("distance", lambda: _with(loss(), distance="manhattan" if mine else "euclidean")(x, y)),
            ("labels", lambda: loss()(x, y.tolist() if mine else y)),
            # Two problems on one rank: the first is relayed, whatever the labels.
            ("soft", lambda: _with(loss(BatchHardTripletLoss), soft="yes" if mine else False)(
                x, y.tolist() if mine else y)),
            # A check of one rank's values (integers beyond 2**53 meeting float
            # labels), made before the exchange.
            ("extra_labels", lambda: loss()(
                x, y.double(), extra_embeddings=extra[0],
                extra_labels=torch.tensor([2**60 if mine else 0, 1, 2]))),
            ("memory (entries stored)", lambda: stored()(x, y)),
            ("memory (memory_size)", lambda: CrossBatchMemory(
                loss(), memory_size=4 if mine else 16)(x, y)),
        ]
        for what, call in cases:
            with pytest.raises(ValueError) as err:
                call()
            text = str(err.value)
            assert text.startswith(what), (rank, what, text)
            assert "rank" in text or what in ("margin", "extra_embeddings and extra_labels",
                                              "extra_embeddings", "soft", "distance",
                                              "labels", "extra_labels"), text
            # The group still works: a matching call goes through on both ranks.
            value = loss()(x, y)
            value.backward()
            assert torch.isfinite(value)
        # The same margin written differently on the ranks is one margin.
        for margin in ((0.0, -0.0), (0.25, torch.tensor(0.25)), (1, 1.0)):
            torch.testing.assert_close(_with_margin(loss(), margin[rank])(x, y),
                                       _with_margin(loss(), margin[0])(x, y))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _with_margin(criterion, margin):
    criterion.loss.margin = margin
    return criterion


def _with(criterion, **settings):
    """The wrapped loss's settings changed after construction, which checks
    them: the distributed loss reads them at every call."""
    for name, value in settings.items():
        object.__setattr__(criterion.loss, name, value)
    return criterion


def test_ranks_with_different_settings_all_raise(tmp_path):
    assert dist.is_available(), "torch.distributed is required"
    _start(_worker_settings, (2, os.path.join(str(tmp_path), "init")), 2)


def _worker_second_review(rank, world, init_file):
    """Found by the second review: embeddings of a dtype gloo cannot gather
    raised gloo's 'Invalid scalar type', and a loss put in place of
    ``criterion.loss`` was mined with the old one's mining on several ranks."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        full_x, full_y, rows = _global_batch(rank, seed=3)
        x, y = full_x[rows], full_y[rows]
        for bad in (torch.float8_e4m3fn, torch.uint16, torch.int64):
            for both in (True, False):
                criterion = DistributedTripletLoss(BatchHardTripletLoss(margin=0.5))
                odd = x.to(bad) if both or rank == 1 else x
                if rank == 1 or both:
                    match = f"embeddings: must be floating point .* got dtype {str(bad)[6:]}"
                else:
                    match = "embeddings: rank 1 of the group raised a ValueError"
                with pytest.raises(ValueError, match=match):
                    criterion(odd, y)
                # The group still works.
                torch.testing.assert_close(criterion(x, y), BatchHardTripletLoss(margin=0.5)(full_x, full_y))
        for make in MAKERS:
            criterion = DistributedTripletLoss(BatchAllTripletLoss(margin=0.5))
            criterion.loss = make()
            assert criterion.mining == criterion.loss.mining
            assert f"mining={criterion.loss.mining!r}" in repr(criterion)
            torch.testing.assert_close(criterion(x, y), make()(full_x, full_y))
            # What is not one of the three losses is refused on every rank.
            criterion.loss = torch.nn.Identity()
            with pytest.raises(ValueError, match="loss: expected one of"):
                criterion(x, y)
            criterion.loss = make()
            torch.testing.assert_close(criterion(x, y), make()(full_x, full_y))
            # Replaced on one rank only: the other names the loss too.
            if rank == 1:
                criterion.loss = torch.nn.Identity()
            match = "loss: expected one of" if rank == 1 else "loss: rank 1 of the group raised"
            with pytest.raises(ValueError, match=match):
                criterion(x, y)
            criterion.loss = make()
            torch.testing.assert_close(criterion(x, y), make()(full_x, full_y))
        _check_fraction_of_non_finite_batches(rank, full_x, full_y, rows)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _check_fraction_of_non_finite_batches(rank, full_x, full_y, rows):
    """On several ranks, batch-all's fraction is NaN whenever the loss is, as
    in one process, with NaN or inf on either rank (the all-reduced counts
    alone stay finite)."""
    for bad_rank in (0, 1):
        for value in (float("nan"), float("inf")):
            for distance in ("euclidean", "cosine"):
                broken = full_x.clone()
                broken[(1, 6)[bad_rank]] = value  # a row of rank bad_rank
                criterion = DistributedTripletLoss(BatchAllTripletLoss(margin=0.5, distance=distance))
                loss = criterion(broken[rows], full_y[rows])
                want_loss, want_fraction = batch_all_triplet_loss(full_y, broken, 0.5, distance=distance)
                assert torch.isnan(want_loss) and torch.isnan(want_fraction), (value, distance)
                assert torch.isnan(loss), (rank, bad_rank, value, distance)
                assert torch.isnan(criterion.last_fraction), (rank, bad_rank, value, distance)
    # Finite batches keep the exact fraction.
    criterion = DistributedTripletLoss(BatchAllTripletLoss(margin=0.5))
    criterion(full_x[rows], full_y[rows])
    torch.testing.assert_close(criterion.last_fraction,
                               batch_all_triplet_loss(full_y, full_x, 0.5)[1], rtol=1e-12, atol=0)
    # In half precision the loss and the fraction come back in the
    # embeddings' dtype, equal to one process's.
    for dtype in (torch.float16, torch.bfloat16):
        criterion = DistributedTripletLoss(BatchAllTripletLoss(margin=0.5))
        loss = criterion(full_x[rows].to(dtype), full_y[rows])
        want_loss, want_fraction = batch_all_triplet_loss(full_y, full_x.to(dtype), 0.5)
        assert loss.dtype == criterion.last_fraction.dtype == want_fraction.dtype == dtype
        assert torch.equal(criterion.last_fraction, want_fraction), dtype
        torch.testing.assert_close(loss, want_loss)


def test_second_review_findings_on_two_ranks(tmp_path):
    assert dist.is_available(), "torch.distributed is required"
    _start(_worker_second_review, (2, os.path.join(str(tmp_path), "init")), 2)


def test_a_replaced_loss_is_the_one_mined_in_one_process():
    criterion = DistributedTripletLoss(BatchAllTripletLoss(margin=0.5))
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    for make in MAKERS:
        criterion.loss = make()
        for extras in ({}, {"extra_embeddings": x[:3] + 1, "extra_labels": y[:3]}):
            want = DistributedTripletLoss(make())(x, y, **extras)
            torch.testing.assert_close(criterion(x, y, **extras), want, rtol=0, atol=0)
    criterion.loss = torch.nn.Identity()
    assert "mining=None" in repr(criterion)
    with pytest.raises(ValueError, match="loss: expected one of"):
        criterion(x, y)


def _worker_unusable_embeddings(rank, world, init_file):
    """One rank's embeddings that are no dense CPU or CUDA tensor (a list,
    meta, sparse, nested), or that sit on another device than its memory: the
    rank raised before the exchange while the other waited in all_gather
    until the timeout. Now both raise a ValueError, the other naming the
    rank, and the group stays usable."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        good = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
        y = torch.tensor([0, 1, 0, 1])
        unusable = [
            ("a list", good.tolist(), "embeddings: must be a torch.Tensor"),
            ("meta", torch.empty(4, 3, dtype=torch.float64, device="meta"),
             "embeddings: must be on the CPU or a CUDA device"),
            ("sparse", good.detach().to_sparse(), "embeddings: must be a dense"),
            ("nested", torch.nested.nested_tensor([good.detach()[:2], good.detach()[2:]]),
             "embeddings: must be a dense"),
        ]
        for name, bad, message in unusable:
            x = bad if rank == 1 else good
            for make in MAKERS:
                criterion = DistributedTripletLoss(make())
                for call in (lambda: criterion(x, y), lambda: criterion.gather(x, y),
                             lambda: CrossBatchMemory(criterion, memory_size=8)(x, y)):
                    with pytest.raises(ValueError) as raised:
                        call()
                    text = str(raised.value)
                    if rank == 1:
                        assert message in text, (name, text)
                    else:
                        assert text.startswith("embeddings: rank 1 of the group"), (name, text)
        # A memory on the meta device on rank 1 only, the embeddings on the CPU.
        criterion = DistributedTripletLoss(BatchHardTripletLoss(margin=0.5))
        memory = CrossBatchMemory(criterion, memory_size=8)
        memory.enqueue(good.detach(), y)
        if rank == 1:
            memory.to("meta")
        with pytest.raises(ValueError) as raised:
            memory(good, y)
        wanted = "must be on the memory's device" if rank == 1 else "embeddings: rank 1 of the group"
        assert wanted in str(raised.value), str(raised.value)
        # The group still works.
        loss = criterion(good, y)
        loss.backward()
        assert torch.isfinite(loss) and good.grad is not None
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_unusable_embeddings_on_one_rank_raise_on_every_rank(tmp_path):
    assert dist.is_available(), "torch.distributed is required"
    _start(_worker_unusable_embeddings, (2, os.path.join(str(tmp_path), "init")), 2)


@pytest.mark.parametrize("embeddings, labels, message", [
    (torch.randn(6), torch.tensor([0, 0, 1, 1, 2, 2]), "embeddings: must be 2-D"),
    (torch.randn(2, 3, 3), torch.tensor([0, 1]), "embeddings: must be 2-D"),
    (torch.randn(6, 3), torch.tensor([[0], [0], [1], [1], [2], [2]]), "labels: must be 1-D"),
    (torch.randn(6, 3), torch.tensor([0, 0, 1]), "labels: must be 1-D"),
    (torch.randn(6, 3).int(), torch.tensor([0, 0, 1, 1, 2, 2]), "embeddings: must be floating"),
])
def test_extras_in_one_process_check_the_batch_first(embeddings, labels, message):
    # The batch met the extras in torch.cat first, which raised its own text.
    criterion = DistributedTripletLoss(BatchSemiHardTripletLoss(margin=0.5))
    with pytest.raises(ValueError, match=message):
        criterion(embeddings, labels, extra_embeddings=torch.randn(2, 3),
                  extra_labels=torch.tensor([0, 1]))


def _worker_third_review(rank, world, init_file):
    """A review's findings, on two ranks: (1) rank 1 alone loads a checkpoint
    of the memory saved two steps earlier, full and at the same place, so
    that size, count and position agree: both ranks mined against different
    memories and returned the same wrong loss; (2) rank 1 in eval mode for a
    step stores nothing while rank 0 stores the batch, and, the memory being
    full with batches a multiple of its size, position and count agree
    again; (3) a forward-mode AD dual tensor on rank 1 raised there after the
    exchange, leaving rank 0 in the gather until the timeout. Each now
    raises a ValueError on both ranks, the other naming rank 1."""
    from torch.autograd import forward_ad

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        g = torch.Generator().manual_seed(rank)
        y = torch.tensor([0, 1, 0, 1])
        batch = lambda: torch.randn(4, 3, generator=g, dtype=torch.float64)  # noqa: E731
        memory = CrossBatchMemory(DistributedTripletLoss(BatchHardTripletLoss(margin=0.5)),
                                  memory_size=16)
        states = []
        for _ in range(6):
            memory(batch(), y)
            states.append(memory.state_dict())
        if rank == 1:
            memory.load_state_dict(states[3])
        assert (memory.num_stored, memory._next) == (16, 0)
        with pytest.raises(ValueError, match=r"^memory \(entries stored since it was empty\): must "
                           r"be the same on every rank of the group; got 48 on rank 0, 32 on rank 1"):
            memory(batch(), y)
        memory.load_state_dict(states[5])  # both ranks: agreed again
        memory.train(rank == 0)
        with pytest.raises(ValueError, match=r"^memory \(training mode, which stores the batch\): "
                           r"must be the same on every rank of the group; got True on rank 0, "
                           r"False on rank 1"):
            memory(batch(), y)
        memory.train()
        assert torch.isfinite(memory(batch(), y))
        criterion = DistributedTripletLoss(BatchHardTripletLoss(margin=0.5))
        x = batch()
        with forward_ad.dual_level():
            dual = forward_ad.make_dual(x, torch.ones_like(x)) if rank == 1 else x
            with pytest.raises(ValueError) as raised:
                criterion(dual, y)
        wanted = "forward-mode AD dual tensor" if rank == 1 else "embeddings: rank 1 of the group"
        assert wanted in str(raised.value), str(raised.value)
        assert torch.isfinite(criterion(x, y))
        # (4) A dual margin: each rank's tangent was its own share of the
        # global loss's (0.5 and 1.5 where one process gives 1.0).
        with forward_ad.dual_level():
            margin = torch.tensor(0.5, dtype=torch.float64)
            criterion.loss.margin = (forward_ad.make_dual(margin, torch.ones_like(margin))
                                     if rank == 1 else margin)
            with pytest.raises(ValueError) as raised:
                criterion(x, y)
        criterion.loss.margin = 0.5
        wanted = "loss.margin: a forward-mode AD dual tensor" if rank == 1 else "rank 1"
        assert wanted in str(raised.value), str(raised.value)
        assert torch.isfinite(criterion(x, y))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_third_review_findings_on_two_ranks(tmp_path):
    assert dist.is_available(), "torch.distributed is required"
    _start(_worker_third_review, (2, os.path.join(str(tmp_path), "init")), 2)


def _worker_large_sums(rank, world, init_file):
    """A review's finding: the gradient was attached as part − part.detach()
    with part = this rank's sum · world / count, which overflows where the
    loss does not: rank 0 (a sum of 1.08e308, its double inf) returned NaN
    and rank 1 the loss, 1.875e305; with 24 negatives rank 0's own sum is
    inf, and it returned NaN where one process and rank 1 give inf. Now every
    rank returns the single-process loss, and the gradients are unchanged.
    The first fix returned a view made inside an autograd Function, which
    refused in-place changes (`loss /= 2`); they work as on one process."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for negatives in (12, 24):
            full_x = torch.tensor([[0.0]] * 3 + [[1e153]] * 3 + [[1.0]] * negatives,
                                  dtype=torch.float64)
            full_y = torch.tensor([0] * 6 + [1] * negatives)
            rows = [slice(0, 6), slice(6, 6 + negatives)][rank]
            x = full_x[rows].clone().requires_grad_(True)
            loss = DistributedTripletLoss(BatchAllTripletLoss(margin=0.5, distance="squared"))
            value = loss(x, full_y[rows])
            value.backward()
            one = full_x.clone().requires_grad_(True)
            expected = batch_all_triplet_loss(full_y, one, 0.5, distance="squared")[0]
            expected.backward()
            assert (math.isfinite(expected.item())) == (negatives == 12)
            assert value.item() == expected.item(), (rank, negatives, value.item(), expected.item())
            torch.testing.assert_close(x.grad, world * one.grad[rows], rtol=1e-12, atol=0)
        g = torch.Generator().manual_seed(5)
        full_x, full_y = torch.randn(8, 3, generator=g), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
        for make in MAKERS:
            x = full_x[4 * rank:4 * rank + 4].clone().requires_grad_(True)
            value = DistributedTripletLoss(make())(x, full_y[4 * rank:4 * rank + 4])
            value /= 2
            value += x.square().sum()
            value.backward()
            one = full_x.clone().requires_grad_(True)
            expected = make()(one, full_y) / 2 + one[4 * rank:4 * rank + 4].square().sum()
            expected.backward()
            torch.testing.assert_close(value, expected)
            own = 2 * one[4 * rank:4 * rank + 4].detach()
            torch.testing.assert_close(x.grad, world * (one.grad[4 * rank:4 * rank + 4] - own) + own)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_large_sums_give_every_rank_the_loss_of_one_process(tmp_path):
    assert dist.is_available(), "torch.distributed is required"
    _start(_worker_large_sums, (2, os.path.join(str(tmp_path), "init")), 2)

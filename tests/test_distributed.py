"""DistributedTripletLoss: one DDP step on N gloo ranks against one
single-process step on the concatenated batch.

Each spawn runs every check for its world size, since gloo processes start
slowly; a failing rank raises, and torch.multiprocessing.spawn re-raises it here.
"""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from online_triplet_loss import (
    BatchAllTripletLoss,
    BatchHardTripletLoss,
    BatchSemiHardTripletLoss,
    CrossBatchMemory,
    PKSampler,
    batch_all_triplet_loss,
)
from online_triplet_loss.distributed import DistributedTripletLoss
from online_triplet_loss.losses import terms

DTYPE = torch.float64
IN, OUT = 5, 4
LR = 0.1
TIGHT = dict(rtol=1e-10, atol=1e-12)

# (name, factory) pairs; each factory builds a fresh loss module.
LOSSES = [
    ("all", lambda: BatchAllTripletLoss(margin=1.0)),
    ("hard", lambda: BatchHardTripletLoss(margin=0.5)),
    ("hard-soft-cosine", lambda: BatchHardTripletLoss(margin=0.1, distance="cosine", soft=True)),
    ("semihard", lambda: BatchSemiHardTripletLoss(margin=0.5)),
    ("semihard-squared", lambda: BatchSemiHardTripletLoss(margin=1.0, distance="squared")),
]

# Labels per rank. In each layout one rank has no positive pair of its own
# (its classes have positives only on other ranks, or none at all), and the
# batch sizes differ; LAYOUT_3_EMPTY also has a rank with an empty batch.
LAYOUT_2 = [[0, 0, 1, 2, 3], [1, 4, 2]]
LAYOUT_3 = [[0, 1, 0, 2], [3, 1], [2, 3, 5]]
LAYOUT_3_EMPTY = [[0, 1, 0, 2, 1], [], [2, 0, 5]]


def _data(layout, seed):
    """Per-rank inputs and labels; the same on every process."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(len(lab), IN, generator=g, dtype=DTYPE) for lab in layout]
    ys = [torch.tensor(lab, dtype=torch.int64) for lab in layout]
    return xs, ys


def _model(seed):
    torch.manual_seed(seed)
    return nn.Linear(IN, OUT).to(DTYPE)


def _reference(make_loss, xs, ys, seed, extra=None):
    """A single-process step on the concatenated batch: (loss, embedding grad, params after SGD)."""
    model = _model(seed)
    x, y = torch.cat(xs), torch.cat(ys)
    out = model(x)
    out.retain_grad()
    loss_module = make_loss()
    if extra is None:
        loss = loss_module(out, y)
    else:
        mining = {BatchAllTripletLoss: "all", BatchHardTripletLoss: "hard",
                  BatchSemiHardTripletLoss: "semihard"}[type(loss_module)]
        s, c, _ = terms(mining, y, out, loss_module.margin, distance=loss_module.distance,
                        soft=getattr(loss_module, "soft", False),
                        ref_embeddings=torch.cat([out, extra[0]]),
                        ref_labels=torch.cat([y, extra[1]]),
                        anchor_offset=0)
        loss = s / c.clamp_min(1)
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=LR).step()
    fraction = None
    if isinstance(loss_module, BatchAllTripletLoss) and extra is None:
        fraction = batch_all_triplet_loss(y, out.detach(), loss_module.margin)[1]
    return loss.detach(), out.grad, [p.detach().clone() for p in model.parameters()], fraction


def _check_step(tag, make_loss, layout, rank, group, seed, extra=None, data=None):
    """One DDP step of this rank against the single-process reference; ``data``
    (per-rank inputs and labels) replaces the random data of ``layout``."""
    world = dist.get_world_size(group)
    grank = dist.get_rank(group)
    xs, ys = _data(layout, seed) if data is None else data
    layout = [y.tolist() for y in ys]
    ref_loss, ref_grad, ref_params, ref_fraction = _reference(make_loss, xs, ys, seed, extra)
    assert ref_loss > 0, f"[{tag}] the reference loss is 0: the comparison would prove little"
    offset = sum(len(lab) for lab in layout[:grank])
    rows = slice(offset, offset + len(layout[grank]))
    msg = f"[{tag}] rank {rank} (group rank {grank} of {world})"

    # DDP on a Linear: the loss on every rank and the parameters after a step.
    # DDP broadcasts group rank 0's parameters over the others'.
    model = _model(seed if grank == 0 else seed + 1000 * (rank + 1))
    ddp = DistributedDataParallel(model, process_group=group)
    criterion = DistributedTripletLoss(make_loss(), group=group)
    out = ddp(xs[grank])
    kwargs = {} if extra is None else dict(extra_embeddings=extra[0], extra_labels=extra[1])
    loss = criterion(out, ys[grank], **kwargs)
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=LR).step()
    torch.testing.assert_close(loss.detach(), ref_loss, **TIGHT, msg=lambda m: f"{msg} loss: {m}")
    for p, q in zip(model.parameters(), ref_params):
        torch.testing.assert_close(p.detach(), q, **TIGHT, msg=lambda m: f"{msg} parameters: {m}")
    if ref_fraction is not None:
        torch.testing.assert_close(criterion.last_fraction, ref_fraction, **TIGHT,
                                   msg=lambda m: f"{msg} fraction: {m}")
    losses = [torch.empty_like(loss.detach()) for _ in range(world)]
    dist.all_gather(losses, loss.detach(), group=group)
    assert all(bool(v == losses[0]) for v in losses), f"{msg}: ranks disagree: {losses}"

    # Leaf embeddings: each rank's gradient is world_size times its rows of the
    # single-process gradient (DDP's average removes that factor).
    emb = _model(seed)(xs[grank]).detach().requires_grad_(True)
    loss = criterion(emb, ys[grank], **kwargs)
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref_loss, **TIGHT,
                               msg=lambda m: f"{msg} leaf loss: {m}")
    torch.testing.assert_close(emb.grad, world * ref_grad[rows], **TIGHT,
                               msg=lambda m: f"{msg} embedding gradient: {m}")


# XBM: memory size 11 is no multiple of the global batch sizes (8 and 9), so the
# ring wraps in the middle of a global batch at the third step.
XBM_SIZE, XBM_STEPS = 11, 3
XBM_LOSSES = [LOSSES[1], LOSSES[0], LOSSES[3]]  # hard, all, semihard


def _check_xbm(tag, make_loss, layout, rank, seed):
    """XBM_STEPS DDP steps with CrossBatchMemory(DistributedTripletLoss(...)) against
    one process with CrossBatchMemory(loss) on the concatenated batches. The
    layout is rotated at every step, so each rank's batch size changes."""
    world, grank = dist.get_world_size(), dist.get_rank()
    ref_model = _model(seed)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=LR)
    ref_xbm = CrossBatchMemory(make_loss(), memory_size=XBM_SIZE)
    model = _model(seed if grank == 0 else seed + 1000 * (rank + 1))
    ddp = DistributedDataParallel(model, process_group=None)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    xbm = CrossBatchMemory(DistributedTripletLoss(make_loss()), memory_size=XBM_SIZE)
    for step in range(XBM_STEPS):
        msg = f"[{tag}] rank {rank} step {step}"
        xs, ys = _data(layout[step:] + layout[:step], seed + step)
        x, y = torch.cat(xs), torch.cat(ys)

        ref_opt.zero_grad()
        out = ref_model(x)
        ref_loss = ref_xbm(out, y)
        assert ref_loss > 0, f"{msg}: the reference loss is 0: the comparison would prove little"
        if step > 0:
            plain = make_loss()(out.detach(), y)
            assert not torch.equal(ref_loss.detach(), plain), f"{msg}: the memory changes nothing"
        ref_loss.backward()
        ref_opt.step()

        opt.zero_grad()
        loss = xbm(ddp(xs[grank]), ys[grank])
        loss.backward()
        opt.step()
        torch.testing.assert_close(loss.detach(), ref_loss.detach(), **TIGHT,
                                   msg=lambda m: f"{msg} loss: {m}")
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p.detach(), q.detach(), **TIGHT,
                                       msg=lambda m: f"{msg} parameters: {m}")
        assert xbm.num_stored == ref_xbm.num_stored == min(XBM_SIZE, (step + 1) * len(y)), msg
        for got, expected in zip(xbm.memory, ref_xbm.memory):
            torch.testing.assert_close(got, expected, **TIGHT, msg=lambda m: f"{msg} memory: {m}")


# PKSampler over a small dataset: 7 classes of 3 to 6 samples.
PK_LABELS = torch.tensor([c for c, n in enumerate([5, 3, 6, 4, 3, 5, 4]) for _ in range(n)])
PK_P, PK_K = 2, 2


def _check_sampler(rank, world):
    """Each rank feeds the batches of its PKSampler(rank=rank, world_size=world)
    shard to DistributedTripletLoss; every step must be the single-process step
    on the union of the ranks' batches of that step, gathered from the ranks."""
    g = torch.Generator().manual_seed(5)
    inputs = torch.randn(len(PK_LABELS), IN, generator=g, dtype=DTYPE)
    sampler = PKSampler(PK_LABELS, p=PK_P, k=PK_K, seed=3, rank=rank, world_size=world)
    sampler.set_epoch(1)
    others = [list(PKSampler(PK_LABELS, p=PK_P, k=PK_K, seed=3, rank=r, world_size=world))
              for r in range(world)]
    for step, batch in enumerate(sampler):
        if step == 2:
            break
        shards = [None] * world
        dist.all_gather_object(shards, batch)  # the batch each rank actually drew
        assert len({tuple(shard) for shard in shards}) == world, f"step {step}: shards repeat"
        # set_epoch(1) here against epoch 0 there: the epoch changes the shards.
        assert shards != [batches[step] for batches in others], f"step {step}: epoch ignored"
        xs = [inputs[shard] for shard in shards]
        ys = [PK_LABELS[shard] for shard in shards]
        for loss_index, (name, make_loss) in enumerate(XBM_LOSSES):
            _check_step(f"{name} PKSampler step {step}", make_loss, None, rank, None,
                        70 + 10 * step + loss_index, data=(xs, ys))


def _worker(rank, world, init_file, layouts):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for layout_index, layout in enumerate(layouts):
            for loss_index, (name, make_loss) in enumerate(LOSSES):
                seed = 100 * layout_index + loss_index
                _check_step(f"{name} sizes {[len(lab) for lab in layout]}", make_loss, layout,
                            rank, None, seed)
        # Extra references (a memory), the same on every rank; gradient-free.
        g = torch.Generator().manual_seed(7)
        extra = (torch.randn(4, OUT, generator=g, dtype=DTYPE), torch.tensor([1, 4, 9, 0]))
        for name, make_loss in LOSSES[:2] + LOSSES[3:4]:
            _check_step(f"{name} + extra", make_loss, layouts[0], rank, None, 11, extra)
        for loss_index, (name, make_loss) in enumerate(XBM_LOSSES):
            _check_xbm(f"{name} XBM", make_loss, layouts[0], rank, 30 + loss_index)
        _check_sampler(rank, world)

        if world == 2:
            # A group of one rank: the wrapped loss itself.
            solo = dist.new_group([0])
            if rank == 0:
                xs, ys = _data(layouts[0], 3)
                emb = torch.cat(xs)[:, :OUT].requires_grad_(True)
                for name, make_loss in LOSSES:
                    wrapped = make_loss()
                    got = DistributedTripletLoss(wrapped, group=solo)(emb, torch.cat(ys))
                    assert torch.equal(got, wrapped(emb, torch.cat(ys))), name
        else:
            # A subgroup of ranks 1 and 2: offsets follow the group's ranks.
            pair = dist.new_group([1, 2])
            if rank in (1, 2):
                layout = layouts[0][1:]
                for loss_index, (name, make_loss) in enumerate(LOSSES):
                    _check_step(f"{name} subgroup", make_loss, layout, rank, pair, 50 + loss_index)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _start(fn, args, nprocs):
    """torch.multiprocessing's spawn, from a forkserver where there is one: the
    server imports torch (and torch._dynamo, which DDP imports: seconds on
    its own) once for every rank of every test instead of once per rank."""
    method = "spawn"
    if "forkserver" in mp.get_all_start_methods():
        method = "forkserver"
        mp.set_forkserver_preload(["torch", "torch._dynamo", "torch.nn.parallel",
                                   "online_triplet_loss.distributed"])
    mp.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method=method)


@pytest.mark.parametrize("world, layouts", [(2, [LAYOUT_2]), (3, [LAYOUT_3, LAYOUT_3_EMPTY])],
                         ids=["2-ranks", "3-ranks"])
def test_ddp_step_matches_single_process(tmp_path, world, layouts):
    assert dist.is_available(), "torch.distributed is required"
    init_file = os.path.join(str(tmp_path), "init")
    _start(_worker, (world, init_file, layouts), world)


def test_layouts_have_a_rank_without_local_positives():
    for layout in (LAYOUT_2, LAYOUT_3, LAYOUT_3_EMPTY):
        assert len({len(lab) for lab in layout}) > 1
        assert any(len(set(lab)) == len(lab) for lab in layout)


@pytest.mark.parametrize("name, make_loss", LOSSES, ids=[name for name, _ in LOSSES])
def test_without_process_group_is_the_wrapped_loss(name, make_loss):
    assert not dist.is_initialized()
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    emb = torch.randn(7, 6, generator=g, dtype=DTYPE, requires_grad=True)
    wrapped = make_loss()
    expected = wrapped(emb, labels)
    (expected_grad,) = torch.autograd.grad(expected, emb)
    got = DistributedTripletLoss(wrapped)(emb, labels)
    (got_grad,) = torch.autograd.grad(got, emb)
    assert torch.equal(got, expected)
    assert torch.equal(got_grad, expected_grad)


def test_rejects_other_losses():
    with pytest.raises(ValueError, match="loss"):
        DistributedTripletLoss(nn.MSELoss())


def test_extra_references_without_process_group():
    """Without a group, extra references follow the batch as on several ranks:
    anchor i is reference i, and the extras get no gradient."""
    assert not dist.is_initialized()
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 0, 1, 2, 3])
    extra_labels = torch.tensor([1, 2, 9, 0])
    extra = torch.randn(4, 3, generator=g, dtype=DTYPE, requires_grad=True)
    for name, make_loss in LOSSES:
        wrapped = make_loss()
        mining = {BatchAllTripletLoss: "all", BatchHardTripletLoss: "hard",
                  BatchSemiHardTripletLoss: "semihard"}[type(wrapped)]
        emb = torch.randn(5, 3, generator=g, dtype=DTYPE, requires_grad=True)
        s, c, v = terms(mining, labels, emb, wrapped.margin, distance=wrapped.distance,
                        soft=getattr(wrapped, "soft", False),
                        ref_embeddings=torch.cat([emb, extra.detach()]),
                        ref_labels=torch.cat([labels, extra_labels]), anchor_offset=0)
        expected = s / c.clamp_min(1)
        assert expected > 0, name
        criterion = DistributedTripletLoss(wrapped)
        got = criterion(emb, labels, extra_embeddings=extra, extra_labels=extra_labels)
        assert torch.equal(got, expected), name
        assert not torch.equal(got, wrapped(emb, labels)), name
        got_grad, extra_grad = torch.autograd.grad(got, [emb, extra], allow_unused=True)
        assert extra_grad is None, name
        assert torch.equal(got_grad, torch.autograd.grad(expected, emb)[0]), name
        if mining == "all":
            assert torch.equal(criterion.last_fraction, c.to(DTYPE) / v.to(DTYPE)), name
        # gather: the batch itself, at offset 0.
        all_emb, all_labels, offset = criterion.gather(emb, labels)
        assert all_emb is emb and all_labels is labels and offset == 0


def test_extra_reference_errors():
    criterion = DistributedTripletLoss(BatchHardTripletLoss())
    emb, labels = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="together"):
        criterion(emb, labels, extra_embeddings=emb)
    with pytest.raises(ValueError, match="together"):
        criterion(emb, labels, extra_labels=labels)
    with pytest.raises(ValueError, match="extra_embeddings: must be a torch.Tensor"):
        criterion(emb, labels, extra_embeddings=[[0.0, 1.0, 2.0]], extra_labels=labels[:1])
    with pytest.raises(ValueError, match=r"extra_embeddings: must be 2-D with 3 columns like embeddings, got shape \(2, 4\)"):
        criterion(emb, labels, extra_embeddings=torch.randn(2, 4), extra_labels=labels[:2])
    with pytest.raises(ValueError, match=r"extra_labels: must be 1-D with one entry per row of extra_embeddings \(2\)"):
        criterion(emb, labels, extra_embeddings=torch.randn(2, 3), extra_labels=labels)
    with pytest.raises(ValueError, match="labels: must be 1-D"):
        criterion.gather(emb, labels[:2])
    with pytest.raises(ValueError, match="embeddings: must be 2-D"):
        criterion.gather(emb[0], labels)


@pytest.mark.parametrize("bad", [torch.uint16, torch.uint32, torch.uint64, torch.complex64,
                                 torch.float8_e4m3fn])
@pytest.mark.parametrize("which", ["labels", "extra_labels"])
def test_extra_reference_label_dtypes_are_errors_naming_the_argument(which, bad):
    """Labels meet the extra labels in a concatenation before the core sees
    them: unsupported dtypes are refused first, naming the argument, as the
    core names labels and ref_labels."""
    criterion = DistributedTripletLoss(BatchHardTripletLoss())
    emb, labels = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    args = dict(labels=labels, extra_labels=labels)
    args[which] = labels.to(bad)
    with pytest.raises(ValueError, match=f"^{which}: dtype {bad} is not supported"):
        criterion(emb, args["labels"], extra_embeddings=emb, extra_labels=args["extra_labels"])


def test_integer_extra_embeddings_are_an_error():
    criterion = DistributedTripletLoss(BatchHardTripletLoss())
    emb, labels = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="^extra_embeddings: must be floating point"):
        criterion(emb, labels, extra_embeddings=emb.long(), extra_labels=labels)

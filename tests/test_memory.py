"""CrossBatchMemory against a plain-loop reference over batch + memory."""

from __future__ import annotations

import math

import pytest
import torch

from online_triplet_loss import (
    BatchAllTripletLoss,
    BatchHardTripletLoss,
    BatchSemiHardTripletLoss,
    CrossBatchMemory,
    batch_all_triplet_loss,
    batch_hard_triplet_loss,
    batch_semihard_triplet_loss,
)
from online_triplet_loss.distributed import DistributedTripletLoss


def _distance(a: torch.Tensor, b: torch.Tensor, distance: str) -> torch.Tensor:
    if distance == "cosine":
        return 1 - (a @ b) / (a.norm().clamp_min(1e-12) * b.norm().clamp_min(1e-12))
    squared = ((a - b) ** 2).sum()
    return squared if distance == "squared" else squared.sqrt()


def reference_loss(mining, margin, distance, soft, anchors, anchor_labels, refs, ref_labels):
    """Anchor i is reference i (the batch comes first in the reference set)
    and never its own positive. Plain loops over every (a, p, n)."""
    n, m = len(anchors), len(refs)
    ya, yr = anchor_labels.tolist(), ref_labels.tolist()
    d = [[_distance(anchors[i], refs[j], distance) for j in range(m)] for i in range(n)]
    dv = [[float(x.detach()) for x in row] for row in d]  # the selection is on plain floats
    terms = []
    for a in range(n):
        positives = [j for j in range(m) if yr[j] == ya[a] and j != a]
        negatives = [j for j in range(m) if yr[j] != ya[a]]
        if not positives or not negatives:
            continue
        if mining == "all":
            for p in positives:
                for q in negatives:
                    value = d[a][p] - d[a][q] + margin
                    if dv[a][p] - dv[a][q] + margin > 0:
                        terms.append(value)
        elif mining == "hard":
            hardest_p = max(positives, key=lambda j: dv[a][j])
            hardest_n = min(negatives, key=lambda j: dv[a][j])
            value = d[a][hardest_p] - d[a][hardest_n] + margin
            terms.append(torch.logaddexp(value, torch.zeros_like(value)) if soft else torch.relu(value))
        else:
            for p in positives:
                farther = [j for j in negatives if dv[a][j] > dv[a][p]]
                if farther:
                    chosen = min(farther, key=lambda j: dv[a][j])
                else:
                    chosen = max(negatives, key=lambda j: dv[a][j])
                terms.append(torch.relu(d[a][p] - d[a][chosen] + margin))
    if not terms:
        return anchors.sum() * 0
    return torch.stack(terms).sum() / len(terms)


CONFIGS = [
    ("all", BatchAllTripletLoss(margin=0.5), "euclidean", False),
    ("hard", BatchHardTripletLoss(margin=0.3), "euclidean", False),
    ("hard", BatchHardTripletLoss(margin=0.0, distance="cosine", soft=True), "cosine", True),
    ("semihard", BatchSemiHardTripletLoss(margin=0.4, distance="squared"), "squared", False),
]


@pytest.mark.parametrize("mining, loss, distance, soft", CONFIGS, ids=lambda c: str(c))
def test_matches_reference_over_batch_and_fifo_memory(mining, loss, distance, soft):
    g = torch.Generator().manual_seed(0)
    memory_size = 13  # not a multiple of the batch sizes: the ring wraps mid-batch
    xbm = CrossBatchMemory(loss, memory_size=memory_size)
    history_e, history_l = [], []  # the FIFO, oldest first, as the reference keeps it
    for step, batch in enumerate([6, 5, 7, 4, 20, 6]):
        embeddings = torch.randn(batch, 3, generator=g, dtype=torch.float64, requires_grad=True)
        labels = torch.randint(0, 3, (batch,), generator=g)
        got = xbm(embeddings, labels)
        (got_grad,) = torch.autograd.grad(got, embeddings)

        anchors = embeddings.detach().clone().requires_grad_(True)
        memory_e = torch.stack(history_e) if history_e else torch.zeros(0, 3, dtype=torch.float64)
        memory_l = torch.tensor(history_l, dtype=torch.long)
        expected = reference_loss(
            mining, loss.margin, distance, soft, anchors, labels,
            torch.cat([anchors, memory_e]), torch.cat([labels, memory_l]),
        )
        (expected_grad,) = torch.autograd.grad(expected, anchors, allow_unused=True)
        if expected_grad is None:
            expected_grad = torch.zeros_like(anchors)
        assert got.item() > 0, "the data should give a positive loss"
        assert got.item() == pytest.approx(expected.item(), rel=1e-9, abs=1e-12), step
        torch.testing.assert_close(got_grad, expected_grad, rtol=1e-7, atol=1e-10)

        history_e.extend(embeddings.detach())
        history_l.extend(labels.tolist())
        history_e, history_l = history_e[-memory_size:], history_l[-memory_size:]
        stored_e, stored_l = xbm.memory
        assert xbm.num_stored == len(history_l) == len(stored_l)
        torch.testing.assert_close(stored_e, torch.stack(history_e), rtol=0, atol=0)
        assert stored_l.tolist() == history_l


@pytest.mark.parametrize("mining, loss, distance, soft", CONFIGS, ids=lambda c: str(c))
def test_distributed_loss_without_process_group_is_the_plain_memory(mining, loss, distance, soft):
    """XBM(DistributedTripletLoss(L)) in one process: the same losses, gradients
    and memory as XBM(L), step after step (the ring wraps at the third)."""
    assert not torch.distributed.is_initialized()
    g = torch.Generator().manual_seed(1)
    plain = CrossBatchMemory(loss, memory_size=13)
    wrapped = CrossBatchMemory(DistributedTripletLoss(loss), memory_size=13)
    for step, batch in enumerate([6, 5, 7, 4]):
        embeddings = torch.randn(batch, 3, generator=g, dtype=torch.float64, requires_grad=True)
        labels = torch.randint(0, 3, (batch,), generator=g)
        expected = plain(embeddings, labels)
        (expected_grad,) = torch.autograd.grad(expected, embeddings)
        got = wrapped(embeddings, labels)
        (got_grad,) = torch.autograd.grad(got, embeddings)
        assert expected.item() > 0, step
        assert torch.equal(got, expected), step
        assert torch.equal(got_grad, expected_grad), step
        assert wrapped.num_stored == plain.num_stored
        for a, b in zip(wrapped.memory, plain.memory):
            assert torch.equal(a, b), step
    assert not wrapped.memory_embeddings.requires_grad


def test_memory_changes_the_loss_and_differs_from_the_plain_loss():
    torch.manual_seed(0)
    loss = BatchHardTripletLoss(margin=0.5)
    xbm = CrossBatchMemory(loss, memory_size=100)
    first = torch.randn(8, 4)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    # an empty memory: exactly the wrapped loss
    assert torch.equal(xbm(first, labels), loss(first, labels))
    second = torch.randn(8, 4)
    assert not torch.equal(xbm(second, labels), loss(second, labels))


def test_fifo_order_and_overflow():
    xbm = CrossBatchMemory(BatchAllTripletLoss(margin=0.1), memory_size=5)
    assert xbm.num_stored == 0 and xbm.memory[0].shape == (0, 0)
    rows = torch.arange(24.0).view(12, 2)
    ids = torch.arange(12)
    xbm.enqueue(rows[:3], ids[:3])
    assert xbm.memory[1].tolist() == [0, 1, 2]
    xbm.enqueue(rows[3:7], ids[3:7])  # wraps
    assert xbm.memory[1].tolist() == [2, 3, 4, 5, 6]
    torch.testing.assert_close(xbm.memory[0], rows[2:7])
    xbm.enqueue(rows[7:], ids[7:])  # bigger than the memory: only the newest 5 stay
    assert xbm.memory[1].tolist() == [7, 8, 9, 10, 11]
    xbm.enqueue(rows[:1], ids[:1])
    assert xbm.memory[1].tolist() == [8, 9, 10, 11, 0]
    xbm.reset()
    assert xbm.num_stored == 0
    xbm.enqueue(rows[:2], ids[:2])
    assert xbm.memory[1].tolist() == [0, 1]


def test_gradients_reach_only_the_current_batch():
    xbm = CrossBatchMemory(BatchHardTripletLoss(margin=1.0), memory_size=32)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    old = torch.randn(6, 3, requires_grad=True)
    xbm(old, labels).backward()
    old_grad = old.grad.clone()
    new = torch.randn(6, 3, requires_grad=True)
    loss = xbm(new, labels)
    loss.backward()
    assert new.grad is not None and new.grad.abs().sum() > 0
    assert torch.equal(old.grad, old_grad)  # the memory is detached
    assert not xbm.memory_embeddings.requires_grad
    assert loss.grad_fn is not None


def test_state_dict_round_trip_and_preallocation():
    xbm = CrossBatchMemory(BatchSemiHardTripletLoss(margin=0.2), memory_size=7)
    xbm.enqueue(torch.randn(9, 3), torch.arange(9) % 3)
    xbm.enqueue(torch.randn(2, 3), torch.tensor([5, 6]))
    restored = CrossBatchMemory(BatchSemiHardTripletLoss(margin=0.2), memory_size=7)
    restored.load_state_dict(xbm.state_dict())
    assert restored.num_stored == 7
    for a, b in zip(restored.memory, xbm.memory):
        assert torch.equal(a, b)
    batch, labels = torch.randn(4, 3), torch.tensor([0, 0, 5, 6])
    assert torch.equal(restored(batch, labels), xbm(batch, labels))

    given = CrossBatchMemory(BatchHardTripletLoss(), memory_size=4, embedding_dim=3)
    assert given.memory_embeddings.shape == (4, 3) and given.num_stored == 0
    given(torch.randn(2, 3, dtype=torch.float64), torch.tensor([0, 1]))
    assert given.memory_embeddings.dtype == torch.float32 and given.num_stored == 2


def test_errors():
    with pytest.raises(ValueError, match="loss: must be a BatchAllTripletLoss, .* or DistributedTripletLoss"):
        CrossBatchMemory(torch.nn.MSELoss(), memory_size=4)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=f"memory_size: must be an int >= 1, got {bad!r}"):
            CrossBatchMemory(BatchHardTripletLoss(), memory_size=bad)
    with pytest.raises(ValueError, match="embedding_dim: must be an int >= 1, got 0"):
        CrossBatchMemory(BatchHardTripletLoss(), memory_size=4, embedding_dim=0)
    with pytest.raises(ValueError, match="memory_size and embedding_dim: 4611686018427387904 rows of 128 elements"):
        CrossBatchMemory(BatchHardTripletLoss(), memory_size=2**62, embedding_dim=128)
    # Found by review: a huge embedding_dim was blamed on a valid memory_size alone.
    with pytest.raises(ValueError, match="memory_size and embedding_dim: 4 rows of 4611686018427387904 elements"):
        CrossBatchMemory(BatchHardTripletLoss(), memory_size=4, embedding_dim=2**62)
    # Known only at the first batch: its width.
    wide = CrossBatchMemory(BatchHardTripletLoss(), memory_size=2**56)
    with pytest.raises(ValueError, match="memory_size: 72057594037927936 rows of 256 elements"):
        wide(torch.randn(3, 256), torch.tensor([0, 0, 1]))
    xbm = CrossBatchMemory(BatchHardTripletLoss(), memory_size=4)
    xbm(torch.randn(3, 2), torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match=r"embeddings: must have 2 columns like the memory, got shape \(3, 5\)"):
        xbm(torch.randn(3, 5), torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match=r"labels: must have shape \(3,\)"):
        xbm(torch.randn(3, 2), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="labels: must keep the dtype of the first batch's"):
        xbm(torch.randn(3, 2), torch.tensor([0.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="embeddings: must be a 2-D floating point tensor"):
        xbm(torch.zeros(3, 2, dtype=torch.long), torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="embeddings: must be a torch.Tensor"):
        xbm([[0.0, 1.0]], torch.tensor([0]))
    assert xbm.num_stored == 3  # failed calls enqueue nothing


def test_no_nan_on_empty_terms():
    xbm = CrossBatchMemory(BatchAllTripletLoss(margin=0.2), memory_size=4)
    out = xbm(torch.randn(3, 2, requires_grad=True), torch.tensor([0, 1, 2]))
    assert out.item() == 0.0 and not math.isnan(out.item())


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor.*deprecated:UserWarning")
@pytest.mark.parametrize("store", ["enqueue", "forward"])
@pytest.mark.parametrize("dtype", [torch.uint32, torch.uint64, torch.complex64, torch.float8_e4m3fn, torch.quint8])
def test_labels_of_a_dtype_no_loss_takes_are_refused_before_anything_is_stored(store, dtype):
    xbm = CrossBatchMemory(BatchHardTripletLoss(), memory_size=8)
    plain = torch.tensor([0.0, 0.0, 1.0, 1.0])
    labels = (torch.quantize_per_tensor(plain, 1.0, 0, dtype) if dtype == torch.quint8
              else plain.to(dtype))
    call = xbm.enqueue if store == "enqueue" else xbm
    with pytest.raises(ValueError, match=r"^labels: dtype torch\.\w+ is not supported"):
        call(torch.randn(4, 3), labels)
    assert xbm.num_stored == 0 and xbm.memory_labels is None and xbm.embedding_dim is None
    # Still usable, with labels of any dtype the losses take.
    batch, good = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    assert torch.equal(xbm(batch, good), BatchHardTripletLoss()(batch, good))


def test_a_state_with_labels_of_a_dtype_no_loss_takes_is_refused():
    xbm = CrossBatchMemory(BatchHardTripletLoss(), memory_size=4)
    xbm.enqueue(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]))
    state = xbm.state_dict()
    state["memory_labels"] = state["memory_labels"].to(torch.uint32)
    fresh = CrossBatchMemory(BatchHardTripletLoss(), memory_size=4)
    with pytest.raises(ValueError, match="memory_labels has dtype torch.uint32, which no loss takes"):
        fresh.load_state_dict(state)
    assert fresh.num_stored == 0 and fresh.memory_labels is None


def test_an_empty_memory_shows_its_buffers_dtypes():
    xbm = CrossBatchMemory(BatchHardTripletLoss(), memory_size=4)
    assert [t.dtype for t in xbm.memory] == [torch.float32, torch.int64]
    assert xbm.memory[0].shape == (0, 0)
    xbm(torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 0, 1, 1], dtype=torch.int32))
    filled = [(t.dtype, t.device) for t in xbm.memory]
    assert filled == [(torch.float64, torch.device("cpu")), (torch.int32, torch.device("cpu"))]
    xbm.reset()
    embeddings, labels = xbm.memory
    assert [(embeddings.dtype, embeddings.device), (labels.dtype, labels.device)] == filled
    assert embeddings.shape == (0, 3) and labels.shape == (0,)
    preallocated = CrossBatchMemory(BatchHardTripletLoss(), memory_size=4, embedding_dim=5).double()
    assert preallocated.memory[0].dtype == torch.float64 and preallocated.memory[0].shape == (0, 5)


def _functional(mining):
    return {"all": batch_all_triplet_loss, "hard": batch_hard_triplet_loss,
            "semihard": batch_semihard_triplet_loss}[mining]


@pytest.mark.parametrize("distance", ["euclidean", "squared", "cosine"])
@pytest.mark.parametrize("mining", ["all", "hard", "semihard"])
def test_matches_the_function_over_the_concatenated_references(mining, distance):
    """The memory goes to the core apart from the batch (no gradient computed
    for it); the function over torch.cat([batch, memory]) with anchor_offset=0
    computes it and drops it: the same loss and batch gradient, in float32."""
    g = torch.Generator().manual_seed(3)
    loss = {"all": BatchAllTripletLoss, "hard": BatchHardTripletLoss,
            "semihard": BatchSemiHardTripletLoss}[mining](margin=0.3, distance=distance)
    xbm = CrossBatchMemory(loss, memory_size=700)
    for _ in range(3):
        xbm.enqueue(torch.randn(200, 16, generator=g), torch.randint(0, 50, (200,), generator=g))
    x = torch.randn(48, 16, generator=g, requires_grad=True)
    labels = torch.arange(12).repeat_interleave(4)
    memory, memory_labels = xbm.memory
    got = xbm(x, labels)
    (got_grad,) = torch.autograd.grad(got, x)

    x2 = x.detach().clone().requires_grad_(True)
    out = _functional(mining)(
        labels, x2, 0.3, distance=distance, ref_embeddings=torch.cat([x2, memory]),
        ref_labels=torch.cat([labels, memory_labels]), anchor_offset=0,
    )
    expected = out[0] if mining == "all" else out
    (expected_grad,) = torch.autograd.grad(expected, x2)
    assert expected.item() > 0
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got_grad, expected_grad)


@pytest.mark.parametrize("call", ["forward", "enqueue", "memory", "state_dict", "load_state_dict"])
def test_settings_replaced_after_construction_are_refused(call):
    """Found by review: a loss, memory_size or embedding_dim assigned after
    construction reached torch as an AttributeError or a raw shape error,
    or (memory_size) made ``memory`` return other rows in another order and
    ``state_dict`` save a state no memory loads. Each is now a ValueError that
    names the attribute, wherever the memory uses it; the memory is left as
    it was."""
    x, y = torch.randn(6, 3), torch.arange(6) // 2
    saved = CrossBatchMemory(BatchHardTripletLoss(margin=0.2), memory_size=8)
    saved(x, y)

    def use(memory):
        if call == "forward":
            memory(x, y)
        elif call == "enqueue":
            memory.enqueue(x, y)
        elif call == "memory":
            memory.memory
        elif call == "state_dict":
            memory.state_dict()
        else:
            memory.load_state_dict(saved.state_dict())

    cases = [
        ("memory_size", 16, r"memory_size: the memory holds 8 entries, got 16"),
        ("memory_size", 4, r"memory_size: the memory holds 8 entries, got 4"),
        ("memory_size", 0, r"memory_size: must be an int >= 1, got 0"),
        ("embedding_dim", 5, r"embedding_dim: the memory holds embeddings of 3 columns, got 5"),
        ("embedding_dim", None, r"embedding_dim: the memory holds embeddings of 3 columns, got None"),
    ]
    if call == "forward":  # the one use of the loss
        cases += [
            ("loss", torch.nn.TripletMarginLoss(), r"loss: must be a BatchAllTripletLoss, .*TripletMarginLoss"),
            ("loss", None, r"loss: must be a BatchAllTripletLoss, .*got None"),
        ]
    for name, value, message in cases:
        memory = CrossBatchMemory(BatchHardTripletLoss(margin=0.2), memory_size=8)
        memory(x, y)
        memory.enqueue(x, y)  # wrapped around
        before = memory.memory
        setattr(memory, name, value)
        with pytest.raises(ValueError, match=message):
            use(memory)
        setattr(memory, name, {"loss": memory.loss, "memory_size": 8, "embedding_dim": 3}[name])
        after = memory.memory
        assert all(torch.equal(a, b) for a, b in zip(after, before))


def test_a_lenient_load_without_extra_state_sets_the_width():
    """Found by review of the check above: a lenient load of the buffers
    without the extra state into a memory that had none left its
    embedding_dim None beside buffers of 3 columns, which every later call
    then refused."""
    x, y = torch.randn(6, 3), torch.arange(6) // 2
    source = CrossBatchMemory(BatchHardTripletLoss(margin=0.2), memory_size=8)
    source(x, y)
    state = {k: v for k, v in source.state_dict().items() if k != "_extra_state"}
    target = CrossBatchMemory(BatchHardTripletLoss(margin=0.2), memory_size=8)
    target.load_state_dict(state, strict=False)
    assert target.embedding_dim == 3
    assert torch.isfinite(target(x, y)) and target.num_stored == 6


@pytest.mark.parametrize("wrap", [False, True], ids=["loss", "distributed-loss"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mining", ["all", "hard", "semihard"])
def test_a_half_batch_meets_a_float32_memory_unrounded(mining, dtype, wrap):
    """Found by review: the memory was cast to the batch's dtype before the
    loss, so a float32 memory met a half-precision batch rounded to it (a
    loss of 0 instead of 0.003) or overflowed (a finite row of 1e5 made the
    loss NaN), where the loss itself computes in float32 and casts its
    references there. Now the memory's loss and gradient are the function's
    with the stored rows as a float32 reference part."""
    functions = {"all": batch_all_triplet_loss, "hard": batch_hard_triplet_loss,
                 "semihard": batch_semihard_triplet_loss}
    modules = {"all": BatchAllTripletLoss, "hard": BatchHardTripletLoss,
               "semihard": BatchSemiHardTripletLoss}
    g = torch.Generator().manual_seed(8)
    labels = torch.arange(8) % 3
    x = torch.randn(8, 4, generator=g).to(dtype)
    bank = x.float()[:6] + 3e-3 * torch.randn(6, 4, generator=g)
    bank_labels = (labels[:6] + 1) % 3
    if dtype == torch.float16:
        # Finite in float32, inf in float16: a far negative of every anchor.
        bank = torch.cat([bank, torch.full((1, 4), 1e5)])
        bank_labels = torch.cat([bank_labels, torch.tensor([7])])
    loss = modules[mining](margin=0.2)
    memory = CrossBatchMemory(DistributedTripletLoss(loss) if wrap else loss,
                              memory_size=16, embedding_dim=4)
    memory.enqueue(bank, bank_labels)
    assert memory.memory[0].dtype == torch.float32
    got_x = x.clone().requires_grad_()
    got = memory(got_x, labels)
    want_x = x.clone().requires_grad_()
    want = functions[mining](labels, want_x, 0.2, ref_embeddings=(want_x, bank),
                             ref_labels=torch.cat([labels, bank_labels]), anchor_offset=0)
    want = want[0] if mining == "all" else want
    assert torch.isfinite(want)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    (got_grad,) = torch.autograd.grad(got, got_x)
    (want_grad,) = torch.autograd.grad(want, want_x)
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=0)

"""CrossBatchMemory against hostile use (issue 11, item 6): calls under
inference_mode / no_grad, batches with non-finite rows, and saved states of
another memory. The reference is a memory fed only what it should hold."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import LOSSES, leaf, make_module
from online_triplet_loss import BatchHardTripletLoss, CrossBatchMemory
from online_triplet_loss.distributed import DistributedTripletLoss

SIZE = 7


def _batches(seed, n=5, rows=(3, 5, 2, 9, 4)):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows[i % len(rows)], 3, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (rows[i % len(rows)],), generator=g)) for i in range(n)]


def _memory(mining, wrap=False, **kw):
    loss = make_module(mining, 0.5, "euclidean")
    return CrossBatchMemory(DistributedTripletLoss(loss) if wrap else loss, memory_size=SIZE, **kw)


def _same_memory(a, b):
    assert a.num_stored == b.num_stored
    for x, y in zip(a.memory, b.memory):
        assert torch.equal(x, y)


MODES = {
    "inference_mode": torch.inference_mode,
    "no_grad": torch.no_grad,
}


@pytest.mark.parametrize("wrap", [False, True], ids=["plain", "distributed"])
@pytest.mark.parametrize("preallocated", [False, True])
@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("mining", LOSSES)
def test_calls_without_grad_leave_a_trainable_memory(mining, mode, preallocated, wrap):
    """Any step (the first, or a later one, forward or enqueue) run under
    inference_mode or no_grad: the next training steps work and see the
    memory that a memory fed the same batches in grad mode holds."""
    kw = dict(embedding_dim=3) if preallocated else {}
    batches = _batches(1)
    for quiet_step in range(3):
        for how in ("forward", "enqueue"):
            memory, expected = _memory(mining, wrap, **kw), _memory(mining, wrap, **kw)
            if preallocated:
                memory.double(), expected.double()
            for step, (x, y) in enumerate(batches):
                x = leaf(x)
                if step == quiet_step:
                    with MODES[mode]():
                        memory(x, y) if how == "forward" else memory.enqueue(x, y)
                    expected.enqueue(x, y)
                    continue
                loss = memory(x, y)
                loss.backward()  # raised "Inplace update to inference tensor" before
                torch.testing.assert_close(loss, expected(x.detach(), y), rtol=0, atol=0)
            assert not memory.memory_embeddings.is_inference()
            assert not memory.memory_labels.is_inference()
            _same_memory(memory, expected)
            assert torch.is_grad_enabled()


BAD = [float("nan"), float("inf"), -float("inf")]


@pytest.mark.parametrize("wrap", [False, True], ids=["plain", "distributed"])
@pytest.mark.parametrize("bad", BAD, ids=repr)
@pytest.mark.parametrize("mining", LOSSES)
def test_non_finite_rows_are_not_stored(mining, bad, wrap):
    """Rows with a NaN/Inf coordinate, anywhere in a batch, in batches that
    wrap the ring or overflow it: the batch's loss is NaN, the memory holds
    exactly the finite rows, and later losses are those of that memory."""
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        memory, expected = _memory(mining, wrap), _memory(mining, wrap)
        history = []  # the finite rows of every batch so far
        for step, (x, y) in enumerate(_batches(seed, n=6)):
            rows = torch.rand(x.shape[0], generator=g) < 0.4
            if step % 2 == 1:
                rows[torch.randint(0, x.shape[0], (1,), generator=g)] = True
            x = x.clone()
            columns = torch.randint(0, 3, (x.shape[0],), generator=g)
            x[rows, columns[rows]] = bad
            loss = memory(leaf(x), y)
            # The reference: a memory that was only ever given finite rows.
            expected.reset()
            for past in history:
                expected.enqueue(*past)
            expected_loss = expected(x, y)
            history.append((x[~rows], y[~rows]))
            expected.reset()
            for past in history:
                expected.enqueue(*past)
            if rows.any():
                assert torch.isnan(loss), (seed, step)
            else:
                torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0)
            _same_memory(memory, expected)
            assert torch.isfinite(memory.memory[0]).all()
        clean_x, clean_y = _batches(seed + 100, n=1)[0]
        later = memory(leaf(clean_x), clean_y)
        assert torch.isfinite(later)
        torch.testing.assert_close(later, expected(clean_x, clean_y), rtol=0, atol=0)


def test_a_batch_of_only_non_finite_rows_stores_nothing():
    for mining in LOSSES:
        memory = _memory(mining)
        x = torch.full((4, 3), float("nan"), dtype=torch.float64)
        assert torch.isnan(memory(x, torch.tensor([0, 0, 1, 1])))
        assert memory.num_stored == 0
        memory(torch.randn(3, 3, dtype=torch.float64), torch.tensor([0, 0, 1]))
        assert memory.num_stored == 3 and memory.memory_embeddings.dtype == torch.float64


# ------------------------------------------------------------ load_state_dict


def _filled(size=SIZE, steps=2, embedding_dim=None):
    memory = CrossBatchMemory(make_module("hard", 0.5, "euclidean"), memory_size=size,
                              embedding_dim=embedding_dim)
    for x, y in _batches(3, n=steps):
        if embedding_dim is not None:
            x = torch.cat([x, x], 1)[:, :embedding_dim]
        memory.enqueue(x.float(), y)
    return memory


def _corrupt(state, **extra):
    state = copy.deepcopy(state)
    state["_extra_state"].update(extra)
    return state


def _bad_states():
    good = _filled().state_dict()
    yield "bigger memory", _filled(size=SIZE * 2, steps=4).state_dict()
    yield "smaller memory", _filled(size=SIZE - 3).state_dict()
    yield "other width", _filled(embedding_dim=5).state_dict()  # loaded into a width-3 memory
    yield "count above size", _corrupt(good, count=SIZE + 13, next=0)
    yield "negative count", _corrupt(good, count=-1)
    yield "next past the end", _corrupt(_filled(steps=3).state_dict(), next=SIZE)
    yield "negative next", _corrupt(good, next=-2)
    yield "next not after the last", _corrupt(_filled(steps=1).state_dict(), next=1)
    yield "count not an int", _corrupt(good, count=2.5)
    yield "count a bool", _corrupt(good, count=True, next=1)
    yield "huge count", _corrupt(good, count=2**70)
    bad = _corrupt(good)
    del bad["memory_embeddings"]
    yield "no buffers for a count", bad
    bad = copy.deepcopy(good)
    bad["memory_labels"] = bad["memory_labels"][:3]
    yield "short labels", bad
    # Rows without columns (a width no batch can have) and no embedding_dim.
    bad = _corrupt(good, count=0, next=0, embedding_dim=None, enqueued=0)
    bad["memory_embeddings"] = bad["memory_embeddings"][:, :0]
    yield "no columns", bad


BAD_STATES = list(_bad_states())


# A fresh memory without embedding_dim takes any width (tested below), so
# "other width" is refused only by the used and preallocated ones.
REFUSALS = [(why, state, target) for why, state in BAD_STATES
            for target in ("fresh", "used", "preallocated")
            if not (why == "other width" and target == "fresh")]


@pytest.mark.parametrize("why, state, target", REFUSALS,
                         ids=[f"{w}-{t}" for w, _, t in REFUSALS])
def test_load_state_dict_refuses_other_memories(why, state, target):
    if target == "fresh":
        memory = CrossBatchMemory(make_module("hard", 0.5, "euclidean"), memory_size=SIZE)
    elif target == "used":
        memory = _filled(steps=1)
    else:
        memory = CrossBatchMemory(make_module("hard", 0.5, "euclidean"), memory_size=SIZE,
                                  embedding_dim=3)
    before = (memory.num_stored, [t.clone() for t in memory.memory])
    for strict in (True, False):
        with pytest.raises((ValueError, RuntimeError)) as info:
            memory.load_state_dict(state, strict=strict)
        message = str(info.value)
        assert "state_dict" in message or "size mismatch" in message, message
        if isinstance(info.value, ValueError):
            assert f"memory_size={SIZE}" in message
        assert memory.num_stored == before[0]
        for got, was in zip(memory.memory, before[1]):
            assert torch.equal(got, was)
    # Still usable.
    memory(torch.randn(2, 3), torch.tensor([0, 1]))


def test_load_state_dict_accepts_memories_of_the_same_size():
    for steps in (0, 1, 2, 3):
        source = _filled(steps=steps)
        # (An empty memory saves no buffers: a preallocated one misses them.)
        for kw in ({}, {"embedding_dim": 3}) if steps else ({},):
            target = CrossBatchMemory(make_module("hard", 0.5, "euclidean"), memory_size=SIZE, **kw)
            target.load_state_dict(source.state_dict())
            _same_memory(target, source)
    # A fresh memory without embedding_dim takes its width from the state.
    target = CrossBatchMemory(make_module("hard", 0.5, "euclidean"), memory_size=SIZE)
    target.load_state_dict(_filled(embedding_dim=5, steps=0).state_dict())
    assert target.embedding_dim == 5


@pytest.mark.parametrize("used_with", [torch.int32, torch.float32])
def test_load_state_dict_into_a_used_memory_keeps_the_saved_labels(used_with):
    """Loading copies into the buffers: those an earlier batch made must not
    cast the saved labels (int64 beyond 2**31 into int32, or into float32)."""
    labels = torch.tensor([2**31 + 5, 2**31 + 5, 7, 7])
    embeddings = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    source = CrossBatchMemory(BatchHardTripletLoss(margin=0.2), memory_size=4)
    source(embeddings, labels)
    target = CrossBatchMemory(BatchHardTripletLoss(margin=0.2), memory_size=4)
    target(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]).to(used_with))
    target.load_state_dict(source.state_dict())
    for got, saved in zip(target.memory, source.memory):
        assert got.dtype == saved.dtype and torch.equal(got, saved)
    # The next batch, with the labels the state was made with, continues as
    # the source memory does.
    batch = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(target(batch, labels.flip(0)), source(batch, labels.flip(0)))


@pytest.mark.parametrize("cast", ["double", "half"])
def test_load_state_dict_keeps_the_embeddings_dtype_of_a_cast_memory(cast):
    """As a Module's parameters: a memory cast with ``.double()`` stays
    float64 after loading a float32 state, and keeps float64 batches exact."""
    source = CrossBatchMemory(BatchHardTripletLoss(margin=0.2), memory_size=4, embedding_dim=3)
    source(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]))
    target = getattr(CrossBatchMemory(BatchHardTripletLoss(margin=0.2), memory_size=4,
                                      embedding_dim=3), cast)()
    dtype = target.memory_embeddings.dtype
    target.load_state_dict(source.state_dict())
    assert target.memory_embeddings.dtype == dtype
    assert torch.equal(target.memory_embeddings, source.memory_embeddings.to(dtype))
    if cast == "double":
        batch = torch.tensor([[0.1, 0.2, 0.3 + 1e-12]] * 4, dtype=torch.float64)
        target(batch, torch.tensor([2, 2, 3, 3]))
        assert torch.equal(target.memory[0][:4], batch)


@pytest.mark.parametrize("cast", ["half", "double", "bfloat16", "to-float64"])
def test_module_casts_leave_float_labels_alone(cast):
    # 2049 and 2050 are one number in float16 and bfloat16.
    memory = CrossBatchMemory(BatchHardTripletLoss(margin=0.2), memory_size=8)
    labels = torch.tensor([2049.0, 2049.0, 2050.0, 2050.0])
    memory(torch.randn(4, 3), labels)
    memory.to(torch.float64) if cast == "to-float64" else getattr(memory, cast)()
    assert torch.equal(memory.memory[1], labels)
    # Later batches keep the first batch's label dtype, as before the cast.
    memory(torch.randn(4, 3), labels)
    assert torch.equal(memory.memory[1], torch.cat([labels, labels]))
    state = memory.state_dict()
    assert state["memory_labels"].dtype == torch.float32


@pytest.mark.parametrize("cast", ["half", "bfloat16", "to-float16"])
def test_a_cast_that_overflows_a_stored_row_is_refused(cast):
    """1e5 is Inf in float16 (and 1e39 in bfloat16): the cast would store
    rows that make every later loss NaN, as a NaN batch's rows would, which
    the memory never stores. It raises, the memory and its wrapped loss as
    they were; a memory whose rows fit, or that is emptied, is cast."""
    big = 1e39 if cast == "bfloat16" else 1e5

    def do(memory):
        return memory.to(torch.float16) if cast == "to-float16" else getattr(memory, cast)()

    memory = CrossBatchMemory(BatchHardTripletLoss(margin=torch.nn.Parameter(torch.tensor(0.2))),
                              memory_size=8)
    rows = torch.tensor([[big, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    memory(rows, labels)
    before = copy.deepcopy(memory)
    with pytest.raises(ValueError, match=r"^dtype: CrossBatchMemory cannot be cast to torch\."):
        do(memory)
    _same_memory(memory, before)
    assert memory.memory_embeddings.dtype == torch.float64
    assert memory.loss.margin.dtype == torch.float32
    # Rows that fit are cast, and a loss against them stays finite.
    fits = CrossBatchMemory(BatchHardTripletLoss(margin=0.2), memory_size=8)
    fits(rows[1:], labels[1:])
    do(fits)
    assert fits.memory_embeddings.dtype != torch.float64
    assert fits(rows[1:].to(fits.memory_embeddings.dtype), labels[1:]).isfinite()
    # Emptied, the stale rows past the count are no stored rows.
    memory.reset()
    do(memory)
    assert memory.num_stored == 0 and memory.memory_embeddings.dtype != torch.float64


@pytest.mark.parametrize("shape", [(3, 0), (0, 0)])
def test_a_batch_without_columns_is_refused(shape):
    """A memory's rows have a column at least (embedding_dim >= 1, as its
    constructor and its saved state require): a batch without columns would
    fix embedding_dim to 0, and no later batch, or load of its own state,
    would be taken."""
    memory = CrossBatchMemory(BatchHardTripletLoss(margin=0.2), memory_size=4)
    with pytest.raises(ValueError, match=r"^embeddings: must have at least one column"):
        memory(torch.zeros(shape), torch.zeros(shape[0], dtype=torch.long))
    assert memory.embedding_dim is None and memory.num_stored == 0
    memory(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]))
    CrossBatchMemory(BatchHardTripletLoss(margin=0.2), memory_size=4).load_state_dict(
        memory.state_dict())


# ------------------------------------------------------- object lifecycle


def _used(size=50, width=8, steps=3):
    g = torch.Generator().manual_seed(0)
    memory = CrossBatchMemory(BatchHardTripletLoss(margin=0.3), memory_size=size)
    for _ in range(steps):
        memory(torch.randn(20, width, generator=g), torch.randint(0, 5, (20,), generator=g))
    return memory


def _states_without_labels():
    """States with no labels buffer: of a memory that never stored anything
    (no buffers at all), and of one preallocated with embedding_dim but
    never used (its embeddings and no labels)."""
    yield CrossBatchMemory(BatchHardTripletLoss(margin=0.3), memory_size=50).state_dict()
    yield CrossBatchMemory(BatchHardTripletLoss(margin=0.3), memory_size=50,
                           embedding_dim=8).state_dict()


@pytest.mark.parametrize("which", ["no buffers", "preallocated"])
def test_loading_an_unused_memory_empties_a_used_one_consistently(which):
    """The buffers such a state lacks are missing keys: a strict load reports
    them (torch's "Missing key(s)"), a lenient one keeps them; either way the
    state's count, 0, is loaded, and the memory stays consistent: its
    embedding_dim is its buffers' width, and it goes on as an empty memory."""
    state = list(_states_without_labels())[["no buffers", "preallocated"].index(which)]
    x, y = torch.randn(6, 8), torch.tensor([0, 0, 1, 1, 2, 2])
    for strict in (True, False):
        memory = _used()
        if strict:
            with pytest.raises(RuntimeError, match="Missing key"):
                memory.load_state_dict(state)
        else:
            result = memory.load_state_dict(state, strict=False)
            assert "memory_labels" in result.missing_keys
        assert memory.num_stored == 0 and memory.embedding_dim == 8
        assert memory.memory[0].shape == (0, 8)
        with pytest.raises(ValueError, match="embeddings: must have 8 columns"):
            memory(torch.randn(4, 16), torch.tensor([0, 0, 1, 1]))
        assert torch.equal(memory(x, y), BatchHardTripletLoss(margin=0.3)(x, y))


def test_a_load_reports_unexpected_keys_beside_missing_ones():
    """A misspelt key of an unused memory's state is reported beside the one
    it should have been, and the rest is loaded."""
    state = CrossBatchMemory(BatchHardTripletLoss(margin=0.3), memory_size=50,
                             embedding_dim=8).state_dict()
    state["memory_label"] = torch.zeros(50, dtype=torch.long)
    memory = _used(steps=2)
    result = memory.load_state_dict(state, strict=False)
    assert result.unexpected_keys == ["memory_label"]
    assert result.missing_keys == ["memory_labels"]
    assert memory.num_stored == 0 and torch.equal(memory.memory_embeddings, state["memory_embeddings"])


@pytest.mark.parametrize("full", [False, True])
def test_memory_returns_copies(full):
    memory = _used(size=40 if full else 50, steps=2)
    assert (memory.num_stored == memory.memory_size) == full
    embeddings, labels = memory.memory
    kept = embeddings.clone(), labels.clone()
    memory.enqueue(torch.full((30, 8), 7.0), torch.full((30,), 9))  # wraps around
    assert torch.equal(embeddings, kept[0]) and torch.equal(labels, kept[1])
    embeddings.fill_(float("nan"))
    assert torch.isfinite(memory.memory[0]).all()


def test_replaced_buffers_are_refused_not_mined():
    """The ring's position and count are the module's: buffers put in place
    of its own (functional_call, DataParallel's replicas) would be mined and
    filled as if they held what it stored."""
    from torch.func import functional_call

    memory = _used(steps=1)
    x, y = torch.randn(8, 8), torch.arange(8) % 2
    buffers = {name: t.clone() for name, t in memory.named_buffers()}
    with pytest.raises(RuntimeError, match="buffers were replaced"):
        functional_call(memory, buffers, (x, y))
    assert memory.num_stored == 20
    # Parameters alone may be replaced (the inner loss has none here).
    assert torch.equal(functional_call(memory, {}, (x, y)), _used(steps=1)(x, y))
    replica = copy.copy(memory)
    replica._buffers = dict(memory._buffers)
    replica.memory_embeddings = memory.memory_embeddings.clone()
    for call in (lambda: replica(x, y), lambda: replica.enqueue(x, y), lambda: replica.memory):
        with pytest.raises(RuntimeError, match="buffers were replaced"):
            call()


def test_moved_copied_and_loaded_memories_keep_working():
    import io
    import pickle

    memory = _used(steps=2)
    x, y = torch.randn(8, 8), torch.arange(8) % 2
    want = copy.deepcopy(memory)(x, y)
    copies = [copy.deepcopy(memory), pickle.loads(pickle.dumps(memory)),
              copy.deepcopy(memory).double().float()]
    buffer = io.BytesIO()
    torch.save(memory, buffer)
    buffer.seek(0)
    copies.append(torch.load(buffer, weights_only=False))
    target = CrossBatchMemory(BatchHardTripletLoss(margin=0.3), memory_size=50)
    target.load_state_dict(memory.state_dict(), assign=True)
    copies.append(target)
    for other in copies:
        assert torch.equal(other(x, y), want)


def test_memories_pickled_by_earlier_versions_load():
    """Modules saved whole (torch.save(model)) before the buffers' owner was
    recorded come back without it: it is recorded on unpickling."""
    import pickle

    memory = _used(steps=2)
    x, y = torch.randn(8, 8), torch.arange(8) % 2
    want = copy.deepcopy(memory)(x, y)
    del memory.__dict__["_ring"]  # as 0.1.0 before it
    loaded = pickle.loads(pickle.dumps(memory))
    assert loaded.num_stored == 40
    assert torch.equal(loaded(x, y), want)


@pytest.mark.parametrize("wrap", [False, True], ids=["plain", "distributed"])
@pytest.mark.parametrize("mining", LOSSES)
def test_eval_mode_mines_against_the_memory_and_enqueues_nothing(mining, wrap):
    """As batch norm updates no statistics in eval mode, a validation loss
    leaves the memory as training left it: no held-out embeddings in it."""
    memory = _memory(mining, wrap)
    batches = _batches(4)
    for x, y in batches[:2]:
        memory(x, y)
    training_twin = copy.deepcopy(memory)
    x, y = batches[2]
    memory.eval()
    loss = memory(x, y)
    # The loss a training step would take, against the same memory.
    torch.testing.assert_close(loss, training_twin(x, y), rtol=0, atol=0)
    _same_memory(memory, _fed(mining, wrap, batches[:2]))
    memory.enqueue(x, y)  # explicitly, in either mode
    memory.train()
    x, y = batches[3]
    memory(x, y)
    _same_memory(memory, _fed(mining, wrap, batches[:4]))


def _fed(mining, wrap, batches):
    memory = _memory(mining, wrap)
    for x, y in batches:
        memory.enqueue(x, y)
    return memory


@pytest.mark.parametrize("fresh", [False, True], ids=["used", "first-call"])
def test_threads_sharing_a_memory_store_every_batch_once(fresh):
    """Four threads calling one memory at once: each batch is mined against
    and enqueued whole, once; nothing is counted that was not written, and
    no row is stored with another's label. Unlocked, the ring's place was
    read before and moved after the writes, with the GIL let go between."""
    import threading

    threads, calls, rows = 4, 12, 16
    for trial in range(3):
        memory = CrossBatchMemory(BatchHardTripletLoss(margin=0.2),
                                  memory_size=threads * calls * rows + (0 if fresh else rows))
        if not fresh:
            memory(torch.full((rows, 8), -1.0), torch.full((rows,), -1))
        start, errors = threading.Barrier(threads), []

        def work(t):
            try:
                start.wait()
                for c in range(calls):
                    batch = t * calls + c
                    # Column 0 holds each row's label, which is its batch's id.
                    x = torch.randn(rows, 8)
                    x[:, 0] = batch
                    memory(x, torch.full((rows,), batch))
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(repr(e))

        workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert errors == []
        embeddings, labels = memory.memory
        assert memory.num_stored == memory.memory_size == len(labels)
        assert torch.equal(embeddings[:, 0], labels.float())
        counts = torch.bincount(labels[labels >= 0])
        assert counts.tolist() == [rows] * (threads * calls)


def test_a_compiled_memory_pickles():
    """Module.compile stores a compiled call in the module, which nn.Module's
    own __getstate__ leaves out: the lock's removal must keep doing so."""
    import pickle

    memory = _used(steps=2)
    memory.compile(backend="eager")
    x, y = torch.randn(8, 8), torch.arange(8) % 2
    want = copy.deepcopy(memory)(x, y)
    assert torch.equal(pickle.loads(pickle.dumps(memory))(x, y), want)


# 2**44 rows of 4 float32: 256 TiB, beyond x86-64's 128 TiB of user address
# space, so no allocator can grant it whatever the machine's overcommit.
HUGE = 2**44


@pytest.mark.parametrize("when", ["constructed", "first call"])
def test_a_memory_the_host_cannot_hold_names_memory_size(when):
    """Found by review: torch's allocator error ("[enforce fail at
    alloc_cpu.cpp] ... can't allocate memory") named no argument. Now a
    HostOutOfMemoryError (a MemoryError) names memory_size, and a memory whose
    first call failed is left as it was: empty, its width not yet fixed."""
    from online_triplet_loss import HostOutOfMemoryError

    loss = BatchHardTripletLoss(margin=0.2)
    if when == "constructed":
        with pytest.raises(HostOutOfMemoryError,
                           match=r"memory_size and embedding_dim: 17592186044416 rows of 4"):
            CrossBatchMemory(loss, memory_size=HUGE, embedding_dim=4)
        return
    memory = CrossBatchMemory(loss, memory_size=HUGE)
    x, y = torch.randn(4, 4), torch.tensor([0, 0, 1, 1])
    with pytest.raises(MemoryError, match=r"memory_size: 17592186044416 rows of 4 elements"):
        memory(x, y)
    assert memory.memory_embeddings is None and memory.memory_labels is None
    assert memory.embedding_dim is None and memory.extra_repr().endswith("stored=0")


@pytest.mark.parametrize("device, reported_as_host_memory", [("cpu", True), ("cuda", False)])
def test_only_a_host_allocation_failure_is_reported_as_host_memory(device, reported_as_host_memory):
    """Found by review: every RuntimeError of an allocation became a
    HostOutOfMemoryError, also on a GPU, where a RuntimeError at that call
    may be an earlier kernel's failure (a device-side assert) that torch
    reports late. There torch's error is kept."""
    from online_triplet_loss import memory as memory_module

    def fails():
        raise RuntimeError("CUDA error: device-side assert triggered")

    with pytest.raises(RuntimeError) as info:
        memory_module._allocated(fails, torch.device(device), 10, 4, 4, "memory_size")
    assert isinstance(info.value, MemoryError) == reported_as_host_memory
    if reported_as_host_memory:
        assert "memory_size: 10 rows of 4 elements of 4 bytes" in str(info.value)
    else:
        assert str(info.value) == "CUDA error: device-side assert triggered"


def test_the_entries_stored_since_empty_are_saved_and_checked():
    """The count that tells apart ranks whose memories agree on position and
    count (distributed: one loaded an earlier checkpoint): saved, restored,
    reset with the memory, taken as the count from states saved before it
    was kept, and refused where no memory could have it."""
    memory = CrossBatchMemory(BatchHardTripletLoss(margin=0.2), memory_size=4)
    for step in range(3):
        memory.enqueue(torch.randn(3, 2), torch.tensor([0, 1, 0]))
    assert memory.get_extra_state() == {"next": 1, "count": 4, "embedding_dim": 2, "enqueued": 9}
    copy_ = CrossBatchMemory(BatchHardTripletLoss(margin=0.2), memory_size=4)
    copy_.load_state_dict(memory.state_dict())
    assert copy_._enqueued == 9
    old = memory.state_dict()
    del old["_extra_state"]["enqueued"]
    copy_.load_state_dict(old)
    assert copy_._enqueued == 4
    for enqueued, why in ((3, "enqueued: must be"), (2**70, "enqueued: must be")):
        bad = memory.state_dict()
        bad["_extra_state"]["enqueued"] = enqueued
        with pytest.raises(ValueError, match=f"^state_dict: .*{why}"):
            copy_.load_state_dict(bad)
    memory.reset()
    assert memory._enqueued == 0
    memory.enqueue(torch.randn(3, 2), torch.tensor([0, 1, 0]))
    bad = memory.state_dict()
    bad["_extra_state"]["enqueued"] = 7
    with pytest.raises(ValueError, match="^state_dict: .*enqueued=7 with count=3"):
        copy_.load_state_dict(bad)

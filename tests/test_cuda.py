"""The losses, reference sets, CrossBatchMemory and the metrics on a CUDA device.

Every test runs on the device named by the environment variable
``OTL_TEST_DEVICE`` (default ``cuda``) and compares it with the CPU and with
the float64 brute-force references of tests/reference.py (values and
gradients). Without CUDA every test is skipped with the reason;
``OTL_TEST_DEVICE=cpu`` runs the same checks on the CPU device, which is how
``tools/gpu-check --cpu`` proves them on a machine without a GPU (there the
device-versus-CPU comparisons compare the CPU with itself and only the
reference comparisons carry information). The host-synchronisation check
needs CUDA and is skipped on any other device.

Layout: losses against the CPU and the reference (per loss x distance x dtype)
-> chunked mining -> reference sets -> CrossBatchMemory -> metrics -> the
sentence-transformers adapters against sentence-transformers' losses -> no
host synchronisation.

Tolerances, per input dtype, of a loss or a gradient entry against the
float64 reference of the same (already rounded) input values:

- float64: the CPU reference tests' own (1e-9 / 1e-7 relative): only the
  order of operations differs.
- float32: 1e-4 for values and 1e-3 relative / 1e-4 absolute for gradients,
  as tests/test_losses_reference.py allows float32 on the CPU.
- float16 and bfloat16: computed in float32, then the loss and the gradient
  are rounded to the input dtype, so float32's tolerance plus twice the unit
  roundoff of that dtype (2^-11 and 2^-8) relative: one rounding of the value
  itself, and one step between two neighbours when the device and the CPU
  round a slightly different float32 result.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import online_triplet_loss
import reference as R
from conftest import make_batch, make_reference_set
from helpers import DISTANCES, LOSSES, function_loss, grad_of, leaf
from online_triplet_loss import (
    BatchAllTripletLoss,
    BatchHardTripletLoss,
    BatchSemiHardTripletLoss,
    CrossBatchMemory,
    _core,
)
from online_triplet_loss.metrics import (
    mean_average_precision,
    mean_average_precision_at_r,
    mean_inverse_negative_penalty,
    recall_at_k,
    retrieval_scores,
)
from test_losses_numerics import check_huge_constant_column
from test_near_copies import check_near_copies
from test_memory import reference_loss as memory_reference_loss
from test_metrics import brute_force as metrics_brute_force
from test_metrics import TIED, copies_and_near_neighbours, tied_data
from test_metrics import random_data as metrics_random_data
from test_metrics import tight_classes_far_apart as metrics_tight_classes
from test_sentence_transformers import HAVE_ST
from test_sentence_transformers import LOSS_NAMES as ST_LOSS_NAMES
from test_sentence_transformers import _pair as st_pair
from test_sentence_transformers import _pk_batch as st_pk_batch
from test_sentence_transformers import _value_and_grad as st_value_and_grad

pytestmark = pytest.mark.cuda

DEVICE_VARIABLE = "OTL_TEST_DEVICE"

DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
DTYPE_IDS = {torch.float64: "f64", torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def value_tol(dtype: torch.dtype) -> dict:
    if dtype == torch.float64:
        return dict(rtol=1e-9, atol=1e-10)
    return dict(rtol=1e-4 + 2 * UNIT_ROUNDOFF.get(dtype, 0.0), atol=1e-4)


def grad_tol(dtype: torch.dtype) -> dict:
    if dtype == torch.float64:
        return dict(rtol=1e-7, atol=1e-9)
    return dict(rtol=1e-3 + 2 * UNIT_ROUNDOFF.get(dtype, 0.0), atol=1e-4)


def assert_close(got: torch.Tensor, expected: torch.Tensor, what: str, **tol) -> None:
    """Compares in float64 on the CPU, whatever the devices and dtypes."""
    torch.testing.assert_close(got.detach().cpu().double(), expected.detach().cpu().double(),
                               msg=lambda m: f"{what}: {m}", **tol)


@pytest.fixture(scope="module")
def device(record_testsuite_property) -> torch.device:
    """The device under test; skips the module's tests when it is CUDA and
    there is none. With ``OTL_EXPECT_PACKAGE_DIR`` set (tools/gpu-check sets
    it), the package must be the one installed there, not the source tree."""
    record_testsuite_property("online_triplet_loss", online_triplet_loss.__file__)
    record_testsuite_property("torch", torch.__version__)
    expected = os.environ.get("OTL_EXPECT_PACKAGE_DIR")
    if expected:
        package = Path(online_triplet_loss.__file__).resolve()
        assert Path(expected).resolve() in package.parents, (
            f"online_triplet_loss was imported from {package}, not from the installed wheel in {expected}")
    dev = torch.device(os.environ.get(DEVICE_VARIABLE, "cuda"))
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            pytest.skip(f"CUDA is not available (torch {torch.__version__}, CUDA build "
                        f"{torch.version.cuda or 'none'}); {DEVICE_VARIABLE}=cpu runs these checks on the CPU")
        if (dev.index or 0) >= torch.cuda.device_count():
            pytest.skip(f"{dev} does not exist: {torch.cuda.device_count()} CUDA device(s)")
        if dev.index is None:  # tensors report their device with its index
            dev = torch.device("cuda", torch.cuda.current_device())
        record_testsuite_property("device_name", torch.cuda.get_device_name(dev))
    record_testsuite_property("device", str(dev))
    return dev


def on(t, dev):
    return None if t is None else t.to(dev)


def run_loss(mining, labels, emb, margin, distance, soft, dev, ref_labels=None, ref_emb=None):
    """Loss (and batch-all's fraction) and gradients on ``dev``; the inputs are
    copied there as leaves."""
    x = leaf(emb.to(dev))
    y = leaf(ref_emb.to(dev)) if ref_emb is not None else None
    kw = {} if y is None else dict(ref_embeddings=y, ref_labels=ref_labels.to(dev))
    fraction = None
    if mining == "all":
        loss, fraction = online_triplet_loss.batch_all_triplet_loss(labels.to(dev), x, margin,
                                                                    distance=distance, **kw)
    else:
        loss = function_loss(mining, labels.to(dev), x, margin, distance, soft, **kw)
    grads = grad_of(loss, x, *([] if y is None else [y]))
    return loss, fraction, grads


# ------------------------------------------------- losses: device vs CPU vs reference

LOSS_SEEDS = (300, 301, 302, 303)
DUPLICATE_SEEDS = (500, 501)  # exact copies of rows: zero distances and ties (float64 only)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining", LOSSES)
def test_loss_matches_cpu_and_reference(device, mining, distance, dtype):
    margin = 0.2
    batches = [make_batch(s, min_size=10) for s in LOSS_SEEDS]
    if dtype == torch.float64:
        batches += [make_batch(s, min_size=10, duplicates=True) for s in DUPLICATE_SEEDS]
    for soft in ((False, True) if mining == "hard" else (False,)):
        for b in batches:
            what = f"{b} {mining} {distance} {DTYPE_IDS[dtype]} soft={soft}"
            emb = b.embeddings.to(dtype)
            got, got_frac, (g,) = run_loss(mining, b.labels, emb, margin, distance, soft, device)
            assert got.device == device and got.dtype == dtype and got.shape == (), what
            assert g.device == device and g.dtype == dtype, what
            cpu, cpu_frac, (g_cpu,) = run_loss(mining, b.labels, emb, margin, distance, soft,
                                               torch.device("cpu"))
            xr = leaf(emb.double())
            ref = R.reference_terms(mining, b.labels, xr, margin, distance, soft=soft)
            (g_ref,) = grad_of(ref.loss, xr)

            assert_close(got, ref.loss, what + " loss vs reference", **value_tol(dtype))
            assert_close(g, g_ref, what + " gradient vs reference", **grad_tol(dtype))
            assert_close(got, cpu, what + " loss vs CPU", **value_tol(dtype))
            assert_close(g, g_cpu, what + " gradient vs CPU", **grad_tol(dtype))
            if mining == "all":
                assert got_frac.device == device, what
                assert_close(got_frac, torch.tensor(ref.fraction, dtype=torch.float64), what + " fraction vs reference",
                             **value_tol(dtype))
                assert_close(got_frac, cpu_frac, what + " fraction vs CPU", **value_tol(dtype))


@pytest.mark.parametrize("distance", ["euclidean", "squared"])
@pytest.mark.parametrize("mining", LOSSES)
def test_a_huge_constant_column_changes_no_distance(device, mining, distance):
    """A float64 column of 1.5e308 in 4096 rows, one block of rows on a GPU
    (every row goes into the centre's first estimate, whose sum is taken
    scaled down by a power of two): the loss and gradient without it."""
    check_huge_constant_column(mining, distance, device, 1.5e308)


@pytest.mark.parametrize("mining,dtype,gap", [("all", torch.float32, 1e-5),
                                              ("all", torch.float64, 1e-11),
                                              ("semihard", torch.float64, 1e-7)])
def test_near_copies_get_the_gradient_of_their_exact_distance(device, mining, dtype, gap):
    """Near-copies on the device (the libtorch path): their pairs' gradients
    from their exact distances, against the float64 brute force."""
    check_near_copies(mining, dtype, gap, device)


@pytest.mark.parametrize("refs", ["none", "refs", "offset", "stale"])
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining", LOSSES)
def test_chunked_terms_match_reference(device, mining, distance, refs):
    """Mining a few anchors at a time (uneven last chunk) gives the reference's
    sum, count, valid and gradients on the device (float64). "stale": rows at
    the offset that are not their anchors' (a zero row beside another zero
    row, a copy of another reference), whose ties the anchors must not take."""
    margin, soft = 0.3, mining == "hard"
    b = make_batch(3000, min_size=17, max_size=37)
    labels, emb = b.labels, b.embeddings
    rlabels = remb = offset = None
    if refs != "none":
        labels, emb, rlabels, remb, offset = make_reference_set(3100, 23, 4, with_offset=(refs != "refs"))
    if refs == "stale":
        remb = torch.cat([remb, torch.zeros(1, remb.shape[1], dtype=remb.dtype)])
        rlabels = torch.cat([rlabels, rlabels[offset + 1:offset + 2] + 1])
        remb[offset + 1] = 0.0
        remb[offset + 5] = remb[offset + 9]
    xr = leaf(emb)
    yr = leaf(remb) if remb is not None else None
    ref = R.reference_terms(mining, labels, xr, margin, distance, soft=soft, ref_embeddings=yr,
                            ref_labels=rlabels, anchor_offset=offset)
    ref_grads = grad_of(ref.sum, xr, *([yr] if yr is not None else []))
    for chunk in (None, 1, 7):
        x = leaf(emb.to(device))
        y = leaf(remb.to(device)) if remb is not None else None
        s, c, v = _core.triplet_terms(mining, labels.to(device), x, margin, distance, soft, y,
                                      on(rlabels, device), offset, chunk)
        what = f"{mining} {distance} {refs} chunk_size={chunk}"
        assert s.device == device and c.device == device, what
        assert (int(c), int(v)) == (ref.count, ref.valid), what
        assert_close(s, ref.sum, what + " sum", **value_tol(torch.float64))
        for g, gr in zip(grad_of(s, x, *([y] if y is not None else [])), ref_grads):
            assert g.device == device, what
            assert_close(g, gr, what + " gradient", **grad_tol(torch.float64))


# ------------------------------------------------------------------- reference sets


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining", LOSSES)
def test_reference_set_matches_cpu_and_reference(device, mining, distance, dtype):
    margin = 0.5
    for seed in range(3):
        labels, emb, rlabels, remb, _ = make_reference_set(1000 + seed, 8 + 7 * seed, 2 + seed,
                                                           with_offset=False)
        emb, remb = emb.to(dtype), remb.to(dtype)
        what = f"seed {1000 + seed} {mining} {distance} {DTYPE_IDS[dtype]}"
        got, _, (gx, gy) = run_loss(mining, labels, emb, margin, distance, False, device, rlabels, remb)
        cpu, _, (gx_cpu, gy_cpu) = run_loss(mining, labels, emb, margin, distance, False,
                                            torch.device("cpu"), rlabels, remb)
        xr, yr = leaf(emb.double()), leaf(remb.double())
        ref = R.reference_terms(mining, labels, xr, margin, distance, ref_embeddings=yr, ref_labels=rlabels)
        grx, gry = grad_of(ref.loss, xr, yr)
        assert got.device == device and gx.device == device and gy.device == device, what
        assert_close(got, ref.loss, what + " loss vs reference", **value_tol(dtype))
        assert_close(gx, grx, what + " grad embeddings vs reference", **grad_tol(dtype))
        assert_close(gy, gry, what + " grad ref_embeddings vs reference", **grad_tol(dtype))
        assert_close(got, cpu, what + " loss vs CPU", **value_tol(dtype))
        assert_close(gx, gx_cpu, what + " grad embeddings vs CPU", **grad_tol(dtype))
        assert_close(gy, gy_cpu, what + " grad ref_embeddings vs CPU", **grad_tol(dtype))


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining", LOSSES)
def test_reference_set_in_parts_matches_cpu_and_reference(device, mining, distance, dtype):
    """ref_embeddings=(batch, bank) with anchor_offset=0, the bank not
    requiring grad: on the device as on the CPU and as the brute force over
    their concatenation."""
    margin = 0.5
    for seed in range(3):
        labels, emb, blabels, bank, _ = make_reference_set(1100 + seed, 8 + 7 * seed, 2 + seed,
                                                           with_offset=False)
        emb, bank = emb.to(dtype), bank.to(dtype)
        rlabels = torch.cat([labels, blabels])
        what = f"seed {1100 + seed} {mining} {distance} {DTYPE_IDS[dtype]}"
        results = []
        for dev in (device, torch.device("cpu")):
            x = leaf(emb.to(dev))
            loss = function_loss(mining, labels.to(dev), x, margin, distance, False,
                                 ref_embeddings=(x, bank.to(dev)), ref_labels=rlabels.to(dev),
                                 anchor_offset=0)
            results.append((loss, grad_of(loss, x)[0]))
        (got, gx), (cpu, gx_cpu) = results
        xr = leaf(emb.double())
        ref = R.reference_terms(mining, labels, xr, margin, distance,
                                ref_embeddings=torch.cat([xr, bank.double()]), ref_labels=rlabels,
                                anchor_offset=0)
        (grx,) = grad_of(ref.loss, xr)
        assert got.device == device and gx.device == device, what
        assert_close(got, ref.loss, what + " loss vs reference", **value_tol(dtype))
        assert_close(gx, grx, what + " grad embeddings vs reference", **grad_tol(dtype))
        assert_close(got, cpu, what + " loss vs CPU", **value_tol(dtype))
        assert_close(gx, gx_cpu, what + " grad embeddings vs CPU", **grad_tol(dtype))


# ---------------------------------------------------------------- CrossBatchMemory

MEMORY_CONFIGS = [
    ("all", lambda: BatchAllTripletLoss(margin=0.5), "euclidean", False),
    ("hard", lambda: BatchHardTripletLoss(margin=0.3), "euclidean", False),
    ("hard", lambda: BatchHardTripletLoss(margin=0.0, distance="cosine", soft=True), "cosine", True),
    ("semihard", lambda: BatchSemiHardTripletLoss(margin=0.4, distance="squared"), "squared", False),
]


@pytest.mark.parametrize("mining, make_loss, distance, soft", MEMORY_CONFIGS,
                         ids=[f"{c[0]}-{c[2]}" + ("-soft" if c[3] else "") for c in MEMORY_CONFIGS])
def test_cross_batch_memory_matches_cpu_and_reference(device, mining, make_loss, distance, soft):
    """The same stream of batches through a memory on the device and on the
    CPU (the ring wraps mid-batch): equal losses, gradients and stored
    memory, and the plain-loop reference of tests/test_memory.py."""
    g = torch.Generator().manual_seed(0)
    memory_size = 13
    on_device = CrossBatchMemory(make_loss(), memory_size=memory_size)
    on_cpu = CrossBatchMemory(make_loss(), memory_size=memory_size)
    margin = on_cpu.loss.margin
    for step, batch in enumerate([6, 5, 7, 4, 20, 6]):
        emb = torch.randn(batch, 3, generator=g, dtype=torch.float64)
        labels = torch.randint(0, 3, (batch,), generator=g)
        # copies: the memory is updated in place by the calls below
        memory_e, memory_l = (t.clone() for t in on_cpu.memory)
        memory_e = memory_e.reshape(-1, 3).double()
        x = leaf(emb.to(device))
        got = on_device(x, labels.to(device))
        (g_dev,) = grad_of(got, x)
        x_cpu = leaf(emb)
        cpu = on_cpu(x_cpu, labels)
        (g_cpu,) = grad_of(cpu, x_cpu)
        anchors = leaf(emb)
        expected = memory_reference_loss(mining, margin, distance, soft, anchors, labels,
                                         torch.cat([anchors, memory_e]), torch.cat([labels, memory_l]))
        (g_ref,) = grad_of(expected, anchors)
        what = f"step {step}"
        assert got.device == device and g_dev.device == device, what
        assert_close(got, expected, what + " loss vs reference", **value_tol(torch.float64))
        assert_close(g_dev, g_ref, what + " gradient vs reference", **grad_tol(torch.float64))
        assert_close(got, cpu, what + " loss vs CPU", **value_tol(torch.float64))
        assert_close(g_dev, g_cpu, what + " gradient vs CPU", **grad_tol(torch.float64))
        stored_dev, stored_cpu = on_device.memory, on_cpu.memory
        assert stored_dev[0].device == device and on_device.memory_labels.device == device, what
        assert torch.equal(stored_dev[0].cpu(), stored_cpu[0]), what
        assert torch.equal(stored_dev[1].cpu(), stored_cpu[1]), what


# ------------------------------------------------------------------------- metrics

KS = (1, 2, 5, 17)


@pytest.mark.parametrize("distance", ("euclidean", "squared", "cosine"))
def test_metrics_match_brute_force_and_cpu(device, distance):
    for seed in range(3):
        emb, labels = metrics_random_data(seed, n=80 + 40 * seed, dim=2 + seed, classes=6, singletons=2)
        what = f"seed {seed} {distance}"
        # squared Euclidean ranks like Euclidean
        recall, map_r = metrics_brute_force(emb, labels, KS, "cosine" if distance == "cosine" else "euclidean")
        for chunk in (None, 7):
            got = recall_at_k(emb.to(device), labels.to(device), KS, distance=distance, chunk_size=chunk)
            assert got == pytest.approx(recall, abs=1e-12), what
            got_map = mean_average_precision_at_r(emb.to(device), labels.to(device), distance=distance,
                                                  chunk_size=chunk)
            assert got_map == pytest.approx(map_r, abs=1e-12), what
        assert 0 < recall[1] < 1 and 0 < map_r < 1, "the data should make the metrics informative"
        # float32 on the device against float32 on the CPU: the same ranking
        # unless two distances round to an order the other side does not see.
        got32 = recall_at_k(emb.float().to(device), labels.to(device), KS, distance=distance)
        cpu32 = recall_at_k(emb.float(), labels, KS, distance=distance)
        assert got32 == pytest.approx(cpu32, abs=2.0 / len(labels)), what
        got32 = mean_average_precision_at_r(emb.float().to(device), labels.to(device), distance=distance)
        cpu32 = mean_average_precision_at_r(emb.float(), labels, distance=distance)
        assert got32 == pytest.approx(cpu32, abs=2.0 / len(labels)), what


@pytest.mark.parametrize("distance", ("euclidean", "cosine"))
def test_metrics_rank_identical_items_first(device, distance):
    # The device finds copies with the sort-based search the losses use there.
    embeddings, labels = copies_and_near_neighbours()
    recall, map_r = metrics_brute_force(embeddings, labels, (1, 2), distance)
    for chunk in (None, 7):
        kw = dict(distance=distance, chunk_size=chunk)
        assert recall_at_k(embeddings.to(device), labels.to(device), (1, 2), **kw) == pytest.approx(recall)
        assert mean_average_precision_at_r(embeddings.to(device), labels.to(device), **kw) == pytest.approx(map_r)


@pytest.mark.parametrize("kind", TIED)
def test_metrics_on_tied_distances_rank_other_labels_first(device, kind):
    """Tied distances rank the items of other labels first on the device too,
    also under deterministic algorithms (the reordering of ties counts in
    integers), and retrieval_scores equals the single functions there."""
    x, y = tied_data(kind, 1)
    ks = (1, 2, 5)
    recall, map_r = metrics_brute_force(x, y, ks)
    _, full = metrics_brute_force(x, y, ks, full=True)
    _, minp = metrics_brute_force(x, y, ks, penalty=True)
    x, y = x.to(device), y.to(device)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for chunk in (None, 7):
            kw = dict(chunk_size=chunk)
            assert recall_at_k(x, y, ks, **kw) == pytest.approx(recall, abs=1e-12)
            assert mean_average_precision_at_r(x, y, **kw) == pytest.approx(map_r, abs=1e-12)
            got = retrieval_scores(x, y, ks, **kw)
            assert got.recall == recall_at_k(x, y, ks, **kw)
            assert got.mean_average_precision == pytest.approx(full, abs=1e-12)
            assert got.mean_inverse_negative_penalty == pytest.approx(minp, abs=1e-12)
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("distance", ("euclidean", "cosine"))
def test_metrics_stay_exact_with_tf32_matmuls_allowed(device, distance):
    """TF32 products keep about 10 bits, which the certified float32 ranking
    does not bound: with TF32 allowed, float32 embeddings on a GPU are ranked
    in float64. Tight classes far from the centre, whose float32 ranking
    needs the certificate, equal the float64 brute force, in float32 and in
    float16."""
    if device.type != "cuda":
        pytest.skip(f"TF32 applies to CUDA matrix products; the device is {device}")
    embeddings, labels = metrics_tight_classes(distance, torch.float32)
    half_x, half_y = metrics_random_data(5, n=60, dim=6, classes=4)
    half_x = half_x.half()
    half_recall, _ = metrics_brute_force(half_x, half_y, (1, 2), distance)
    recall, map_r = metrics_brute_force(embeddings, labels, (1, 2, 5), distance)
    before = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        kw = dict(distance=distance)
        got = recall_at_k(embeddings.to(device), labels.to(device), (1, 2, 5), **kw)
        got_map = mean_average_precision_at_r(embeddings.to(device), labels.to(device), **kw)
        half = recall_at_k(half_x.to(device), half_y.to(device), (1, 2), **kw)
        # The queries as their own gallery are refused also when ranked in float64.
        with pytest.raises(ValueError, match="ref_embeddings: is embeddings itself"):
            x = embeddings.to(device)
            recall_at_k(x, labels.to(device), (1,), ref_embeddings=x, ref_labels=labels.to(device))
    finally:
        torch.backends.cuda.matmul.fp32_precision = before
    assert got == pytest.approx(recall, abs=1e-12)
    assert got_map == pytest.approx(map_r, abs=1e-12)
    assert half == pytest.approx(half_recall, abs=1e-12)


@pytest.mark.parametrize("distance", ("euclidean", "cosine"))
def test_metrics_against_a_reference_set_match_brute_force(device, distance):
    emb, labels = metrics_random_data(4, n=150, dim=5, classes=6, singletons=2)
    x, y, gx, gy = emb[:50], labels[:50], emb[50:], labels[50:]
    recall, map_r = metrics_brute_force(x, y, KS, distance, references=(gx, gy))
    _, full = metrics_brute_force(x, y, KS, distance, references=(gx, gy), full=True)
    for chunk in (None, 7):
        kw = dict(distance=distance, chunk_size=chunk, ref_embeddings=gx.to(device), ref_labels=gy.to(device))
        assert recall_at_k(x.to(device), y.to(device), KS, **kw) == pytest.approx(recall, abs=1e-12)
        assert mean_average_precision_at_r(x.to(device), y.to(device), **kw) == pytest.approx(map_r, abs=1e-12)
        assert mean_average_precision(x.to(device), y.to(device), **kw) == pytest.approx(full, abs=1e-12)
        cams, ref_cams = torch.arange(len(y)) % 3, torch.arange(len(gy)) % 3
        cameras = dict(references=(gx, gy), cameras=(cams, ref_cams))
        camera_recall, _ = metrics_brute_force(x, y, KS, distance, **cameras)
        _, camera_full = metrics_brute_force(x, y, KS, distance, full=True, **cameras)
        kw.update(cameras=cams.to(device), ref_cameras=ref_cams.to(device))
        assert recall_at_k(x.to(device), y.to(device), KS, **kw) == pytest.approx(camera_recall, abs=1e-12)
        assert mean_average_precision(x.to(device), y.to(device), **kw) == pytest.approx(camera_full, abs=1e-12)
        _, camera_minp = metrics_brute_force(x, y, KS, distance, penalty=True, **cameras)
        assert mean_inverse_negative_penalty(x.to(device), y.to(device), **kw) == \
            pytest.approx(camera_minp, abs=1e-12)
        together = retrieval_scores(x.to(device), y.to(device), KS, **kw)
        assert together.recall == pytest.approx(camera_recall, abs=1e-12)
        assert together.mean_average_precision == pytest.approx(camera_full, abs=1e-12)
        assert together.mean_inverse_negative_penalty == pytest.approx(camera_minp, abs=1e-12)


# ---------------------------------------------------------- sentence-transformers


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("loss_name", ST_LOSS_NAMES)
def test_sentence_transformers_losses_match_st_on_the_device(device, loss_name, dtype):
    """The adapters of online_triplet_loss.sentence_transformers against
    sentence-transformers' own losses, both on the device, on P×K batches
    where the two must agree (values and gradients)."""
    if not HAVE_ST:
        pytest.skip("sentence-transformers is not installed")
    os.environ["HF_HUB_OFFLINE"] = "1"
    from sentence_transformers.sentence_transformer import losses as st

    import online_triplet_loss.sentence_transformers as ours

    for metric in ("euclidean", "squared", "cosine"):
        for batch in ((3, 4, 8, 1), (16, 8, 32, 3)):
            st_loss, our_loss = st_pair(st, ours, loss_name, metric, margin=None)
            labels, emb = st_pk_batch(*batch, dtype=dtype)
            labels, emb = labels.to(device), emb.to(device)
            expected, g_expected = st_value_and_grad(st_loss, labels, emb)
            got, g = st_value_and_grad(our_loss, labels, emb)
            what = f"{loss_name} {metric} P{batch[0]}xK{batch[1]} {DTYPE_IDS[dtype]}"
            assert got.device == device and g.device == device and got.dtype == dtype, what
            assert_close(got, expected, what + " loss vs sentence-transformers", **value_tol(dtype))
            assert_close(g, g_expected, what + " gradient vs sentence-transformers", **grad_tol(dtype))


def test_a_learned_margin_stays_on_the_cpu_when_an_st_loss_moves(device):
    """ST's trainer moves the loss to the model's device: the adapter's learned
    margin stays the same CPU parameter, and the loss runs on the device."""
    if not HAVE_ST:
        pytest.skip("sentence-transformers is not installed")
    import online_triplet_loss.sentence_transformers as ours

    margin = torch.nn.Parameter(torch.tensor(0.5))
    loss = ours.BatchHardTripletLoss(torch.nn.Identity(), margin=margin).to(device)
    assert loss.triplet_margin is margin and margin.device.type == "cpu"
    labels, emb = st_pk_batch(3, 4, 8, 1, dtype=torch.float32)
    value = loss.compute_loss_from_embeddings([emb.to(device)], labels.to(device))
    value.backward()
    assert value.device == device and margin.grad is not None and margin.grad.device.type == "cpu"


# -------------------------------------------------------------- host synchronisation


@pytest.mark.parametrize("refs", [False, True, "parts"], ids=["batch", "ref-set", "parts"])
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining", LOSSES)
def test_loss_does_not_synchronise_with_the_host(device, mining, distance, refs):
    """Forward and backward of each loss under
    ``torch.cuda.set_sync_debug_mode("error")``: any synchronising call (a
    copy to the host, ``.item()``, a data-dependent shape) raises. A chunk
    size below the batch also checks the loop over chunks."""
    if device.type != "cuda":
        pytest.skip(f"the host-synchronisation check needs CUDA (torch.cuda.set_sync_debug_mode); "
                    f"the device is {device}")
    g = torch.Generator().manual_seed(7)
    n = 256
    labels = torch.randint(0, 16, (n,), generator=g).to(device)
    emb = (torch.randn(n, 32, generator=g) / 32 ** 0.5).to(device)
    ref_labels = torch.randint(0, 16, (100,), generator=g).to(device) if refs else None
    ref_emb = (torch.randn(100, 32, generator=g) / 32 ** 0.5).to(device) if refs else None
    soft = mining == "hard"

    def step(chunk):
        x = leaf(emb)
        y = leaf(ref_emb) if refs is True else ref_emb
        # In parts: the batch, then references that do not require grad.
        given, given_labels, offset = y, ref_labels, None
        if refs == "parts":
            given, given_labels, offset = [x, y], torch.cat([labels, ref_labels]), 0
        if chunk is None:
            kw = {} if not refs else dict(ref_embeddings=given, ref_labels=given_labels,
                                          anchor_offset=offset)
            loss = function_loss(mining, labels, x, 0.2, distance, soft, **kw)
        else:
            s, c, _ = _core.triplet_terms(mining, labels, x, 0.2, distance, soft, given,
                                          given_labels, offset, chunk)
            loss = s / c.clamp_min(1)
        loss.backward()
        return loss

    for chunk in (None, 64):
        step(chunk)  # warm-up: first-call initialisation may synchronise
        torch.cuda.synchronize(device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss = step(chunk)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.isfinite(loss).item(), (chunk, loss)


@pytest.mark.parametrize("refs", [False, True], ids=["batch", "ref-set"])
@pytest.mark.parametrize("mining", LOSSES)
def test_cpu_labels_do_not_synchronise_the_loss(device, mining, refs):
    """Labels left on the CPU with CUDA embeddings (common in training loops)
    are copied to the device without waiting for it: forward and backward
    under ``set_sync_debug_mode("error")``, with the value and gradient of
    device labels."""
    if device.type != "cuda":
        pytest.skip(f"the host-synchronisation check needs CUDA (torch.cuda.set_sync_debug_mode); "
                    f"the device is {device}")
    g = torch.Generator().manual_seed(5)
    labels, emb = torch.randint(0, 8, (128,), generator=g), torch.randn(128, 16, generator=g).to(device)
    ref_labels = torch.randint(0, 8, (60,), generator=g)
    ref_emb = torch.randn(60, 16, generator=g).to(device)
    results = []
    for on_device in (True, False):
        x = leaf(emb)
        y, yl = (leaf(ref_emb), ref_labels.to(device) if on_device else ref_labels) if refs else (None, None)
        kw = dict(ref_embeddings=y, ref_labels=yl) if refs else {}
        lab = labels.to(device) if on_device else labels
        function_loss(mining, lab, x, 0.2, "euclidean", False, **kw)  # warm-up
        torch.cuda.synchronize(device)
        if not on_device:
            torch.cuda.set_sync_debug_mode("error")
        try:
            loss = function_loss(mining, lab, x, 0.2, "euclidean", False, **kw)
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        results.append((loss.detach(), x.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("mining", LOSSES)
def test_device_labels_with_cpu_embeddings(device, mining):
    """Labels on the device with CPU embeddings are copied to the CPU before
    the native kernels read them, after queued device work: the loss and its
    gradient equal those of CPU labels, with references too."""
    if device.type != "cuda":
        pytest.skip(f"device labels with CPU embeddings need a CUDA device; the device is {device}")
    g = torch.Generator().manual_seed(6)
    labels, emb = torch.randint(0, 8, (512,), generator=g), torch.randn(512, 16, generator=g)
    ref_labels, ref_emb = torch.randint(0, 8, (300,), generator=g), torch.randn(300, 16, generator=g)
    for refs in (False, True):
        got, want = [], []
        for out, on in ((got, device), (want, torch.device("cpu"))):
            x = leaf(emb)
            kw = dict(ref_embeddings=ref_emb, ref_labels=ref_labels.to(on)) if refs else {}
            # Work queued on the device first, so that a copy not waited for would be late.
            torch.randn(4096, 4096, device=device).matmul(torch.randn(4096, 4096, device=device))
            loss = function_loss(mining, labels.to(on), x, 0.2, "euclidean", False, **kw)
            loss.backward()
            out += [loss.detach(), x.grad]
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mining", LOSSES)
def test_a_learnable_cpu_margin_does_not_synchronise_the_forward_pass(device, mining):
    """A learnable margin stays on the CPU (an ``nn.Parameter`` of the loss,
    which moving the module to the device leaves there, the same parameter);
    with CUDA embeddings it enters the forward pass as a number, not by a
    copy to the device, which waits for it. Its gradient comes back to the
    CPU in the backward pass (a copy that waits, as for any CPU parameter);
    value and gradients equal the CPU's."""
    if device.type != "cuda":
        pytest.skip(f"the host-synchronisation check needs CUDA (torch.cuda.set_sync_debug_mode); "
                    f"the device is {device}")
    g = torch.Generator().manual_seed(9)
    labels = torch.randint(0, 8, (128,), generator=g)
    emb = torch.randn(128, 16, generator=g)
    make = {"all": BatchAllTripletLoss, "hard": BatchHardTripletLoss,
            "semihard": BatchSemiHardTripletLoss}[mining]
    results = []
    for dev in (device, torch.device("cpu")):
        margin = torch.nn.Parameter(torch.tensor(0.3))
        loss_fn, x = make(margin=margin).to(dev), leaf(emb.to(dev))
        assert loss_fn.margin is margin and margin.device.type == "cpu"
        loss_fn(x, labels.to(dev))  # warm-up
        margin.grad = None
        torch.cuda.synchronize(device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss = loss_fn(x, labels.to(dev))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        loss.backward()
        results.append((loss.detach().cpu(), x.grad.cpu(), margin.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------- out of device memory


@pytest.mark.parametrize("mining", LOSSES)
def test_out_of_device_memory_is_torchs_out_of_memory_error(device, mining):
    """A loss that runs out of device memory inside the Rust core raises
    ``torch.OutOfMemoryError``, as torch's own operations do (code that
    shrinks the batch and retries catches it), with libtorch's message and
    without its C++ stack; grad mode is kept and the next call is right.
    The device's memory is capped at what is in use plus 64 MiB, and the
    chunk buffers of a 65536-anchor batch pass that cap."""
    if device.type != "cuda":
        pytest.skip(f"device memory caps are CUDA's (torch.cuda.set_per_process_memory_fraction); "
                    f"the device is {device}; tests/test_out_of_memory.py covers the CPU")
    g = torch.Generator().manual_seed(11)
    n = 1 << 16
    labels = torch.randint(0, 4096, (n,), generator=g).to(device)
    x = leaf(torch.randn(n, 128, generator=g).to(device))
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    cap = torch.cuda.memory_allocated(device) + (64 << 20)
    torch.cuda.set_per_process_memory_fraction(cap / total, device)
    try:
        with pytest.raises(torch.OutOfMemoryError) as caught:
            loss = function_loss(mining, labels, x, 0.2, "euclidean", False)
            loss.backward()
            torch.cuda.synchronize(device)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        torch.cuda.empty_cache()
    message = str(caught.value)
    assert "out of memory" in message, message
    for leak in ["frame #", "Exception raised from", "unwrap()", "Torch("]:
        assert leak not in message, message
    assert torch.is_grad_enabled()
    small = make_batch(12, min_size=16)
    got = function_loss(mining, small.labels.to(device), small.embeddings.to(device), 0.2,
                        "euclidean", False)
    want = R.reference_terms(mining, small.labels, small.embeddings, 0.2, "euclidean", False)
    assert_close(got, want.loss, "after the failure", **value_tol(torch.float64))


# ------------------------------------------------------------- deterministic algorithms


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining", LOSSES)
def test_deterministic_algorithms_mode(device, mining, distance):
    """Under ``torch.use_deterministic_algorithms(True)``, which reproducible
    training sets and under which torch raises for operations without a
    deterministic kernel (a floating ``cumsum`` on CUDA, say), every loss and
    the metrics run, agree with the reference, and two runs agree bit for
    bit, gradients included."""
    b = make_batch(21, min_size=40)
    labels, emb = b.labels.to(device), b.embeddings.to(device=device, dtype=torch.float32)
    ref = R.reference_terms(mining, b.labels, leaf(b.embeddings), 0.2, distance)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            x = leaf(emb)
            loss = function_loss(mining, labels, x, 0.2, distance, False)
            (grad,) = grad_of(loss, x)
            metrics = (recall_at_k(emb, labels, ks=(1, 2), distance=distance),
                       mean_average_precision_at_r(emb, labels, distance=distance))
            runs.append((loss.detach(), grad, metrics))
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert runs[0][2] == runs[1][2]
    assert_close(runs[0][0], ref.loss, "loss vs reference", **value_tol(torch.float32))
    recall, map_r = runs[0][2]
    assert recall == pytest.approx(recall_at_k(b.embeddings, b.labels, ks=(1, 2), distance=distance))
    assert map_r == pytest.approx(mean_average_precision_at_r(b.embeddings, b.labels, distance=distance),
                                  rel=1e-9)


# ------------------------------------------------------------------ autocast


@pytest.mark.parametrize("distance", ("euclidean", "cosine"))
@pytest.mark.parametrize("mining", LOSSES)
def test_autocast_reaches_neither_the_loss_nor_its_products(device, mining, distance):
    """Under autocast on the device (float16, as mixed-precision training
    runs), float32 embeddings give what they give without it, bit for bit,
    and float16 ones a float32 loss, that of the embeddings cast to float32
    (as torch's triplet_margin_loss, which autocast runs in float32); the
    metrics rank as without it."""
    g = torch.Generator().manual_seed(7)
    labels = torch.randint(0, 6, (256,), generator=g).to(device)
    x = torch.randn(256, 64, generator=g).to(device)
    for emb in (x, x.half()):
        want = function_loss(mining, labels, a := leaf(emb.float()), 0.5, distance)
        with torch.autocast(device.type, dtype=torch.float16):
            got = function_loss(mining, labels, b := leaf(emb), 0.5, distance)
        assert got.dtype == torch.float32 and torch.equal(got, want), emb.dtype
        assert_close(grad_of(got, b)[0], grad_of(want, a)[0].to(emb.dtype), f"{emb.dtype} grad",
                     rtol=0, atol=0)
    want = (recall_at_k(x, labels, (1, 5), distance=distance),
            mean_average_precision_at_r(x, labels, distance=distance))
    with torch.autocast(device.type, dtype=torch.float16):
        got = (recall_at_k(x, labels, (1, 5), distance=distance),
               mean_average_precision_at_r(x, labels, distance=distance))
    assert got == want

"""online_triplet_loss.sentence_transformers against sentence-transformers' own losses.

Values and gradients are compared with ST's losses on P×K batches (every anchor
has a positive and a negative), where the two must agree; elsewhere our values
are checked against the float64 references and ST's against the formulas the
module documents. A tiny BERT with a word-level tokenizer, built here and never
downloaded, trains through ``SentenceTransformerTrainer`` and ``model.fit``.
"""

from __future__ import annotations

import doctest
import functools
import importlib
import importlib.util
import math
import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import reference
from helpers import save_tiny_bert

HAVE_ST = importlib.util.find_spec("sentence_transformers") is not None
needs_st = pytest.mark.skipif(
    not HAVE_ST,
    reason="sentence-transformers is not installed "
    "(pip install 'online_triplet_loss[sentence-transformers]'); CI installs it",
)

LOSS_NAMES = (
    "BatchAllTripletLoss",
    "BatchHardTripletLoss",
    "BatchSemiHardTripletLoss",
    "BatchHardSoftMarginTripletLoss",
)
METRIC_NAMES = ("euclidean", "eucledian_alias", "squared", "cosine")
# (P classes, K samples per class, embedding dim, seed)
PK_BATCHES = ((2, 2, 3, 0), (3, 4, 8, 1), (5, 3, 16, 2), (8, 8, 32, 3))


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120)


def test_import_is_lazy_and_names_the_extra_without_sentence_transformers():
    proc = _run_python("""
        import sys
        import online_triplet_loss
        from online_triplet_loss import losses, memory, samplers, metrics, distributed
        loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'sentence_transformers')
        assert not loaded, loaded
        sys.modules['sentence_transformers'] = None   # as if not installed
        try:
            import online_triplet_loss.sentence_transformers
        except ImportError as err:
            print('ImportError:', err)
        else:
            raise SystemExit('imported without sentence-transformers')
    """)
    assert proc.returncode == 0, proc.stderr
    assert "online_triplet_loss[sentence-transformers]" in proc.stdout


# ---------------------------------------------------------------------------
# Fixtures and helpers that need sentence-transformers


@pytest.fixture(scope="module")
def st():
    """ST's loss module, with the Hub switched off before anything loads it."""
    if not HAVE_ST:
        pytest.skip("sentence-transformers is not installed")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    from sentence_transformers.sentence_transformer import losses

    return losses


@pytest.fixture(scope="module")
def ours():
    if not HAVE_ST:
        pytest.skip("sentence-transformers is not installed")
    import online_triplet_loss.sentence_transformers as module

    return module


def _metric(st, name):
    functions = st.BatchHardTripletLossDistanceFunction
    return {
        "euclidean": functions.euclidean_distance,
        "eucledian_alias": functions.eucledian_distance,
        "squared": functools.partial(functions.euclidean_distance, squared=True),
        "cosine": functions.cosine_distance,
    }[name]


def _our_distance(metric_name):
    return {"eucledian_alias": "euclidean"}.get(metric_name, metric_name)


def _pair(st, ours, loss_name, metric_name, margin=None, model=None):
    """(ST's loss, ours) with the same arguments; ``margin=None`` keeps the default."""
    kwargs = {"distance_metric": _metric(st, metric_name)}
    if margin is not None and loss_name != "BatchHardSoftMarginTripletLoss":
        kwargs["margin"] = margin
    return getattr(st, loss_name)(model, **kwargs), getattr(ours, loss_name)(model, **kwargs)


def _pk_batch(p, k, dim, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(p).repeat_interleave(k)
    labels = labels[torch.randperm(p * k, generator=g)] * 7 - 3   # shuffled, non-contiguous ids
    centres = torch.randn(p, dim, generator=g, dtype=torch.float64) * 2
    emb = centres[(labels + 3) // 7] + torch.randn(p * k, dim, generator=g, dtype=torch.float64)
    return labels, emb.to(dtype)


def _value_and_grad(loss, labels, emb):
    x = emb.detach().clone().requires_grad_(True)
    value = loss.compute_loss_from_embeddings([x], labels)
    value.backward()
    return value.detach(), x.grad


# ---------------------------------------------------------------------------
# Equal to ST on P×K batches


# Margins: ST's default (None) and two others; the soft margin has none.
LOSS_MARGINS = [(name, margin) for name in LOSS_NAMES for margin in (None, 0.0, 0.3)
                if margin is None or name != "BatchHardSoftMarginTripletLoss"]


@needs_st
@pytest.mark.parametrize("loss_name, margin", LOSS_MARGINS)
@pytest.mark.parametrize("metric_name", METRIC_NAMES)
@pytest.mark.parametrize("batch", PK_BATCHES, ids=lambda b: "P{}xK{}-D{}".format(*b[:3]))
def test_equals_st_on_pk_batches(st, ours, loss_name, margin, metric_name, batch):
    st_loss, our_loss = _pair(st, ours, loss_name, metric_name, margin)
    labels, emb = _pk_batch(*batch)
    st_value, st_grad = _value_and_grad(st_loss, labels, emb)
    our_value, our_grad = _value_and_grad(our_loss, labels, emb)
    assert our_value.dtype == torch.float64
    torch.testing.assert_close(our_value, st_value, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(our_grad, st_grad, rtol=1e-7, atol=1e-10)


@needs_st
@pytest.mark.parametrize("loss_name", LOSS_NAMES)
@pytest.mark.parametrize("metric_name", ["euclidean", "squared", "cosine"])
def test_equals_st_in_float32(st, ours, loss_name, metric_name):
    st_loss, our_loss = _pair(st, ours, loss_name, metric_name, margin=1.0)
    labels, emb = _pk_batch(6, 4, 16, seed=11, dtype=torch.float32)
    st_value, st_grad = _value_and_grad(st_loss, labels, emb)
    our_value, our_grad = _value_and_grad(our_loss, labels, emb)
    assert our_value.dtype == torch.float32
    torch.testing.assert_close(our_value, st_value, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(our_grad, st_grad, rtol=1e-4, atol=1e-5)


@needs_st
@pytest.mark.parametrize("loss_name", LOSS_NAMES)
@pytest.mark.parametrize("metric_name", ["euclidean", "squared", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_embeddings_give_a_float32_loss(st, ours, loss_name, metric_name, dtype):
    # Squared distances of float16 embeddings at scale 40 pass float16's
    # 65504: the loss came back in float16, infinite. ST's Euclidean
    # distances cast to float32 first, and so does the adapter, for every distance.
    st_loss, our_loss = _pair(st, ours, loss_name, metric_name, margin=1.0)
    labels, emb = _pk_batch(6, 4, 64, seed=12, dtype=torch.float32)
    emb = (emb * 40).to(dtype)
    our_value, our_grad = _value_and_grad(our_loss, labels, emb)
    assert our_value.dtype == torch.float32 and our_grad.dtype == dtype
    assert torch.isfinite(our_value) and torch.isfinite(our_grad).all()
    # The loss of the same values in float32, rounded to the embeddings' dtype in backward.
    want_value, want_grad = _value_and_grad(our_loss, labels, emb.float())
    torch.testing.assert_close(our_value, want_value, rtol=0, atol=0)
    torch.testing.assert_close(our_grad, want_grad.to(dtype), rtol=0, atol=0)
    if metric_name != "cosine":  # ST's cosine distance stays in the embeddings' dtype
        st_value, st_grad = _value_and_grad(st_loss, labels, emb)
        assert st_value.dtype == torch.float32
        torch.testing.assert_close(our_value, st_value, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(our_grad.float(), st_grad.float(), rtol=1e-2, atol=1e-2)


@needs_st
@pytest.mark.parametrize("loss_name", LOSS_NAMES)
@pytest.mark.parametrize("metric_name", ["euclidean", "squared", "cosine"])
def test_under_autocast_the_loss_is_float32(st, ours, loss_name, metric_name):
    # As the README says: the float32 loss of the embeddings, which ST 6.2's
    # Euclidean distances compute too; its cosine products run in bfloat16.
    st_loss, our_loss = _pair(st, ours, loss_name, metric_name, margin=1.0)
    labels, emb = _pk_batch(6, 4, 16, seed=13, dtype=torch.float32)
    want, want_grad = _value_and_grad(our_loss, labels, emb)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, grad = _value_and_grad(our_loss, labels, emb)
        st_value, _ = _value_and_grad(st_loss, labels, emb)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(grad, want_grad, rtol=0, atol=0)
    if metric_name != "cosine":
        torch.testing.assert_close(got, st_value.float(), rtol=1e-5, atol=1e-5)


class _Linear(torch.nn.Module):
    """A model whose ``sentence_embedding`` is a linear map of the input, so the
    loss's own ``forward(sentence_features, labels)`` runs."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.proj = torch.nn.Linear(6, 5).double()

    def forward(self, features):
        return {"sentence_embedding": self.proj(features["x"])}


@needs_st
@pytest.mark.parametrize("loss_name", LOSS_NAMES)
def test_forward_through_model_equals_st(st, ours, loss_name):
    g = torch.Generator().manual_seed(5)
    features = [{"x": torch.randn(12, 6, generator=g, dtype=torch.float64)}]
    labels = torch.tensor([0, 1, 2] * 4)
    results = []
    for impl in (st, ours):
        model = _Linear(seed=3)
        loss = getattr(impl, loss_name)(model)
        value = loss(features, labels)
        value.backward()
        results.append((value.detach(), model.proj.weight.grad, model.proj.bias.grad))
    for mine, theirs in zip(results[1], results[0]):
        torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-12)


@needs_st
@pytest.mark.parametrize("loss_name", LOSS_NAMES)
def test_attributes_set_after_construction_act_as_on_st(st, ours, loss_name):
    """``distance_metric`` and ``sentence_embedder`` set on a built loss, as
    on ST's: the next call uses them, and the config says what is used."""
    g = torch.Generator().manual_seed(8)
    features = [{"x": torch.randn(12, 6, generator=g, dtype=torch.float64)}]
    labels = torch.tensor([0, 1, 2] * 4)
    values = []
    for impl in (st, ours):
        loss = getattr(impl, loss_name)(_Linear(seed=3))
        loss.distance_metric = _metric(st, "cosine")
        replacement = _Linear(seed=4)
        loss.sentence_embedder = replacement
        assert loss.sentence_embedder is replacement
        assert [p for p in loss.parameters()] == [p for p in replacement.parameters()]
        assert loss.get_config_dict()["distance_metric"] == "cosine_distance"
        values.append(loss(features, labels).detach())
    torch.testing.assert_close(values[1], values[0], rtol=1e-9, atol=1e-12)
    loss = getattr(ours, loss_name)(_Linear(seed=3))
    # A module is an attribute nn.Module stores without asking the property.
    for bad in (lambda x: x, torch.nn.PairwiseDistance()):
        with pytest.raises(ValueError, match="^distance_metric: expected"):
            loss.distance_metric = bad
        with pytest.raises(ValueError, match="^distance_metric: expected"):
            getattr(ours, loss_name)(_Linear(seed=3), distance_metric=bad)
    assert loss.get_config_dict()["distance_metric"] == "euclidean_distance"
    assert [name for name, _ in loss.named_children()] == ["model"]


# ---------------------------------------------------------------------------
# Where ST differs: our definitions, and ST's values as documented


def _nearest_negative(labels, emb, distance):
    d = reference.distance_matrix(emb, emb, distance)
    other = labels[:, None] != labels[None, :]
    return torch.where(other, d, torch.full_like(d, math.inf)).min(1).values


@needs_st
@pytest.mark.parametrize("metric_name", ["euclidean", "squared", "cosine"])
def test_anchors_without_positive(st, ours, metric_name):
    distance = _our_distance(metric_name)
    labels, emb = _pk_batch(3, 3, 6, seed=21)
    labels = torch.cat([labels, torch.tensor([100, 101])])             # two singletons
    emb = torch.cat([emb, torch.randn(2, 6, generator=torch.Generator().manual_seed(1),
                                      dtype=torch.float64)])
    singles = labels >= 100
    m = 1.0
    gap = _nearest_negative(labels, emb, distance)[singles]
    n_anchors, n_all = int((~singles).sum()), labels.numel()
    for name, mining, soft, extra in [
        ("BatchAllTripletLoss", "all", False, None),
        ("BatchSemiHardTripletLoss", "semihard", False, None),
        ("BatchHardTripletLoss", "hard", False, torch.relu(m - gap)),
        ("BatchHardSoftMarginTripletLoss", "hard", True, F.softplus(-gap)),
    ]:
        margin = 0.0 if soft else m
        st_loss, our_loss = _pair(st, ours, name, metric_name, margin=margin)
        ref = reference.reference_terms(mining, labels, emb, margin, distance, soft=soft).loss
        ours_value = our_loss.compute_loss_from_embeddings([emb], labels)
        torch.testing.assert_close(ours_value, ref, rtol=1e-9, atol=1e-12)
        st_value = st_loss.compute_loss_from_embeddings([emb], labels)
        # ST also averages in the singletons: relu(m - min_n d_an), softplus(-min_n d_an).
        st_expected = ref if extra is None else (ref * n_anchors + extra.sum()) / n_all
        torch.testing.assert_close(st_value, st_expected, rtol=1e-9, atol=1e-12)
        if extra is not None:
            assert abs(float(st_value) - float(ours_value)) > 1e-3


@needs_st
@pytest.mark.parametrize("metric_name", ["euclidean", "squared", "cosine"])
def test_one_class(st, ours, metric_name):
    distance = _our_distance(metric_name)
    labels = torch.full((6,), 4)
    emb = torch.randn(6, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    m = 0.7
    d = reference.distance_matrix(emb, emb, distance)
    mean_positive = d[~torch.eye(6, dtype=torch.bool)].mean()
    st_expected = {
        "BatchAllTripletLoss": 0.0,
        "BatchHardTripletLoss": m,
        "BatchHardSoftMarginTripletLoss": math.log(2.0),
        "BatchSemiHardTripletLoss": float(mean_positive + m),
    }
    for name, expected in st_expected.items():
        st_loss, our_loss = _pair(st, ours, name, metric_name, margin=m)
        value, grad = _value_and_grad(our_loss, labels, emb)
        assert float(value) == 0.0
        assert torch.equal(grad, torch.zeros_like(emb))
        st_value = st_loss.compute_loss_from_embeddings([emb], labels)
        assert float(st_value) == pytest.approx(expected, rel=1e-9, abs=1e-9), name


@needs_st
@pytest.mark.parametrize("metric_name", ["euclidean", "squared", "cosine"])
def test_no_positive_pair(st, ours, metric_name):
    distance = _our_distance(metric_name)
    labels = torch.arange(7)
    emb = torch.randn(7, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    m = 2.0
    gap = _nearest_negative(labels, emb, distance)
    st_expected = {
        "BatchAllTripletLoss": 0.0,
        "BatchSemiHardTripletLoss": 0.0,
        "BatchHardTripletLoss": float(torch.relu(m - gap).mean()),
        "BatchHardSoftMarginTripletLoss": float(F.softplus(-gap).mean()),
    }
    for name, expected in st_expected.items():
        st_loss, our_loss = _pair(st, ours, name, metric_name, margin=m)
        value, grad = _value_and_grad(our_loss, labels, emb)
        assert float(value) == 0.0
        assert torch.equal(grad, torch.zeros_like(emb))
        st_value = st_loss.compute_loss_from_embeddings([emb], labels)
        assert float(st_value) == pytest.approx(expected, rel=1e-9, abs=1e-12), name


@needs_st
def test_soft_margin_large_gap_in_float32(st, ours):
    """Hardest positive 300 away, hardest negative 1 away: the soft margin is
    about 299 per anchor. Ours stays finite and equal to the float64 reference
    (ST < 6.2 computed log1p(exp(x)), which is inf in float32 beyond x = 88.7)."""
    emb = torch.tensor([[0.0, 0.0], [300.0, 0.0], [1.0, 0.0], [301.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])
    st_loss, our_loss = _pair(st, ours, "BatchHardSoftMarginTripletLoss", "euclidean")
    value, grad = _value_and_grad(our_loss, labels, emb)
    ref = reference.reference_terms("hard", labels, emb.double(), 0.0, "euclidean", soft=True).loss
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    assert float(value) == pytest.approx(float(ref), rel=1e-6)
    st_value = st_loss.compute_loss_from_embeddings([emb], labels)
    if torch.isfinite(st_value):   # ST >= 6.2 uses softplus
        assert float(st_value) == pytest.approx(float(value), rel=1e-6)


# ---------------------------------------------------------------------------
# Arguments and ST's loss interface


@needs_st
@pytest.mark.parametrize("loss_name", LOSS_NAMES)
def test_rejects_other_distance_metrics(st, ours, loss_name):
    functions = st.BatchHardTripletLossDistanceFunction
    bad = [
        lambda x: torch.cdist(x, x),
        torch.cdist,
        functools.partial(functions.euclidean_distance, squared="yes"),
        functools.partial(functions.euclidean_distance, True),
        functools.partial(functions.cosine_distance),
        "cosine",
    ]
    for metric in bad:
        with pytest.raises(ValueError, match="distance_metric") as info:
            getattr(ours, loss_name)(None, distance_metric=metric)
        message = str(info.value)
        assert "euclidean_distance" in message and "cosine_distance" in message
        assert "squared=True" in message


@needs_st
def test_public_names_are_documented_and_examples_run(ours):
    for name in ours.__all__:
        assert getattr(ours, name).__doc__.strip(), name
    # As `python -m doctest` runs them: with the module's own names only.
    result = doctest.testmod(ours)
    assert result.attempted >= 12 and result.failed == 0, result


@needs_st
@pytest.mark.parametrize("loss_name", ["BatchAllTripletLoss", "BatchHardTripletLoss",
                                       "BatchSemiHardTripletLoss"])
@pytest.mark.parametrize("margin", [-0.5, math.nan, "1"])
def test_rejects_bad_margin(ours, loss_name, margin):
    with pytest.raises(ValueError, match="margin"):
        getattr(ours, loss_name)(None, margin=margin)


@needs_st
@pytest.mark.parametrize("loss_name", LOSS_NAMES)
def test_rejects_embeddings_that_are_not_tensors(ours, loss_name):
    loss = getattr(ours, loss_name)(None)
    with pytest.raises(ValueError, match="embeddings: must be a torch.Tensor, got list"):
        loss.compute_loss_from_embeddings([[[0.0, 1.0]] * 4], torch.tensor([0, 0, 1, 1]))


@needs_st
def test_rejects_label_count_mismatch(ours):
    loss = ours.BatchAllTripletLoss(None)
    with pytest.raises(ValueError, match="labels"):
        loss.compute_loss_from_embeddings([torch.randn(4, 3)], torch.arange(5))


@needs_st
@pytest.mark.parametrize("loss_name", LOSS_NAMES)
@pytest.mark.parametrize("labels", [[0, 0, 1, 1], (0, 0, 1, 1)], ids=["list", "tuple"])
def test_rejects_labels_that_are_not_tensors(ours, loss_name, labels):
    loss = getattr(ours, loss_name)(None)
    with pytest.raises(ValueError, match=f"labels: must be a torch.Tensor, got {type(labels).__name__}"):
        loss.compute_loss_from_embeddings([torch.randn(4, 3)], labels)


@needs_st
@pytest.mark.parametrize("loss_name", LOSS_NAMES)
@pytest.mark.parametrize("metric_name", METRIC_NAMES)
def test_interface_matches_st(st, ours, loss_name, metric_name):
    model = _Linear(seed=0)
    st_loss, our_loss = _pair(st, ours, loss_name, metric_name, model=model)
    assert our_loss.get_config_dict() == st_loss.get_config_dict()
    assert our_loss.model is model and our_loss.sentence_embedder is model
    assert "@" in our_loss.citation
    assert isinstance(our_loss, torch.nn.Module)
    # The model is the child `model`, which ST's trainer replaces (ST's
    # triplet losses name it `sentence_embedder`, which it does not).
    assert set(dict(our_loss.named_parameters())) == {"model." + n for n, _ in model.named_parameters()}
    # ST's attributes and methods (its hooks, its static masks).
    for name in ("triplet_margin", "margin"):
        assert getattr(our_loss, name, None) == getattr(st_loss, name, None), name
    public = {n for n in dir(st_loss) if not n.startswith("_") and not hasattr(torch.nn.Module, n)}
    assert public <= set(dir(our_loss)), public - set(dir(our_loss))
    if loss_name == "BatchHardSoftMarginTripletLoss":
        assert isinstance(our_loss, ours.BatchHardTripletLoss)


_HOOKS = {
    "BatchAllTripletLoss": "batch_all_triplet_loss",
    "BatchHardTripletLoss": "batch_hard_triplet_loss",
    "BatchHardSoftMarginTripletLoss": "batch_hard_triplet_soft_margin_loss",
    "BatchSemiHardTripletLoss": "batch_semi_hard_triplet_loss",
}


@pytest.mark.parametrize("loss_name", LOSS_NAMES)
def test_a_subclass_that_overrides_st_s_method_changes_the_loss(st, ours, loss_name):
    # ST's compute_loss_from_embeddings goes through the loss's method, a hook
    # subclasses override; so does ours, with ST's values.
    hook = _HOOKS[loss_name]
    labels, emb = _pk_batch(3, 3, 4, seed=1)
    values = []
    for impl in (st, ours):
        tenfold = type("Tenfold", (getattr(impl, loss_name),),
                       {hook: lambda self, l, e, _h=hook, _c=getattr(impl, loss_name): 10 * getattr(_c, _h)(self, l, e)})
        plain, scaled = getattr(impl, loss_name)(None), tenfold(None)
        direct = getattr(plain, hook)(labels, emb)
        torch.testing.assert_close(plain.compute_loss_from_embeddings([emb], labels), direct)
        torch.testing.assert_close(scaled.compute_loss_from_embeddings([emb], labels), 10 * direct)
        values.append(direct)
    torch.testing.assert_close(values[1], values[0], rtol=1e-9, atol=1e-12)


def test_the_soft_margin_ignores_triplet_margin_as_st_does(st, ours):
    labels, emb = _pk_batch(3, 3, 4, seed=2)
    values = []
    for impl in (st, ours):
        loss = impl.BatchHardSoftMarginTripletLoss(None)
        before = loss.compute_loss_from_embeddings([emb], labels)
        loss.triplet_margin = 2.0
        torch.testing.assert_close(loss.compute_loss_from_embeddings([emb], labels), before)
        # Its batch-hard method, inherited, is batch-hard with that margin.
        values.append((before, loss.batch_hard_triplet_loss(labels, emb)))
    for got, want in zip(values[1], values[0]):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------
# Training a tiny offline model


WORDS = [f"w{i}" for i in range(40)]
N_CLASSES, PER_CLASS = 4, 16


@pytest.fixture(scope="module")
def tiny_model_dir(st, tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), WORDS)


def _tiny_model(model_dir):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    transformer = Transformer(model_dir)
    return SentenceTransformer(modules=[transformer, Pooling(32)], device="cpu")


@pytest.fixture(scope="module")
def sentences():
    """Each class draws its words from its own tenth of the vocabulary."""
    rnd = random.Random(0)
    texts, labels = [], []
    for c in range(N_CLASSES):
        pool = WORDS[c * 10:(c + 1) * 10]
        for _ in range(PER_CLASS):
            texts.append(" ".join(rnd.choice(pool) for _ in range(6)))
            labels.append(c)
    return texts, labels


def _full_batch_loss(model, loss, sentences):
    texts, labels = sentences
    with torch.no_grad():
        emb = model.encode(texts, convert_to_tensor=True, show_progress_bar=False)
        return float(loss.compute_loss_from_embeddings([emb], torch.tensor(labels)))


def _train(model, loss, sentences, tmp_path, steps):
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    texts, labels = sentences
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=16, max_steps=steps,
        learning_rate=2e-3, warmup_steps=0, logging_steps=1, report_to="none",
        save_strategy="no", batch_sampler="group_by_label", seed=0, use_cpu=True,
        disable_tqdm=True, dataloader_drop_last=True,
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=Dataset.from_dict({"sentence": texts, "label": labels}),
        loss=loss,
    )
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@needs_st
@pytest.mark.parametrize("loss_name", LOSS_NAMES)
def test_trainer_same_first_step_as_st_and_loss_falls(st, ours, tiny_model_dir, sentences,
                                                      tmp_path, loss_name):
    margin = {} if loss_name == "BatchHardSoftMarginTripletLoss" else {"margin": 1.0}
    st_model = _tiny_model(tiny_model_dir)
    st_losses = _train(st_model, getattr(st, loss_name)(st_model, **margin), sentences,
                       tmp_path / "st", steps=1)

    model = _tiny_model(tiny_model_dir)
    loss = getattr(ours, loss_name)(model, **margin)
    before = _full_batch_loss(model, loss, sentences)
    our_losses = _train(model, loss, sentences, tmp_path / "ours", steps=8)
    after = _full_batch_loss(model, loss, sentences)

    assert our_losses[0] == pytest.approx(st_losses[0], rel=1e-5)
    assert len(our_losses) == 8 and all(math.isfinite(v) for v in our_losses)
    assert after < 0.8 * before, (before, after, our_losses)
    card = model.model_card_data
    assert f"loss:{loss_name}" in card.tags


@needs_st
def test_model_card_names_our_loss(ours, tiny_model_dir, sentences, tmp_path):
    model = _tiny_model(tiny_model_dir)
    _train(model, ours.BatchSemiHardTripletLoss(model, margin=0.5), sentences, tmp_path, steps=1)
    model.save(str(tmp_path / "saved"))
    card = (tmp_path / "saved" / "README.md").read_text()
    assert "online_triplet_loss.sentence_transformers.BatchSemiHardTripletLoss" in card
    assert '"margin": 0.5' in card and '"distance_metric": "euclidean_distance"' in card
    assert "schroff2015facenet" in card


class _Wrapper(torch.nn.Module):
    """Stands in for the trainer's DDP or compile wrapper of the model."""

    def __init__(self, model):
        super().__init__()
        self.module = model
        self.calls = 0

    def forward(self, features):
        self.calls += 1
        return self.module(features)


@needs_st
@pytest.mark.parametrize("loss_name", LOSS_NAMES)
def test_the_trainer_puts_its_wrapped_model_in_the_loss(st, ours, tiny_model_dir, sentences,
                                                        loss_name):
    # ST's trainer replaces a loss's child named `model` by its wrapped model
    # (override_model_in_loss, for DDP and model_init); the loss must then
    # embed with the wrapper, or DDP would not synchronise its gradients.
    from sentence_transformers import SentenceTransformerTrainer

    model = _tiny_model(tiny_model_dir)
    loss = getattr(ours, loss_name)(model)
    wrapped = _Wrapper(model)
    trainer = object.__new__(SentenceTransformerTrainer)
    assert trainer.override_model_in_loss(loss, wrapped) is loss
    assert loss.model is wrapped and loss.sentence_embedder is wrapped
    texts, labels = sentences
    features = model.tokenize(texts[:8])
    loss([features], torch.tensor(labels[:8]))
    assert wrapped.calls == 1


@needs_st
@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true")
def test_old_fit_trains(ours, tiny_model_dir, sentences):
    from sentence_transformers import InputExample
    from torch.utils.data import DataLoader

    texts, labels = sentences
    model = _tiny_model(tiny_model_dir)
    loss = ours.BatchHardTripletLoss(model, margin=1.0)
    before = _full_batch_loss(model, loss, sentences)
    examples = [InputExample(texts=[t], label=y) for t, y in zip(texts, labels)]
    loader = DataLoader(examples, batch_size=16, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    model.fit(train_objectives=[(loader, loss)], epochs=2, warmup_steps=0,
              optimizer_params={"lr": 2e-3}, show_progress_bar=False)
    after = _full_batch_loss(model, loss, sentences)
    assert after < 0.8 * before, (before, after)



@needs_st
@pytest.mark.parametrize("mining", ["all", "hard", "semihard"])
def test_benchmark_st_cell_agrees_with_ours(mining):
    """benchmarks/run.py's ``st`` step gives our loss on a P×K batch."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("benchmark_run", os.path.join(root, "benchmarks", "run.py"))
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    labels, emb = _pk_batch(8, 8, 16, seed=4, dtype=torch.float32)
    values = [run._build_step({"impl": impl, "mining": mining, "margin": 0.2}, torch)(labels, emb)
              for impl in ("st", "ours")]
    torch.testing.assert_close(values[0], values[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_name", ["BatchAllTripletLoss", "BatchHardTripletLoss",
                                       "BatchSemiHardTripletLoss"])
def test_a_learned_margin_stays_the_same_cpu_parameter_when_the_loss_moves(ours, loss_name):
    """ST's trainer moves the loss to the model's device (``loss.to(device)``):
    a learned margin stays on the CPU, where the core reads it, as the same
    parameter the optimiser holds; dtype casts apply to it."""
    margin = torch.nn.Parameter(torch.tensor(0.5))
    loss = getattr(ours, loss_name)(torch.nn.Identity(), margin=margin)
    optimiser = torch.optim.SGD(loss.parameters(), lr=0.1)
    loss.to(torch.float64)
    name = "margin" if loss_name == "BatchSemiHardTripletLoss" else "triplet_margin"  # as in ST
    assert getattr(loss, name) is margin and margin.dtype == torch.float64
    labels, emb = _pk_batch(3, 4, 8, 1)
    loss.compute_loss_from_embeddings([emb], labels).backward()
    optimiser.step()
    assert margin.grad is not None and margin.device.type == "cpu"


@pytest.mark.parametrize("loss_name", ["BatchAllTripletLoss", "BatchHardTripletLoss", "BatchSemiHardTripletLoss"])
def test_config_of_tensor_and_array_margins_is_json(ours, loss_name):
    """The model card writes ``get_config_dict()`` as JSON: a margin given as
    a tensor, a 0-d array or a learned parameter appears as its number (found
    by a review: the card showed ``tensor(0.5000)``)."""
    import json

    import numpy as np

    for margin in (np.array(0.5), np.float32(0.5), torch.tensor(0.5), torch.tensor(0.5, dtype=torch.float64),
                   torch.nn.Parameter(torch.tensor(0.5))):
        config = getattr(ours, loss_name)(None, margin=margin).get_config_dict()
        assert json.loads(json.dumps(config))["margin"] == 0.5, (margin, config)


def test_repr_of_a_learned_margin_on_meta(ours):
    """A loss moved to meta, whose learned margin has no value, has a
    one-line repr that says so."""
    loss = ours.BatchHardTripletLoss(None, margin=torch.nn.Parameter(torch.tensor(0.5))).to("meta")
    assert "margin='(learned, on meta)'" in repr(loss) and "\n" not in repr(loss)

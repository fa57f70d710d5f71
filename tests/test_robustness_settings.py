"""Settings checked for type and range, and capture by jit/export refused
(issue 11, items 11 and 12). Every refusal is a clear error naming the
argument and leaves grad mode as it was."""

from __future__ import annotations

import decimal
import fractions
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from helpers import LOSSES, function_loss, make_module
from online_triplet_loss import (
    BatchAllTripletLoss,
    BatchHardTripletLoss,
    BatchSemiHardTripletLoss,
    CrossBatchMemory,
    PKSampler,
    demo,
)
from online_triplet_loss.distributed import DistributedTripletLoss
from online_triplet_loss.metrics import mean_average_precision_at_r, recall_at_k

LABELS = torch.tensor([0, 0, 1, 1])
EMB = torch.randn(4, 3)
MODULES = (BatchAllTripletLoss, BatchHardTripletLoss, BatchSemiHardTripletLoss)


def refused(name, call, error=ValueError):
    """``call()`` raises ``error`` naming ``name``, under grad and no_grad,
    and grad mode is unchanged afterwards."""
    for grad_mode in (True, False):
        with torch.set_grad_enabled(grad_mode):
            with pytest.raises(error) as info:
                call()
            assert torch.is_grad_enabled() == grad_mode
        assert name in str(info.value), f"{info.value!r} does not name {name!r}"


NOT_FLAGS = ["no", "yes", "", 2, -1, 0.5, 1.0, None, [], torch.tensor(True)]


@pytest.mark.parametrize("bad", NOT_FLAGS, ids=repr)
def test_soft_must_be_a_bool(bad):
    refused("soft", lambda: BatchHardTripletLoss(soft=bad))
    refused("soft", lambda: function_loss("hard", LABELS, EMB, 0.2, "euclidean", soft=bad))


@pytest.mark.parametrize("mining", LOSSES)
@pytest.mark.parametrize("bad", [b for b in NOT_FLAGS if b is not None], ids=repr)
def test_squared_must_be_a_bool(mining, bad):
    fn = {"all": "batch_all_triplet_loss", "hard": "batch_hard_triplet_loss",
          "semihard": "batch_semihard_triplet_loss"}[mining]
    import online_triplet_loss as otl
    refused("squared", lambda: getattr(otl, fn)(LABELS, EMB, 0.2, bad))


@pytest.mark.parametrize("flag", [True, False, 1, 0, np.int64(1), np.True_, np.False_, np.array(True)], ids=repr)
def test_flags_accept_bools_and_0_1(flag):
    module = BatchHardTripletLoss(soft=flag)
    assert module.soft is bool(flag)
    assert torch.equal(module(EMB, LABELS),
                       function_loss("hard", LABELS, EMB, 1.0, "euclidean", soft=bool(flag)))


BAD_MARGINS = [
    10**400, -(10**400), float("inf"), float("nan"), -0.1, "0.2", None, True, False, 1j,
    decimal.Decimal("0.2"), [0.2], torch.tensor([0.1, 0.2]), torch.tensor(True),
    torch.tensor(0.2, device="meta"), torch.tensor(float("nan")), torch.tensor(-1.0),
]


@pytest.mark.parametrize("mining", LOSSES)
@pytest.mark.parametrize("bad", BAD_MARGINS, ids=lambda b: repr(b)[:30])
def test_margin_must_be_a_finite_non_negative_number(mining, bad):
    refused("margin", lambda: function_loss(mining, LABELS, EMB, bad, "euclidean"))
    refused("margin", lambda: make_module(mining, bad, "euclidean"))


@pytest.mark.parametrize("bad", [10**400, 10**5000], ids=["400 digits", "5001 digits"])
def test_margin_messages_stay_short(bad):
    # 5001 digits are past the limit of Python's int-to-str conversion.
    with pytest.raises(ValueError) as caught:
        function_loss("hard", LABELS, EMB, bad, "euclidean")
    assert str(caught.value).startswith("margin: ") and len(str(caught.value)) < 150


@pytest.mark.parametrize("module_class", [BatchAllTripletLoss, BatchHardTripletLoss, BatchSemiHardTripletLoss])
def test_learned_margin_repr_is_one_line_on_any_device(module_class):
    module = module_class(margin=nn.Parameter(torch.tensor(0.25)))
    assert "margin=0.25 (learned)" in repr(module) and "\n" not in repr(module)
    assert "margin=(learned, on meta)" in repr(module.to("meta"))
    frozen = module_class(margin=torch.nn.Parameter(torch.tensor(0.25), requires_grad=False))
    assert "margin=0.25 (frozen)" in repr(frozen)


@pytest.mark.parametrize("module_class", [BatchAllTripletLoss, BatchHardTripletLoss, BatchSemiHardTripletLoss])
def test_margin_tensors_that_are_not_parameters(module_class):
    """Found by review: a plain tensor requiring grad read as "(learned)" in
    the repr though it is no parameter of the module (not in parameters() or
    the state_dict), and a margin computed from a parameter was kept with a
    graph the first backward frees (the second call's backward failed in
    torch, deepcopy too). The repr now says so, and the latter is refused."""
    leaf = torch.tensor(0.25, requires_grad=True)
    module = module_class(margin=leaf)
    assert "margin=0.25 (requires grad, not a parameter of this module)" in repr(module)
    assert list(module.parameters()) == [] and "margin" not in module.state_dict()
    raw = nn.Parameter(torch.tensor(-1.0))
    with pytest.raises(ValueError, match=r"^margin: a tensor computed from others \(SoftplusBackward0\)"):
        module_class(margin=nn.functional.softplus(raw))


@pytest.mark.parametrize("mining", LOSSES)
@pytest.mark.parametrize("good", [0, 2, 0.5, np.float32(0.5), np.int64(2), fractions.Fraction(1, 2),
                                  10**20, torch.tensor(0.5), torch.tensor([2]), np.array(0.5),
                                  np.array(2, dtype=np.int32)], ids=repr)
def test_margins_that_are_numbers(mining, good):
    value = float(good.item() if hasattr(good, "item") else good)
    expected = function_loss(mining, LABELS, EMB, value, "euclidean")
    assert torch.equal(function_loss(mining, LABELS, EMB, good, "euclidean"), expected)


@pytest.mark.parametrize("bad", [1, True, "Euclidean", "cos", b"cosine", ["cosine"]], ids=repr)
def test_distance_must_be_a_known_name(bad):
    for module in MODULES:
        refused("distance", lambda: module(distance=bad))
    for mining in LOSSES:
        refused("distance", lambda: function_loss(mining, LABELS, EMB, 0.2, bad))


@pytest.mark.parametrize("bad", [2**63, 2**70, -(2**70), 0, -1, 1.0, True, "1", None],
                         ids=repr)
def test_integer_settings_name_themselves(bad):
    emb, labels = torch.randn(10, 2), torch.tensor([0, 1] * 5)
    refused("ks", lambda: recall_at_k(emb, labels, ks=(bad,)))
    refused("ks", lambda: recall_at_k(emb, labels, ks=(1, bad)))
    if bad is not None:
        refused("chunk_size", lambda: recall_at_k(emb, labels, chunk_size=bad))
        refused("chunk_size", lambda: mean_average_precision_at_r(emb, labels, chunk_size=bad))
        refused("memory_size", lambda: CrossBatchMemory(BatchHardTripletLoss(), memory_size=bad))
        refused("embedding_dim",
                lambda: CrossBatchMemory(BatchHardTripletLoss(), memory_size=4, embedding_dim=bad))
        refused("k", lambda: PKSampler([0, 0, 1, 1], p=2, k=bad))
        refused("world_size", lambda: PKSampler([0, 0, 1, 1], p=2, k=2, world_size=bad))
        refused("epoch", lambda: PKSampler([0, 0, 1, 1], p=2, k=2).set_epoch(
            -1 if bad == 0 else bad))


def test_large_but_valid_integers_work():
    emb, labels = torch.randn(10, 2), torch.tensor([0, 1] * 5)
    assert recall_at_k(emb, labels, ks=(2**63 - 1,)) == {2**63 - 1: 1.0}
    assert recall_at_k(emb, labels, chunk_size=2**63 - 1) == recall_at_k(emb, labels)
    assert len(list(PKSampler([0, 0, 1, 1], p=2, k=2, seed=2**70))) == 1


# ------------------------------------------------------------ jit and export


class _Model(nn.Module):
    def __init__(self, call):
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.call = call

    def forward(self, x, y):
        return self.call(self.linear(x), y)


def _callers():
    """Each loss as a function and as a module, alone and wrapped."""
    out = []
    for mining in LOSSES:
        out.append((f"{mining}-function",
                    lambda e, y, m=mining: function_loss(m, y, e, 0.2, "euclidean")))
        module = make_module(mining, 0.2, "euclidean")
        out.append((f"{mining}-module", module))
        out.append((f"{mining}-distributed", DistributedTripletLoss(module)))
        out.append((f"{mining}-memory", CrossBatchMemory(make_module(mining, 0.2, "cosine"),
                                                         memory_size=8)))
    # The metrics too: a traced metric would be a constant as well.
    out.append(("recall", lambda e, y: e.sum() * recall_at_k(e, y, ks=[1])[1]))
    out.append(("map", lambda e, y: e.sum() * mean_average_precision_at_r(e, y)))
    return out


CALLERS = _callers()


@pytest.mark.parametrize("name, call", CALLERS, ids=[n for n, _ in CALLERS])
def test_jit_trace_is_refused(name, call):
    model = _Model(call)
    x, y = torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings before the refusal
        refused("torch.jit.trace is not supported", lambda: torch.jit.trace(model, (x, y)),
                RuntimeError)


@pytest.mark.parametrize("name, call", CALLERS, ids=[n for n, _ in CALLERS])
def test_jit_script_is_refused(name, call):
    if isinstance(call, nn.Module):
        refused("torch.jit.script is not supported", lambda: torch.jit.script(call), RuntimeError)
        holder = nn.Sequential(nn.Linear(3, 3))
        holder.add_module("loss", call)
        refused("torch.jit.script is not supported", lambda: torch.jit.script(holder), RuntimeError)


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
@pytest.mark.parametrize("name, call", CALLERS, ids=[n for n, _ in CALLERS])
def test_export_is_refused(name, call, strict):
    # Non-strict export of CrossBatchMemory and of the metrics met the
    # tensor checks first: "must be a plain tensor, got a FakeTensor".
    model = _Model(call)
    x, y = torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        refused("torch.export",
                lambda: torch.export.export(model, (x, y), strict=strict), RuntimeError)


def test_eager_still_works_after_refusals():
    model = _Model(BatchHardTripletLoss(margin=0.2))
    x, y = torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError):
            torch.jit.trace(model, (x, y))
    model(x, y).backward()
    assert model.linear.weight.grad is not None


# ------------------------------------------------------------ the demo


@pytest.mark.parametrize("flag", ["--epochs", "--p", "--k", "--dim", "--threads"])
@pytest.mark.parametrize("value", ["x", "1.5", "", "0", "-3"])
def test_demo_integers_say_positive_integer(flag, value, capsys):
    with pytest.raises(SystemExit) as info:
        demo.parse_args([flag, value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: must be a positive integer" in err and "invalid" not in err


@pytest.mark.parametrize("flag, value, message", [
    ("--seed", "x", "must be an integer in [0, 2**32)"),
    ("--margin", "x", "must be a number, finite and >= 0"),
    ("--lr", "x", "must be a number, finite and > 0"),
])
def test_demo_other_numbers_say_what_they_need(flag, value, message, capsys):
    with pytest.raises(SystemExit):
        demo.parse_args([flag, value])
    err = capsys.readouterr().err
    assert message in err and "invalid" not in err


@pytest.mark.parametrize("argv, word", [(["--k", "1"], "positive"), (["--p", "1"], "negative")])
def test_demo_warns_when_no_triplet_can_form(argv, word):
    with pytest.warns(UserWarning, match=f"{argv[0]} 1: .*no anchor has a {word}"):
        demo.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        demo.parse_args(["--k", "2", "--p", "2"])


def test_demo_checks_out_before_training(tmp_path, monkeypatch):
    """An --out that cannot be written (a file in the way, a path under a
    file) fails at once, before any training step."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    trained = []
    monkeypatch.setattr(demo, "_run", lambda args: trained.append(args))
    for out in (blocker, blocker / "sub"):
        with pytest.raises(SystemExit, match=f"--out: cannot write the figure to {str(out)!r}"):
            demo.run(demo.parse_args(["--out", str(out)]))
    assert not trained
    demo.run(demo.parse_args(["--out", str(tmp_path / "new" / "dir")]))
    assert len(trained) == 1 and (tmp_path / "new" / "dir").is_dir()


@pytest.mark.parametrize("transform", ["vmap", "grad", "jacrev"])
@pytest.mark.parametrize("mining", LOSSES)
def test_torch_func_transforms_are_refused(mining, transform):
    """They reached the core with storage-less tensors (a native panic that
    left grad mode off)."""
    loss = lambda e: function_loss(mining, LABELS, e, 0.2, "euclidean")
    x = torch.randn(2, 4, 3) if transform == "vmap" else EMB.clone()
    refused("torch.func transforms", lambda: getattr(torch.func, transform)(loss)(x), RuntimeError)

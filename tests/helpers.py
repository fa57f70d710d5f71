"""Small helpers shared by the test modules."""

from __future__ import annotations

import math

import pytest
import torch

from online_triplet_loss import (
    BatchAllTripletLoss,
    BatchHardTripletLoss,
    BatchSemiHardTripletLoss,
    batch_all_triplet_loss,
    batch_hard_triplet_loss,
    batch_semihard_triplet_loss,
)

LOSSES = ("all", "hard", "semihard")
DISTANCES = ("euclidean", "squared", "cosine")
MARGINS = (0.0, 0.2, 1.0)


def configs():
    """(mining, distance, margin, soft) for every loss / distance / margin,
    soft on and off for batch-hard."""
    out = []
    for mining in LOSSES:
        for distance in DISTANCES:
            for margin in MARGINS:
                for soft in ((False, True) if mining == "hard" else (False,)):
                    out.append((mining, distance, margin, soft))
    return out


def config_id(cfg) -> str:
    mining, distance, margin, soft = cfg
    return f"{mining}-{distance}-m{margin}" + ("-soft" if soft else "")


def function_loss(mining, labels, embeddings, margin, distance, soft=False, **kw):
    """The public function's loss (batch-all: the first output)."""
    if mining == "all":
        assert not soft
        return batch_all_triplet_loss(labels, embeddings, margin, distance=distance, **kw)[0]
    if mining == "hard":
        return batch_hard_triplet_loss(labels, embeddings, margin, distance=distance, soft=soft, **kw)
    if mining == "semihard":
        assert not soft
        return batch_semihard_triplet_loss(labels, embeddings, margin, distance=distance, **kw)
    raise ValueError(mining)


def make_module(mining, margin, distance, soft=False):
    if mining == "all":
        return BatchAllTripletLoss(margin=margin, distance=distance)
    if mining == "hard":
        return BatchHardTripletLoss(margin=margin, distance=distance, soft=soft)
    if mining == "semihard":
        return BatchSemiHardTripletLoss(margin=margin, distance=distance)
    raise ValueError(mining)


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def grad_of(loss: torch.Tensor, *inputs: torch.Tensor):
    """Gradients of ``loss`` w.r.t. ``inputs`` (zeros where unused)."""
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


def assert_overflow_is_nan_else_right(got: float, want: float, dtype: torch.dtype, distance: str,
                                      rows: torch.Tensor, centre_rows: torch.Tensor, rel: float) -> None:
    """The documented overflow rule, with a factor of 4 either side of its
    threshold: distances are computed in float32 (or float64). Euclidean and
    squared ones come from rows centred on the references' mean, and the loss
    is NaN when 4·max‖row − mean‖² does not fit; the cosine distance is NaN
    when a row's norm does not fit (a factor of 2 either side there). Below
    that the loss is right (``want``, the float64 loss, rounded to
    ``dtype``); inputs that are not finite give NaN. ``rows`` and
    ``centre_rows`` hold the values as given, in float64."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    big = torch.finfo(compute).max
    if not torch.isfinite(rows).all():  # overflowed already in the dtype
        zone = "nan"
    elif distance == "cosine":
        reach = rows.norm(dim=1).max().item() if len(rows) else 0.0
        zone = "finite" if reach < big / 2 else "nan" if reach > 2 * big else "either"
    else:
        centred = rows - centre_rows.mean(0)
        reach = 4 * centred.pow(2).sum(1).max().item() if len(rows) else 0.0
        zone = "finite" if reach < big / 4 else "nan" if reach > 4 * big else "either"
    expected = torch.tensor(want, dtype=torch.float64).to(dtype).item()
    if zone == "nan":
        assert math.isnan(got), (got, want)
    elif zone == "finite":
        assert got == pytest.approx(expected, rel=rel), (got, expected)
    else:
        assert math.isnan(got) or got == pytest.approx(expected, rel=rel), (got, expected)


# The start of a child script that calls something long under repeated
# SIGINTs (the metrics' and the losses' Ctrl-C tests): `interrupted(call,
# raises)` returns (result or exception, seconds, number of signals).
SIGINT_CHILD = """
import os, signal, threading, time

class Stop(Exception):
    pass

def interrupted(call, raises):
    # SIGINT every 50 ms until the call returns (one late signal, on a
    # loaded machine, could otherwise come after it); the handler raises
    # `raises` at the first and counts the others.
    count, done = [0], threading.Event()
    def handler(*_):
        count[0] += 1
        if count[0] == 1 and raises is not None:
            raise raises("from the handler")
    def send():
        while not done.wait(0.05):
            os.kill(os.getpid(), signal.SIGINT)
    signal.signal(signal.SIGINT, handler)
    sender = threading.Thread(target=send)
    start = time.perf_counter()
    sender.start()
    try:
        result = call()
    except BaseException as err:
        result = err
    finally:
        done.set()
        sender.join()
        signal.signal(signal.SIGINT, signal.default_int_handler)
    return result, time.perf_counter() - start, count[0]
"""


def save_tiny_bert(path, words) -> str:
    """A randomly initialised one-layer BERT and a word-level tokenizer of
    ``words``, saved in ``path`` where sentence-transformers' ``Transformer``
    (or ``SentenceTransformer(path)``) loads them without the Hub."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: i for i, token in enumerate(specials + list(words))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=16,
    ).save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    BertModel(config).save_pretrained(path)
    return str(path)

"""The README's Python examples, run as they are written.

Each ``python`` block of README.md runs here after a prelude that supplies
what the text around it assumes (a model, a dataset, embeddings); what the
text says of its results is then checked against an independent computation.
A block this file does not know fails ``test_every_block_is_run``, so an
example added to the README is an example tested. Blocks that need
sentence-transformers skip, saying so, where it is not installed (CI installs
it); the one that names a model on the Hugging Face Hub loads a tiny BERT
built here instead, the only change made to its text.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import reference
from helpers import save_tiny_bert

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)

HAVE_ST = importlib.util.find_spec("sentence_transformers") is not None
needs_st = pytest.mark.skipif(
    not HAVE_ST,
    reason="sentence-transformers is not installed "
    "(pip install 'online_triplet_loss[sentence-transformers]'); CI installs it",
)

# One line that only its block has, for each block this file runs.
MARKERS = {
    "006": "model = nn.Embedding(10, 10)",
    "modules": "criterion = BatchHardTripletLoss(margin=0.0, soft=True",
    "kit": "sampler = PKSampler(dataset_labels",
    "ddp": "torchrun --nproc_per_node",
    "st_swap": "# from sentence_transformers.sentence_transformer.losses import",
    "st_train": "trainer = SentenceTransformerTrainer(",
}


def _block(name: str) -> str:
    found = [b for b in BLOCKS if MARKERS[name] in b]
    assert len(found) == 1, f"README: {len(found)} python blocks contain {MARKERS[name]!r}"
    return found[0]


def _run(name: str, namespace: dict) -> dict:
    exec(compile(_block(name), f"<README block {name}>", "exec"), namespace)
    return namespace


def test_every_block_is_run():
    assert len(BLOCKS) >= len(MARKERS)
    for block in BLOCKS:
        assert any(marker in block for marker in MARKERS.values()), (
            "a README python block no test runs:\n" + block)


def test_the_006_example():
    torch.manual_seed(0)
    ns = _run("006", {})
    labels, model = ns["labels"], ns["model"]
    want = reference.batch_all(labels, model(labels).double(), 100.0).loss
    torch.testing.assert_close(ns["loss"].double(), want, rtol=1e-5, atol=1e-4)
    assert model.weight.grad is not None and torch.isfinite(model.weight.grad).all()


def test_the_modules_and_functions_example():
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 4, (16,), generator=g)
    queries = torch.randn(16, 8, generator=g, dtype=torch.float64, requires_grad=True)
    gallery = torch.randn(24, 8, generator=g, dtype=torch.float64)
    gallery_labels = torch.randint(0, 4, (24,), generator=g)
    ns = _run("modules", {"labels": labels, "embeddings": queries.detach().clone(),
                          "queries": queries, "gallery": gallery,
                          "gallery_labels": gallery_labels})
    want = reference.batch_all(labels, queries.detach(), 0.2, ref_embeddings=gallery,
                               ref_labels=gallery_labels).loss
    torch.testing.assert_close(ns["loss"].detach(), want)
    ns["loss"].backward()
    assert queries.grad is not None and torch.isfinite(queries.grad).all()


def _rank1(queries, labels, cameras, gallery, gallery_labels, gallery_cameras):
    """Brute-force rank-1 in float64: the nearest gallery item, leaving out
    those of the query's label from its camera."""
    d = torch.cdist(queries.double(), gallery.double())
    junk = (labels[:, None] == gallery_labels[None]) & (cameras[:, None] == gallery_cameras[None])
    d = d.masked_fill(junk, float("inf"))
    has_match = ((labels[:, None] == gallery_labels[None]) & ~junk).any(1)
    hit = gallery_labels[d.argmin(1)] == labels
    return (hit & has_match).sum().item() / has_match.sum().item()


def test_the_training_and_evaluation_example():
    g = torch.Generator().manual_seed(2)
    classes, per_class, dim = 40, 6, 12
    dataset_labels = torch.arange(classes).repeat_interleave(per_class)
    centres = torch.randn(classes, dim, generator=g)
    images = centres[dataset_labels] + 0.5 * torch.randn(len(dataset_labels), dim, generator=g)
    dataset = torch.utils.data.TensorDataset(images, dataset_labels)
    model = torch.nn.Linear(dim, 8)

    def split(n, seed):
        gen = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, 10, (n,), generator=gen)
        return centres[labels, :8] + 0.3 * torch.randn(n, 8, generator=gen), labels

    test_embeddings, test_labels = split(60, 3)
    query_embeddings, query_labels = split(30, 4)
    gallery_embeddings, gallery_labels = split(90, 5)
    query_cameras = torch.randint(0, 3, (30,), generator=g)
    gallery_cameras = torch.randint(0, 3, (90,), generator=g)
    ns = _run("kit", {
        "dataset_labels": dataset_labels, "dataset": dataset, "model": model, "epochs": 2,
        "test_embeddings": test_embeddings, "test_labels": test_labels,
        "query_embeddings": query_embeddings, "query_labels": query_labels,
        "query_cameras": query_cameras, "gallery_embeddings": gallery_embeddings,
        "gallery_labels": gallery_labels, "gallery_cameras": gallery_cameras,
    })
    assert ns["loss"].requires_grad and torch.isfinite(ns["loss"])
    assert set(ns["recall"]) == {1, 5, 10}
    assert set(ns["cmc"]) == {1, 5}
    want = _rank1(query_embeddings, query_labels, query_cameras,
                  gallery_embeddings, gallery_labels, gallery_cameras)
    assert float(ns["cmc"][1]) == pytest.approx(want, abs=1e-12)
    assert 0.0 <= float(ns["map_r"]) <= 1.0 and 0.0 <= float(ns["m_ap"]) <= 1.0
    assert 0.0 < float(ns["m_inp"]) <= 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_distributed_example_on_one_gloo_rank():
    """As ``torchrun --nproc_per_node=1`` would start it, on the CPU, with a
    loader of one batch: the loss it leaves is that of the untrained net."""
    prelude = textwrap.dedent("""
        import copy
        import torch
        torch.manual_seed(0)
        net = torch.nn.Linear(6, 4)
        before = copy.deepcopy(net)
        batch = (torch.randn(12, 6), torch.arange(4).repeat_interleave(3))
        loader = [batch]
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    """)
    epilogue = textwrap.dedent("""
        from online_triplet_loss import batch_hard_triplet_loss
        want = batch_hard_triplet_loss(batch[1], before(batch[0]), 0.2)
        print(repr(float(loss)), repr(float(want)))
        assert not torch.equal(net.weight, before.weight), "no step was taken"
        dist.destroy_process_group()
    """)
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", prelude + _block("ddp") + epilogue],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got, want = map(float, proc.stdout.split()[-2:])
    assert want > 0 and got == pytest.approx(want, rel=1e-6)


@needs_st
def test_the_sentence_transformers_swap():
    """The swapped import gives a loss equal to the one it replaces."""
    from sentence_transformers.sentence_transformer import losses as st_losses

    ns = _run("st_swap", {})
    ours = ns["BatchAllTripletLoss"]
    assert ours.__module__ == "online_triplet_loss.sentence_transformers"
    g = torch.Generator().manual_seed(6)
    labels = torch.arange(4).repeat_interleave(3)
    emb = torch.randn(12, 5, generator=g, dtype=torch.float64)
    got = ours(None).compute_loss_from_embeddings([emb], labels)
    want = st_losses.BatchAllTripletLoss(None).compute_loss_from_embeddings([emb], labels)
    torch.testing.assert_close(got, want)


@needs_st
def test_the_sentence_transformers_training_example(tmp_path, monkeypatch):
    words = "He played a great game They won 2-1".split()
    tiny = save_tiny_bert(tmp_path / "tiny-bert", words)
    code = _block("st_train")
    hub_name = '"sentence-transformers/all-MiniLM-L6-v2"'
    assert hub_name in code
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("WANDB_DISABLED", "true")
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(code.replace(hub_name, repr(tiny)), "<README block st_train>", "exec"), ns)
    card = (tmp_path / "out" / "final" / "README.md").read_text()
    assert "online_triplet_loss.sentence_transformers.BatchSemiHardTripletLoss" in card
    assert '"margin": 0.5' in card
    assert ns["trainer"].state.global_step >= 1

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
from test_metrics import brute_force

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```(?:python|py)\n(.*?)```", README.read_text(), flags=re.S)

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
    """Both losses of the block, through the gradient they leave on the
    embedding table (nothing steps it): batch-hard's plus batch-all's, against
    the float64 references. Seed 1 draws labels [0, 0, 8, 0, 2], so that the
    anchors of class 0 have positives and both losses are positive."""
    torch.manual_seed(1)
    ns = _run("006", {})
    labels, model = ns["labels"], ns["model"]
    assert len(set(labels.tolist())) < len(labels), "no anchor would have a positive"
    table = model.weight.detach().double().requires_grad_(True)
    hard = reference.batch_hard(labels, table[labels], 100.0).loss
    every = reference.batch_all(labels, table[labels], 100.0).loss
    assert hard > 0 and every > 0
    torch.testing.assert_close(ns["loss"].double(), every.detach(), rtol=1e-5, atol=1e-4)
    (hard + every).backward()
    assert table.grad.abs().sum() > 0
    torch.testing.assert_close(model.weight.grad.double(), table.grad, rtol=1e-4, atol=1e-5)


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
    recall, _ = brute_force(test_embeddings, test_labels, (1, 5, 10))
    assert ns["recall"] == pytest.approx(recall, abs=1e-12)
    _, map_r = brute_force(test_embeddings, test_labels, (1,), "cosine")
    assert ns["map_r"] == pytest.approx(map_r, abs=1e-12)
    gallery = dict(references=(gallery_embeddings, gallery_labels),
                   cameras=(query_cameras, gallery_cameras))
    cmc, m_ap = brute_force(query_embeddings, query_labels, (1, 5), full=True, **gallery)
    _, m_inp = brute_force(query_embeddings, query_labels, (1,), penalty=True, **gallery)
    reid = ns["reid"]
    assert reid.recall == pytest.approx(cmc, abs=1e-12)
    assert reid.mean_average_precision == pytest.approx(m_ap, abs=1e-12)
    assert reid.mean_inverse_negative_penalty == pytest.approx(m_inp, abs=1e-12)
    assert m_ap != pytest.approx(m_inp, abs=1e-6), "mAP and mINP should differ here"
    # rank-1 once more, by hand, for the camera rule.
    want = _rank1(query_embeddings, query_labels, query_cameras,
                  gallery_embeddings, gallery_labels, gallery_cameras)
    assert reid.recall[1] == pytest.approx(want, abs=1e-12)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_distributed_example_on_two_gloo_ranks():
    """As ``torchrun --nproc_per_node=2`` would start it, on the CPU: each rank
    loads its half of one global batch of 12, and its loader has that one
    batch, so the loss it leaves is the global batch's under the untrained
    net, the same on both ranks."""
    prelude = textwrap.dedent("""
        import copy, os
        import torch
        torch.manual_seed(0)
        net = torch.nn.Linear(6, 4)
        before = copy.deepcopy(net)
        all_images, all_labels = torch.randn(12, 6), torch.arange(4).repeat(3)
        half = slice(0, 7) if os.environ["RANK"] == "0" else slice(7, 12)
        loader = [(all_images[half], all_labels[half])]
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    """)
    epilogue = textwrap.dedent("""
        from online_triplet_loss import batch_hard_triplet_loss
        want = batch_hard_triplet_loss(all_labels, before(all_images), 0.2)
        local = batch_hard_triplet_loss(labels, before(images), 0.2)  # this rank's half alone
        assert abs(float(local) - float(want)) > 1e-3, "the halves should not say the global loss"
        print(repr(float(loss)), repr(float(want)))
        assert not torch.equal(net.weight, before.weight), "no step was taken"
        # Both ranks tear gloo down together, as the other DDP tests do, and
        # leave as their multiprocessing workers do, with os._exit: the
        # interpreter's own exit ran libtorch's static destructors, which
        # aborted now and then ("terminate called without an active
        # exception", SIGABRT) after everything here had finished (once in
        # CI on torch 2.13, once on 2.14; the spawned tests never did).
        dist.barrier()
        dist.destroy_process_group()
        import sys
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    """)
    port = str(_free_port())
    procs = []
    for rank in ("0", "1"):
        env = dict(os.environ, RANK=rank, LOCAL_RANK=rank, WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, CUDA_VISIBLE_DEVICES="",
                   OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", prelude + _block("ddp") + epilogue],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outputs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
        got, want = map(float, out.split()[-2:])
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

"""Every public name is documented, and the examples in the docstrings run."""

import doctest
import importlib

import pytest

MODULES = [
    "online_triplet_loss.losses",
    "online_triplet_loss.metrics",
    "online_triplet_loss.samplers",
    "online_triplet_loss.memory",
    "online_triplet_loss.distributed",
]


@pytest.mark.parametrize("name", MODULES)
def test_public_names_have_docstrings(name):
    module = importlib.import_module(name)
    assert module.__all__, name
    for attr in module.__all__:
        doc = getattr(module, attr).__doc__
        assert doc and doc.strip(), f"{name}.{attr} has no docstring"


# distributed's docstrings hold no examples, which would need a process group;
# test_distributed.py runs the module under gloo.
@pytest.mark.parametrize("name", [m for m in MODULES if m != "online_triplet_loss.distributed"])
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    # As `python -m doctest` runs them: with the module's own names only.
    result = doctest.testmod(module)
    assert result.attempted > 0, f"{name} has no docstring examples"
    assert result.failed == 0, f"{result.failed} doctest failures in {name}"

"""tools/torch_build.py's patch of torch-sys for torch 2.14 and 2.15: how it
reaches cargo and maturin, and how the patched copy is made (on a stand-in
source, and on the released torch-sys 0.26.0 where cargo's registry holds it;
the patched copy is built by `make test TORCH=2.15.0` and CI's smoke run)."""

from __future__ import annotations

import importlib.util
import os
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("torch_build", ROOT / "tools" / "torch_build.py")
tb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tb)

PATCHED = Path("/t/torch-sys-0.26.0-patched")
OPTION = tb.patch_option(PATCHED)


def test_cargo_gets_the_patch_before_its_subcommand_and_after_a_toolchain():
    assert tb.with_patch(["cargo", "test", "-q"], PATCHED) == ["cargo", *OPTION, "test", "-q"]
    assert tb.with_patch(["/x/cargo", "+nightly", "doc"], PATCHED) == ["/x/cargo", "+nightly", *OPTION, "doc"]


def test_maturin_gets_it_after_build_and_develop_and_refuses_the_rest(monkeypatch):
    monkeypatch.setattr(tb, "torch_version", lambda: "2.15.0")
    assert tb.with_patch(["maturin", "develop", "--release"], PATCHED) == ["maturin", "develop", *OPTION, "--release"]
    assert tb.with_patch(["maturin", "build"], PATCHED) == ["maturin", "build", *OPTION]
    for argv in (["maturin", "sdist"], ["python", "-m", "maturin", "build"], ["make"], []):
        with pytest.raises(SystemExit, match="patched copy"):
            tb.with_patch(argv, PATCHED)


def test_without_a_patch_every_command_is_left_alone():
    for argv in (["cargo", "test"], ["maturin", "sdist"], ["python", "-c", "1"]):
        assert tb.with_patch(argv, None) == argv


@pytest.mark.parametrize("path", ['/a b/c"d', r"C:\target\torch-sys", "/plain"])
def test_the_option_is_toml_for_any_path(path):
    flag, value = tb.patch_option(Path(path))
    assert flag == "--config"
    assert tomllib.loads(value)["patch"]["crates-io"]["torch-sys"]["path"] == str(Path(path))


def test_the_backend_puts_the_option_first_among_maturins_build_arguments(monkeypatch):
    monkeypatch.setenv("MATURIN_PEP517_ARGS", "--features x -- -C opt-level=3")
    assert tb._with_patch(None, None) is None
    got = tb._with_patch(None, PATCHED)
    assert got == {"maturin.build-args": [*OPTION, "--features", "x", "--", "-C", "opt-level=3"]}
    # Settings that name build arguments win over the environment, as in maturin.
    got = tb._with_patch({"build-args": "--locked"}, PATCHED)
    assert got == {"build-args": [*OPTION, "--locked"]}


def _source(tmp_path: Path, text_of=lambda old: old) -> Path:
    source = tmp_path / "registry" / "torch-sys-0.26.0"
    (source / "libtch").mkdir(parents=True)
    files = {}
    for name, old, _ in tb.TORCH_SYS_PATCH:
        files[name] = files.get(name, "// start\n") + text_of(old) + "\n"
    for name, text in files.items():
        (source / name).write_text(text)
    (source / "Cargo.toml").write_text("[package]\n")
    return source


def _patched(monkeypatch, tmp_path, source):
    monkeypatch.setattr(tb, "torch_version", lambda: "2.15.0")
    monkeypatch.setattr(tb, "torch_sys_source", lambda env: source)
    return tb.patched_torch_sys({"CARGO_TARGET_DIR": str(tmp_path / "target")})


def test_the_copy_is_patched_once_and_then_left_alone(monkeypatch, tmp_path):
    source = _source(tmp_path)
    target = _patched(monkeypatch, tmp_path, source)
    for name, old, new in tb.TORCH_SYS_PATCH:
        text = (target / name).read_text()
        assert new in text and old not in text.replace(new, ""), name
    assert (target / "Cargo.toml").read_text() == "[package]\n"
    times = {p: p.stat().st_mtime_ns for p in target.rglob("*")}
    assert _patched(monkeypatch, tmp_path, source) == target
    assert {p: p.stat().st_mtime_ns for p in target.rglob("*")} == times


def test_a_copy_cut_short_is_made_again(monkeypatch, tmp_path):
    source = _source(tmp_path)
    target = _patched(monkeypatch, tmp_path, source)
    (target / "libtch" / "torch_api_generated.cpp").unlink()
    (target / ".patched").unlink()
    target = _patched(monkeypatch, tmp_path, source)
    assert "linalg_qr" in (target / "libtch" / "torch_api_generated.cpp").read_text()


def test_a_source_the_patch_was_not_made_for_is_refused(monkeypatch, tmp_path):
    source = _source(tmp_path, text_of=lambda old: old + "\n" + old)
    with pytest.raises(SystemExit, match="exactly once"):
        _patched(monkeypatch, tmp_path, source)


def test_torches_before_2_14_build_torch_sys_as_released(monkeypatch, tmp_path):
    monkeypatch.setattr(tb, "torch_version", lambda: "2.13.0")
    assert tb.patched_torch_sys({"CARGO_TARGET_DIR": str(tmp_path)}) is None
    assert not os.listdir(tmp_path)


def _registry_torch_sys() -> Path | None:
    home = Path(os.environ.get("CARGO_HOME", Path.home() / ".cargo"))
    found = sorted(home.glob("registry/src/*/torch-sys-0.26.0/build.rs"))
    return found[0].parent if found else None


@pytest.mark.skipif(_registry_torch_sys() is None,
                    reason="torch-sys 0.26.0 is not in cargo's registry (no build has fetched it)")
def test_the_released_torch_sys_takes_the_patch_and_asks_no_compiler_for_cpp17(monkeypatch, tmp_path):
    source = _registry_torch_sys()
    target = _patched(monkeypatch, tmp_path, source)
    build = (target / "build.rs").read_text()
    assert "c++17" not in build, "a compiler is still asked for C++17"
    assert build.count('.flag("-std=c++20")') == 1 and build.count('.flag("/std:c++20")') == 1
    generated = (target / "libtch" / "torch_api_generated.cpp").read_text()
    for call in ("torch::cholesky(", "torch::cholesky_out(", "torch::qr(", "torch::qr_out("):
        assert call not in generated, call


def test_runtime_check_names_the_supported_torch_minors():
    """The import-time check's advice names the minors this build supports."""
    from online_triplet_loss._torch_check import SUPPORTED

    assert SUPPORTED == (min(tb.TCH_FOR_TORCH), max(tb.TCH_FOR_TORCH))
    minors = sorted(tb.TCH_FOR_TORCH)
    assert minors == [(2, m) for m in range(minors[0][1], minors[-1][1] + 1)]

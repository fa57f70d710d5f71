"""Builds the extension against the torch of the Python that runs this file.

torch-sys (under tch) compiles libtorch's C++ wrapper against one torch:
tch 0.24 matches torch 2.11, tch 0.26 matches 2.13 and also builds against
2.12 with libtorch's version check bypassed, and against 2.14 and 2.15 with
torch-sys patched (no tch release compiles against them yet): their headers
need C++20, and no longer declare ``torch::cholesky``, ``torch::qr`` and
their ``_out`` forms, which torch-sys 0.26's generated wrapper calls; the
patched copy asks for C++20 (GCC's and Clang's flag, and MSVC's) and calls
``torch::linalg_cholesky`` and ``torch::linalg_qr``, the same functions
under their current names. Before cargo or maturin runs, this

- moves Cargo.lock to the tch that matches the torch in this environment
  for the duration of the build (the committed lock holds tch 0.26, torch
  2.13, and is put back afterwards);
- points cargo at a target directory of its own for this torch and Python,
  e.g. ``target/torch-2.13.0+cu130-cp311``: torch-sys does not rebuild when
  only the environment's torch changes, so two torches never share one;
- puts this Python first on PATH (torch-sys runs ``python`` to find torch)
  and in ``PYO3_PYTHON``;
- for torch 2.14 and 2.15, writes the patched torch-sys into the target
  directory (once: unchanged files keep their times, so nothing rebuilds)
  and points cargo at it with ``--config patch.crates-io.torch-sys.path``,
  given to cargo and maturin commands and, for the backend, among maturin's
  build arguments.

Two ways in:

- a command: ``python tools/torch_build.py maturin develop --release`` (or
  ``cargo test --release --workspace``, ...), which the Makefile uses;
- the PEP 517 backend of pyproject.toml, wrapping maturin's, for
  ``pip install --no-build-isolation .`` and ``pip wheel --no-build-isolation
  --no-deps .``. Its wheels require the torch minor they were built against
  (``torch==2.11.*``) and carry it in a local version, ``0.1.0+torch2.11``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# tch's version for each supported torch minor, and the torch each tch was made for.
TCH_FOR_TORCH = {
    (2, 11): "0.24.0",
    (2, 12): "0.26.0",
    (2, 13): "0.26.0",
    (2, 14): "0.26.0",
    (2, 15): "0.26.0",
}
TORCH_OF_TCH = {"0.24.0": (2, 11), "0.26.0": (2, 13)}
# From this torch on, torch-sys is built from a patched copy (see the top).
PATCHED_FROM = (2, 14)
# The patch, each replacement found exactly once: (file, old, new).
TORCH_SYS_PATCH = [
    ("build.rs", '.flag("-std=c++17")', '.flag("-std=c++20")'),
    # MSVC's spelling, in the Windows branch of the same build script.
    ("build.rs", '.flag("/std:c++17")', '.flag("/std:c++20")'),
    (
        "libtch/torch_api_generated.cpp",
        "torch::cholesky(*self, (bool)upper)",
        "torch::linalg_cholesky(*self, (bool)upper)",
    ),
    (
        "libtch/torch_api_generated.cpp",
        "torch::cholesky_out(*out, *self, (bool)upper)",
        "torch::linalg_cholesky_out(*out, *self, (bool)upper)",
    ),
    (
        "libtch/torch_api_generated.cpp",
        "torch::qr(*self, (bool)some)",
        'torch::linalg_qr(*self, some ? "reduced" : "complete")',
    ),
    (
        "libtch/torch_api_generated.cpp",
        "torch::qr_out(*Q, *R, *self, (bool)some)",
        'torch::linalg_qr_out(*Q, *R, *self, some ? "reduced" : "complete")',
    ),
]


def torch_version() -> str:
    """``torch.__version__`` of this environment, read without importing torch."""
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        raise SystemExit(
            "building online_triplet_loss needs torch in the same environment "
            "(pip install 'torch>=2.11,<2.16'; with pip, build with --no-build-isolation)"
        )
    path = Path(spec.origin).with_name("version.py")
    namespace: dict = {}
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    return namespace["__version__"]


def torch_minor(version: str) -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


def tch_for(version: str) -> str:
    try:
        return TCH_FOR_TORCH[torch_minor(version)]
    except KeyError:
        supported = ", ".join(f"{a}.{b}" for a, b in TCH_FOR_TORCH)
        raise SystemExit(f"torch {version} is not supported; supported: {supported}") from None


def locked_tch() -> str | None:
    match = re.search(r'name = "tch"\nversion = "([^"]+)"', (ROOT / "Cargo.lock").read_text())
    return match.group(1) if match else None


@contextlib.contextmanager
def lock_for(tch: str):
    """Cargo.lock moved to ``tch`` inside the block, as it was after it."""
    lock = ROOT / "Cargo.lock"
    original = lock.read_bytes()
    try:
        select_lock(tch)
        yield
    finally:
        if lock.read_bytes() != original:
            lock.write_bytes(original)


def select_lock(tch: str) -> None:
    """Moves Cargo.lock to ``tch`` (pyo3-tch pins tch and torch-sys to its own version)."""
    if locked_tch() == tch:
        return
    print(f"torch_build: moving Cargo.lock to tch {tch}", file=sys.stderr, flush=True)
    update = ["cargo", "update", "--quiet", "-p", "pyo3-tch", "--precise", tch]
    # Offline first: the registry index is usually cached already.
    if subprocess.run([*update, "--offline"], cwd=ROOT, stderr=subprocess.DEVNULL).returncode:
        subprocess.run(update, cwd=ROOT, check=True)


def torch_sys_source(env: dict[str, str]) -> Path:
    """The directory of the torch-sys that Cargo.lock holds, fetched if need be."""
    command = ["cargo", "metadata", "--format-version", "1", "--filter-platform", host_triple(env)]
    # Offline first, as select_lock: the sources are usually there already.
    found = subprocess.run([*command, "--offline"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True)
    if found.returncode:
        found = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    if found.returncode:
        raise SystemExit("torch_build: `cargo metadata` failed (above), so torch-sys cannot be patched")
    for package in json.loads(found.stdout)["packages"]:
        if package["name"] == "torch-sys":
            return Path(package["manifest_path"]).parent
    raise SystemExit("torch_build: Cargo.lock holds no torch-sys")


def host_triple(env: dict[str, str]) -> str:
    version = subprocess.run(["rustc", "-vV"], env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
    return re.search(r"^host: (\S+)$", version, flags=re.M).group(1)


def patched_torch_sys(env: dict[str, str]) -> Path | None:
    """For torch 2.14 and later, the patched torch-sys (see the top of this
    file) in the target directory, written where it is missing or differs;
    None before 2.14."""
    if torch_minor(torch_version()) < PATCHED_FROM:
        return None
    source = torch_sys_source(env)
    files: dict[str, str] = {}
    for name, old, new in TORCH_SYS_PATCH:
        text = files.get(name) or (source / name).read_text()
        if text.count(old) != 1:
            raise SystemExit(
                f"torch_build: {source / name} does not hold {old!r} exactly once: "
                "the patch for torch 2.14 and later was made for torch-sys 0.26.0"
            )
        files[name] = text.replace(old, new)
    # Made whole in a sibling and renamed into place, with a stamp of what
    # it was made from: a copy cut short, or made from another source or
    # patch, is made again (and only then, so that nothing rebuilds).
    stamp = hashlib.sha256(repr((str(source), TORCH_SYS_PATCH)).encode()).hexdigest()
    target = (Path(env["CARGO_TARGET_DIR"]) / f"{source.name}-patched").resolve()
    if not (target / ".patched").is_file() or (target / ".patched").read_text() != stamp:
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(source, partial)
        for name, text in files.items():
            (partial / name).write_text(text)
        (partial / ".patched").write_text(stamp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(partial, target)
    return target


def patch_option(patched: Path) -> list[str]:
    # A TOML string: JSON's escapes of a path are TOML's.
    return ["--config", f"patch.crates-io.torch-sys.path={json.dumps(str(patched))}"]


# The maturin subcommands that build, and take cargo's options.
MATURIN_BUILDS = {"build", "develop"}


def with_patch(argv: list[str], patched: Path | None) -> list[str]:
    """``argv`` with the option that builds the patched torch-sys: for cargo
    before its subcommand (after a ``+toolchain``), for maturin's ``build``
    and ``develop`` after theirs. Other commands are refused: under them the
    build would fail far from the cause, in libtorch's headers."""
    if patched is None:
        return argv
    program = os.path.basename(argv[0]) if argv else ""
    if program == "cargo":
        at = 2 if len(argv) > 1 and argv[1].startswith("+") else 1
        return [*argv[:at], *patch_option(patched), *argv[at:]]
    if program == "maturin" and len(argv) > 1 and argv[1] in MATURIN_BUILDS:
        return [*argv[:2], *patch_option(patched), *argv[2:]]
    raise SystemExit(
        f"torch_build: torch {torch_version()} builds torch-sys from a patched copy, which "
        f"this script passes to `cargo ...` and `maturin build|develop ...` only, not to {argv!r}"
    )


def python_tag() -> str:
    return f"cp{sys.version_info.major}{sys.version_info.minor}"


def build_environment() -> dict[str, str]:
    """The environment that cargo and maturin run in, for this environment's torch."""
    version = torch_version()
    tch = tch_for(version)
    env = dict(os.environ)
    env.setdefault("CARGO_TARGET_DIR", str(ROOT / "target" / f"torch-{version}-{python_tag()}"))
    env["LIBTORCH_USE_PYTORCH"] = "1"
    if TORCH_OF_TCH[tch] == torch_minor(version):
        env.pop("LIBTORCH_BYPASS_VERSION_CHECK", None)
    else:
        env["LIBTORCH_BYPASS_VERSION_CHECK"] = "1"
    env["PYO3_PYTHON"] = sys.executable
    bindir = os.path.dirname(sys.executable)
    env["PATH"] = os.pathsep.join([bindir, env.get("PATH", "")])
    if sys.prefix != sys.base_prefix:
        env["VIRTUAL_ENV"] = sys.prefix
    target = Path(env["CARGO_TARGET_DIR"])
    first = not any(target.glob("*/build/torch-sys-*/output"))
    print(
        f"torch_build: torch {version} ({python_tag()}), tch {tch}, target dir {target}"
        + (
            "\ntorch_build: the first build for this torch compiles libtorch's C++ wrapper "
            "(torch-sys, the long 'torch-sys(build)' step): about 2 minutes on 2 idle cores, more on busy ones"
            if first
            else ""
        ),
        file=sys.stderr,
        flush=True,
    )
    return env


# --- PEP 517 backend: maturin's, with the torch pinned in the metadata. -----------------


def _pin(metadata: str, version: str) -> str:
    """METADATA text requiring torch ``X.Y.*``, with version ``<ours>+torchX.Y``."""
    major, minor = torch_minor(version)
    metadata, n = re.subn(
        r"^Requires-Dist: torch\b[^;\n]*", f"Requires-Dist: torch=={major}.{minor}.*", metadata, flags=re.M
    )
    if n != 1:
        raise RuntimeError("the built metadata does not name torch exactly once")
    return re.sub(r"^Version: ([^+\n]+)$", rf"Version: \1+torch{major}.{minor}", metadata, count=1, flags=re.M)


def _local_name(dist_info: str, version: str) -> str:
    """``name-0.1.0.dist-info`` -> ``name-0.1.0+torch2.11.dist-info``."""
    major, minor = torch_minor(version)
    stem = dist_info[: -len(".dist-info")]
    return f"{stem}+torch{major}.{minor}.dist-info"


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def _pin_wheel(wheel_directory: str, filename: str, version: str) -> str:
    """Rewrites the wheel ``filename`` in place of the original: pinned metadata, local version."""
    major, minor = torch_minor(version)
    name, ours, rest = filename.split("-", 2)
    new_filename = f"{name}-{ours}+torch{major}.{minor}-{rest}"
    old_info = f"{name}-{ours}.dist-info"
    new_info = _local_name(old_info, version)
    source = Path(wheel_directory, filename)
    target = Path(wheel_directory, new_filename)
    records = []
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as new:
        for info in old.infolist():
            data = old.read(info)
            member = info.filename
            if member.startswith(old_info + "/"):
                member = new_info + member[len(old_info) :]
            if member == f"{new_info}/RECORD":
                continue
            if member == f"{new_info}/METADATA":
                data = _pin(data.decode(), version).encode()
            copy = zipfile.ZipInfo(member, date_time=info.date_time)
            copy.external_attr = info.external_attr
            copy.compress_type = zipfile.ZIP_DEFLATED
            new.writestr(copy, data)
            records.append(_record_line(member, data))
        records.append(f"{new_info}/RECORD,,")
        new.writestr(f"{new_info}/RECORD", "\n".join(records) + "\n")
    source.unlink()
    return new_filename


def _maturin():
    import maturin

    return maturin


def _enter_build_environment() -> None:
    env = build_environment()
    os.environ.clear()
    os.environ.update(env)


def _with_patch(config_settings, patched: Path | None):
    """``config_settings`` with the option that builds the patched torch-sys
    added to maturin's build arguments (taken, as maturin takes them, from
    the settings or else from ``MATURIN_PEP517_ARGS``)."""
    if patched is None:
        return config_settings
    settings = dict(config_settings or {})
    key = next((k for k in ("maturin.build-args", "build-args") if k in settings), None)
    given = settings[key] if key else os.environ.get("MATURIN_PEP517_ARGS", "")
    args = shlex.split(given) if isinstance(given, str) else list(given)
    # First: maturin passes what follows a `--` to rustc.
    settings[key or "maturin.build-args"] = [*patch_option(patched), *args]
    return settings


def _build(wheel_directory, config_settings, metadata_directory, editable):
    _enter_build_environment()
    version = torch_version()
    maturin = _maturin()
    build = maturin.build_editable if editable else maturin.build_wheel
    with lock_for(tch_for(version)):
        settings = _with_patch(config_settings, patched_torch_sys(dict(os.environ)))
        filename = build(wheel_directory, settings, metadata_directory)
    return _pin_wheel(wheel_directory, filename, version)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    return _build(wheel_directory, config_settings, metadata_directory, editable=False)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    return _build(wheel_directory, config_settings, metadata_directory, editable=True)


def _prepare(metadata_directory, config_settings, editable):
    _enter_build_environment()
    version = torch_version()
    maturin = _maturin()
    prepare = (
        maturin.prepare_metadata_for_build_editable if editable else maturin.prepare_metadata_for_build_wheel
    )
    dist_info = prepare(metadata_directory, config_settings)
    metadata = Path(metadata_directory, dist_info, "METADATA")
    metadata.write_text(_pin(metadata.read_text(), version))
    pinned = _local_name(dist_info, version)
    os.replace(Path(metadata_directory, dist_info), Path(metadata_directory, pinned))
    return pinned


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    return _prepare(metadata_directory, config_settings, editable=False)


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
    return _prepare(metadata_directory, config_settings, editable=True)


def get_requires_for_build_wheel(config_settings=None):
    return _maturin().get_requires_for_build_wheel(config_settings)


def get_requires_for_build_editable(config_settings=None):
    return _maturin().get_requires_for_build_wheel(config_settings)


def build_sdist(sdist_directory, config_settings=None):
    return _maturin().build_sdist(sdist_directory, config_settings)


def get_requires_for_build_sdist(config_settings=None):
    return _maturin().get_requires_for_build_sdist(config_settings)


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit(f"usage: {sys.executable} {sys.argv[0]} COMMAND [ARGS...]")
    env = build_environment()
    # A SIGTERM (a CI timeout, say) unwinds too, so that lock_for puts
    # Cargo.lock back.
    signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(128 + number))
    with lock_for(tch_for(torch_version())):
        code = subprocess.run(with_patch(argv, patched_torch_sys(env)), env=env).returncode
    raise SystemExit(code)


if __name__ == "__main__":
    main(sys.argv[1:])

"""The lab's own CPU kernels (sleep_engine/quant_matvec.cpp): quantized x·Wᵀ at small batch, the
compiled decode step, and a long prompt's attention in bfloat16 dot products (AVX512-BF16).

Built once per machine (and per source and torch version) with the system C++ compiler (~35 s
on 2 cores) into the lab's cache directory, and imported from there afterwards (~20 ms). Where
there is no compiler, no AVX2, or SLEEP_LAB_KERNELS=0, `load()` returns None and QuantLinear uses torch's packed kernels instead.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:   # Windows: a lock older than STALE_AFTER_S is taken for a killed build's
    fcntl = None

SOURCE = Path(__file__).with_name("quant_matvec.cpp")
NAME = "sleeplab_quant_matvec"
FLAGS = dict(extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"])
STALE_AFTER_S = 600   # torch's build lock older than this is a killed build's (a build takes 35 s–3 min)
log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict = {}


def _build_dir() -> Path:
    from .config import default_cache_dir
    # keyed by torch's version (an extension built against another torch must not be loaded) and by
    # the source and flags, so that every checkout of the same source shares one build
    digest = hashlib.sha256(SOURCE.read_bytes() + repr(FLAGS).encode()).hexdigest()[:12]
    return default_cache_dir() / f"kernels-torch{torch.__version__.replace('+', '-')}-{digest}"


def _ninja_on_path() -> None:
    """torch builds with the `ninja` command; the PyPI package's binary is not on PATH when the
    venv's python is run without activating the venv."""
    try:
        import ninja
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass


def supported() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") and \
        os.environ.get("SLEEP_LAB_KERNELS", "1") != "0"


def _import_built(target: Path):
    """The module a finished build left in `target`, imported directly: torch's `load` would take
    its build lock and run ninja on every start, and wait for ever on a lock a killed build left."""
    try:   # the file a finished build names (torch renames a rebuilt extension NAME_v1, ...)
        so = target / (target / "built").read_text().strip()
    except FileNotFoundError:
        return None
    if not so.is_file():
        return None
    spec = importlib.util.spec_from_file_location(so.name.split(".")[0], so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stale(lock: Path) -> bool:
    try:
        return time.time() - lock.stat().st_mtime > STALE_AFTER_S
    except FileNotFoundError:
        return False


def _build(target: Path):
    """Compile once per machine; a second process starting meanwhile waits and then imports it."""
    from torch.utils.cpp_extension import load as build
    _ninja_on_path()
    target.mkdir(parents=True, exist_ok=True)
    with open(target / "build.flock", "w") as held:
        if fcntl is not None:
            fcntl.flock(held, fcntl.LOCK_EX)   # the OS releases it when its holder dies
            (target / "lock").unlink(missing_ok=True)   # so torch's lock, if any, is a dead build's
        elif _stale(target / "lock"):
            (target / "lock").unlink(missing_ok=True)
        module = _import_built(target)   # built by the process this one waited for
        if module is not None:
            return module
        log.warning("compiling the lab's CPU kernels once (about 30 s) …")
        source = target / SOURCE.name    # built from a copy: ninja's rules name the source's path
        shutil.copyfile(SOURCE, source)
        # copies: torch appends its own libraries to extra_ldflags, which changed FLAGS and with
        # them _build_dir()'s name for the rest of the process
        module = build(NAME, [str(source)], build_directory=str(target), verbose=False,
                       **{k: list(v) for k, v in FLAGS.items()})
        (target / "built").write_text(Path(module.__file__).name + "\n")
        return module


def load():
    """The compiled module (functions q4_linear, q8_linear, ...), or None where it cannot be had.
    Modules keep a bool and call this at use: a compiled module on an nn.Module would make
    models impossible to deepcopy or pickle."""
    if "module" in _state:   # the hot path: no lock once loaded
        return _state["module"]
    with _lock:
        if "module" in _state:
            return _state["module"]
        module = None
        if supported():
            try:
                target = _build_dir()
                module = _import_built(target) or _build(target)
            except Exception as e:   # no compiler, no headers: torch's kernels do the job, slower
                log.warning("the lab's CPU kernels could not be built (%s); using torch's", str(e).splitlines()[0][:200])
                module = None
        _state["module"] = module
        return module


def pack_q4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [n, k] in 0..15 → [n, k/2]: byte j of block b holds code 32b + j in its low
    nibble and code 32b + 16 + j in its high nibble (the GGUF Q4_1 order the kernel reads)."""
    n, k = codes.shape
    c = codes.to(torch.uint8).view(n, k // 32, 2, 16)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, k // 2).contiguous()

"""The lab's own CPU kernels for quantized x·Wᵀ at small batch (sleep_engine/quant_matvec.cpp).

Built once per machine with the system C++ compiler (~35 s on 2 cores) into the lab's cache
directory and loaded from there afterwards (~20 ms). Where there is no compiler, no AVX2, or
SLEEP_LAB_KERNELS=0, `load()` returns None and QuantLinear uses torch's packed kernels instead.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("quant_matvec.cpp")
log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict = {}


def _build_dir() -> Path:
    from .config import default_cache_dir
    # keyed by torch's version: an extension built against another torch must not be loaded
    return default_cache_dir() / f"kernels-torch{torch.__version__.replace('+', '-')}"


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
                from torch.utils.cpp_extension import load as build
                _ninja_on_path()
                target = _build_dir()
                target.mkdir(parents=True, exist_ok=True)
                if not any(target.glob("*.so")):
                    log.warning("compiling the lab's CPU kernels once (about 30 s) …")
                module = build("sleeplab_quant_matvec", [str(SOURCE)], build_directory=str(target),
                               extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"],
                               verbose=False)
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

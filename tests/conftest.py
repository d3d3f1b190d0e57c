"""Shared fixtures: tiny random-weight models (fast, no download) and the real embedded model."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from sleep_engine.config import LabConfig, default_cache_dir  # noqa: E402

torch.set_flush_denormal(True)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers on two cores: one thread each (two threads each under contention ran ~15× slower),
    # and the CLI subprocesses a test starts inherit it
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


# the longest tests' modules (real model, subprocesses, a browser): run first, so that no worker is
# left alone with one of them at the end (make test: two workers that steal each other's queued tests)
LONG_FIRST = ("test_integration.py", "test_browser.py", "test_crash.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FIRST)))   # stable: module order kept


def tiny_llama(vocab_size: int = 256, layers: int = 2, seed: int = 0, **config):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2), **config})
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


def cache_dir() -> Path:
    """The real model cache; shared with the user's (building it takes ~30 s once)."""
    return Path(os.environ.get("SLEEP_LAB_TEST_CACHE", default_cache_dir()))


@pytest.fixture(scope="session")
def embedded_source() -> Path:
    """Directory of the dequantized embedded model (built on first use)."""
    import fcntl

    from sleep_engine import backbone
    target = backbone._embedded_cache(cache_dir())
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".tests-build.lock", "w") as lock:   # pytest -n 2: one worker builds it
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "sleep-lab.json").is_file():
            backbone._dequantize_embedded_to(target)
    return target


@pytest.fixture(scope="session")
def tokenizer(embedded_source):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(embedded_source)


def make_tiny_engine(root: Path, tokenizer):
    """A SleepEngine on a tiny random Llama with the real tokenizer, state in root/"state"."""
    from sleep_engine.backbone import Backbone
    from sleep_engine.engine import SleepEngine
    model = tiny_llama(vocab_size=len(tokenizer))
    bb = Backbone(model, tokenizer, "tiny-llama", torch.device("cpu"), torch.float32, "none", 0.0, True)
    cfg = LabConfig(model="tiny", state_dir=root / "state", cache_dir=root / "cache", quantize="none")
    cfg.wake.max_new_tokens = 8
    cfg.wake.fast_update_every = 0
    # a random tiny model's favourite tokens are newlines; penalised, it often stops at once (an
    # empty reply, not an episode): its replies stay as they were (the penalty has its own tests)
    cfg.wake.repetition_penalty = 1.0
    return SleepEngine(cfg, backbone=bb)


@pytest.fixture
def tiny_engine(tmp_path, tokenizer):
    """A SleepEngine on a tiny random Llama with the real tokenizer, in a fresh state dir; closed
    after the test (a fast-weight update left running in a daemon thread aborted the process at
    exit: "terminate called without an active exception", exit status 134)."""
    engine = make_tiny_engine(tmp_path, tokenizer)
    yield engine
    engine.close()

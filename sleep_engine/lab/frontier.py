"""Accuracy against damage (issue 16): every learner swept over its main knob on the same passages.

A point is one setting of one method, learned from the untrained model and measured four ways:
closed-book accuracy with its 95% Wilson interval, general perplexity drift, the share of everyday
questions kept, and learning seconds. From the points of a run come the Pareto front (what no
other setting beats on both accuracy and damage), each method's best accuracy within a damage
budget, and the learning seconds each method needs to reach an accuracy with and without that
budget. Those summaries are pure functions of the points; `Runner.frontier` measures the points.
"""
from __future__ import annotations

import dataclasses
import re
import time

from ..probes import is_correct, perplexity
from .data import fingerprint
from .methods import EWC, SealSFT, make_learner
from .scoring import answer, wilson
from .settings import ExperimentConfig

DAMAGES = ("ppl_change", "everyday_lost")   # the two x axes: perplexity drift, everyday questions lost
REFERENCE = "sleep_2tier"                   # whose best accuracy within budget is the default target


# -- the points ------------------------------------------------------------------------------------
def point_config(exp: ExperimentConfig, knobs: dict) -> ExperimentConfig:
    """The run's settings with one point's knobs, as a new object (the run's own stays as it was);
    Sleep overrides are merged into the run's, so a point changes only what it names."""
    over = dict(knobs)
    if "sleep_overrides" in over:
        over["sleep_overrides"] = {**exp.sleep_overrides, **over["sleep_overrides"]}
    return dataclasses.replace(exp, **over).validate()


def point_label(knobs: dict) -> str:
    """A point's knobs for people: "3 ep, lr 0.001", "λ 1e+04", "quick preset, distill_epochs 1.4"."""
    short = {"sft_epochs": "{} ep", "sft_lr": "lr {:g}", "ewc_lambda": "λ {:.0e}", "sleep_preset": "{} preset"}
    flat = {**{k: v for k, v in knobs.items() if k != "sleep_overrides"}, **knobs.get("sleep_overrides", {})}
    return ", ".join(short[k].format(v) if k in short else f"{k} {v}" for k, v in flat.items()) or "defaults"


def point_slug(knobs: dict) -> str:
    """A file name for a point's cached result: its knobs, sorted, e.g. "sft_epochs-3_sft_lr-0.001"."""
    flat = {**{k: v for k, v in knobs.items() if k != "sleep_overrides"}, **knobs.get("sleep_overrides", {})}
    return re.sub(r"[^A-Za-z0-9._-]", "", "_".join(f"{k}-{v}" for k, v in sorted(flat.items()))) or "defaults"


def damage_reading(lm, tokenizer, generic: str, questions: list[tuple[str, str]], tokens: int) -> dict:
    """What damage is measured on: perplexity of the generic text, and each everyday question's
    reply (closed-book, the lab's answer prompt) with whether it is right."""
    replies = answer(lm, tokenizer, [q for q, _ in questions], None, tokens) if questions else []
    return {"ppl": perplexity(lm, tokenizer, generic), "replies": replies,
            "right": [is_correct(r, a) for (_, a), r in zip(questions, replies)]}


def point_numbers(correct: int, n: int, before: dict, after: dict, questions: list[tuple[str, str]]) -> dict:
    """One point's numbers from its closed-book score and the damage readings before and after:

        accuracy       = k / n, with the 95% Wilson interval of k of n
        ppl_change     = ppl_after / ppl_before − 1
        everyday_kept  = |R_before ∩ R_after| / |R_before|, R = the everyday questions answered right
                         (the untrained model's own right answers; None when it has none)
        everyday_lost  = 1 − everyday_kept
    """
    was = [i for i, ok in enumerate(before["right"]) if ok]
    kept = [i for i in was if after["right"][i]]
    share = len(kept) / len(was) if was else None
    lo, hi = wilson(correct, n)
    return {"accuracy": correct / n, "correct": correct, "n": n, "ci": [lo, hi],
            "ppl_before": before["ppl"], "ppl_after": after["ppl"], "ppl_change": after["ppl"] / before["ppl"] - 1,
            "everyday_kept": share, "everyday_lost": None if share is None else 1 - share,
            "everyday_right_before": len(was), "everyday_still_right": len(kept),
            "everyday_lost_replies": [[questions[i][0], after["replies"][i]] for i in was if not after["right"][i]]}


# -- the learners ----------------------------------------------------------------------------------
class AnchoredEWC(EWC):
    """EWC for one learning episode: the anchor θ* is the untrained model and F̂ the empirical Fisher
    of Sleep's plain-text anchors (assets/anchor_text.txt) there, so λ trades what the passages
    teach against moving the weights everyday text depends on. (The continual EWC anchors after
    each episode: with the frontier's single episode its penalty would never act.) Computing F̂
    is part of the method, so its seconds count as learning."""

    def learn(self, passages, on_epoch=None, epochs=None):
        from ..consolidation import ANCHOR_TEXT
        paragraphs = [p.strip() for p in ANCHOR_TEXT.read_text(encoding="utf-8").split("\n\n") if p.strip()]
        fisher_s = self.t.consolidate_fisher(paragraphs)
        info = super().learn(passages, on_epoch, epochs)
        return {**info, "seconds": round(info["seconds"] + fisher_s, 2), "fisher_s": round(fisher_s, 2)}

    def after_episode(self, texts) -> float:
        return 0.0   # nothing is learned after the frontier's one episode: no Fisher to add


class SealSharedEdits(SealSFT):
    """SEAL-style SFT whose self-edits are written once per run and shared by its sweep points:
    they come from the untrained model with a fixed seed, so every point would write the same
    lines. Each point is still charged the seconds the writing took."""

    def __init__(self, shared, exp, written: dict):
        super().__init__(shared, exp)
        self.written = written   # (passages, edit settings) → (texts, info, seconds)

    def sequences(self, passages):
        e = self.exp
        key = (fingerprint(passages), e.seal_edits, e.seal_edit_tokens, e.seal_temperature, e.seed)
        reused = key in self.written
        if not reused:
            t0 = time.perf_counter()
            texts, info = super().sequences(passages)
            self.written[key] = (texts, info, round(time.perf_counter() - t0, 2))
        texts, info, seconds = self.written[key]
        return texts, {**info, "edit_seconds": seconds, "edits_reused": reused}

    def learn(self, passages, on_epoch=None, epochs=None):
        info = super().learn(passages, on_epoch, epochs)
        if info["edits_reused"]:
            info["seconds"] = round(info["seconds"] + info["edit_seconds"], 2)
        return info


def frontier_learner(name: str, runner, exp: ExperimentConfig, seal_edits: dict, progress=None):
    """The learner of one point, built on the point's own settings `exp`."""
    if name == "ewc":
        return AnchoredEWC(runner.shared(), exp)
    if name == "seal_sft":
        return SealSharedEdits(runner.shared(), exp, seal_edits)
    return make_learner(name, runner.lab, exp, runner.shared, runner.out / "_state", "frontier", progress,
                        runner.backbone_factory)


# -- summaries: pure functions of the points -------------------------------------------------------
def measured(points: list[dict]) -> list[dict]:
    """The points that have numbers (a refused sleep leaves an error instead)."""
    return [p for p in points if "accuracy" in p]


def pareto_front(pairs: list[tuple[float, float]]) -> list[bool]:
    """For (accuracy, damage) pairs: is each on the Pareto front (maximise accuracy, minimise
    damage)? Point i is dominated when some j has acc_j ≥ acc_i and dmg_j ≤ dmg_i with at least
    one of the two strict; the front is every point nothing dominates (equal points both stay)."""
    def dominated(a, d):
        return any(a2 >= a and d2 <= d and (a2 > a or d2 < d) for a2, d2 in pairs)
    return [not dominated(a, d) for a, d in pairs]


def front_members(points_by_method: dict[str, list[dict]], damage: str) -> set[tuple[str, int]]:
    """(method, index of the point) on the front of all methods' measured points, for one damage."""
    flat = [(name, i, p) for name, pts in points_by_method.items() for i, p in enumerate(pts)
            if "accuracy" in p and p.get(damage) is not None]
    on = pareto_front([(p["accuracy"], p[damage]) for _, _, p in flat])
    return {(name, i) for (name, i, _), yes in zip(flat, on) if yes}


def within_budget(point: dict, max_drift: float, min_kept: float) -> bool:
    """ppl_change ≤ max_drift and everyday_kept ≥ min_kept; an unmeasured kept share fails."""
    return point["ppl_change"] <= max_drift and point.get("everyday_kept") is not None \
        and point["everyday_kept"] >= min_kept


def best_within_budget(points: list[dict], max_drift: float, min_kept: float) -> dict | None:
    """The point of highest accuracy among those within the damage budget (ties: fewer learning
    seconds); None when no point qualifies."""
    ok = [p for p in measured(points) if within_budget(p, max_drift, min_kept)]
    return max(ok, key=lambda p: (p["accuracy"], -p["seconds"])) if ok else None


def time_to_accuracy(points: list[dict], target: float, max_drift: float | None = None,
                     min_kept: float | None = None) -> dict | None:
    """The fewest learning seconds among the points reaching accuracy ≥ `target`:

        t(target) = min { seconds_p : accuracy_p ≥ target [and p within the damage budget] }

    with the budget only when `max_drift` and `min_kept` are given (time-to-accuracy at matched
    damage); the point itself, or None: never."""
    ok = [p for p in measured(points) if p["accuracy"] >= target
          and (max_drift is None or within_budget(p, max_drift, min_kept))]
    return min(ok, key=lambda p: p["seconds"]) if ok else None


def choose_target(points_by_method: dict[str, list[dict]], exp: ExperimentConfig) -> dict:
    """The accuracy time-to-accuracy asks for: `frontier_target` when set; else Sleep 2-tier's best
    accuracy within the budget ("how long does each method take to match Sleep at Sleep's damage");
    when that is missing or 0, one question right (the least accuracy that is learning)."""
    if exp.frontier_target > 0:
        return {"accuracy": exp.frontier_target, "from": "frontier_target"}
    best = best_within_budget(points_by_method.get(REFERENCE, []), exp.frontier_max_drift, exp.frontier_min_kept)
    if best is not None and best["accuracy"] > 0:
        return {"accuracy": best["accuracy"], "from": f"{REFERENCE}'s best within the budget"}
    n = next((p["n"] for pts in points_by_method.values() for p in measured(pts)), 1)
    return {"accuracy": 1 / n, "from": "one question right"}


def summarise(points_by_method: dict[str, list[dict]], exp: ExperimentConfig) -> dict:
    """The run's fronts, target and per-method summary numbers (labels name the points)."""
    budget = {"max_drift": exp.frontier_max_drift, "min_kept": exp.frontier_min_kept}
    target = choose_target(points_by_method, exp)
    fronts = {d: front_members(points_by_method, d) for d in DAMAGES}

    def brief(p):
        return None if p is None else {k: p[k] for k in ("label", "accuracy", "correct", "n", "ppl_change",
                                                         "everyday_kept", "seconds")}
    summary = {}
    for name, pts in points_by_method.items():
        summary[name] = {
            "best_within_budget": brief(best_within_budget(pts, **budget)),
            "time_matched": brief(time_to_accuracy(pts, target["accuracy"], **budget)),
            "time_any": brief(time_to_accuracy(pts, target["accuracy"])),
            "on_front": {d: [pts[i]["label"] for m, i in sorted(fronts[d]) if m == name] for d in DAMAGES},
            "points": len(pts), "failed": len(pts) - len(measured(pts))}
    return {"budget": budget, "target": target, "summary": summary,
            "front": {d: sorted([m, i] for m, i in fronts[d]) for d in DAMAGES}}

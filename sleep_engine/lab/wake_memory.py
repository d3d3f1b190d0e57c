"""`lab wake`: what tier 1 (the Wake fast weights) is for and what it costs.

1. In-session gain: teach each passage (one fast-weight update each, as in the app), clear the
   conversation, ask its questions closed-book with tier 1 on and off.
2. Long chat: `turns` turns of ordinary chat (assets/chat_prompts.txt) with test-time learning as
   configured, the model's own replies included, then, in the same session after a clear, the
   everyday questions and generic perplexity with tier 1 on vs the fresh model (tier 1 off).
3. Sleeps after the chat (the promise as a user meets it): `sleeps` rounds of teaching
   `passages_per_sleep` further passages and sleeping; each sleep consolidates whatever the
   session holds (the chat turns too). After each: closed-book answers about everything taught
   so far, how often a wrong one names another taught passage, and the everyday questions and
   generic perplexity against the fresh model.
All parts run on one engine in a throw-away state dir, in this order.
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .. import ASSETS
from ..config import ConfigError, LabConfig, SleepConfig, WakeConfig
from . import data as lab_data
from .scoring import wilson

CHAT_PROMPTS = ASSETS / "chat_prompts.txt"


@dataclass
class WakeExperiment:
    split: str = "test"        # passages for the in-session gain; tune on dev
    passages: int = 8          # taught one at a time (0 = skip part 1)
    turns: int = 200           # ordinary chat turns (0 = skip part 2)
    reply_tokens: int = 48     # cap per chat reply (a 135M model often runs to any cap)
    checkpoints: str = "20,40,60,80,100,120,140,160,180"   # also measure after these many turns
    sleeps: int = 0            # part 3: rounds of teach + sleep after the chat (0 = skip)
    passages_per_sleep: int = 2   # taught before each of those sleeps (passages after part 1's)
    sleep_preset: str = "quick"
    sleep_overrides: dict = dataclasses.field(default_factory=dict)   # over the preset: '{"older_gate_steps": 0}'

    def update(self, values: dict) -> dict:
        """Take this experiment's keys from `values`; return the rest (wake settings)."""
        rest = {}
        for key, value in values.items():
            if key == "sleep_overrides":
                self.sleep_overrides = json.loads(value) if isinstance(value, str) else dict(value)
                SleepConfig.from_preset(self.sleep_preset, **self.sleep_overrides)   # a wrong name fails now
            elif key in {f.name for f in dataclasses.fields(self)}:
                setattr(self, key, type(getattr(self, key))(value))
            else:
                rest[key] = value
        return rest


def chat_prompts(n: int) -> list[str]:
    lines = [ln.strip() for ln in CHAT_PROMPTS.read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    return (lines * (n // len(lines) + 1))[:n]


def apply_wake_settings(wake: WakeConfig, values: dict) -> None:
    for key, value in values.items():
        if not hasattr(wake, key):
            raise ConfigError(f"unknown setting {key!r} (experiment: {', '.join(f.name for f in dataclasses.fields(WakeExperiment))}; "
                              f"or a wake setting such as fast_lr, fast_decay, fast_self_weight)")
        setattr(wake, key, type(getattr(wake, key))(value))
    wake.validate()


def general_check(engine, questions, generic: str, fast_weights: bool) -> dict:
    """Everyday questions (right or wrong, each) and generic perplexity, with or without tier 1."""
    from ..probes import is_correct, perplexity
    from .scoring import answer
    lm, tok = engine.memory.lm, engine.tokenizer
    with engine.memory.configured(fast_weights=fast_weights):
        replies = answer(lm, tok, [q for q, _ in questions], None, 32)
        ppl = perplexity(lm, tok, generic)
    per = [is_correct(r, a) for (_, a), r in zip(questions, replies)]
    return {"ppl": ppl, "correct": sum(per), "per_question": per, "replies": replies}


def in_session_gain(engine, passages, log) -> dict:
    from ..probes import Probe, answer_logprob, closed_book_accuracy
    t0 = time.perf_counter()
    for p in passages:
        engine.wake.teach(p.text, source=p.id)
    engine.wake.clear()
    probes = [Probe(i, q, a) for i, p in enumerate(passages) for q, a in p.qa]
    result = {}
    for name, fast in (("with", True), ("without", False)):
        with engine.memory.configured(fast_weights=fast):
            acc = closed_book_accuracy(engine.memory.lm, engine.tokenizer, probes)
            logprob = answer_logprob(engine.memory.lm, engine.tokenizer, probes)
        k = round(sum(acc.get(i, 0.0) * len(p.qa) for i, p in enumerate(passages)))
        result[name] = {"correct": k, "n": len(probes), "ci95": wilson(k, len(probes)),
                        "answer_logprob": logprob}   # mean per-token log p(gold answer), closed-book
    result["teach_seconds"] = round(time.perf_counter() - t0, 1)
    result["drift_after_teaching"] = engine.memory.fast_weight_drift
    log(f"in-session: closed-book {result['with']['correct']}/{len(probes)} with tier 1, "
        f"{result['without']['correct']}/{len(probes)} without; gold-answer log-prob per token "
        f"{result['with']['answer_logprob']:.3f} with, {result['without']['answer_logprob']:.3f} without")
    return result


def long_chat(engine, exp: WakeExperiment, questions, generic: str, fresh: dict, log) -> dict:
    engine.memory.reset_fast_weights()
    marks = {int(c) for c in exp.checkpoints.split(",") if c.strip()} | {exp.turns}
    curve, updates, t0 = [], [], time.perf_counter()
    engine.wake.cfg.max_new_tokens = exp.reply_tokens
    for turn, prompt in enumerate(chat_prompts(exp.turns), 1):
        reply = engine.wake.reply(prompt)
        if turn % 10 == 0:
            log(f"turn {turn}/{exp.turns} ({time.perf_counter() - t0:.0f}s)")
        if reply.fast_update:
            updates.append({k: reply.fast_update.get(k) for k in ("loss_before", "loss_after", "drift", "changed", "shrinks", "undone")})
        if turn in marks:
            engine.wake.clear()
            g = general_check(engine, questions, generic, fast_weights=True)
            curve.append({"turn": turn, "ppl": g["ppl"], "correct": g["correct"], "per_question": g["per_question"],
                          "drift": g["ppl"] / fresh["ppl"] - 1, "kept": _kept(g, fresh),
                          "fast_norm": engine.memory.fast_weight_norm(), "seconds": round(time.perf_counter() - t0)})
            log(f"turn {turn}: everyday {g['correct']}/{len(questions)} (fresh {fresh['correct']}), "
                f"ppl {g['ppl']:.3f} ({100 * curve[-1]['drift']:+.2f}%), tier-1 norm {curve[-1]['fast_norm']:.3g}")
    # the worst checkpoint, not only the last: tier 1 moves up and down with what each update brought
    worst = {"kept": min(c["kept"] for c in curve), "correct": min(c["correct"] for c in curve),
             "drift": max(c["drift"] for c in curve)} if curve else None
    return {"fresh": {k: fresh[k] for k in ("ppl", "correct")}, "n_questions": len(questions), "curve": curve,
            "final": curve[-1] if curve else None, "worst": worst, "updates": len(updates),
            "shrunk_updates": sum(1 for u in updates if u.get("shrinks")),
            "undone_updates": sum(1 for u in updates if u.get("undone")), "update_log": updates,
            "seconds": round(time.perf_counter() - t0, 1)}


def _kept(g: dict, fresh: dict) -> float:
    """Share of the questions the fresh model gets right that are still right."""
    right = [i for i, ok in enumerate(fresh["per_question"]) if ok]
    return sum(g["per_question"][i] for i in right) / max(len(right), 1)


def _learning(summary: dict) -> dict:
    """What a sleep had time for: its steps against the plan, the teacher's answers, the seconds of
    each part (a budgeted sleep's recall follows its steps)."""
    seeded = summary.get("consolidation") or {}
    return {"steps": seeded.get("steps"), "planned_steps": seeded.get("planned_steps"),
            "answered": seeded.get("answered"), "prompts": seeded.get("prompts"),
            "writing_s": seeded.get("writing_s"), "gate_s": seeded.get("gate_s"), "training_s": seeded.get("training_s"),
            "older_gates_s": summary.get("older_gates_s"), "phases": summary.get("phases")}


def sleeps_after_chat(engine, exp: WakeExperiment, settings, passages, questions, generic: str, fresh: dict,
                      log) -> dict:
    from .methods import follow_sleep
    from .scoring import borrowing, evaluate, items_of
    rounds, taught, k = [], [], exp.passages_per_sleep
    for i in range(exp.sleeps):
        group = passages[i * k:(i + 1) * k]
        for p in group:
            engine.wake.teach(p.text, source=p.id)
        taught += group
        pending, t0 = len(engine.pending_episodes()), time.perf_counter()
        try:
            summary, error = follow_sleep(engine, engine.sleep(settings)), None
        except RuntimeError as e:   # refused or failed: rolled back, its episodes stay pending
            summary, error = {}, str(e)
        seconds = round(time.perf_counter() - t0, 1)
        engine.wake.clear()
        recall = evaluate(engine.memory.lm, engine.tokenizer, items_of(taught), semantic=False)
        mixed = borrowing(recall["answers"], taught)
        g = general_check(engine, questions, generic, fast_weights=True)
        rounds.append({"sleep": i + 1, "passages": [p.id for p in group], "episodes": pending, "seconds": seconds,
                       "error": error, "closed_book": {"correct": recall["correct"], "n": recall["n"],
                                                       "ci95": wilson(recall["correct"], recall["n"])},
                       "interference": {k2: mixed[k2] for k2 in ("wrong", "from_other_passage", "rate")},
                       "interference_examples": mixed["examples"][:5],
                       "everyday": g["correct"], "kept": _kept(g, fresh), "drift": g["ppl"] / fresh["ppl"] - 1,
                       "everyday_changed": summary.get("everyday_changed"),
                       "gate_selectivity": summary.get("gate_selectivity"),
                       "tier_consolidation": summary.get("tier_consolidation"),
                       "learning": _learning(summary),
                       "wrong_everyday": [{"q": q, "reply": r} for (q, a), r, ok, was in
                                          zip(questions, g["replies"], g["per_question"], fresh["per_question"])
                                          if was and not ok]})
        log(f"sleep {i + 1} ({pending} episodes, {seconds:.0f}s{', ' + error if error else ''}): closed-book "
            f"{recall['correct']}/{recall['n']}, wrong answers naming another passage {mixed['from_other_passage']}/"
            f"{mixed['wrong']}; everyday {g['correct']}/{len(questions)} (fresh {fresh['correct']}, kept "
            f"{100 * rounds[-1]['kept']:.0f}%), ppl {100 * rounds[-1]['drift']:+.2f}%; steps "
            f"{rounds[-1]['learning']['steps']}/{rounds[-1]['learning']['planned_steps']}")
    return {"preset": exp.sleep_preset, "settings": vars(settings), "rounds": rounds}


def run(cfg: LabConfig, exp: WakeExperiment, out: Path, log=print) -> dict:
    from ..engine import SleepEngine
    from .runner import code_version
    questions = lab_data.general_questions()
    generic = lab_data.generic_text()
    split = lab_data.load_passages(exp.split)
    passages = split[:exp.passages]
    later = split[exp.passages:exp.passages + exp.sleeps * exp.passages_per_sleep]
    if len(later) < exp.sleeps * exp.passages_per_sleep:
        raise ConfigError(f"split {exp.split!r} has {len(split)} passages: not enough for {exp.passages} taught "
                          f"to tier 1 and {exp.sleeps} sleeps of {exp.passages_per_sleep}")
    with tempfile.TemporaryDirectory(prefix="sleep-lab-wake-") as state:
        cfg = dataclasses.replace(cfg, state_dir=Path(state))
        cfg.wake.fast_in_background = False   # each update is recorded with the turn that caused it
        engine = SleepEngine(cfg)
        result = {"experiment": "wake", "settings": dataclasses.asdict(exp), "wake": dataclasses.asdict(cfg.wake),
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "code": code_version()}
        fresh = general_check(engine, questions, generic, fast_weights=False)
        if passages:
            result["in_session"] = in_session_gain(engine, passages, log)
        if exp.turns:
            result["long_chat"] = long_chat(engine, exp, questions, generic, fresh, log)
        if exp.sleeps:
            settings = SleepConfig.from_preset(exp.sleep_preset, **exp.sleep_overrides)
            result["sleeps"] = sleeps_after_chat(engine, exp, settings, later, questions, generic, fresh, log)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "wake.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    result["json"] = str(path)
    return result

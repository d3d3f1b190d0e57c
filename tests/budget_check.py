"""Do the presets keep their word? (`budget_s` bounds the learning; the probes come on top.)
A quick and a full sleep on the embedded model, each over a
small session (2 taught passages, quick only) and a typical one (4 taught passages + 6 chat turns: 10
episodes), timed wall to wall, with what the budget cut (steps, teacher prompts, dreaming) and
what the sleep learned (closed-book probes, perplexity drift); the typical session's quick sleep
once more without a budget, to show what the cut costs. `base_readings_on_disk`: whether the
un-slept model's readings came from the cache dir (readings.py; the first sleep on a machine
takes them). `make budget-check` (~20 min, 2 threads).
README "Sleep presets are time budgets"."""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
CHATS = ["How do I boil an egg?", "Write a haiku about rain.", "What is a good name for a cat?",
         "Why is the sky blue?", "Give me a tip for sleeping better.", "What is 12 times 7?"]
RUNS = [("small", "quick", None), ("typical", "quick", None), ("typical", "quick", 0.0), ("typical", "full", None)]


def session(engine, kind: str) -> None:
    from sleep_engine.lab.data import load_passages
    passages = load_passages("dev")[:2 if kind == "small" else 4]
    for p in passages:
        engine.wake.teach(p.text, qa=[{"q": q, "a": a} for q, a in p.qa])
    if kind == "typical":
        engine.wake.cfg.max_new_tokens = 48
        for prompt in CHATS:
            engine.wake.reply(prompt)
        engine.wake.clear()


def one_sleep(threads: int, kind: str, preset: str, budget: float | None, **overrides) -> dict:
    from check_setup import fresh_engine
    from sleep_engine.config import SleepConfig
    engine = fresh_engine(f"budget-check-{kind}-{preset}", threads)
    try:
        session(engine, kind)
        cached = engine.memory.readings.path is not None and engine.memory.readings.path.exists()
        settings = SleepConfig.from_preset(preset, **({} if budget is None else {"budget_s": budget}), **overrides)
        t0 = time.perf_counter()
        engine.sleep(settings, wait=True)
        wall = time.perf_counter() - t0
        last = engine.events.since(0)[-1]
        if last.kind != "done":
            return {"session": kind, "preset": preset, "budget_s": settings.budget_s, "error": last.data}
        s, c = last.data["summary"], last.data["summary"]["consolidation"]
        before, after = s["probe_accuracy_before"], s["probe_accuracy_after"]
        return {"session": kind, "preset": preset, "budget_s": settings.budget_s, "episodes": len(s["episode_ids"]),
                "base_readings_on_disk": cached,
                "wall_s": round(wall, 1), "phases": s["phases"], "steps": c["steps"], "planned_steps": c["planned_steps"],
                "prompts_answered": c.get("answered"), "prompts": c.get("prompts"), "writing_s": c.get("writing_s"),
                "gate_s": c.get("gate_s"), "training_s": c.get("training_s"),
                "learning_s": round(sum(v for k, v in s["phases"].items() if not k.startswith("probe")), 1),
                "dreams": s["dreams"], "probes_before": round(sum(before.values()) / max(len(before), 1), 3),
                "probes_after": round(sum(after.values()) / max(len(after), 1), 3),
                "ppl_drift": round(s["general_ppl_after"] / s["general_ppl_before"] - 1, 4),
                "everyday_changed": s["everyday_changed"]}
    finally:
        engine.close()


def main(threads: int = 2):
    rows = []
    for kind, preset, budget in RUNS:
        rows.append(one_sleep(threads, kind, preset, budget))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": threads,
                      "runs": rows}, indent=1))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2)

"""Does the tier step keep passages apart, and what does it keep? One shared unbudgeted quick
sleep over dev passages p01–p03, then, from copies of that state, p04–p06 taught and a second
sleep whose tier step (`consolidate_every` = 2) merges the six passages' tier-2 experts into
`tier_experts` = 1 slow expert in arm "1" and 4 (grouped as a sleep groups them) in arm "4";
arm "none" skips the tier step, which measures tier 2 just before a merge. Per arm: closed-book
answers about all six passages, how often a wrong one names another passage, the everyday
questions and generic perplexity against the un-slept model, and the tier step's own numbers.
(Until 2026-12-05 the tier step's teacher answered seed prompts only, notes in context behind
`tier_teacher_notes`; now it is a sleep's teacher, `teacher_data`.) Dev split only (this
chooses a default). `make tier-check` (~75 min, 2 threads); `tier_step_check.py THREADS --reuse
ARM…` runs the named arms from the last run's first sleep. README "The tier step keeps passages apart"."""
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
PER_SLEEP = 3
ARMS = {"1": {"tier_experts": 1}, "4": {"tier_experts": 4},
        "none": {"consolidate_every": 1000}}   # no tier step: tier 2's recall just before a merge


def slept(engine, settings) -> dict:
    engine.sleep(settings, wait=True)
    last = engine.events.since(0)[-1]
    if last.kind != "done":
        raise SystemExit(f"the sleep did not finish: {last.kind} {last.data}")
    return last.data["summary"]


def measure(engine, passages, questions, generic, fresh) -> dict:
    from sleep_engine.lab.scoring import borrowing, evaluate, items_of, wilson
    from sleep_engine.lab.wake_memory import general_check
    recall = evaluate(engine.memory.lm, engine.tokenizer, items_of(passages), semantic=False)
    mixed = borrowing(recall["answers"], passages)
    everyday = general_check(engine, questions, generic, fast_weights=False)
    kept = [ok for ok, was in zip(everyday["per_question"], fresh["per_question"]) if was]
    return {"closed_book": recall["correct"], "n": recall["n"], "ci95": wilson(recall["correct"], recall["n"]),
            "wrong": mixed["wrong"], "from_other_passage": mixed["from_other_passage"],
            "examples": mixed["examples"][:6], "everyday": everyday["correct"],
            "kept": sum(kept) / max(len(kept), 1), "ppl_drift": everyday["ppl"] / fresh["ppl"] - 1}


def main(threads: int, reuse: bool, arms: list[str]) -> None:
    from check_setup import fresh_engine
    from sleep_engine.config import LabConfig, SleepConfig
    from sleep_engine.engine import SleepEngine
    from sleep_engine.lab.data import general_questions, generic_text, load_passages
    from sleep_engine.lab.runner import code_version
    from sleep_engine.lab.wake_memory import general_check
    passages = load_passages("dev")[:2 * PER_SLEEP]
    questions, generic = general_questions(), generic_text()
    root = Path("/tmp/sleep-lab-tier-check")
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "code": code_version(), "threads": threads,
           "passages": [p.id for p in passages], "arms": {}}
    if reuse:   # the un-slept model's answers from a fresh engine on the same files
        import launch
        # per arm list: two processes with different arms may run side by side (1 thread each)
        cfg = LabConfig(threads=threads, state_dir=root.with_name(f"{root.name}-fresh-{'+'.join(arms)}")).validate()
        cfg.wake.fast_update_every = 0
        launch.quiet_libraries(cfg)
        shutil.rmtree(cfg.state_dir, ignore_errors=True)
        engine = SleepEngine(cfg)
        fresh = general_check(engine, questions, generic, fast_weights=False)
        engine.close()
        cfg = dataclasses.replace(cfg, state_dir=root)
    else:
        engine = fresh_engine("tier-check", threads)
        cfg = engine.cfg
        fresh = general_check(engine, questions, generic, fast_weights=False)
        for p in passages[:PER_SLEEP]:
            engine.wake.teach(p.text, source=p.id)
        t0 = time.perf_counter()
        first = slept(engine, SleepConfig.from_preset("quick", budget_s=0, consolidate_every=2))
        out["sleep_1"] = {"seconds": round(time.perf_counter() - t0, 1), "experts": first["expert_episodes"],
                          **measure(engine, passages[:PER_SLEEP], questions, generic, fresh)}
        print(json.dumps(out["sleep_1"]), flush=True)
        engine.close()
    out["fresh_everyday"] = fresh["correct"]
    for name in arms:
        state = root.with_name(f"{root.name}-{name}")
        shutil.rmtree(state, ignore_errors=True)
        shutil.copytree(root, state)
        engine = SleepEngine(dataclasses.replace(cfg, state_dir=state))
        for p in passages[PER_SLEEP:]:
            engine.wake.teach(p.text, source=p.id)
        t0 = time.perf_counter()
        summary = slept(engine, SleepConfig.from_preset("quick", **{"budget_s": 0, "consolidate_every": 2, **ARMS[name]}))
        step = summary.get("tier_consolidation") or {}
        arm = {"settings": ARMS[name], "seconds": round(time.perf_counter() - t0, 1),
               "reset_s": summary["phases"].get("reset"),
               "tier_step": {k: step.get(k) for k in ("experts", "removed", "steps", "planned_steps", "examples",
                                                       "gate_s", "training_s", "deferred")},
               "gate_selectivity": summary.get("gate_selectivity"),
               **measure(engine, passages, questions, generic, fresh)}
        out["arms"][name] = arm
        print(name, json.dumps({k: v for k, v in arm.items() if k != "gate_selectivity"}), flush=True)
        engine.close()
    path = Path(f"reports/tier_step_check{'_' + '+'.join(arms) if reuse else ''}.json")
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=str))
    print(f"results: {path}")


if __name__ == "__main__":
    args = sys.argv[1:]
    reuse = "--reuse" in args
    args = [a for a in args if a != "--reuse"]
    main(int(args[0]) if args else 2, reuse, args[1:] or list(ARMS))

"""Which layers should a sleep train? (`SleepConfig.trained_layers`.) For each share: a fresh
embedded model, 4 dev passages taught (p01–p04, 16 questions), one quick sleep without a time
budget (so every share runs the same 32 steps), then closed-book recall, the answers'
log-probability, general perplexity, everyday answers changed, gate selectivity and the step time.
`make layers-check` (~20 min, 2 threads). README "Experts in the upper half"."""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def one_share(share: float, threads: int) -> dict:
    from check_setup import fresh_engine
    from sleep_engine.config import SleepConfig
    from sleep_engine.lab.data import load_passages
    engine = fresh_engine(f"layers-check-{share}", threads)
    try:
        for p in load_passages("dev")[:4]:
            engine.wake.teach(p.text, qa=[{"q": q, "a": a} for q, a in p.qa])
        t0 = time.perf_counter()
        engine.sleep(SleepConfig.from_preset("quick", budget_s=0.0, trained_layers=share), wait=True)
        wall = time.perf_counter() - t0
        events = engine.events.since(0)
        s = events[-1].data["summary"]
        c = s["consolidation"]
        secs = sorted(e.data["seconds"] for e in events if e.kind == "loss" and e.data.get("phase") == "consolidation")
        return {"trained_layers": share, "trained_from_layer": c.get("trained_from_layer"), "wall_s": round(wall, 1),
                "phases": s["phases"], "steps": c["steps"], "gate_s": c.get("gate_s"), "training_s": c.get("training_s"),
                "median_step_s": secs[len(secs) // 2], "final_divergence": c["final_divergence"],
                "answer_logprob": [s.get("answer_logprob_before"), s.get("answer_logprob_after")],
                "closed_book_after": s["probe_accuracy_after"], "general_ppl": [s["general_ppl_before"], s["general_ppl_after"]],
                "everyday_changed": s["everyday_changed"],
                "gate_selectivity": {e: {k: v.get(k) for k in ("own", "everyday", "other", "everyday_over_own")}
                                     for e, v in (s.get("gate_selectivity") or {}).items()}}
    finally:
        engine.close()


def main(threads: int = 2, shares=(0.5, 1.0, 0.67)):
    rows = []
    for share in shares:
        rows.append(one_share(share, threads))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": threads, "runs": rows},
                     indent=1))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2)

"""Chat while asleep on the embedded model: reply speed awake vs during a quick sleep, whether the
replies during it are the pre-sleep model's, what the snapshot costs. `make asleep-check`."""
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
PROMPTS = ["What is the capital of France?", "Write a haiku about rain.", "How do I boil an egg?"]


def replies(engine, tag):
    out = []
    for i, q in enumerate(PROMPTS):
        r = engine.wake.reply(q, session=f"{tag}-{i}", sampling={"max_new_tokens": 32})
        out.append({"tokens": r.token_ids, "ttft_s": r.ttft_s, "tokens_per_s": r.tokens_per_s,
                    "asleep": any("asleep" in n for n in r.notices), "episode": r.episode_id})
    return out


def main(threads: int = 2):
    from check_setup import fresh_engine
    from sleep_engine.config import SleepConfig
    from sleep_engine.lab.data import load_passages
    engine = fresh_engine("asleep-check", threads)
    p = load_passages("dev")
    try:
        engine.wake.teach(p[0].text)
        t0 = time.time(); engine.sleep(SleepConfig.from_preset("quick"), wait=True); quiet_sleep = time.time() - t0
        engine.wake.teach(p[1].text)
        awake = replies(engine, "awake")
        t0 = time.perf_counter(); engine.memory.twin(); twin_s = time.perf_counter() - t0
        t0 = time.time(); engine.sleep(SleepConfig.from_preset("quick"))
        while engine.status().get("phase") != "consolidation":
            time.sleep(0.5)
        during = replies(engine, "during")
        engine._worker.join(); busy_sleep = time.time() - t0
        pending = [e.id for e in engine.pending_episodes()]
    finally:
        engine.close()
    med = lambda rows, k: statistics.median(r[k] for r in rows if r[k] is not None)
    print(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": threads,
                      "awake": {"ttft_s": med(awake, "ttft_s"), "tokens_per_s": med(awake, "tokens_per_s")},
                      "during_sleep": {"ttft_s": med(during, "ttft_s"), "tokens_per_s": med(during, "tokens_per_s"),
                                       "said_asleep": all(r["asleep"] for r in during)},
                      "same_tokens_as_pre_sleep": [a["tokens"] == d["tokens"] for a, d in zip(awake, during)],
                      "twin_s": round(twin_s, 3), "quick_sleep_alone_s": round(quiet_sleep), "quick_sleep_with_chat_s": round(busy_sleep),
                      "pending_after": pending, "episodes_during": [d["episode"] for d in during]}, indent=1))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2)

"""How long Stop takes on the embedded model: a quick sleep over two taught passages is started
and stopped after different delays (so in different phases); each stop's latency, the phase it
hit, and whether the memory came back bit for bit. `make stop-check`."""
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
DELAYS = [2, 6, 12, 20, 35, 55]   # seconds after Sleep now: probes, teacher answers, training steps


def main(threads: int = 2):
    from check_setup import fresh_engine
    from sleep_engine.config import SleepConfig
    from sleep_engine.lab.data import load_passages
    engine = fresh_engine("stop-check", threads)
    rows = []
    try:
        for p in load_passages("dev")[:2]:
            engine.wake.teach(p.text)
        before = {k: v.clone() for k, v in engine.memory.memory_state()[0].items()}
        for delay in DELAYS:
            engine.sleep(SleepConfig.from_preset("quick"))
            time.sleep(delay)
            status = engine.status()
            t0 = time.perf_counter()
            stopped = engine.cancel()
            latency = time.perf_counter() - t0
            after = engine.memory.memory_state()[0]
            same = before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
            rows.append({"delay_s": delay, "phase": status.get("phase"), "step": status.get("step"),
                         "stopped": stopped, "stop_s": round(latency, 2), "memory_restored": same})
            print(rows[-1], file=sys.stderr, flush=True)
    finally:
        engine.close()
    stops = [r["stop_s"] for r in rows if r["stopped"]]
    print(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": threads,
                      "stops": rows, "median_stop_s": statistics.median(stops) if stops else None,
                      "max_stop_s": max(stops) if stops else None}, indent=1))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2)

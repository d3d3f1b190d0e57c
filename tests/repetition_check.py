"""Which repetition penalty keeps Wake's embedded model from looping without hurting answers?
Dev data only: loops on 24 ordinary chat requests (sleep_engine/assets/chat_prompts.txt, the first
24), answers to dev-passage questions with the passage in the prompt. `make repetition-check`."""
import json
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def loops(ids: list[int], n: int = 6, times: int = 3) -> bool:
    """A reply loops when some n-token run occurs `times` times or more."""
    grams = Counter(tuple(ids[i:i + n]) for i in range(len(ids) - n + 1))
    return bool(grams) and max(grams.values()) >= times


def main(penalties=(1.0, 1.1, 1.2, 1.3), threads: int = 2):
    import launch
    from sleep_engine.config import LabConfig
    cfg = LabConfig(threads=threads, state_dir=Path("/tmp/sleep-lab-repetition-check")).validate()
    cfg.wake.fast_update_every, cfg.wake.max_new_tokens = 0, 128
    launch.quiet_libraries(cfg)
    from sleep_engine.engine import SleepEngine
    from sleep_engine.lab.data import load_passages
    from sleep_engine.lab.wake_memory import CHAT_PROMPTS
    from sleep_engine.probes import ANSWER_PROMPT, is_correct
    from sleep_engine.lab.scoring import wilson
    chats = [l for l in CHAT_PROMPTS.read_text().splitlines() if l.strip() and not l.startswith("#")][:24]
    qa = [(f"{p.text}\n\n{ANSWER_PROMPT.format(q=q)}", a) for p in load_passages("dev") for q, a in p.qa[:2]]
    engine = SleepEngine(cfg)
    rows = []
    try:
        for pen in penalties:
            t0 = time.time()
            looped = right = 0
            for i, prompt in enumerate(chats):
                r = engine.wake.reply(prompt, session=f"c{pen}-{i}", sampling={"repetition_penalty": pen})
                looped += loops(r.token_ids)
            for i, (prompt, gold) in enumerate(qa):
                r = engine.wake.reply(prompt, session=f"q{pen}-{i}", sampling={"repetition_penalty": pen, "max_new_tokens": 32})
                right += is_correct(r.text, gold)
            engine.wake.conversations.clear()
            rows.append({"penalty": pen, "looped": looped, "n_chats": len(chats), "loop_ci95": wilson(looped, len(chats)),
                         "in_context_right": right, "n_questions": len(qa), "right_ci95": wilson(right, len(qa)),
                         "seconds": round(time.time() - t0)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finally:
        engine.close()
    print(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}))


if __name__ == "__main__":
    main(penalties=tuple(float(a) for a in sys.argv[2:]) or (1.0, 1.1, 1.2, 1.3),
         threads=int(sys.argv[1]) if len(sys.argv) > 1 else 2)

"""The teacher's writing, transformers' `generate` against shared prefixes (README "The teacher
reads each episode once"): the first 32 teacher prompts of a quick sleep over dev p01–p02 (12 chat
anchors + 10 per passage), answered the teacher's way (greedy, 36 tokens, logits kept), and the
gold restatements scored; alternating rounds in one process, the answers compared token for token.
`make writing-check` (~5 min, 2 threads). Usage: teacher_writing_check.py [THREADS] [ROUNDS]"""
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(f):
    t0 = time.perf_counter()
    out = f()
    return out, time.perf_counter() - t0


def main(threads: int = 2, rounds: int = 3) -> dict:
    import torch
    from check_setup import fresh_engine
    from sleep_engine.backbone import float_weights
    from sleep_engine.chat_format import encode_text
    from sleep_engine.config import SleepConfig
    from sleep_engine.consolidation import Consolidator, _forward_answer_logits, _scored_answer_logits
    from sleep_engine.lab.data import load_passages
    from sleep_engine.sampling import chat_ids, generate_batch, prefix_groups
    engine = fresh_engine("writing-check", threads)
    for p in load_passages("dev")[:2]:
        engine.wake.teach(p.text, qa=[{"q": q, "a": a} for q, a in p.qa])
    cfg, tok, lm = SleepConfig.from_preset("quick"), engine.tokenizer, engine.memory.lm
    seeder = Consolidator(engine.memory, tok, cfg, lambda *a, **k: None, lambda: None)
    prompts = seeder.teacher_prompts(engine.pending_episodes(), [], {})
    asked = [chat_ids(tok, q, system) for q, system, _, gold in prompts if gold is None][:32]
    gold = [(chat_ids(tok, q, system), encode_text(tok, g)[:2 * cfg.answer_tokens])
            for q, system, _, g in prompts if g is not None][:16]
    seqs, n_gold = [p + g for p, g in gold], [len(g) for _, g in gold]
    times = {"hf": [], "shared": [], "gold_full": [], "gold_shared": []}
    with float_weights(lm), torch.no_grad():
        for _ in range(rounds):
            (ref, ref_logits), t = timed(lambda: generate_batch(lm, tok, asked, cfg.answer_tokens, return_logits=True,
                                                                batch_size=32))
            times["hf"].append(t)
            (got, got_logits), t = timed(lambda: generate_batch(lm, tok, asked, cfg.answer_tokens, return_logits=True,
                                                                batch_size=32, share_prefixes=True))
            times["shared"].append(t)
            full, t = timed(lambda: _forward_answer_logits(lm, seqs, n_gold, 0))
            times["gold_full"].append(t)
            grouped, t = timed(lambda: _scored_answer_logits(lm, seqs, n_gold, 0))
            times["gold_shared"].append(t)
    engine.close()
    lengths = sorted(map(len, asked))
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": threads, "prompts": len(asked),
            "lengths_min_median_max": [lengths[0], lengths[len(lengths) // 2], lengths[-1]],
            "groups_prefix_rows": [(n, len(rows)) for n, rows in prefix_groups(asked, cfg.answer_tokens)],
            "gold_rows": len(gold), "same_answers": sum(a == b for a, b in zip(got, ref)),
            "tokens": sum(map(len, ref)),
            "logit_max_abs_diff": max(float((x.float() - y.float()).abs().max())
                                      for a, b, x, y in zip(got, ref, got_logits, ref_logits) if a == b),
            "gold_logit_max_abs_diff": float((full - grouped).abs().max()),
            "seconds": {k: [round(v, 2) for v in vs] for k, vs in times.items()},
            "median_ratio_shared_over_hf": round(statistics.median(b / a for a, b in zip(times["hf"], times["shared"])), 3),
            "median_ratio_gold": round(statistics.median(b / a for a, b in zip(times["gold_full"], times["gold_shared"])), 3)}


if __name__ == "__main__":
    print(json.dumps(main(*(int(a) for a in sys.argv[1:3])), indent=1))

"""Which candidate everyday questions does the base model answer right? (issue 16: the set must hold
at least 60 questions the base model answers, so that "95% kept" is not decided by one question.)

Scores the candidates exactly as `Runner.kept_questions` scores the everyday set: the float32 base
(the LoRA baselines' model), the lab's closed-book prompt, greedy, `answer_tokens` new tokens,
gold containment. Candidates that appear in a training or anchor set (Sleep's anchor text and
prompts, the gate's everyday negatives, the long-chat prompts) or in the set already are refused.

    python tests/everyday_check.py [CANDIDATES.jsonl] [--threads N] [--append]

Prints one JSON line per candidate on stderr, then a JSON summary. The right ones are written to
/tmp/frontier/passing.jsonl; with --append they are also appended to
sleep_engine/assets/general_questions.jsonl, after the existing lines (which stay as they are).
"""
import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def excluded() -> tuple[str, set[str]]:
    """The texts and prompts an everyday question must not appear in (lower case)."""
    from sleep_engine import ASSETS
    from sleep_engine.consolidation import ANCHOR_PROMPTS, GATE_NEGATIVE_PROMPTS
    text = " ".join((ASSETS / n).read_text(encoding="utf-8").lower() for n in ("anchor_text.txt", "chat_prompts.txt"))
    return text, {p.lower() for p in ANCHOR_PROMPTS + GATE_NEGATIVE_PROMPTS}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("candidates", nargs="?", default="docs/results/everyday_candidates.jsonl")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--append", action="store_true", help="append the right ones to the everyday set")
    args = ap.parse_args()

    import launch
    import torch
    from sleep_engine import ASSETS
    from sleep_engine.backbone import load_backbone
    from sleep_engine.config import LabConfig
    from sleep_engine.lab.data import general_questions
    from sleep_engine.lab.scoring import Item, evaluate
    from sleep_engine.lab.settings import ExperimentConfig

    cfg = LabConfig(threads=args.threads).validate()
    launch.quiet_libraries(cfg)
    torch.set_num_threads(args.threads)
    existing = general_questions()
    text, prompts = excluded()
    have = {q for q, _ in existing}
    candidates = [json.loads(ln) for ln in Path(args.candidates).read_text(encoding="utf-8").splitlines() if ln.strip()]
    refused = [c["q"] for c in candidates if c["q"] in have or c["q"].lower() in text or c["q"].lower() in prompts]
    candidates = [c for c in candidates if c["q"] not in refused]

    t0 = time.time()
    bb = load_backbone(dataclasses.replace(cfg, quantize="none"))   # the float32 base, as the runner's
    tokens = ExperimentConfig().answer_tokens
    items = [Item("general", q, a) for q, a in existing] + [Item("general", c["q"], c["a"]) for c in candidates]
    res = evaluate(bb.model, bb.tokenizer, items, None, tokens, semantic=False)
    old, new = res["answers"][:len(existing)], res["answers"][len(existing):]
    for a in new:
        print(json.dumps({"q": a["q"], "gold": a["gold"], "right": a["correct"], "reply": a["reply"]}), file=sys.stderr)
    passing = [{"q": a["q"], "a": a["gold"]} for a in new if a["correct"]]
    out = Path("/tmp/frontier/passing.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(p) + "\n" for p in passing), encoding="utf-8")
    if args.append and passing:
        with open(ASSETS / "general_questions.jsonl", "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(p) + "\n" for p in passing))
    right = sum(a["correct"] for a in old) + len(passing)
    print(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "answer_tokens": tokens,
                      "existing_right": sum(a["correct"] for a in old), "existing": len(old),
                      "candidates_right": len(passing), "candidates": len(new), "refused": refused,
                      "right_in_all": right, "goal_60_met": right >= 60, "appended": bool(args.append and passing),
                      "passing": str(out), "seconds": round(time.time() - t0, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the gate's dead zone does to a slept state, served with each ε (no retraining): everyday
answers kept (of the ones the fresh model gets right) and closed-book recall of the taught passages.
A `lab knowledge` run's `<out>/_state/sleep_2tier-1` and `<out>/general_questions.json`:
    .venv/bin/python tests/gate_floor_check.py reports/lab-knowledge 0 0.03 0.05 0.1 [--threads N]"""
import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch
from sleep_engine.config import LabConfig
from sleep_engine.engine import SleepEngine
from sleep_engine.lab.data import load_passages
from sleep_engine.lab.scoring import answer, is_correct, items_of, score

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("run", type=Path, help="a lab knowledge --out directory")
ap.add_argument("floors", type=float, nargs="+")
ap.add_argument("--threads", type=int, default=1)
args = ap.parse_args()
torch.set_num_threads(args.threads)
state = Path(tempfile.mkdtemp()) / "state"   # a copy: loading a state takes its lock
shutil.copytree(args.run / "_state" / "sleep_2tier-1", state)
(state / "lock").unlink(missing_ok=True)
eng = SleepEngine(LabConfig(state_dir=state, threads=args.threads).validate())
mem, tok = eng.memory, eng.tokenizer
kept = json.loads((args.run / "general_questions.json").read_text())["kept"]
source = {ep.id: ep.source for ep in eng.state.episodes.all()}
taught = sorted({source[e] for eps in eng.expert_episodes().values() for e in eps if source.get(e, "").startswith("p")})
passages = {p.id: p for p in load_passages()}
items = items_of([passages[p] for p in taught])
rows = []
for floor in args.floors:
    for mlp in mem.mlps.values():
        mlp.gate_floor = floor
    everyday = answer(mem.lm, tok, [q for q, _ in kept])
    recall = score(items, answer(mem.lm, tok, [it.q for it in items]))
    rows.append({"floor": floor, "everyday_kept": sum(is_correct(r, a) for (_, a), r in zip(kept, everyday)),
                 "everyday_of": len(kept), "closed_book": recall["correct"], "questions": recall["n"]})
    print(json.dumps(rows[-1]), flush=True)
shutil.rmtree(state.parent, ignore_errors=True)

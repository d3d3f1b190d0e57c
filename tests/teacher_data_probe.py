"""What the teacher writes about dev passages p05–p08 (its episode in context, a fresh embedded
model, the quick preset without a budget, one thread): every kept example with its faithfulness,
then the passages and their probe questions. ~2 min.
    .venv/bin/python tests/teacher_data_probe.py"""
import sys
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import torch
torch.set_num_threads(1)
from pathlib import Path
import tempfile
from sleep_engine.config import LabConfig, SleepConfig
from sleep_engine.engine import SleepEngine
from sleep_engine.consolidation import Consolidator, faithfulness
from sleep_engine.lab.data import load_passages
ps = {p.id: p for p in load_passages()}
cfg = LabConfig(state_dir=Path(tempfile.mkdtemp()) / "s", threads=1).validate()
cfg.wake.fast_update_every = 0
eng = SleepEngine(cfg)
for pid in ("p05", "p06", "p07", "p08"):
    eng.wake.teach(ps[pid].text, source=pid)
eps = eng.pending_episodes()
scfg = SleepConfig.from_preset("quick", budget_s=0.0)
ids = [eng.memory.add_expert(tier=2, born=1, gate_bias=-6.0) for _ in eps]
c = Consolidator(eng.memory, eng.tokenizer, scfg, lambda *a, **k: None, lambda: None, seed=1)
ex = c.teacher_data(eps, [], ids)
src = {e.id: e.source for e in eps}
text = {e.id: e.text for e in eps}
print(c.written, c.studied)
for e in ex:
    if e.episode is None:
        continue
    print(src[e.episode], f"{faithfulness(e.answer_text, text[e.episode]):.2f}", "|", e.prompt[:70], "→", e.answer_text[:110].replace("\n", " "))
for pid in ("p06", "p07"):
    print(pid, ps[pid].text)
    print([qa for qa in ps[pid].qa])

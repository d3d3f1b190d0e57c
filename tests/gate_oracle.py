"""Is recall limited by the gate (extraction) or by what the expert learned (storage)?
Closed-book answers of a slept lab state (a `lab knowledge` run's `<out>/_state/sleep_2tier-1`):
as routed, with the question's own expert forced open (gate 1) in every layer, with another
expert forced open (control), with the own expert alone (every other one muted: what the others
cost), and with the own expert's gate logit raised by 2 and 4 (a wider but not forced gate); then
the own expert's mean gate at the prompt's last token. Writes <out>/oracle.json.
    .venv/bin/python tests/gate_oracle.py reports/lab-knowledge/_state/sleep_2tier-1 [threads]"""
import dataclasses
import json
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
from sleep_engine.config import LabConfig
from sleep_engine.engine import SleepEngine
from sleep_engine.lab.data import load_passages
from sleep_engine.lab.scoring import items_of, answer, score
from sleep_engine.probes import ANSWER_PROMPT
from sleep_engine.sampling import chat_ids

state = Path(sys.argv[1])
eng = SleepEngine(LabConfig(state_dir=state, threads=torch.get_num_threads()).validate())
source = {ep.id: ep.source for ep in eng.state.episodes.all()}
owner = {}
for eid, eps in eng.expert_episodes().items():
    for e in eps:
        if source.get(e, "").startswith("p"):
            owner.setdefault(source[e], eid)
passages = {p.id: p for p in load_passages()}
items = items_of([passages[pid] for pid in sorted(owner)])
mem, tok = eng.memory, eng.tokenizer
layers = list(mem.mlps)
qs = [it.q for it in items]
out = {"routed": answer(mem.lm, tok, qs)}
forced = []
for it in items:
    with mem.configured(forced={l: owner[it.passage_id] for l in layers}):
        forced += answer(mem.lm, tok, [it.q])
out["own forced"] = forced
sleep_of = {eid: [p for p, e in owner.items() if e == eid] for eid in set(owner.values())}
ids = sorted(set(owner.values()))
wrong = []
for it in items:
    other = ids[(ids.index(owner[it.passage_id]) + 1) % len(ids)]
    with mem.configured(forced={l: other for l in layers}):
        wrong += answer(mem.lm, tok, [it.q])
out["other forced"] = wrong


def answer_own(it, shift: float = 0.0, alone: bool = False) -> str:
    """The answer with the own expert's gate logit raised by `shift` in every layer, the others muted if `alone`."""
    own = owner[it.passage_id]
    gates = [e.gate_bias for l in layers for e in mem.mlps[l].experts if e.expert_id == own]
    with torch.no_grad():
        for b in gates:
            b += shift
    try:
        with mem.configured(muted=[e for e in ids if e != own] if alone else ()):
            return answer(mem.lm, tok, [it.q])[0]
    finally:
        with torch.no_grad():
            for b in gates:
                b -= shift


out["own alone"] = [answer_own(it, alone=True) for it in items]
for shift in (2.0, 4.0):
    out[f"own gate +{shift:g}"] = [answer_own(it, shift) for it in items]
res = {k: score(items, v) for k, v in out.items()}
for k, r in res.items():
    print(k, {kk: r[kk] for kk in r if kk in ("correct", "n", "accuracy", "semantic")})
# gate of the own expert at the prompt's last position (it produces the first answer token)
last = []
with torch.no_grad():
    for it in items:
        ids_ = torch.tensor([chat_ids(tok, ANSWER_PROMPT.format(q=it.q))])
        with mem.configured(fast_weights=False), mem.capturing() as xs:
            mem.lm.model(input_ids=ids_)
        g = [float(torch.sigmoid(xs[l][-1][0, -1].float() @ e.gate.float() + e.gate_bias.float()))
             for l in layers for e in mem.mlps[l].experts if e.expert_id == owner[it.passage_id]]
        last.append(sum(g) / len(g))
print("own gate at the prompt's last token: mean", round(sum(last) / len(last), 3), "per q", [round(x, 2) for x in last])
json.dump({"answers": out, "items": [dataclasses.asdict(i) if dataclasses.is_dataclass(i) else list(i) for i in items],
           "scores": {k: {kk: r[kk] for kk in r if not isinstance(r[kk], list)} for k, r in res.items()}, "last_gate": last},
          open(state.parent.parent / "oracle.json", "w"), indent=1, default=str)

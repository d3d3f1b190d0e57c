"""The gate fit's speed: one logistic fit per expert (as before 2a425dc, copied here as `old`) against
the joint fit of `Consolidator._fit_gates`, on random hidden states of a 4-expert quick sleep's shapes
(30 layers × d 576; closed tokens capped at 640, each episode's questions and answers at 320), one
thread, alternating, three rounds; prints each time and the medians.
    .venv/bin/python tests/gate_fit_bench.py"""
import random
import statistics
import sys
import time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch, torch.nn.functional as F
torch.set_num_threads(1)
from sleep_engine.consolidation import Consolidator
from sleep_engine.config import SleepConfig
L, d, E = 30, 576, 4
torch.manual_seed(0)
n_closed, n_q, n_a = 1400, 150, 600    # per episode; capped at 640 closed, 320 q, 320 a
kind = torch.cat([torch.zeros(n_closed)] + [torch.cat([torch.ones(n_q), 2 * torch.ones(n_a)]) for _ in range(E)]).long()
episode = torch.cat([torch.full((n_closed,), -1)] + [torch.full((n_q + n_a,), e) for e in range(E)]).long()
x = torch.randn(L, len(kind), d)
c = Consolidator.__new__(Consolidator); c.cfg = SleepConfig(); c.check = lambda: None; c.rng = random.Random(0)
class Gate:
    def __init__(s): s.gate, s.gate_bias = torch.zeros(d), torch.tensor(-6.0)
def old_one(data):
    pos = [data["question"], data["answer"]]; neg = torch.cat([data["closed"], data["other"]], 1)
    w = torch.zeros(L, d, requires_grad=True); b = torch.full((L,), -6.0, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.1)
    def loss_of():
        z = [torch.einsum("lnd,ld->ln", v, w) + b[:, None] for v in pos]
        o = sum(F.binary_cross_entropy_with_logits(v, torch.ones_like(v)) for v in z) / len(z)
        zn = torch.einsum("lnd,ld->ln", neg, w) + b[:, None]
        return 0.5 * (o + F.binary_cross_entropy_with_logits(zn, torch.zeros_like(zn)))
    for _ in range(80):
        loss = loss_of() + 1e-3 * w.pow(2).sum(-1).mean(); opt.zero_grad(); loss.backward(); opt.step()
def old():
    for e in range(E):
        own = (kind > 0) & (episode == e)
        g = {"question": own & (kind == 1), "answer": own & (kind == 2), "closed": kind == 0, "other": (kind > 0) & ~own}
        caps = {"question": 320, "answer": 320, "closed": 640, "other": 320}
        data = {k: x[:, c._sample(r.nonzero().squeeze(1), caps[k])] for k, r in g.items()}
        old_one(data)
def new():
    rows, w, t, counts = c.gate_fit_weights(kind, episode, [{e} for e in range(E)], 320)
    c._fit_gates([[Gate() for _ in range(L)] for _ in range(E)], x[:, rows], w, t)
times = {"old": [], "new": []}
for rep in range(3):
    for name, f in (("old", old), ("new", new)):
        t0 = time.perf_counter(); f(); times[name].append(time.perf_counter() - t0)
        print(name, round(times[name][-1], 1), flush=True)
print({k: round(statistics.median(v), 1) for k, v in times.items()})

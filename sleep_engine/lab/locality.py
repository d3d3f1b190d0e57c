"""Locality of Sleep's experts in the lab (issue 13): gate selectivity on the passages' real
questions, and interference between passages.

    selectivity(memory, tokenizer, passages, sleeps, everyday)   per expert: mean gate on its own
        passages' questions, the fixed everyday questions, the other passages' questions
    python -m sleep_engine.lab.locality RESULT.json [STATE_DIR]   both, after the fact, for a
        finished `lab knowledge` n=many Sleep result (STATE_DIR: its engine state under _state/)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..probes import gate_selectivity, question_gates
from .data import Passage, general_questions, load_passages
from .scoring import borrowing


def selectivity(memory, tokenizer, passages: list[Passage], sleeps: list[dict], everyday: list[str]) -> dict:
    """`sleeps`: the Sleep learner's per-sleep records ({"passages": [...], "experts_added": [...],
    "expert_passages": {expert: [...]}} — without the last, each expert holds its sleep's passages,
    and a slow expert every passage consolidated so far). The questions are the passages' probe
    questions (the test): used here only to measure."""
    from ..engine import slow_experts
    owners, slow = {}, []
    for i, s in enumerate(sleeps):
        held = s.get("expert_passages") or {}
        owners.update({e: list(held.get(e, s["passages"])) for e in s.get("experts_added", [])})
        made = slow_experts(s.get("tier_consolidation"), [p for s2 in sleeps[:i + 1] for p in s2["passages"]])
        owners.update({e: list(held.get(e, ps)) for e, ps in made.items()})
        slow += list(made)
    owners = {e: ps for e, ps in owners.items() if e in memory.expert_ids()}
    asked = [(p.id, q) for p in passages for q, _ in p.qa]
    gates = question_gates(memory, tokenizer, [q for _, q in asked] + list(everyday), list(owners))
    out = {}
    for eid, own_ids in owners.items():
        g = gates[eid]
        own = [v for (pid, _), v in zip(asked, g) if pid in own_ids]
        other = [v for (pid, _), v in zip(asked, g) if pid not in own_ids]
        out[eid] = {"passages": own_ids, "slow": eid in slow, **gate_selectivity(own, g[len(asked):], other)}
    return out


def main(argv=None) -> None:
    argv = argv or sys.argv[1:]
    result = json.loads(Path(argv[0]).read_text())
    split = result.get("data", {}).get("split") or "dev"
    by_id = {p.id: p for p in load_passages("dev") + load_passages("test")}
    taught = [pid for s in result["learn"]["sleeps"] for pid in s["passages"]]
    passages = [by_id[pid] for pid in taught]
    out = {"split": split, "interference": borrowing(result["answers"], passages)}
    if len(argv) > 1:
        import torch

        from ..config import LabConfig
        from ..engine import SleepEngine
        torch.set_num_threads(1)
        engine = SleepEngine(LabConfig(state_dir=Path(argv[1]), threads=1))
        out["gate_selectivity"] = selectivity(engine.memory, engine.tokenizer, passages, result["learn"]["sleeps"],
                                              [q for q, _ in general_questions()])
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

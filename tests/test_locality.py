"""Locality of sleep-added experts (issue 13): born closed, gate trained on both sides, selectivity
and interference metrics. Tiny random model with the real tokenizer; hand-made data for the metrics."""

import pytest
import torch

from sleep_engine.consolidation import Consolidator, subjects
from sleep_engine.lab.data import general_questions
from sleep_engine.memory import routed_gate
from sleep_engine.probes import gate_selectivity, interference, passage_names, question_gates
from sleep_engine.sampling import chat_ids
from test_sleep import QA, TEXTS, teach_two, tiny_settings

EVERYDAY = "What is the capital of France?"   # one of assets/general_questions.jsonl: never a training negative


def _logits(engine, text):
    ids = torch.tensor([engine.tokenizer(text)["input_ids"]])
    with torch.no_grad():
        return engine.memory.lm(input_ids=ids).logits


def test_a_sleep_added_expert_is_born_closed_and_changes_no_logit(tiny_engine):
    before = _logits(tiny_engine, "The lighthouse of Quarrow Point was painted violet.")
    cfg = tiny_settings()
    eid = tiny_engine.memory.add_expert(tier=2, born=1, gate_bias=cfg.gate_bias_init)
    assert torch.equal(_logits(tiny_engine, "The lighthouse of Quarrow Point was painted violet."), before)
    gates = question_gates(tiny_engine.memory, tiny_engine.tokenizer, [EVERYDAY, QA[0][0]["q"]])[eid]
    floor = tiny_engine.memory.cfg.gate_floor
    born = float(routed_gate(torch.tensor(cfg.gate_bias_init), floor))
    assert cfg.gate_bias_init <= -4 and all(abs(g - born) < 1e-6 for g in gates)
    assert floor == 0 or born == 0.0   # σ(−6) ≈ 0.0025 lies in the dead zone: the gate is exactly shut


def test_after_a_sleep_the_gate_is_open_on_its_episode_and_closed_on_everyday_questions(tiny_engine):
    teach_two(tiny_engine)
    # without the everyday answers among the negatives: a random model's answers are random tokens,
    # which crowd the everyday prompts out of the closed side's 640-token sample (with them this
    # failed: own 0.086, everyday 0.109); their part has a test of its own
    # every layer trains: the tiny model has two, and its top one alone did not keep a random model's gates apart;
    # the chat anchors are closed examples too (quick has none since 3f24af0: without them this random
    # model's everyday gate was 0.040 against 0.035 on an own question; the embedded model's stays
    # under 0.003 × its own, make user-check)
    tiny_engine.sleep(tiny_settings(dreaming=False, lti=False, distill_steps=6, episode_experts=1,
                                    gate_negative_answers=0, trained_layers=1.0, anchor_prompts=12), wait=True)
    summary = tiny_engine.events.since(0)[-1].data["summary"]
    (eid,) = summary["experts_added"]
    own = [qa[0]["q"] for qa in QA]
    g = question_gates(tiny_engine.memory, tiny_engine.tokenizer, own + [EVERYDAY])[eid]
    assert min(g[:2]) > g[2], g                       # held-out everyday question below both own questions
    c = summary["consolidation"]
    assert c["gate_fit_loss"] < c["gate_fit_first_loss"] and c["gate_fit_tokens"]["question"] > 0
    sel = summary["gate_selectivity"][eid]            # the sleep summary reports it (launch.py sleep --json)
    assert sel["episodes"] == [1, 2] and sel["n_everyday"] == len(general_questions()) and sel["n_own"] == 2
    assert sel["everyday"] < sel["own"] and sel["everyday_over_own"] < 1


def test_episode_groups_give_each_taught_episode_its_expert_and_the_chat_turns_one_more():
    from sleep_engine.consolidation import episode_groups
    from sleep_engine.store import Episode
    eps = [Episode(1, "taught", "a"), Episode(2, "turn", "b"), Episode(3, "taught", "c"), Episode(4, "taught", "d"),
           Episode(5, "turn", "e")]
    assert episode_groups(eps, 1) == [[1, 2, 3, 4, 5]]
    assert episode_groups(eps, 4) == [[1], [3], [4], [2, 5]]
    assert episode_groups(eps, 2) == [[1, 4], [3], [2, 5]]           # more taught episodes than experts: round-robin
    assert episode_groups([eps[1], eps[4]], 4) == [[2, 5]]           # chat turns only: one expert


def test_with_an_expert_per_episode_each_gate_opens_on_its_own_episode_not_the_others(tiny_engine):
    """Two taught episodes, episode_experts = 2: two experts, each fitted open on its episode and
    closed on the other's, so a question about one calls its own expert more than the other."""
    teach_two(tiny_engine)
    tiny_engine.sleep(tiny_settings(dreaming=False, lti=False, distill_steps=6, episode_experts=2), wait=True)
    summary = tiny_engine.events.since(0)[-1].data["summary"]
    e1, e2 = summary["experts_added"]
    assert summary["expert_episodes"] == {e1: [1], e2: [2]}
    g = question_gates(tiny_engine.memory, tiny_engine.tokenizer, [QA[0][0]["q"], QA[1][0]["q"], EVERYDAY])
    assert g[e1][0] > g[e1][1] and g[e2][1] > g[e2][0], g            # each opens more on its own episode
    assert g[e1][2] < g[e1][0] and g[e2][2] < g[e2][1], g            # and stays below it on everyday
    sel = summary["gate_selectivity"]
    assert sel[e1]["episodes"] == [1] and sel[e2]["episodes"] == [2] and sel[e1]["n_own"] == sel[e1]["n_other"] == 1
    assert set(summary["consolidation"]["gate_fits"]) == {e1, e2}
    assert tiny_engine.expert_episodes() == {e1: [1], e2: [2]}       # from the committed manifest


def test_without_the_gate_loss_nothing_teaches_the_gate_to_tell_them_apart(tiny_engine):
    """Control for the test above: the same sleep with the gate loss off and the old half-open
    birth leaves the gate near 0.5 everywhere."""
    teach_two(tiny_engine)
    tiny_engine.sleep(tiny_settings(dreaming=False, lti=False, distill_steps=6, gate_loss=0.0, gate_bias_init=0.0),
                      wait=True)
    eid = tiny_engine.memory.expert_ids()[0]
    g = question_gates(tiny_engine.memory, tiny_engine.tokenizer, [QA[0][0]["q"], EVERYDAY])[eid]
    assert all(0.2 < v < 0.8 for v in g), g


def test_gate_targets_mark_episode_tokens_open_and_anchor_tokens_closed(tiny_engine):
    from sleep_engine.consolidation import Example
    c = Consolidator(tiny_engine.memory, tiny_engine.tokenizer, tiny_settings(), lambda *a, **k: None, lambda: None)
    ep = Example(list(range(20)), [], 3, "q", "a", about_episode=True)   # the last 3 tokens: the answer
    anchor = Example(list(range(12)), [], 3, "q", "a", about_episode=False)
    t = c.gate_targets([ep, anchor], 20)
    p = c.chat_prefix
    assert 0 < p < 20
    assert (t[0, :p] == -1).all()                                     # shared template/system prompt ignored
    assert (t[0, p:17] == 1).all() and (t[0, 17:] == 2).all()         # question open, answer open (own group)
    assert (t[1, :12] == 0).all() and (t[1, 12:] == -1).all()        # anchors closed everywhere; padding ignored


def test_an_old_state_with_half_open_gates_keeps_them(tiny_engine):
    """States saved before the closed birth hold gate_bias = 0: loading keeps it (no new default)."""
    mem = tiny_engine.memory
    mem.add_expert(tier=2, born=1)          # the old birth: bias 0
    tensors, manifest = mem.memory_state()
    mem.remove_experts(mem.expert_ids())
    mem.load_memory_state(tensors, manifest)
    assert all(float(e.gate_bias) == 0.0 for e in mem.expert_modules("e0"))


def test_gate_selectivity_on_hand_made_gates():
    s = gate_selectivity(own=[0.8, 0.6], everyday=[0.05, 0.09], other=[0.2, 0.4, 0.3])
    assert s["own"] == pytest.approx(0.7) and s["everyday"] == pytest.approx(0.07) and s["other"] == pytest.approx(0.3)
    assert s["everyday_over_own"] == pytest.approx(0.1) and s["other_over_own"] == pytest.approx(0.3 / 0.7)
    assert s["meets_target"] is True and (s["n_own"], s["n_everyday"], s["n_other"]) == (2, 2, 3)
    assert gate_selectivity([0.5], [0.2])["meets_target"] is False
    empty = gate_selectivity([], [0.1], None)
    assert empty["own"] is None and empty["everyday_over_own"] is None and empty["meets_target"] is None


def test_interference_counts_wrong_answers_naming_another_passage():
    passages = {"p1": "Velmora Ridge was mapped in 1847 by the cartographer Idris Kallowen.",
                "p2": "The Cinderfox Orchestra is led by the conductor Mara Quillon since 1986."}
    assert {"velmora", "ridge", "1847", "idris", "kallowen"} <= passage_names(passages["p1"])
    assert "the" not in passage_names(passages["p2"])                 # sentence openers are not names
    answers = [
        {"passage": "p1", "q": "Who mapped Velmora Ridge?", "reply": "Idris Kallowen.", "correct": True},
        {"passage": "p1", "q": "When was Velmora Ridge mapped?", "reply": "It was mapped in 1986.", "correct": False},
        {"passage": "p2", "q": "Who leads the Cinderfox Orchestra?", "reply": "Idris Kallowen leads it.",
         "correct": False},
        {"passage": "p2", "q": "Since when?", "reply": "Since the spring of 1950.", "correct": False},
        {"passage": "p2", "q": "Who leads the Cinderfox Orchestra?", "reply": "The Cinderfox conductor.",
         "correct": False},   # its own passage's name: a wrong answer, not interference
    ]
    r = interference(answers, passages)
    assert r["wrong"] == 4 and r["from_other_passage"] == 2 and r["rate"] == pytest.approx(0.5)
    assert [h["from"] for h in r["examples"]] == [{"p2": ["1986"]}, {"p1": ["idris", "kallowen"]}]
    assert interference([], passages)["rate"] is None


def test_a_word_several_passages_share_is_not_borrowed_from_one_of_them():
    """"Mount" in a wrong answer named the one taught passage with a mountain (2026-12-05); it
    names no single passage of the collection, so it is not counted; a distinctive name still is."""
    from collections import Counter

    from sleep_engine.lab.data import common_names, load_passages
    passages = {"p1": "Velmora Ridge was mapped in 1847 by the cartographer Idris Kallowen.",
                "p2": "Mount Tessaly above the Orrin River was first climbed by Mara Quillon."}
    wrong = [{"passage": "p1", "q": "Who mapped Velmora Ridge?", "reply": "Mount Everest's climbers.", "correct": False},
             {"passage": "p1", "q": "Who mapped Velmora Ridge?", "reply": "Mara Quillon.", "correct": False}]
    assert interference(wrong, passages)["from_other_passage"] == 2            # without the common words
    r = interference(wrong, passages, common=frozenset({"mount", "river"}))
    assert r["from_other_passage"] == 1 and r["examples"][0]["from"] == {"p2": ["mara", "quillon"]}
    common = common_names()
    passages_with = Counter(n for p in load_passages() for n in passage_names(p.text))
    shared = [n for n in ("river", "lake", "mount") if passages_with[n] > 1]
    assert shared and set(shared) <= common
    one_only = {n for n, k in passages_with.items() if k == 1}
    assert len(one_only & common) < 0.1 * len(one_only)   # the names that teach something stay names


def test_inspect_summary_shows_each_experts_gate_selectivity():
    from app.views import selectivity_rows, sleep_summary
    manifest = {"gate_selectivity": {
        "e0": {"episodes": [1, 2], "own": 0.6, "everyday": 0.03, "other": 0.2, "everyday_over_own": 0.05,
               "meets_target": True},
        "e1": {"episodes": [3], "own": 0.4, "everyday": 0.2, "other": None, "everyday_over_own": 0.5,
               "meets_target": False}}}
    rows = selectivity_rows(manifest)
    assert rows == [("gate of e0 (episodes 1, 2)", "own 0.600, everyday 0.030 (0.05× own ✓ ≤ 0.1×), other episodes 0.200"),
                    ("gate of e1 (episodes 3)", "own 0.400, everyday 0.200 (0.50× own ✗ > 0.1×), other episodes –")]
    assert sleep_summary(manifest)[-2:] == rows and selectivity_rows({}) == []


def test_the_fitted_gate_is_sharpened_then_stays_frozen_while_the_expert_distils(tiny_engine):
    """σ(k·(z − θ)): the fit's gate scaled by k and shifted by θ; distillation trains A and B only."""
    teach_two(tiny_engine)
    mem = tiny_engine.memory
    runs = {}
    for k, theta in ((1.0, 0.0), (3.0, 1.0)):
        eid = mem.add_expert(tier=2, born=1, gate_bias=-6.0, expert_id=f"e{len(runs)}")
        cfg = tiny_settings(gate_sharpness=k, gate_threshold=theta, distill_steps=2, lti=False, trained_layers=1.0)
        c = Consolidator(mem, tiny_engine.tokenizer, cfg, lambda *a, **kw: None, lambda: None, seed=3)
        examples = c.teacher_data(tiny_engine.pending_episodes(), [], [eid])
        with mem.configured(muted=[e for e in mem.expert_ids() if e != eid]):
            fit = c.fit_gate(examples, {eid: None}, c.gate_negative_states([eid]))
        runs[(k, theta)] = [(m.gate.detach().clone(), float(m.gate_bias)) for m in mem.expert_modules(eid)]
        assert fit["gate_sharpness"] == k and fit["gate_threshold"] == theta
        mem.remove_experts([eid])
    for (w1, b1), (w3, b3) in zip(runs[(1.0, 0.0)], runs[(3.0, 1.0)]):
        assert torch.allclose(w3, 3 * w1, atol=1e-5) and b3 == pytest.approx(3 * (b1 - 1.0), abs=1e-4)
    eid = mem.add_expert(tier=2, born=1, gate_bias=-6.0)
    c = Consolidator(mem, tiny_engine.tokenizer, tiny_settings(distill_steps=2, lti=False, trained_layers=1.0),
                     lambda *a, **kw: None, lambda: None, seed=3)
    examples = c.teacher_data(tiny_engine.pending_episodes(), [], [eid])
    orig = c.fit_gate
    after_fit = {}

    def fit_and_remember(*a, **kw):
        out = orig(*a, **kw)
        after_fit["gates"] = [(m.gate.detach().clone(), m.B.detach().clone()) for m in mem.expert_modules(eid)]
        return out
    c.fit_gate = fit_and_remember
    c.seed(examples, [eid])
    for m, (g, B) in zip(mem.expert_modules(eid), after_fit["gates"]):
        assert torch.equal(m.gate, g) and not torch.equal(m.B, B)   # gate as fitted, B learned


def test_an_older_gate_open_everywhere_is_shut_on_the_new_episode_and_kept_on_its_own(tiny_engine):
    """`close_older_gates`: an older expert whose gate is open on every token (bias +4) is nudged
    to closed on the new episode's text and questions, and stays more open on the older one's."""
    teach_two(tiny_engine)
    mem = tiny_engine.memory
    old_ep, new_ep = tiny_engine.pending_episodes()
    old = mem.add_expert(tier=2, born=1, gate_bias=4.0)
    new = mem.add_expert(tier=2, born=2, gate_bias=-6.0)
    c = Consolidator(mem, tiny_engine.tokenizer, tiny_settings(older_gate_steps=60, older_gate_lr=0.05),
                     lambda *a, **kw: None, lambda: None, seed=3)
    new_gate = [m.gate_bias.item() for m in mem.expert_modules(new)]
    report = c.close_older_gates([new_ep], [old_ep], [new])
    assert list(report) == [old]                                   # the sleep's own expert is not touched
    assert [m.gate_bias.item() for m in mem.expert_modules(new)] == new_gate
    r = report[old]
    assert r["new_before"] > 0.95 and r["new_after"] < 0.5 * r["new_before"], r
    assert r["kept_after"] > r["new_after"] + 0.15, r          # a random tiny model: far from separable
    own_q, new_q = QA[0][0]["q"], QA[1][0]["q"]
    g = question_gates(mem, tiny_engine.tokenizer, [own_q, new_q])[old]
    assert g[0] > g[1], g                                          # its own question above the new one's
    off = Consolidator(mem, tiny_engine.tokenizer, tiny_settings(older_gate_steps=0), lambda *a, **kw: None,
                       lambda: None)
    assert off.close_older_gates([new_ep], [old_ep], [new]) == {}


def test_stop_lands_inside_the_gate_fit(tiny_engine):
    """The gate fit reads every example and runs its Adam steps without other checkpoints: a Stop
    raised there must not wait for the whole fit (stop-check measured 8.5–11.8 s before)."""
    teach_two(tiny_engine)
    mem = tiny_engine.memory
    eid = mem.add_expert(tier=2, born=1, gate_bias=-6.0)
    calls = []

    class Stop(Exception):
        pass

    def check():
        calls.append(1)
        if len(calls) > 2:
            raise Stop()
    c = Consolidator(mem, tiny_engine.tokenizer, tiny_settings(gate_fit_steps=200, lti=False), lambda *a, **kw: None,
                     lambda: None, seed=3)
    examples = c.teacher_data(tiny_engine.pending_episodes(), [], [eid])
    negatives = c.gate_negative_states([eid])
    c.check = check
    before = [m.gate.detach().clone() for m in mem.expert_modules(eid)]
    with pytest.raises(Stop):
        c.fit_gate(examples, {eid: None}, negatives)
    assert len(calls) == 3 and all(torch.equal(m.gate, g) for m, g in zip(mem.expert_modules(eid), before))


def _bare_consolidator(**settings):
    """A Consolidator for the gate-fit arithmetic alone (no model is touched)."""
    c = Consolidator.__new__(Consolidator)
    c.cfg, c.check, c.older_texts = tiny_settings(**settings), lambda: None, []
    import random
    c.rng = random.Random(0)
    return c


def test_gate_fit_weights_balance_each_experts_own_tokens_against_the_rest():
    """Hand-made tokens: kind 0 closed ×4; episode 1: 2 questions, 1 answer; episode 2: 1 question,
    3 answers. Expert of episode 1: ½ split over its question and answer groups, ½ over the closed
    tokens and the other episode's tokens (capped at `cap` tokens' worth)."""
    kind = torch.tensor([0, 0, 0, 0, 1, 1, 2, 1, 2, 2, 2])
    episode = torch.tensor([-1, -1, -1, -1, 1, 1, 1, 2, 2, 2, 2])
    rows, w, t, counts = _bare_consolidator().gate_fit_weights(kind, episode, [{1}, {2}], cap=2)
    assert rows[:8].tolist() == list(range(8)) and len(rows) == 10   # episode 2's answers capped at 2
    assert counts[0] == {"question": 2, "answer": 1, "closed": 4, "plain text": 0, "other episodes": 3}
    assert torch.allclose(w.sum(1), torch.ones(2))
    assert w[0, 4].item() == pytest.approx(0.125) and w[0, 6].item() == pytest.approx(0.25)
    assert w[0, 0].item() == pytest.approx(0.5 / 6)                       # 4 closed + min(3, cap=2) others
    assert w[0, 7:].sum().item() == pytest.approx(0.5 * 2 / 6)            # the others weigh as 2 tokens
    assert t[0].tolist()[:8] == [0, 0, 0, 0, 1, 1, 1, 0] and t[1, 7].item() == 1 and t[1, 4].item() == 0
    none_owned = _bare_consolidator().gate_fit_weights(kind, episode, [None], cap=8)
    assert none_owned[3][0]["other episodes"] == 0 and none_owned[2][0, 4:].eq(1).all()


def test_the_plain_text_document_is_kept_whole_at_its_share_of_the_closed_side():
    """Hand-made tokens: 6 closed chat tokens (kind 0, sampled down to 2·cap = 4), 3 plain-text
    tokens (kind 3, all kept), one episode's question and answer. The closed side's ½ splits
    (1 − s) over the sampled chat tokens and s over the document, s = TEXT_SHARE."""
    from sleep_engine.consolidation import TEXT_SHARE
    kind = torch.tensor([0, 0, 0, 0, 0, 0, 3, 3, 3, 1, 2])
    episode = torch.tensor([-1] * 9 + [1, 1])
    rows, w, t, counts = _bare_consolidator().gate_fit_weights(kind, episode, [{1}], cap=2)
    assert counts[0] == {"question": 1, "answer": 1, "closed": 4, "plain text": 3, "other episodes": 0}
    assert rows[-5:].tolist() == [6, 7, 8, 9, 10] and len(rows) == 9
    assert w[0, -5:-2].tolist() == pytest.approx([0.5 * TEXT_SHARE / 3] * 3)
    assert w[0, :4].tolist() == pytest.approx([0.5 * (1 - TEXT_SHARE) / 4] * 4)
    assert w.sum().item() == pytest.approx(1.0) and t[0, -5:].tolist() == [0, 0, 0, 1, 1]
    only_text = _bare_consolidator().gate_fit_weights(kind[6:], episode[6:], [{1}], cap=2)
    assert only_text[1][0, :3].sum().item() == pytest.approx(0.5)   # no chat negatives: the document is the closed side


def test_the_gate_fit_reads_the_plain_text_as_one_document_with_its_paragraph_breaks(tiny_engine):
    """`gate_text_states`: every token of assets/anchor_text.txt, breaks included, in windows."""
    from sleep_engine.chat_format import encode_text
    from sleep_engine.consolidation import ANCHOR_TEXT
    eid = tiny_engine.memory.add_expert(tier=2, born=1, gate_bias=-6.0)
    c = Consolidator(tiny_engine.memory, tiny_engine.tokenizer, tiny_settings(), lambda *a, **kw: None, lambda: None)
    states = c.gate_text_states([eid], window=64)
    n = len(encode_text(tiny_engine.tokenizer, ANCHOR_TEXT.read_text(encoding="utf-8").strip()))
    assert "\n\n" in ANCHOR_TEXT.read_text() and n > 64
    assert set(states) == set(tiny_engine.memory.mlps) and all(v.shape == (n, 64) for v in states.values())
    assert c.gate_text_states([], window=64) == {}


@pytest.mark.parametrize("frozen", [True, False])
def test_a_gate_that_still_trains_keeps_the_document_among_its_negatives(tiny_engine, frozen):
    """`prepare_gates`: a frozen gate needs no negatives afterwards; one that trains during
    distillation gets the everyday prompts' and the document's states for its gate loss."""
    teach_two(tiny_engine)
    eid = tiny_engine.memory.add_expert(tier=2, born=1, gate_bias=-6.0)
    c = Consolidator(tiny_engine.memory, tiny_engine.tokenizer, tiny_settings(gate_frozen=frozen, lti=False),
                     lambda *a, **kw: None, lambda: None, seed=3)
    examples = c.teacher_data(tiny_engine.pending_episodes(), [], [eid])
    tiny_engine.memory.train_only([eid])   # as `seed` does before it
    drawn = c.rng.getstate()
    fitted, negatives, _ = c.prepare_gates(examples, [eid], {eid: None})
    c.rng.setstate(drawn)   # the same everyday prompts again
    everyday, text = c.gate_negative_states([eid]), c.gate_text_states([eid])
    assert fitted and all(m.gate.requires_grad is not frozen for m in tiny_engine.memory.expert_modules(eid))
    assert set(negatives) == set(everyday) == set(text)
    for layer, v in negatives.items():
        want = everyday[layer] if frozen else torch.cat([everyday[layer], text[layer]])
        assert torch.allclose(v, want, atol=1e-5)


def test_the_joint_gate_fit_fits_each_expert_as_if_alone():
    """One batched fit of two experts' gates = two separate fits on the same tokens."""
    class Gate:
        def __init__(self, d):
            self.gate, self.gate_bias = torch.zeros(d), torch.tensor(-6.0)
    torch.manual_seed(0)
    x = torch.randn(3, 40, 8)
    weights, targets = torch.rand(2, 40), (torch.rand(2, 40) > 0.5).float()
    weights /= weights.sum(1, keepdim=True)
    c = _bare_consolidator(gate_fit_steps=30)
    both = [[Gate(8) for _ in range(3)] for _ in range(2)]
    first, last = c._fit_gates(both, x, weights, targets)
    for e in range(2):
        alone = [[Gate(8) for _ in range(3)]]
        f1, l1 = c._fit_gates(alone, x, weights[e:e + 1], targets[e:e + 1])
        assert f1[0] == pytest.approx(first[e]) and l1[0] == pytest.approx(last[e], rel=1e-4) and last[e] < first[e]
        for m_alone, m_both in zip(alone[0], both[e]):
            assert torch.allclose(m_alone.gate, m_both.gate, atol=1e-4)
            assert m_alone.gate_bias.item() == pytest.approx(m_both.gate_bias.item(), abs=1e-4)


def test_older_gates_shut_together_move_each_as_if_alone():
    """`_close_gates` of two experts at once = each shut alone on the same tokens (its readings too)."""
    class Gate:
        def __init__(self, w, b):
            self.gate, self.gate_bias = w.clone(), b.clone()
    torch.manual_seed(0)
    keep, close = torch.randn(3, 30, 8), torch.randn(3, 20, 8)
    start = [(torch.randn(3, 8), torch.randn(3) + 2) for _ in range(2)]
    c = _bare_consolidator(older_gate_steps=25, older_gate_lr=0.05)
    both = {f"e{i}": [Gate(w[l], b[l]) for l in range(3)] for i, (w, b) in enumerate(start)}
    together = c._close_gates(both, keep, close)
    for i, (w, b) in enumerate(start):
        alone = {"x": [Gate(w[l], b[l]) for l in range(3)]}
        reading = c._close_gates(alone, keep, close)["x"]
        assert reading == pytest.approx(together[f"e{i}"], abs=2e-4)
        assert reading["new_after"] < reading["new_before"]
        for m_alone, m_both in zip(alone["x"], both[f"e{i}"]):
            assert torch.allclose(m_alone.gate, m_both.gate, atol=1e-5)
            assert m_alone.gate_bias.item() == pytest.approx(m_both.gate_bias.item(), abs=1e-5)


def test_the_new_gates_are_fitted_shut_on_questions_about_older_episodes():
    """`gate_old_questions` subject questions per older taught episode join the gate's negatives;
    none is a probe question, and 0 adds none."""
    c = _bare_consolidator(gate_old_questions=3)
    c.older_texts = [TEXTS[0], TEXTS[1]]
    asks = c.older_questions()
    names = [n for t in c.older_texts for n in subjects(t)]
    assert len(asks) == 6 and all(any(n in q for n in names) for q in asks)
    assert not {q for q in asks} & {item["q"] for qa in QA for item in qa}
    off = _bare_consolidator(gate_old_questions=0)
    off.older_texts = list(c.older_texts)
    assert off.older_questions() == []
    c.older_texts = [TEXTS[0]] * 40
    assert len(c.older_questions(cap=16)) == 16


def test_the_new_gates_are_fitted_shut_on_the_everyday_answers_too(tiny_engine):
    """`gate_negative_answers`: the closed states hold each everyday prompt followed by the
    pre-sleep model's own answer (up to that many tokens); the prompts' states are the same as
    without, and 0 leaves the prompts alone."""
    def states(answers):
        c = Consolidator(tiny_engine.memory, tiny_engine.tokenizer,
                         tiny_settings(gate_negatives=4, gate_distractors=0, gate_negative_answers=answers),
                         lambda *a, **kw: None, lambda: None, seed=5)
        return c.gate_negative_states([])
    bare, with_answers = states(0), states(6)
    layer = next(iter(bare))
    added = with_answers[layer].shape[0] - bare[layer].shape[0]
    assert 0 < added <= 4 * 6
    first = len(chat_ids(tiny_engine.tokenizer, "x"))   # no everyday prompt is shorter: its tokens come first
    assert torch.allclose(with_answers[layer][:first], bare[layer][:first], atol=1e-5)


def test_the_teacher_can_answer_about_its_episode_without_the_older_experts(tiny_engine):
    """`teacher_old_experts=False`: prompts with their episode in context are answered with every
    routed expert muted (an older expert's facts cannot leak into the new teacher data); the
    others (chat anchors, self-replay) keep the older experts, which hold what they ask about."""
    from sleep_engine.sampling import chat_ids, generate_batch
    mem, tok = tiny_engine.memory, tiny_engine.tokenizer
    old = mem.add_expert(tier=2, born=1, gate_bias=6.0)   # an older expert, wide open and loud
    for m in mem.expert_modules(old):
        torch.nn.init.normal_(m.B, std=2.0)
    new = mem.add_expert(tier=2, born=2, gate_bias=-6.0)
    prompts = [chat_ids(tok, "Tell me about Quarrow Point.", "Notes: " + TEXTS[0]), chat_ids(tok, "Name three kinds of fruit.")]
    views = {}
    for muted in ([old, new], [new]):
        with mem.configured(muted=muted):
            views[len(muted)] = generate_batch(mem.lm, tok, prompts, 6, return_logits=True)
    assert views[1][0][0] != views[2][0][0]   # the older expert changes the in-context answer
    for keep, expected in ((True, (views[1][0][0], views[1][0][1])), (False, (views[2][0][0], views[1][0][1]))):
        c = Consolidator(mem, tok, tiny_settings(teacher_old_experts=keep, answer_tokens=6), lambda *a, **kw: None,
                         lambda: None, seed=3)
        answers, logits = c.teacher_answers(prompts, [True, False], [new])
        assert tuple(answers) == expected and len(logits) == 2


def test_gold_quotes_answer_recitations_and_quotes_with_the_episodes_own_words(tiny_engine):
    from sleep_engine.consolidation import gold_answer, seed_prompts
    text = "Velmora Ridge is a town. It sits beside Lake Tessarine. Its clock tower has a copper roof."
    asks = seed_prompts(text, 10)
    assert gold_answer(asks[0], text) == text
    assert [gold_answer(q, text) for q in asks[1:3]] == ["It sits beside Lake Tessarine.", "Its clock tower has a copper roof."]
    assert gold_answer("Tell me about Velmora Ridge.", text) is None
    teach_two(tiny_engine)
    mem = tiny_engine.memory
    eid = mem.add_expert(tier=2, born=1, gate_bias=-6.0)
    c = Consolidator(mem, tiny_engine.tokenizer, tiny_settings(gold_quotes=True, prompts_per_episode=2), lambda *a, **kw: None,
                     lambda: None, seed=3)
    examples = [e for e in c.teacher_data(tiny_engine.pending_episodes(), [], [eid]) if e.about_episode]
    recited = [e for e in examples if e.prompt.startswith("Repeat your notes")]
    assert {e.answer_text for e in recited} == set(TEXTS)
    for e in recited:
        assert e.teacher_logits.shape[0] == e.n_answer and e.student[-e.n_answer:] == e.teacher[-e.n_answer:]


def test_standalone_sentences_name_the_subject_where_a_sentence_opens_with_a_pronoun_or_its_kind():
    from sleep_engine.consolidation import episode_subject, standalone_sentences
    club = ("Brackenholt Rovers is an amateur hurling club founded in the mill town of Stellinford. "
            "The club plays its home matches at Pellamy Field. Its record goal scorer is Fenwick Oduya.")
    assert episode_subject(club) == "Brackenholt Rovers"
    assert standalone_sentences(club)[1:] == ["Brackenholt Rovers plays its home matches at Pellamy Field.",
                                              "Brackenholt Rovers' record goal scorer is Fenwick Oduya."]
    animal = "The frost-tailed vossel is a small mammal. It has silver fur. The biologist Mara Dunwoody described it."
    assert episode_subject(animal) == "The frost-tailed vossel"
    assert standalone_sentences(animal)[1:] == ["The frost-tailed vossel has silver fur.",
                                                "The biologist Mara Dunwoody described it."]   # not its kind: kept
    lamp = "Philippa Gorranth designed a wind-up lamp in 1919. She built it in Ravensmoor Quay. The lamp could shine for hours."
    assert episode_subject(lamp) == "Philippa Gorranth"
    assert standalone_sentences(lamp)[1:] == ["Philippa Gorranth built it in Ravensmoor Quay.",
                                              "The lamp could shine for hours."]   # the lamp is not Philippa
    assert episode_subject("In 1896 the naturalist Barnaby Kolt led an expedition. His team went by canoe.") == "Barnaby Kolt"


def test_restatements_are_answered_with_the_standalone_sentence_and_scored_by_the_teacher(tiny_engine):
    from sleep_engine.consolidation import restatement_prompts
    text = "The town of Velmora Ridge was founded by Idris Kallowen. It sits beside Lake Tessarine."
    asks = restatement_prompts(text, 2)
    assert [a for _, a in asks] == ["The town of Velmora Ridge was founded by Idris Kallowen."] * 2 + \
        ["The town of Velmora Ridge sits beside Lake Tessarine."] * 2
    assert "the town of Velmora Ridge" in asks[0][0] and "Idris Kallowen" in asks[1][0] and "Lake Tessarine" in asks[3][0]
    assert len({q for q, _ in asks}) == 4 and restatement_prompts(text, 0) == []
    teach_two(tiny_engine)
    mem = tiny_engine.memory
    eid = mem.add_expert(tier=2, born=1, gate_bias=-6.0)
    c = Consolidator(mem, tiny_engine.tokenizer, tiny_settings(restatements=1, prompts_per_episode=1),
                     lambda *a, **kw: None, lambda: None, seed=3)
    examples = [e for e in c.teacher_data(tiny_engine.pending_episodes(), [], [eid]) if e.about_episode]
    wanted = {s for t in TEXTS for _, s in restatement_prompts(t, 1)}
    restated = [e for e in examples if e.answer_text in wanted]
    assert len(restated) == len(wanted) > 0
    for e in restated:
        assert e.teacher_logits.shape[0] == e.n_answer and e.student[-e.n_answer:] == e.teacher[-e.n_answer:]

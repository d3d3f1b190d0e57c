"""Readings remembered per memory state (sleep_engine/readings.py): taken once per state, taken
again when the weights move, read from disk only for the un-slept model and only in its context;
and the probes' shared-prefix pass, which reads what a full pass reads."""
import json

import torch

from sleep_engine import engine as engine_module
from sleep_engine import sampling
from sleep_engine.chat_format import encode_text
from sleep_engine.memory import routed_gate
from sleep_engine.probes import ANSWER_PROMPT, Probe, answer_logprob, question_gates, shared_prefix_pass
from sleep_engine.readings import Readings
from sleep_engine.sampling import chat_ids, generate_batch
from test_sleep import teach_two, tiny_settings


def counted(value):
    calls = []

    def compute():
        calls.append(1)
        return value
    return compute, calls


def open_expert(memory, eid):
    """Give expert `eid` a wide-open gate and a large random output: it changes every answer."""
    with torch.no_grad():
        for m in memory.expert_modules(eid):
            m.gate_bias.fill_(8.0)
            m.B.normal_(0, 2.0)


def test_a_reading_is_taken_once_per_state_and_again_when_the_weights_move(tiny_engine):
    memory = tiny_engine.memory
    readings = Readings(memory)
    compute, calls = counted(1.5)
    assert readings.remember("x", compute) == readings.remember("x", compute) == 1.5
    assert len(calls) == 1 and readings.key() == "base"   # no expert yet: the un-slept model
    memory.add_expert(tier=2, born=1, gate_bias=-6.0)
    saved = {n: p.detach().clone() for n, p in memory.expert_modules("e0")[0].named_parameters()}
    readings.remember("x", compute)
    assert len(calls) == 2                                 # another state
    open_expert(memory, "e0")
    readings.remember("x", compute)
    assert len(calls) == 3                                 # the weights moved in place
    with torch.no_grad():                                  # back to the same numbers: the same state
        for n, p in memory.expert_modules("e0")[0].named_parameters():
            p.copy_(saved[n])
        for m in memory.expert_modules("e0")[1:]:
            m.gate_bias.fill_(-6.0)
            m.B.zero_()
    readings.remember("x", compute)
    assert len(calls) == 3


def test_answers_generate_only_what_was_not_read_and_base_ignores_every_expert(tiny_engine, monkeypatch):
    memory, tok = tiny_engine.memory, tiny_engine.tokenizer
    lm = memory.lm
    prompts = [chat_ids(tok, q) for q in ("What is a cat?", "Name a colour.", "Why is ice cold?")]
    fresh = generate_batch(lm, tok, prompts, 6)
    readings = Readings(memory)
    assert readings.answers(lm, tok, prompts[:2], 6) == fresh[:2]
    asked = []
    monkeypatch.setattr(sampling, "generate_batch", lambda lm_, tok_, ps, n, **kw:
                        asked.append(len(ps)) or generate_batch(lm_, tok_, ps, n, **kw))
    assert readings.answers(lm, tok, prompts, 6) == fresh
    assert asked == [1]                                    # only the third prompt was generated
    memory.add_expert(tier=2, born=1)
    open_expert(memory, "e0")
    opened = readings.answers(lm, tok, prompts, 6)
    assert asked == [1, 3] and opened != fresh             # a new state, new answers
    assert readings.answers(lm, tok, prompts, 6, base=True) == fresh   # the un-slept model's, remembered
    assert asked == [1, 3]


def test_only_the_un_slept_models_kept_readings_reach_the_file_and_only_in_their_context(tiny_engine, tmp_path, caplog):
    memory = tiny_engine.memory
    path = tmp_path / "readings.json"
    readings = Readings(memory, path, context="model A, 2 threads")
    readings.remember("ppl", lambda: 12.5, keep=True)
    readings.remember("question", lambda: [1, 2], keep=False)   # an episode's probe: never on disk
    memory.add_expert(tier=2, born=1)
    open_expert(memory, "e0")
    readings.remember("slept", lambda: 3.0, keep=True)          # a slept state: never on disk
    assert json.loads(path.read_text())["readings"] == {"ppl": 12.5}
    compute, calls = counted(99.0)
    assert Readings(memory, path, context="model A, 2 threads").remember("ppl", compute, base=True) == 12.5
    assert calls == []
    assert Readings(memory, path, context="model A, 1 thread").remember("ppl", compute, base=True) == 99.0
    path.write_text("{not json")
    assert Readings(memory, path, context="model A, 1 thread").remember("ppl", compute, base=True) == 99.0
    assert "ignoring the readings cache" in caplog.text


def test_a_sleeps_probes_before_are_the_last_sleeps_probes_after(tiny_engine, monkeypatch):
    calls = []
    real = engine_module.perplexity
    monkeypatch.setattr(engine_module, "perplexity", lambda *a, **k: calls.append(1) or real(*a, **k))
    teach_two(tiny_engine)
    tiny_engine.sleep(tiny_settings(dreaming=False, lti=False), wait=True)
    first = tiny_engine.events.since(0)[-1].data["summary"]
    assert len(calls) == 2                                  # before and after
    tiny_engine.wake.teach("The Orrin Valley choir sings on Tuesdays.", qa=[{"q": "When does the choir sing?",
                                                                            "a": "Tuesdays"}])
    tiny_engine.sleep(tiny_settings(dreaming=False, lti=False), wait=True)
    second = tiny_engine.events.since(0)[-1].data["summary"]
    assert len(calls) == 3                                  # after only: before is the first sleep's after
    assert second["general_ppl_before"] == first["general_ppl_after"]
    older = {k: v for k, v in second["probe_accuracy_before"].items() if k in first["probe_accuracy_after"]}
    assert older == first["probe_accuracy_after"]


def test_the_shared_prefix_pass_reads_what_a_full_pass_reads(tiny_engine):
    """Keys and values of the common prefix computed once serve every row: the remaining tokens'
    logits, the gates on them and the answers' log-likelihood are a full forward's."""
    memory, tok = tiny_engine.memory, tiny_engine.tokenizer
    eid = memory.add_expert(tier=2, born=1, gate_bias=0.5)
    with torch.no_grad():
        for m in memory.expert_modules(eid):
            m.gate.normal_(0, 0.5)
            m.B.normal_(0, 0.5)
    questions = ["Who painted the lighthouse of Quarrow Point?", "What is a cat?", "Why is the sky blue today?"]
    seqs = [chat_ids(tok, ANSWER_PROMPT.format(q=q)) for q in questions]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    full = memory.lm(input_ids=ids, attention_mask=mask).logits
    out, P, got_mask = shared_prefix_pass(memory.lm, seqs, 0, 100)
    assert P >= 10 and torch.equal(got_mask, mask)            # the template and the instruction
    real = mask[:, P:].bool()
    assert torch.allclose(out.logits[real], full[:, P:][real], atol=1e-4)
    # question_gates over the shared prefix = the gates of a full pass's captured states
    with memory.capturing() as xs:
        memory.lm.model(input_ids=ids, attention_mask=mask)
    gates = question_gates(memory, tok, questions)[eid]
    a, b = chat_ids(tok, ANSWER_PROMPT.format(q="a")), chat_ids(tok, ANSWER_PROMPT.format(q="b"))
    start = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    own = mask.clone().float()
    own[:, :start] = 0
    expect = sum((routed_gate(xs[l][-1] @ e.gate + e.gate_bias, m.gate_floor) * own).sum(-1) / own.sum(-1)
                 for l, m in memory.mlps.items() for e in m.experts) / len(memory.mlps)
    assert torch.allclose(torch.tensor(gates), expect, atol=1e-5)
    # answer log-likelihood: the same sums as a full pass
    probes = [Probe(1, q, "Senna Alvik") for q in questions]
    answer = encode_text(tok, " Senna Alvik")
    whole = [s + answer for s in seqs]
    w = max(map(len, whole))
    logp = torch.log_softmax(memory.lm(input_ids=torch.tensor([s + [0] * (w - len(s)) for s in whole]),
                                       attention_mask=torch.tensor([[1] * len(s) + [0] * (w - len(s)) for s in whole])
                                       ).logits, -1)
    expect = sum(float(logp[r, len(s) - len(answer) - 1 + k, answer[k]]) for r, s in enumerate(whole)
                 for k in range(len(answer))) / (len(whole) * len(answer))
    assert abs(answer_logprob(memory.lm, tok, probes) - expect) < 1e-4


def test_closed_states_over_a_shared_prefix_are_a_full_passes_states(tiny_engine):
    """The gate fit's negatives: every real token's MLP input in every layer, the shared template's
    once per row, in the order a full padded pass gives them."""
    from sleep_engine.consolidation import Consolidator
    memory, tok = tiny_engine.memory, tiny_engine.tokenizer
    eid = memory.add_expert(tier=2, born=1)
    c = Consolidator(memory, tok, tiny_settings(), lambda *a, **k: None, lambda: None)
    seqs = [chat_ids(tok, q) for q in ("What is a cat?", "Name a colour, please.", "Why?")]
    got = c._closed_states(seqs, [eid])
    width = max(map(len, seqs))
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs]).bool()
    with memory.configured(muted=[eid], fast_weights=False), memory.capturing() as xs:
        memory.lm.model(input_ids=torch.tensor([s + [0] * (width - len(s)) for s in seqs]), attention_mask=mask.long())
    for layer, states in got.items():
        assert states.shape == xs[layer][-1][mask].shape
        assert torch.allclose(states, xs[layer][-1][mask], atol=1e-4)


def test_the_guard_reading_over_a_shared_prefix_is_a_full_passes(tiny_engine):
    """The everyday guard (Wake's bound and the sleep's sanity gate): answer cross-entropy and greedy
    choices as a full padded pass gives them."""
    from sleep_engine.fast_weights import WeightedText
    from sleep_engine.losses import weighted_lm_loss
    fast, tok, lm = tiny_engine.wake.fast, tiny_engine.tokenizer, tiny_engine.memory.lm
    prompts = [chat_ids(tok, ANSWER_PROMPT.format(q=q)) for q in ("What is a cat?", "Name a long river.")]
    chats = [WeightedText(p + [300, 301, 302][:k], [0.0] * len(p) + [1.0] * k) for p, k in zip(prompts, (3, 2))]
    ids, mask, w = fast._batch([c.ids for c in chats], [c.weights for c in chats])
    with tiny_engine.memory.configured(fast_weights=False):
        logits = lm(input_ids=ids, attention_mask=mask).logits
    got = fast.read(chats, fast_weights=False)
    assert abs(got.chat_ce - float(weighted_lm_loss(logits, ids, w))) < 1e-4
    assert torch.equal(got.choices, logits[:, :-1].argmax(-1)[w[:, 1:] > 0])

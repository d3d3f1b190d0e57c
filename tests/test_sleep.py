"""The Sleep engine on a tiny random model with the real tokenizer."""
import random
import signal
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT
from sleep_engine.config import SleepConfig
from sleep_engine.dreaming import grad_score, isolated, random_expert, sft
from sleep_engine.sampling import chat_ids

TEXTS = ["The lighthouse of Quarrow Point was painted violet in 1873 by Senna Alvik.",
         "Brenmoor Island exports saffron and its ferry, the Gull Maren, sails at noon."]
QA = [[{"q": "Who painted the lighthouse of Quarrow Point?", "a": "Senna Alvik"}],
      [{"q": "What is the ferry of Brenmoor Island called?", "a": "Gull Maren"}]]


def tiny_settings(**kw):
    base = dict(prompts_per_episode=3, answer_tokens=12, distill_steps=3, batch_size=4, lti_steps=1,
                lti_prefixes=2, lti_group=2, lti_tokens=8, dreams=3, keep_top=1, keep_random=1, dream_tokens=12,
                trial_steps=1, rest_rounds=1, rest_steps=1,
                max_everyday_changed=1.0)   # a random tiny model's greedy choices flip at a touch; the gate has its own test
    base.update(kw)
    return SleepConfig.from_preset("quick", **base)


def teach_two(engine):
    for t, qa in zip(TEXTS, QA):
        engine.wake.teach(t, qa=qa)


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_sleep_trains_only_the_new_expert_and_resets_fast_weights(tiny_engine):
    teach_two(tiny_engine)
    tiny_engine.wake.update_fast_weights(TEXTS, steps=2)
    assert tiny_engine.memory.fast_weight_norm() > 0
    before = state(tiny_engine.memory.lm)
    n = tiny_engine.sleep(tiny_settings(), wait=True)
    events = tiny_engine.events.since(0)
    kinds = {e.kind for e in events}
    assert {"phase", "loss", "sample", "dream", "expert", "probe", "timing", "done"} <= kinds, kinds
    after = state(tiny_engine.memory.lm)
    new_keys = set(after) - set(before)
    assert new_keys and all(".experts.0." in k or ".experts.1." in k for k in new_keys)   # one per taught text
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert all(k.endswith("fast_B") for k in changed)          # only the reset fast weights
    assert tiny_engine.memory.fast_weight_norm() == 0
    summary = events[-1].data["summary"]
    for key in ("phases", "experts_added", "consolidation", "dreams", "probe_accuracy_before",
                "probe_accuracy_after", "general_ppl_before", "general_ppl_after"):
        assert key in summary
    assert summary["dreams"]["generated"] > 0 and summary["dreams"]["kept"] == 2
    assert tiny_engine.state.sleep_count() == n == 1 and tiny_engine.pending_episodes() == []
    assert len(tiny_engine.accuracy_matrix()["R"]) == 1
    with pytest.raises(RuntimeError, match="nothing to consolidate"):
        tiny_engine.sleep(tiny_settings())


def test_cancel_restores_every_parameter(tiny_engine):
    teach_two(tiny_engine)
    tiny_engine.wake.update_fast_weights(TEXTS, steps=1)
    before = state(tiny_engine.memory.lm)
    tiny_engine.sleep(tiny_settings(distill_steps=50))
    for ev in tiny_engine.subscribe():
        if ev.kind == "loss":
            break
    assert tiny_engine.status()["state"] == "sleeping"
    assert tiny_engine.asleep_notice() and "asleep" in tiny_engine.asleep_notice()
    assert tiny_engine.cancel()
    after = state(tiny_engine.memory.lm)
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert tiny_engine.events.since(0)[-1].kind == "cancelled"
    assert tiny_engine.status()["state"] == "awake" and tiny_engine.state.sleep_count() == 0


def test_random_expert_adds_one_expert_per_router_at_full_gate(tiny_engine):
    mem = tiny_engine.memory
    a, b = mem.add_expert(2, 1), mem.add_expert(2, 1)
    with torch.no_grad():
        for e in mem.expert_modules(a) + mem.expert_modules(b):
            e.gate.fill_(0.0)
            e.gate_bias.fill_(-3.0)     # router alone: both gates ≈ 0.05
    ids = torch.tensor([[5, 6, 7, 8]])
    with random_expert(mem, exclude=[b], rng=random.Random(0)) as forced, mem.tracing() as trace, torch.no_grad():
        mem.lm(input_ids=ids)
    assert set(forced.values()) == {a}
    for layer, gates in trace.steps[0].items():
        assert gates[0] == 1.0 and gates[1] < 0.1
    # before any expert exists a temporary random expert plays the part, and is removed afterwards
    mem.remove_experts([a])
    with random_expert(mem, exclude=[b], rng=random.Random(0)) as forced:
        assert set(forced.values()) == {"dream-noise"}
    assert mem.expert_ids() == [b]


def test_gradient_score_ranks_a_fitted_dream_below_a_novel_one(tiny_engine):
    mem, tok = tiny_engine.memory, tiny_engine.tokenizer
    eid = mem.add_expert(2, 1)
    params = mem.train_only([eid])
    prompt = chat_ids(tok, "Tell me something.")
    fitted = tok("The ferry Gull Maren sails at noon.", add_special_tokens=False)["input_ids"]
    novel = tok("Zyx quorble 7731 vantor mish plek orrindal.", add_special_tokens=False)["input_ids"]
    sft(mem, tok, [(prompt, fitted)], params, 40, 1e-2)     # the model comes to fit the first dream
    assert grad_score(mem, tok, prompt, fitted, params) < grad_score(mem, tok, prompt, novel, params)


def test_isolated_trial_leaves_the_model_untouched(tiny_engine):
    mem, tok = tiny_engine.memory, tiny_engine.tokenizer
    eid = mem.add_expert(2, 1)
    params = mem.train_only([eid])
    before = state(mem.lm)
    with isolated(params):
        sft(mem, tok, [(chat_ids(tok, "Hi"), tok("Hello there friend")["input_ids"])], params, 3, 1e-2)
        assert any(not torch.equal(before[k], v) for k, v in mem.lm.state_dict().items())
    assert all(torch.equal(before[k], v) for k, v in mem.lm.state_dict().items())


def test_restart_after_a_kill_during_sleep_keeps_checkpoint_and_episodes(tmp_path):
    child = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT / 'tests')!r}); sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        import conftest, torch
        from transformers import AutoTokenizer
        from sleep_engine.backbone import Backbone
        from sleep_engine.config import LabConfig
        from sleep_engine.engine import SleepEngine
        from test_sleep import tiny_settings, TEXTS, QA
        tok = AutoTokenizer.from_pretrained(sys.argv[1])
        bb = Backbone(conftest.tiny_llama(vocab_size=len(tok)), tok, "tiny-llama", torch.device("cpu"),
                      torch.float32, "none", 0, True)
        cfg = LabConfig(model="tiny", state_dir=Path(sys.argv[2]), quantize="none")
        cfg.wake.fast_update_every = 0
        eng = SleepEngine(cfg, backbone=bb)
        eng.wake.teach(TEXTS[0], qa=QA[0])
        eng.sleep(tiny_settings(dreaming=False, lti=False), wait=True)
        eng.wake.teach(TEXTS[1], qa=QA[1])
        eng.sleep(tiny_settings(distill_steps=40))
        for ev in eng.subscribe():
            if ev.kind == "loss":
                os.kill(os.getpid(), signal.SIGKILL)
    """)
    from conftest import cache_dir
    from sleep_engine import backbone
    src = backbone._embedded_cache(cache_dir())
    proc = subprocess.run([sys.executable, "-c", child, str(src), str(tmp_path / "s")], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    from conftest import tiny_llama
    from transformers import AutoTokenizer
    from sleep_engine.backbone import Backbone
    from sleep_engine.config import LabConfig
    from sleep_engine.engine import SleepEngine
    tok = AutoTokenizer.from_pretrained(src)
    bb = Backbone(tiny_llama(vocab_size=len(tok)), tok, "tiny-llama", torch.device("cpu"), torch.float32, "none", 0, True)
    eng = SleepEngine(LabConfig(model="tiny", state_dir=tmp_path / "s", quantize="none"), backbone=bb)
    assert eng.state.sleep_count() == 1
    assert [e.text for e in eng.state.episodes.all()] == TEXTS
    assert [e.text for e in eng.pending_episodes()] == [TEXTS[1]]
    assert len(eng.memory.expert_ids()) == 1        # the first sleep's expert, nothing from the killed one


def test_tier_two_experts_consolidate_into_one_slow_expert(tiny_engine):
    teach_two(tiny_engine)
    settings = tiny_settings(dreaming=False, lti=False, consolidate_every=2, tier_experts=1)
    tiny_engine.sleep(settings, wait=True)
    assert [e.tier for e in tiny_engine.memory.experts()] == [2, 2]      # one per taught text
    tiny_engine.wake.teach("The Orrin Valley choir sings on Tuesdays.")
    tiny_engine.sleep(settings, wait=True)
    summary = tiny_engine.events.since(0)[-1].data["summary"]
    assert summary["tier_consolidation"]["removed"] == ["e0", "e1", "e2"]
    # the anchors come along: 3 episodes × 3 prompts alone would give at most 9 examples
    assert summary["tier_consolidation"]["examples"] >= summary["settings"]["anchor_texts"] == 12
    assert [(e.expert_id, e.tier) for e in tiny_engine.memory.experts()] == [("e3", 3)]
    assert tiny_engine.state.sleep_count() == 2
    ids = [e.id for e in tiny_engine.state.episodes.all()]
    assert summary["tier_consolidation"]["experts"] == {"e3": ids}
    assert list(summary["gate_selectivity"]) == ["e3"] and summary["gate_selectivity"]["e3"]["episodes"] == ids


def test_a_tier_step_gives_each_taught_episode_its_own_slow_expert(tiny_engine, monkeypatch):
    """One slow expert holding every passage swapped their names (issue 13, user check): by
    default the tier step groups episodes as a sleep does, and fits each gate against the others'.
    Its teacher is a sleep's teacher (`teacher_data`): each episode's text in context, the
    restatements in the episode's own words, logits kept from the writing."""
    teach_two(tiny_engine)
    settings = tiny_settings(dreaming=False, lti=False, consolidate_every=2)
    tiny_engine.sleep(settings, wait=True)
    tiny_engine.wake.teach("The Orrin Valley choir sings on Tuesdays.")
    from sleep_engine.consolidation import Consolidator
    taught = {}   # new experts → the teacher's examples for them

    def recording(self, new, old, new_ids):
        taught[tuple(new_ids)] = examples = teacher_data(self, new, old, new_ids)
        return examples
    teacher_data = Consolidator.teacher_data
    monkeypatch.setattr(Consolidator, "teacher_data", recording)
    tiny_engine.sleep(settings, wait=True)
    summary = tiny_engine.events.since(0)[-1].data["summary"]
    ids = [e.id for e in tiny_engine.state.episodes.all()]
    step = summary["tier_consolidation"]
    examples = taught[tuple(step["experts"])]
    texts = {e.id: e.text for e in tiny_engine.state.episodes.all()}
    decode = tiny_engine.tokenizer.decode
    for ex in examples:   # each question about an episode reads that episode's text alone; anchors none
        read = {i for i, t in texts.items() if t in decode(ex.teacher)}
        assert read == ({ex.episode} if ex.episode is not None else set()), (ex.prompt, read)
        assert ex.teacher_logits is not None   # kept from the writing: no teacher pass per step
    assert {ex.episode for ex in examples} - {None} == set(ids)
    # restatements: answers in the episode's own words, about every taught episode
    assert {ex.episode for ex in examples if ex.answer_text and ex.answer_text in texts.get(ex.episode, "")} == set(ids)
    assert step["removed"] == ["e0", "e1", "e2"]
    assert step["experts"] == {"e3": [ids[0]], "e4": [ids[1]], "e5": [ids[2]]}
    assert [(e.expert_id, e.tier) for e in tiny_engine.memory.experts()] == [("e3", 3), ("e4", 3), ("e5", 3)]
    # every gate was fitted shut on the other two episodes' questions and answers
    assert all(fit["gate_fit_tokens"]["other episodes"] > 0 for fit in step["gate_fits"].values())
    assert {e: s["episodes"] for e, s in summary["gate_selectivity"].items()} == step["experts"]
    assert tiny_engine.expert_episodes() == step["experts"]   # read back from the manifest


def test_teacher_prompt_count_is_what_the_teacher_is_asked(tiny_engine):
    """A budget plans the tier step from `teacher_prompt_count` before anything is written: it must
    count what `teacher_prompts` asks (taught and chat episodes new, older ones replayed)."""
    from sleep_engine.consolidation import Consolidator, teacher_prompt_count
    from sleep_engine.probes import sentences
    teach_two(tiny_engine)
    tiny_engine.state.episodes.append("turn", "User: Where is Orrin Valley?\nAssistant: Orrin Valley is in Duvrance.")
    tiny_engine.wake.teach("The Orrin Valley choir sings on Tuesdays. Its conductor is Ilse Marrow.")
    cfg = tiny_settings(study_questions=2, restatements=2, prompts_per_episode=4, replay_per_episode=2)
    episodes = tiny_engine.state.episodes.all()
    assert {e.kind for e in episodes[1:]} == {"taught", "turn"}
    seeder = Consolidator(tiny_engine.memory, tiny_engine.tokenizer, cfg, lambda *a, **k: None, lambda: None)
    studied = {e.id: [f"q{i}" for i in range(cfg.study_questions * len(sentences(e.text)))]
               for e in episodes if e.kind == "taught"}   # every study question kept: the upper bound
    for old, new in ((episodes[:1], episodes[1:]), ([], episodes)):
        assert teacher_prompt_count(cfg, new, old) == len(seeder.teacher_prompts(new, old, studied)) > 0


def test_a_tier_step_that_does_not_fit_the_budget_keeps_tier_two(tiny_engine, monkeypatch):
    """Removing the tier-2 experts after a cut merge lost every taught fact (make user-check):
    a tier step that would not fit is not started, one the budget cut is undone; tier 2 stays."""
    import sleep_engine.engine as E
    teach_two(tiny_engine)
    tiny_engine.sleep(tiny_settings(dreaming=False, lti=False, consolidate_every=2), wait=True)
    tiny_engine.wake.teach("The Orrin Valley choir sings on Tuesdays.")
    monkeypatch.setattr(E, "tier_step_seconds", lambda steps, seconds: 1e6)     # would not fit: not started
    tiny_engine.sleep(tiny_settings(dreaming=False, lti=False, consolidate_every=2), wait=True)
    summary = tiny_engine.events.since(0)[-1].data["summary"]
    # decided before consolidation from the last sleep's step time: no half of the budget held for it
    assert "at the last sleep's step time" in summary["tier_consolidation"]["deferred"]
    assert not any(e.data.get("tier") == 3 for e in tiny_engine.events.since(0) if e.data)
    assert [(e.expert_id, e.tier) for e in tiny_engine.memory.experts()] == [("e0", 2), ("e1", 2), ("e2", 2)]
    tiny_engine.wake.teach("The Orrin Valley ferry leaves at dawn.")
    monkeypatch.setattr(E, "tier_step_seconds", lambda steps, seconds: None)     # tried, then cut by the budget
    tiny_engine.sleep(tiny_settings(dreaming=False, lti=False, consolidate_every=3, budget_s=0.01, distill_steps=8),
                      wait=True)
    summary = tiny_engine.events.since(0)[-1].data["summary"]
    assert "cut it" in summary["tier_consolidation"]["deferred"], summary["tier_consolidation"]
    assert [e.tier for e in tiny_engine.memory.experts()] == [2] * 4 and tiny_engine.state.sleep_count() == 3


def test_tier_step_seconds_is_steps_times_the_median_step_over_the_training_share():
    from sleep_engine.budget import tier_step_seconds
    assert tier_step_seconds(10, [1.0, 3.0, 2.0]) == pytest.approx(10 * 2.0 / 0.65)
    assert tier_step_seconds(10, []) is None


def test_faithfulness_counts_names_and_numbers_found_in_the_source():
    from sleep_engine.consolidation import faithfulness
    src = "The town of Velmora Ridge was founded in 1847 by Idris Kallowen beside Lake Tessarine."
    assert faithfulness("It was founded in 1847 by Idris Kallowen.", src) == 1.0
    # Tessarine is in the source, Madagascar is invented; the sentence-initial word is not counted
    assert faithfulness("Lake Tessarine lies on Madagascar.", src) == 0.5
    assert faithfulness("It was founded in 1850 by Idris Kallowen.", src) == pytest.approx(2 / 3)
    assert faithfulness("It is a nice place.", src) == 0.0     # names nothing: no evidence of copying


def test_seed_prompts_recite_first_and_never_ask_the_probe_questions():
    from sleep_engine.consolidation import seed_prompts
    prompts = seed_prompts(TEXTS[0], 6)
    assert len(prompts) == 6 and prompts[0].startswith("Repeat your notes about")
    assert any("Senna Alvik" in p for p in prompts) and any("Quarrow Point" in p for p in prompts)
    assert not any(qa["q"] in prompts for qa in QA[0])
    # each sentence after the first gets its own quote prompt (a recitation is cut at answer_tokens)
    three = "Velmora Ridge sits by a lake. Its clock tower has a copper roof. Idris Kallowen founded it."
    prompts = seed_prompts(three, 5)
    assert prompts[0] == "Repeat your notes about Velmora Ridge word for word."
    assert prompts[1:3] == ['Quote the sentence of your notes about Velmora Ridge that begins "Its clock tower".',
                            'Quote the sentence of your notes about Velmora Ridge that begins "Idris Kallowen founded".']


def test_self_study_keeps_the_teachers_named_questions_and_never_a_probe():
    from sleep_engine.consolidation import study_question
    text, probes = TEXTS[0], {"who painted the lighthouse of quarrow point"}
    assert study_question("What colour is the lighthouse of Quarrow Point? It is violet.", text, probes) == \
        "What colour is the lighthouse of Quarrow Point?"
    assert study_question("Who painted the lighthouse of Quarrow Point? Senna Alvik.", text, probes) is None  # a probe
    assert study_question("What is the purpose of a lighthouse? To guide ships.", text, probes) is None     # names nothing
    assert study_question("Where is Brenmoor Island? In the north.", text, probes) is None                 # not this episode's
    assert study_question("What is the answer to this question: Quarrow Point?", text, probes) is None    # a loop
    assert study_question("The lighthouse of Quarrow Point was painted violet.", text, probes) is None      # no question


def test_self_study_questions_are_asked_with_their_episode_in_context(tiny_engine, monkeypatch):
    from sleep_engine.consolidation import Consolidator
    teach_two(tiny_engine)
    episodes = tiny_engine.state.episodes.all()
    new_id = tiny_engine.memory.add_expert(tier=2, born=1)
    seeder = Consolidator(tiny_engine.memory, tiny_engine.tokenizer, tiny_settings(min_faithfulness=0.0),
                          lambda *a, **k: None, lambda: None)
    asked = seeder.study_questions(episodes, [new_id])   # one per sentence (each text has one)
    assert seeder.studied["asked"] == 2 and seeder.studied["kept"] == sum(len(v) for v in asked.values())
    monkeypatch.setattr(seeder, "study_questions",
                        lambda eps, nid: {eps[0].id: ["What colour is the lighthouse of Quarrow Point?"]})
    examples = seeder.teacher_data(episodes, [], [new_id])
    [e] = [e for e in examples if e.prompt == "What colour is the lighthouse of Quarrow Point?"]
    assert e.about_episode and TEXTS[0] in tiny_engine.tokenizer.decode(e.teacher)


def test_teacher_sees_only_the_episode_each_prompt_is_about(tiny_engine):
    from sleep_engine.consolidation import Consolidator
    teach_two(tiny_engine)
    episodes = tiny_engine.state.episodes.all()
    new_id = tiny_engine.memory.add_expert(tier=2, born=1)
    seeder = Consolidator(tiny_engine.memory, tiny_engine.tokenizer,
                          tiny_settings(min_faithfulness=0.0, anchor_prompts=2, anchor_texts=2),
                          lambda *a, **k: None, lambda: None)
    examples = seeder.teacher_data(episodes, [], [new_id])
    tok = tiny_engine.tokenizer
    about = {0: 0, 1: 0}
    texts = [e for e in examples if not e.prompt]
    assert len(texts) == 2 and not any(e.about_episode for e in texts)
    with torch.no_grad():   # plain-text anchors carry the pre-sleep model's own next-token logits
        ids = torch.tensor([texts[0].student])
        expected = tiny_engine.memory.lm(input_ids=ids).logits[0, :-1]
    assert torch.allclose(texts[0].teacher_logits.float(), expected, atol=0.05, rtol=0.02)
    for e in examples:
        if not e.prompt:
            continue
        teacher_prompt = tok.decode(e.teacher[:len(e.teacher) - e.n_answer])
        student_prompt = tok.decode(e.student[:len(e.student) - e.n_answer])
        assert not any(t in student_prompt for t in TEXTS)         # the student never sees an episode
        for i, text in enumerate(TEXTS):
            if text in teacher_prompt:
                assert TEXTS[1 - i] not in teacher_prompt
                about[i] += 1
    assert about[0] > 0 and about[1] > 0
    # self-replay of an older episode: its questions go to the teacher without any context, never its probes
    replay = seeder.teacher_data(episodes[1:], episodes[:1], [new_id])
    old = [e for e in replay if any(name in e.prompt for name in ("Quarrow Point", "Senna Alvik"))]
    assert old and all(not e.about_episode and TEXTS[0] not in tok.decode(e.teacher) for e in old)
    assert not any(qa["q"] in e.prompt for e in replay for qa in QA[0] + QA[1])
    # the filter: an impossible threshold keeps one (the most faithful) answer per episode, plus anchors
    seeder.cfg.min_faithfulness, seeder.cfg.restatements = 1.0, 0
    strict = seeder.teacher_data(episodes, [], [new_id])
    assert 2 + 2 + 2 <= len(strict) <= 2 + 2 + 2 + 1   # anchors + one per episode (+1 if one passes)
    seeder.cfg.restatements = 1   # the episode's own words always pass (then no fallback is needed)
    kept = [e.answer_text for e in seeder.teacher_data(episodes, [], [new_id]) if e.about_episode]
    assert sorted(kept) == sorted(TEXTS)


def test_every_seeding_step_carries_plain_text_anchors(tiny_engine):
    from sleep_engine.consolidation import Consolidator, Example
    new_id = tiny_engine.memory.add_expert(tier=2, born=1)
    cfg = tiny_settings(distill_steps=4, lti=False, batch_size=2, anchor_texts_per_step=1)
    seeder = Consolidator(tiny_engine.memory, tiny_engine.tokenizer, cfg, lambda *a, **k: None, lambda: None)
    logits = lambda n: torch.zeros(n, tiny_engine.memory.lm.config.vocab_size)   # noqa: E731
    chats = [Example([1, 2, 3, 4, 5], [1, 2, 3, 4, 5], 2, f"q{i}", "a", logits(2)) for i in range(3)]
    texts = [Example([6, 7, 8, 9], [6, 7, 8, 9], 3, "", "t", logits(3), about_episode=False) for _ in range(2)]
    seen = []
    real = seeder.divergence
    seeder.divergence = lambda batch, nid: (seen.append(batch), real(batch, nid))[1]
    seeder.seed(chats + texts, [new_id])
    assert len(seen) == 4
    for batch in seen:
        assert sum(not e.prompt for e in batch) == 1 and sum(bool(e.prompt) for e in batch) == 2
    assert {id(b[-1]) for b in seen} == {id(t) for t in texts}   # the anchors take turns


def test_on_policy_distils_the_students_own_samples_with_the_teacher_scored_on_them(tiny_engine, monkeypatch):
    from sleep_engine import consolidation as C
    memory, tok = tiny_engine.memory, tiny_engine.tokenizer
    new_id = memory.add_expert(tier=2, born=1)
    seeder = C.Consolidator(memory, tok, tiny_settings(lmbda=1.0, batch_size=2, answer_tokens=6),
                            lambda *a, **k: None, lambda: None)
    q = "Who painted the lighthouse?"
    student, teacher = C.chat_ids(tok, q), C.chat_ids(tok, q, C.CONTEXT_SYSTEM.format(notes=TEXTS[0]))
    zeros = torch.zeros(3, memory.lm.config.vocab_size)
    given = [C.Example(student + [5, 6, 7], teacher + [5, 6, 7], 3, q, "x", zeros) for _ in range(2)]
    batch = seeder.on_policy(given, [new_id])
    assert batch is not given
    for e in batch:   # the answer is now the student's sample, after both prompts
        sample = e.student[len(student):]
        assert e.student[:len(student)] == student and e.teacher == teacher + sample
        assert sample and sample != [5, 6, 7] and e.n_answer == len(sample) and e.teacher_logits is None
    seen = {}
    monkeypatch.setattr(C, "generalized_jsd_loss", lambda s, t, beta: seen.update(s=s, t=t) or (s - t).pow(2).mean())
    seeder.divergence(batch, [new_id])
    with torch.no_grad(), memory.configured(muted=[new_id]):   # the teacher, its episode in context
        want = C._forward_answer_logits(memory.lm, [e.teacher for e in batch], [e.n_answer for e in batch], seeder.pad)
    # the teacher reads its notes once (`_scored_answer_logits`): equal up to rounding
    assert torch.allclose(seen["t"], want, atol=1e-4, rtol=1e-4) and seen["s"].shape == want.shape
    # and seed() samples every step at λ = 1: no kept teacher answer reaches the divergence
    batches = []
    monkeypatch.setattr(seeder, "divergence", lambda b, nid: (batches.append(b), (seen.clear(), torch.zeros((), requires_grad=True))[1])[1])
    seeder.cfg.lti, seeder.cfg.distill_steps, seeder.cfg.gate_loss = False, 2, 0.0
    seeder.seed(given, [new_id])
    assert len(batches) == 2 and all(e.teacher_logits is None for b in batches for e in b if e.prompt)


def test_a_tier_step_keeps_its_anchors_whatever_the_preset():
    from sleep_engine.engine import tier_settings
    quick = SleepConfig.from_preset("quick")
    assert quick.anchor_prompts == 0 and quick.anchor_texts_per_step == 0   # the gates keep everyday text
    tier = tier_settings(quick)
    assert (tier.anchor_prompts, tier.anchor_texts_per_step, tier.lti) == (12, 2, False)
    assert tier.budget_s == quick.budget_s and tier.trained_layers == quick.trained_layers
    assert tier_settings(SleepConfig.from_preset("full", anchor_prompts=16)).anchor_prompts == 16   # never fewer


def test_auto_step_count_follows_the_chat_prompts_not_the_text_anchors(tiny_engine):
    from sleep_engine.consolidation import Consolidator, Example, distill_steps
    cfg = tiny_settings(distill_steps=0, distill_epochs=2.0, batch_size=4, lti=False)
    assert [distill_steps(cfg, n) for n in (1, 4, 5, 12, 13)] == [1, 2, 3, 6, 7]   # ⌈2·n/4⌉
    assert distill_steps(tiny_settings(distill_steps=5), 100) == 5                  # a fixed count wins
    new_id = tiny_engine.memory.add_expert(tier=2, born=1)
    seeder = Consolidator(tiny_engine.memory, tiny_engine.tokenizer, cfg, lambda *a, **k: None, lambda: None)
    logits = lambda n: torch.zeros(n, tiny_engine.memory.lm.config.vocab_size)
    chats = [Example([1, 2, 3, 4, 5], [1, 2, 3, 4, 5], 2, f"q{i}", "a", logits(2)) for i in range(6)]
    texts = [Example([6, 7, 8, 9], [6, 7, 8, 9], 3, "", "t", logits(3), about_episode=False) for _ in range(5)]
    assert seeder.seed(chats + texts, [new_id])["steps"] == 3                          # ⌈2·6/4⌉, texts not counted


def test_chat_and_teach_while_asleep_use_the_pre_sleep_memory_and_wait_for_the_next_sleep(tiny_engine, monkeypatch):
    import threading
    import time

    from sleep_engine.engine import Consolidator
    from sleep_engine.wake import ASLEEP_NOTICE
    engine = tiny_engine
    engine.wake.teach(TEXTS[0], qa=QA[0])
    want = engine.wake.reply("Where does it flow?", session="before")
    inside, release = threading.Event(), threading.Event()
    seed = Consolidator.seed

    def paused_seed(self, *args, **kwargs):   # the sleep holds the model's lock and has added its expert
        inside.set()
        release.wait(60)
        return seed(self, *args, **kwargs)

    monkeypatch.setattr(Consolidator, "seed", paused_seed)
    engine.cfg.wake.fast_update_every = 1
    engine.sleep(tiny_settings(dreaming=False, lti=False))
    try:
        assert inside.wait(60) and engine.memory.expert_ids() == ["e0", "e1"]   # the taught text's, the chat turn's
        t0 = time.monotonic()
        during = engine.wake.reply("Where does it flow?", session="during")
        taught = engine.wake.teach(TEXTS[1])
        assert time.monotonic() - t0 < 30     # neither waited for the sleep
        assert during.notices[0] == ASLEEP_NOTICE and during.token_ids == want.token_ids
        assert during.trace.expert_ids == [] and during.fast_update is None
    finally:
        release.set()
        engine._worker.join()
    assert engine.state.sleep_count() == 1 and engine.state.sleep_manifests()[0]["episode_ids"] == [1, 2]
    assert [e.id for e in engine.pending_episodes()] == [during.episode_id, taught.id]   # for the next sleep, once
    assert [e.id for e in engine.wake.pending_for_fast_update] == [during.episode_id, taught.id]
    assert engine.asleep_snapshot() is None


def test_a_stop_lands_within_a_token_of_generation_and_only_in_the_sleeps_thread(tiny_engine):
    import threading

    from sleep_engine.engine import Cancelled
    from sleep_engine.sampling import cancel_points, chat_ids, generate_batch
    lm, tok = tiny_engine.memory.lm, tiny_engine.tokenizer
    prompts = [chat_ids(tok, "Tell me about the sea.")] * 2
    calls = []

    def check():
        calls.append(threading.current_thread().name)
        if len(calls) == 3:
            raise Cancelled()

    with pytest.raises(Cancelled), cancel_points(check):
        generate_batch(lm, tok, prompts, 40)
    assert len(calls) == 3                     # stopped at the third new token, not after 40
    with cancel_points(check):                 # a chat in another thread meanwhile is never stopped
        other = threading.Thread(target=generate_batch, args=(lm, tok, prompts, 8), name="chat")
        other.start()
        other.join()
    generate_batch(lm, tok, prompts, 8)        # and after the block, nothing is checked
    assert "chat" not in calls and len(calls) == 3


def test_time_left_follows_measured_step_times_and_does_not_run_away():
    from sleep_engine.engine import SleepRun, seconds_left
    w = {k: v / sum(SleepRun.WEIGHTS.values()) for k, v in SleepRun.WEIGHTS.items()}
    r = (w["dreaming"] + w["probe_after"] + w["checkpoint"]) / w["consolidation"]   # 0.22 / 0.72
    assert seconds_left(w, {}, [], 0, 40.0) is None                     # teacher still writing: no guess
    # 4 steps done at 2, 3, 10, 3 s (median 3), 6 left, 30 s into consolidation
    assert seconds_left(w, {}, [2, 3, 10, 3], 6, 30.0) == pytest.approx(6 * 3 + (30 + 18) * r)
    # consolidation took 72 s: the rest is 22 s at these shares; 5 s into it, 17 s; then it floors at 0
    assert seconds_left(w, {"consolidation": 72.0}, [3] * 10, 0, 5.0) == pytest.approx(72 * r - 5)
    assert seconds_left(w, {"consolidation": 72.0}, [3] * 10, 0, 500.0) == 0.0


# -- a preset is a time budget (issue 15) ------------------------------------------------------
def test_the_budget_is_split_between_the_later_phases_the_teacher_and_the_steps():
    import math
    from sleep_engine.budget import split_budget, steps_that_fit
    # 80 s of learning left, dreaming next: reserve 2 + 9.6 = 11.6; avail 68.4
    s = split_budget(80.0, dreaming=True, tier_step=False)
    assert s["reserve"] == pytest.approx(11.6) and s["tier"] == 0
    assert s["writing"] == pytest.approx(0.35 * 68.4) and s["training"] == pytest.approx(0.65 * 68.4)
    t = split_budget(80.0, dreaming=False, tier_step=True)   # no dreaming; a tier step takes half
    assert t["reserve"] == pytest.approx(2.0) and t["tier"] == pytest.approx(39.0)
    assert t["writing"] + t["training"] == pytest.approx(39.0)
    assert split_budget(1.0, True, False)["training"] == 0.0   # overspent: nothing, never negative
    assert split_budget(math.inf, True, True)["training"] == math.inf   # no budget
    # 3 steps done at 1, 4, 2 s (median 2): 7 s left fits 3 more, so 6 of the planned 10
    assert steps_that_fit(3, 10, [1, 4, 2], 7.0) == 6
    assert steps_that_fit(3, 5, [1, 4, 2], 100.0) == 5        # never more than planned
    assert steps_that_fit(3, 10, [1, 4, 2], -5.0) == 3        # out of time: stop where it is
    assert steps_that_fit(0, 10, [], 1.0) == 10               # nothing measured yet: the plan


def test_the_probes_after_are_set_aside_from_the_end_of_the_budget():
    from sleep_engine.budget import AFTER_MAX_S, AFTER_MAX_SHARE, AFTER_PER_BEFORE, AFTER_SHARE, after_reserve
    assert after_reserve(90.0, None) == pytest.approx(AFTER_SHARE * 90)   # nothing timed yet: a share
    assert after_reserve(3600.0, None) == AFTER_MAX_S                     # of at most so much
    assert after_reserve(90.0, 10.0) == pytest.approx(12.0)               # the last sleep's, with a margin
    assert after_reserve(90.0, 10.0, 30.0) == pytest.approx(12.0)         # which beats the probes before
    # a first sleep on a slow hour: its probes before took 9 s, so its probes after will take ~20 s
    assert after_reserve(90.0, None, 9.0) == pytest.approx(AFTER_PER_BEFORE * 9.0)
    assert after_reserve(90.0, None, 2.0) == pytest.approx(AFTER_SHARE * 90)   # fast probes: the share
    assert after_reserve(90.0, None, 60.0) == pytest.approx(AFTER_MAX_SHARE * 90)   # some learning is left
    assert after_reserve(0.0, None, 9.0) == 0.0                           # no budget, nothing kept


def test_a_budgeted_sleep_learns_until_its_end_less_what_the_probes_after_took(tiny_engine):
    """The budget is the whole sleep: its clock starts before the probes before, and learning stops
    where the probes after still fit (the last sleep's time for them, budget.after_reserve)."""
    from sleep_engine import engine as E
    from sleep_engine.budget import AFTER_SHARE
    teach_two(tiny_engine)
    runs = []
    start = E.SleepRun.start_clock

    def timed(run, after_s):
        start(run, after_s)
        runs.append((run.end.at - run.deadline.at, run.end.left()))
    E.SleepRun.start_clock = timed
    try:
        tiny_engine.sleep(tiny_settings(budget_s=3.0, distill_steps=5000, dreaming=False), wait=True)
        first = tiny_engine.events.since(0)[-1]
        tiny_engine.wake.teach("Brenmoor Island exports saffron; its ferry sails at noon.")
        tiny_engine.sleep(tiny_settings(budget_s=3.0, distill_steps=5000, dreaming=False), wait=True)
    finally:
        E.SleepRun.start_clock = start
    assert first.kind == "done", first.data
    seeded = first.data["summary"]["consolidation"]
    assert 1 <= seeded["steps"] < 1000 < seeded["planned_steps"]          # cut by the clock, not by the plan
    assert runs[0][0] == pytest.approx(AFTER_SHARE * 3.0) and runs[0][1] == pytest.approx(3.0, abs=0.1)
    phases = tiny_engine.events.since(0)[-1].data["summary"]["phases"]
    assert tiny_engine._after_timed >= phases["probe_after"] > 0          # the second's, for a third
    assert runs[1][0] >= 1.2 * first.data["summary"]["phases"]["probe_after"]   # what the second planned with
    tiny_engine.close()   # a restarted app plans its first sleep with the last sleep's timing
    from conftest import make_tiny_engine
    reopened = make_tiny_engine(tiny_engine.cfg.state_dir.parent, tiny_engine.tokenizer)
    try:
        assert reopened._after_timed == pytest.approx(phases["probe_after"])   # the manifest has no checkpoint time
    finally:
        reopened.close()


def test_a_manifest_without_timings_leaves_the_first_sleeps_rule():
    from sleep_engine.budget import after_seconds
    assert after_seconds({"probe_after": 4.0, "checkpoint": 0.5}) == 4.5
    assert after_seconds({"probe_after": 4.0}) == 4.0
    assert after_seconds({"consolidation": 30.0}) is None          # cut before its probes after
    assert after_seconds({"probe_after": "4"}) is None             # hand-edited: not trusted
    assert after_seconds({"probe_after": float("nan")}) is None
    assert after_seconds(["probe_after"]) is None


def test_a_sleep_cut_to_under_half_its_steps_says_so_and_the_summary_shows_the_plan():
    from app.views import steps_text
    from sleep_engine.engine import budget_cut_note
    cut = {"steps": 1, "planned_steps": 18, "writing_s": 79.9, "gate_s": 55.7}
    note = budget_cut_note(cut, 180.0)
    assert "fit 1 of 18" in note and "80 s" in note and "56 s" in note
    assert budget_cut_note({**cut, "steps": 9}, 180.0) is None     # half the plan: no warning
    assert budget_cut_note(cut, 0.0) is None                       # no budget (the lab): nothing cut
    assert budget_cut_note({"steps": 0}, 180.0) is None            # nothing was planned (no data)
    assert steps_text(cut) == "1 of 18 planned steps" and steps_text({"steps": 9, "planned_steps": 9}) == "9 steps"
    assert steps_text({"steps": 9, "planned_steps": 9, "trained_from_layer": 15}) == "9 steps, layers 15 up"


def test_teacher_prompts_put_anchors_then_each_taught_episode_first_so_a_cut_keeps_every_episode(tiny_engine):
    from sleep_engine.consolidation import Consolidator, round_robin
    from sleep_engine.store import Episode
    assert round_robin([[1, 2, 3], [4], [5, 6]]) == [1, 4, 5, 2, 6, 3]
    seeder = Consolidator(tiny_engine.memory, tiny_engine.tokenizer, tiny_settings(anchor_prompts=2),
                          lambda *a, **k: None, lambda: None)
    taught = [Episode(i, "taught", t) for i, t in enumerate(TEXTS)]
    turn = Episode(5, "turn", "User: Tell me about Orrin Valley.\nAssistant: Orrin Valley has a choir.")
    old = Episode(0, "taught", "The Velmora Ridge observatory opened in 1911.")
    prompts = seeder.teacher_prompts(taught + [turn], [old], {0: ["Who painted Quarrow Point?"]})
    sources = [ep.text if ep else None for _, _, ep, _ in prompts]
    assert sources[:2] == [None, None]                        # the chat anchors
    assert sources[2:4] == TEXTS and sources[4:6] == TEXTS     # taught episodes take turns
    taught_end = max(i for i, s in enumerate(sources) if s in TEXTS)
    assert all(s not in TEXTS for s in sources[taught_end + 1:])   # replay and chat turns come after
    rest = prompts[taught_end + 1:]
    assert rest[0][1] is None and "Velmora" in rest[0][0]      # replay first in its round, without context
    assert rest[1][2] is turn                             # then the chat turn, its text in context
    assert ("Who painted Quarrow Point?", prompts[2][1], taught[0], None) in prompts   # self-study joins its episode


def test_own_words_after_the_writing_cut_are_not_scored(tiny_engine, monkeypatch):
    """merge_gold keeps the answers up to the first one the deadline left unwritten, and scores
    only the episode's own words before it (the ones after would be dropped)."""
    from sleep_engine import consolidation as C
    seeder = C.Consolidator(tiny_engine.memory, tiny_engine.tokenizer, tiny_settings(), lambda *a, **k: None,
                            lambda: None)
    tok = tiny_engine.tokenizer
    prompts = [chat_ids(tok, f"Question {i}?") for i in range(5)]
    gold = [None, "Senna Alvik painted it.", None, "In 1873.", "Violet."]
    scored = []
    real = C._scored_answer_logits

    def counting(lm, seqs, n_answers, pad):
        scored.append(len(seqs))
        return real(lm, seqs, n_answers, pad)
    monkeypatch.setattr(C, "_scored_answer_logits", counting)
    one = ([[5, 6]], [torch.zeros(2, 8)])                    # prompt 0 written, prompt 2 cut
    answers, logits = seeder.merge_gold(prompts, gold, [0, 2], one, [])
    assert len(answers) == 2 and answers[0] == [5, 6] and scored == [1]   # gold 1 scored; 3 and 4 not
    assert logits[1].shape[0] == len(answers[1])
    scored.clear()
    both = ([[5, 6], [7]], [torch.zeros(2, 8), torch.zeros(1, 8)])   # nothing cut: every gold scored
    answers, _ = seeder.merge_gold(prompts, gold, [0, 2], both, [])
    assert len(answers) == 5 and scored == [3]


def test_teacher_writing_stops_at_its_deadline_after_the_first_batch(tiny_engine):
    from sleep_engine.budget import Deadline
    from sleep_engine.sampling import generate_batch
    tok = tiny_engine.tokenizer
    prompts = [chat_ids(tok, f"Question {i}?") for i in range(5)]
    lm = tiny_engine.memory.lm
    assert len(generate_batch(lm, tok, prompts, 3, batch_size=2)) == 5
    assert len(generate_batch(lm, tok, prompts, 3, batch_size=2, deadline=Deadline(at=0.0))) == 2


def test_teacher_writing_sizes_its_last_batch_to_the_time_left(tiny_engine, monkeypatch):
    """After the first batch, a batch holds only the prompts the last batch's pace says fit."""
    from sleep_engine import sampling
    clock = iter(range(0, 1000, 2))   # each reading of the clock is 2 s later: a batch "takes" 2 s
    monkeypatch.setattr(sampling, "perf_counter", lambda: float(next(clock)))

    class Left:   # always 1.5 s left
        def left(self):
            return 1.5
    tok = tiny_engine.tokenizer
    prompts = [chat_ids(tok, f"Question {i}?") for i in range(5)]
    # batch 1: 2 prompts in 2 s (1 s each) → 1.5 s left holds 1 prompt; it takes 2 s → none fits
    got = sampling.generate_batch(tiny_engine.memory.lm, tok, prompts, 3, batch_size=2, deadline=Left())
    assert len(got) == 3
    assert got == sampling.generate_batch(tiny_engine.memory.lm, tok, prompts, 3, batch_size=2)[:3]
    # no budget (budget.NEVER: infinite time left) answers every batch
    from sleep_engine.budget import NEVER
    assert len(sampling.generate_batch(tiny_engine.memory.lm, tok, prompts, 3, batch_size=2, deadline=NEVER)) == 5


def test_prefix_groups_read_each_episode_once_and_decode_few_loops():
    from sleep_engine.sampling import prefix_groups
    template, a, b = list(range(300, 314)), list(range(100, 185)), list(range(200, 285))   # 14 and 85 tokens
    prompts = [template + [1] * 10, a + [5] * 20, b + [6] * 20, template + [2] * 12, a + [7] * 18, b + [8] * 22,
               a + [9] * 20, template + [3] * 9]
    # a forward (one new token): three groups, each episode's notes and the shared template read once
    assert prefix_groups(prompts, 1) == [(14, [0, 3, 7]), (85, [1, 4, 6]), (85, [2, 5])]
    # 36 new tokens: a decode loop costs ~144 prompt tokens, more than reading b's notes twice
    assert prefix_groups(prompts, 36) == [(0, [0, 2, 3, 5, 7]), (85, [1, 4, 6])]
    assert prefix_groups([a, a + [1]], 1) == [(84, [0, 1])]   # every row keeps a token of its own
    assert prefix_groups([[5]], 36) == [(0, [0])]


def test_common_prefix_stops_at_the_first_difference_the_limit_or_the_shortest_row():
    from sleep_engine.sampling import common_prefix
    assert common_prefix([[1, 2, 3, 4], [1, 2, 9, 4], [1, 2, 3]]) == 2
    assert common_prefix([[1, 2, 3], [1, 2, 3, 4]]) == 3
    assert common_prefix([[1, 2, 3], [1, 2, 3]], limit=1) == 1
    assert common_prefix([[7], [8]]) == 0 and common_prefix([[1, 2]]) == 2


def test_shared_prefix_answers_are_transformers_greedy_answers(tokenizer):
    """The teacher's writing with each episode read once gives the tokens and logits that
    transformers' generate gives (left-padded batches, every row read whole). Weights drawn
    large enough that attention is sharp: at the usual 0.02 a tiny model barely sees positions,
    and a prefix-relative mistake in them went unnoticed."""
    from conftest import tiny_llama
    from sleep_engine.sampling import generate_batch
    tok, lm = tokenizer, tiny_llama(vocab_size=len(tokenizer), initializer_range=0.3)
    prompts = [chat_ids(tok, q, f"Your notes: {t}") for t in TEXTS for q in ("Who is it about?", "Repeat it.",
                                                                                  "Tell me one thing it says, briefly.")]
    prompts += [chat_ids(tok, "Hello there.")]
    order = [0, 3, 6, 1, 4, 2, 5]   # episodes interleaved as the teacher's prompts come
    prompts = [prompts[i] for i in order]
    ref, ref_logits = generate_batch(lm, tok, prompts, 10, batch_size=8, return_logits=True)
    got, got_logits = generate_batch(lm, tok, prompts, 10, batch_size=8, return_logits=True, share_prefixes=True)
    assert got == ref and any(len(a) > 3 for a in got)
    for a, b in zip(got_logits, ref_logits):
        assert a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=0.05, rtol=0.02)


def test_scored_answer_logits_read_each_prefix_once_and_match_a_full_pass(tokenizer):
    from conftest import tiny_llama
    from sleep_engine.consolidation import _forward_answer_logits, _scored_answer_logits
    lm = tiny_llama(vocab_size=len(tokenizer), initializer_range=0.3)
    seqs = [chat_ids(tokenizer, q, f"Your notes: {t}") + [400 + k, 500, 600 + k][:k + 1]
            for k, (t, q) in enumerate([(TEXTS[0], "Who?"), (TEXTS[1], "Where?"), (TEXTS[0], "When did it happen?")])]
    n = [1, 2, 3]
    with torch.no_grad():
        full = _forward_answer_logits(lm, seqs, n, 0)
    assert torch.allclose(_scored_answer_logits(lm, seqs, n, 0), full, atol=1e-4, rtol=1e-4)


def test_a_seed_out_of_time_trains_fewer_steps_and_keeps_imitation_last(tiny_engine, monkeypatch):
    from sleep_engine import consolidation as C
    new_id = tiny_engine.memory.add_expert(tier=2, born=1)
    events = []
    seeder = C.Consolidator(tiny_engine.memory, tiny_engine.tokenizer, tiny_settings(distill_steps=6, gate_loss=0.0),
                            lambda kind, **d: events.append(d) if kind == "loss" else None, lambda: None)
    logits = lambda n: torch.zeros(n, tiny_engine.memory.lm.config.vocab_size)   # noqa: E731
    q = "Who painted the lighthouse of Quarrow Point?"
    chats = [C.Example(chat_ids(tiny_engine.tokenizer, q) + [5, 6], chat_ids(tiny_engine.tokenizer, q) + [5, 6], 2,
                       q, TEXTS[0], logits(2)) for _ in range(3)]
    monkeypatch.setattr(C, "steps_that_fit", lambda done, planned, secs, left: min(planned, 3))   # the clock says 3
    result = seeder.seed(chats, [new_id])
    assert result["planned_steps"] == 7 and result["steps"] == 3 == len(events)
    assert [e["total"] for e in events] == [3, 3, 3]
    assert [e["reward"] is not None for e in events] == [False, False, True]   # imitation is still the last step


def test_a_sleep_over_its_budget_still_commits_with_fewer_steps_and_says_what_it_skipped(tiny_engine):
    teach_two(tiny_engine)
    tiny_engine.sleep(tiny_settings(budget_s=0.01, distill_steps=5), wait=True)
    done = tiny_engine.events.since(0)[-1]
    assert done.kind == "done", done.data
    summary = done.data["summary"]
    assert summary["consolidation"]["planned_steps"] == 6 and summary["consolidation"]["steps"] == 1
    assert summary["dreams"]["skipped"] and summary["dreams"]["generated"] == 0
    assert tiny_engine.state.sleep_count() == 1
    # without a budget (the lab's setting) the recipe runs as written
    tiny_engine.wake.teach("The Orrin Valley choir sings on Tuesdays.")
    tiny_engine.sleep(tiny_settings(budget_s=0.0, distill_steps=5), wait=True)
    summary = tiny_engine.events.since(0)[-1].data["summary"]
    assert summary["consolidation"]["steps"] == 6 and summary["dreams"]["generated"] > 0


def test_dreaming_out_of_time_starts_no_trial_and_no_new_round(tiny_engine):
    from sleep_engine.budget import Deadline
    from sleep_engine.dreaming import Dreamer
    teach_two(tiny_engine)
    new_id = tiny_engine.memory.add_expert(tier=2, born=1)
    dreams = []
    dreamer = Dreamer(tiny_engine.memory, tiny_engine.tokenizer, tiny_settings(rest_rounds=2),
                      lambda kind, **d: dreams.append(d) if kind == "dream" else None, lambda: None,
                      deadline=Deadline(at=0.0))
    stats = dreamer.run(tiny_engine.state.episodes.all(), [], [new_id])
    assert stats["rounds"] == 1 and stats["cut"] and stats["kept"] == 0
    assert dreams and all(d["reward"] is None for d in dreams)   # generated and scored, never tried


def test_dreaming_starts_a_trial_or_m_step_only_while_its_last_time_is_left(tiny_engine):
    from sleep_engine.budget import Deadline
    from sleep_engine.dreaming import Dreamer
    teach_two(tiny_engine)
    new_id = tiny_engine.memory.add_expert(tier=2, born=1)
    dreams = []
    dreamer = Dreamer(tiny_engine.memory, tiny_engine.tokenizer, tiny_settings(),
                      lambda kind, **d: dreams.append(d) if kind == "dream" else None, lambda: None,
                      deadline=Deadline.after(600))
    assert dreamer.fits(None) and dreamer.fits(500) and not dreamer.fits(700)
    dreamer.trial_s = 700.0   # the last trial took longer than what is left
    stats = dreamer.run(tiny_engine.state.episodes.all(), [], [new_id])
    assert stats["generated"] > 0 and stats["kept"] == 0 and stats["cut"]
    assert all(d["reward"] is None and d["metric_before"] is None for d in dreams)   # τ not even read
    assert not Dreamer(tiny_engine.memory, tiny_engine.tokenizer, tiny_settings(), None, None,
                       deadline=Deadline(at=0.0)).fits(None)


def test_gate_selectivity_is_the_part_of_the_probes_after_that_the_budgets_end_cuts(tiny_engine):
    from sleep_engine.budget import Deadline
    from sleep_engine.probes import question_gates
    eid = tiny_engine.memory.add_expert(tier=2, born=1)
    questions = ["Who founded the town?", "What is 2 + 2?"]
    gates = question_gates(tiny_engine.memory, tiny_engine.tokenizer, questions, [eid], deadline=Deadline.after(600))
    assert len(gates[eid]) == 2
    assert question_gates(tiny_engine.memory, tiny_engine.tokenizer, questions, [eid], deadline=Deadline(at=0.0)) is None
    # a batch starts only while the last one's time is left: 1 µs left after a first batch is not enough
    left = iter([600.0, 1e-6])
    closing = SimpleNamespace(left=lambda: next(left))
    assert question_gates(tiny_engine.memory, tiny_engine.tokenizer, questions, [eid], batch_size=1,
                          deadline=closing) is None
    assert Deadline(at=10.0).earlier(0.5).at == 9.5 and Deadline().earlier(0.5).at is None


def test_probed_episodes_keep_every_taught_one_and_sample_the_chat_turns():
    from sleep_engine.engine import probed_episodes
    from sleep_engine.store import Episode
    older = [Episode(i, "taught" if i % 10 == 0 else "turn", "x") for i in range(1, 41)]   # 4 taught, 36 turns
    pending = [Episode(41, "taught", "y"), *(Episode(i, "turn", "z") for i in range(42, 47))]   # 1 taught, 5 turns
    read = probed_episodes(pending, older, chat_turns=8, seed=3)
    assert {10, 20, 30, 40, 41} <= read and len(read) == 5 + 8
    assert set(range(42, 47)) <= read                      # this sleep's turns first
    assert read == probed_episodes(pending, older, 8, seed=3)   # the sample is the sleep's own
    assert read != probed_episodes(pending, older, 8, seed=4)   # and the next sleep reads others
    assert probed_episodes(pending, older, 0, seed=3) == {10, 20, 30, 40, 41}
    assert len(probed_episodes(pending, older, 1000, seed=3)) == 46


def test_a_long_chat_is_probed_by_sample_and_r_carries_the_last_reading(tiny_engine):
    teach_two(tiny_engine)
    turns = [tiny_engine.state.episodes.append("turn", f"User: Tell me about Orrin Valley {i}.\n"
                                                       f"Assistant: Orrin Valley {i} has a choir of Dellam.").id
             for i in range(4)]
    tiny_engine.sleep(tiny_settings(probe_chat_turns=1, dreaming=False), wait=True)
    first = tiny_engine.state.sleep_manifests()[-1]
    assert first["probes_read"] == {"chat_turns": 1, "of": 4}
    read_turns = [t for t in turns if str(t) in first["probe_after"]]
    assert len(read_turns) == 1 and len(first["probe_after"]) == 3          # two taught + one turn
    assert len(first["probe_accuracy_before"]) == 3
    from sleep_engine.probes import episode_probes
    one_turn = len(episode_probes(next(e for e in tiny_engine.state.episodes.all() if e.id == read_turns[0])))
    own = {e: s["n_own"] for e, s in first["gate_selectivity"].items()}
    assert sorted(own.values()) == sorted([1, 1, one_turn])   # each taught expert its QA, the chat expert one turn's
    teach_two(tiny_engine)
    tiny_engine.sleep(tiny_settings(probe_chat_turns=1, dreaming=False), wait=True)
    second = tiny_engine.state.sleep_manifests()[-1]
    assert second["probes_read"] == {"chat_turns": 1, "of": 4} and len(second["probe_after"]) == 5
    R = tiny_engine.accuracy_matrix()
    assert R["episodes"][:3] == [int(k) for k in first["probe_after"]]   # an episode enters when first read
    unread = [j for j, e in enumerate(R["episodes"]) if str(e) not in second["probe_after"]]
    assert all(R["R"][1][j] == R["R"][0][j] for j in unread)              # carried, not counted as forgotten


def test_a_step_from_the_top_layers_reads_the_rest_once_and_matches_a_full_pass(tokenizer):
    from conftest import tiny_llama
    from sleep_engine.config import MemoryConfig
    from sleep_engine.consolidation import FrozenBelow, _forward_answer_logits
    from sleep_engine.memory import MemoryModel
    lm = tiny_llama(vocab_size=len(tokenizer), layers=4, initializer_range=0.3)
    memory = MemoryModel(lm, MemoryConfig())
    eid = memory.add_expert(tier=2, born=1)
    torch.manual_seed(1)
    with torch.no_grad():   # open and non-zero in every layer: each would move the answers
        for m in memory.expert_modules(eid):
            m.B.normal_(0, 0.3)
            m.gate_bias.fill_(2.0)
    assert [memory.first_trained_layer(s) for s in (1.0, 0.5, 0.01)] == [0, 2, 3]
    params = memory.train_only([eid], from_layer=2)
    assert len(params) == 2 * 4   # A, B, gate, bias in layers 2 and 3
    seqs = [chat_ids(tokenizer, q) + [400 + k] * (k + 1) for k, q in enumerate(["Who?", "Where is it now?", "When?"])]
    n = [1, 2, 3]
    full = _forward_answer_logits(lm, seqs, n, 0)
    want = torch.autograd.grad(full.pow(2).sum(), params)
    frozen = FrozenBelow(lm, 2, 0)
    got = frozen.logits(seqs, n)
    assert len(frozen.kept) == 3 and len(lm.model.layers) == 4   # the model is whole again
    assert torch.allclose(got, full, atol=1e-4, rtol=1e-4)
    grads = torch.autograd.grad(got.pow(2).sum(), params)
    assert all(torch.allclose(a, b, atol=1e-4, rtol=1e-3) for a, b in zip(grads, want))
    with torch.no_grad():   # the lower layers are read once: changing them now changes nothing
        for m in memory.expert_modules(eid)[:2]:
            m.B.zero_()
    assert torch.allclose(frozen.logits(seqs[:2], n[:2]), full[:3], atol=1e-4, rtol=1e-4)
    assert len(frozen.kept) == 3


def test_a_sleep_learns_in_the_top_layers_only(tiny_engine):
    teach_two(tiny_engine)
    tiny_engine.sleep(tiny_settings(trained_layers=0.5), wait=True)
    assert tiny_engine.events.since(0)[-1].kind == "done"
    summary = tiny_engine.events.since(0)[-1].data["summary"]
    assert summary["consolidation"]["trained_from_layer"] == 1
    info = next(e for e in tiny_engine.memory.experts() if e.born == 1)
    assert info.layers == [0, 1]
    assert info.layer_norms[0] == 0.0 < info.layer_norms[1]   # consolidation and dreaming left layer 0 alone


def test_a_stop_lands_inside_a_forward_of_the_sleeps_thread_only():
    """cancel_points with the model: each decoder layer checks before its forward, so one long
    batched forward (the teacher's first prefill) is cut within a layer; a chat thread using the
    same layers meanwhile is not; nothing stays hooked after the block."""
    import threading
    from conftest import tiny_llama
    from sleep_engine.sampling import cancel_points
    lm = tiny_llama()
    layers = lm.model.layers
    assert len(layers) >= 2
    calls = []

    class Stop(Exception):
        pass

    def check():
        calls.append(threading.current_thread().name)
        if len(calls) == 2:
            raise Stop

    ids = torch.tensor([[5, 9, 33, 2]])
    other = []
    with cancel_points(check, lm):
        worker = threading.Thread(target=lambda: other.append(lm(input_ids=ids).logits), name="chat")
        worker.start()
        worker.join()
        with pytest.raises(Stop), torch.no_grad():
            lm(input_ids=ids)
    assert other and calls == [threading.current_thread().name] * 2   # cut at the second layer
    assert all(not layer._forward_pre_hooks for layer in layers)
    lm(input_ids=ids)   # after the block: no checks
    assert len(calls) == 2

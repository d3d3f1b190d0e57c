"""Lab experiments: metric math, scoring, identical data for every method, resumability, report."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama

from app.lab_report import render_html, write_report
from sleep_engine.config import LabConfig
from sleep_engine.lab import data as lab_data
from sleep_engine.lab.report import list_reports, table
from sleep_engine.lab.runner import Runner
from sleep_engine.lab.scoring import IN_CONTEXT_PROMPT, Item, matrix_metrics, score
from sleep_engine.lab.settings import ExperimentConfig
from sleep_engine.probes import ANSWER_PROMPT

# -- metric math, checked by hand ------------------------------------------------------------------


def test_matrix_metrics_by_hand():
    # rows: after episode 1, 2, 3; columns: episodes 1, 2, 3 (future ones included)
    R = [[0.50, 0.00, 0.10],
         [1.00, 0.50, 0.00],
         [0.75, 0.50, 1.00]]
    m = matrix_metrics(R, initial=[0.0, 0.0, 0.25])
    assert m["average_accuracy"] == pytest.approx((0.75 + 0.5 + 1.0) / 3)
    # BWT = mean_j<T (R[T][j] − R[j][j]) = ((0.75 − 0.5) + (0.5 − 0.5)) / 2
    assert m["bwt"] == pytest.approx(0.125)
    # forgetting = mean_j<T (max_{j≤l<T} R[l][j] − R[T][j]) = ((1.0 − 0.75) + (0.5 − 0.5)) / 2
    assert m["forgetting"] == pytest.approx(0.125)
    # FWT = mean_{j≥2} (R[j−1][j] − b_j) = ((0 − 0) + (0 − 0.25)) / 2
    assert m["fwt"] == pytest.approx(-0.125)


def test_forgetting_and_bwt_of_plain_overwriting():
    R = [[1.0, 0.0], [0.0, 1.0]]   # learning episode 2 erased episode 1
    m = matrix_metrics(R)
    assert m["forgetting"] == pytest.approx(1.0) and m["bwt"] == pytest.approx(-1.0)
    assert m["average_accuracy"] == pytest.approx(0.5)


# -- scoring ---------------------------------------------------------------------------------------


def test_scoring_normalises_case_punctuation_and_word_boundaries():
    items = [Item("p1", "Who?", "Idris Kallowen"), Item("p1", "When?", "1847"), Item("p2", "When?", "1847"),
             Item("p2", "What?", "copper"), Item("p2", "Where?", "Lake Tessarine")]
    replies = ["It was IDRIS   kallowen.", "In 1847!", "In 18470.", "A copper-roofed tower", "Tessarine"]
    res = score(items, replies, semantic=False)
    assert [a["correct"] for a in res["answers"]] == [True, True, False, True, False]
    assert res["correct"] == 3 and res["accuracy"] == pytest.approx(0.6)
    assert res["per_passage"] == {"p1": 1.0, "p2": pytest.approx(1 / 3)}


def test_answer_prompt_is_fixed_and_in_context_only_adds_the_passage():
    assert ANSWER_PROMPT == "Answer directly and concisely. {q}"
    assert IN_CONTEXT_PROMPT.format(passage="P.", q="Q?") == "P.\n\nAnswer directly and concisely. Q?"


def test_assets_fit_the_issue():
    ps = lab_data.load_passages()
    assert len(ps) >= 40 and {p.split for p in ps} == {"dev", "test"}
    assert all(len(p.qa) >= 3 for p in ps) and len({p.id for p in ps}) == len(ps)
    assert len(lab_data.general_questions()) >= 10 and len(lab_data.generic_text()) > 1000


def test_bad_asset_gives_a_clear_error(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"id": "x", "split": "test", "text": "t"}\n')
    with pytest.raises(lab_data.DataError, match="expected id, split, text and qa"):
        lab_data.load_passages(path=f)


# -- runs on a tiny random model -------------------------------------------------------------------


@pytest.fixture
def tiny_runner(tmp_path, tokenizer):
    """A Runner whose every model is a fresh tiny random Llama with the real tokenizer."""
    from sleep_engine.backbone import Backbone

    def backbone():
        model = tiny_llama(vocab_size=len(tokenizer))
        return Backbone(model, tokenizer, "tiny-llama", torch.device("cpu"), torch.float32, "none", 0.0, True)

    def make(resume=False, **over):
        lab = LabConfig(model="tiny", quantize="none", state_dir=tmp_path / "state", cache_dir=tmp_path / "cache")
        lab.wake.fast_update_every = 0
        settings = {"n1_passages": 2, "many_passages": 2, "episodes": 2, "passages_per_episode": 1, "answer_tokens": 4,
                        "lora_rank": 2, "lora_alpha": 4, "sft_epochs": 1, "seal_edits": 1, "seal_edit_tokens": 8,
                        "sleep_overrides": {"prompts_per_episode": 2, "answer_tokens": 6, "distill_steps": 1, "batch_size": 2,
                                             "lti": False, "replay_per_episode": 1, "anchor_prompts": 1,
                                             "max_everyday_changed": 1.0},
                        "n1_methods": ("base", "in_context", "passage_sft", "seal_sft", "sleep_nodream"),
                        "many_methods": ("base", "passage_sft", "sleep_nodream"),
                        "continual_methods": ("seq_sft", "ewc", "sleep_nodream")}
        settings.update(over)
        exp = ExperimentConfig.from_preset("quick", **settings)
        runner = Runner(lab, exp, tmp_path / "out", resume=resume, progress=False, log=lambda s: None,
                        backbone_factory=backbone, write_report=write_report)
        runner.generic = runner.generic[:300]         # the real sets, shortened: a 49k-word vocabulary
        runner.questions = runner.questions[:3]       # makes every token costly for the tiny model
        return runner
    return make


@pytest.fixture(autouse=True)
def no_semantic_model(monkeypatch):
    """Unit tests skip loading MiniLM: a deterministic stand-in for the cosine."""
    from sleep_engine.lab import scoring
    monkeypatch.setattr(scoring, "semantic_scores", lambda replies, golds: [0.5] * len(replies))


def test_every_method_sees_identical_data_and_resume_skips_finished_methods(tiny_runner, tmp_path, monkeypatch):
    res = tiny_runner(passages_per_sleep=1).knowledge()
    n1 = {name: r["inputs"] for name, r in res["n1"].items()}
    assert len(set(map(tuple, n1.values()))) == 1 and len(next(iter(n1.values()))) == 2   # one call per passage
    many = {name: r["inputs"] for name, r in res["many"].items()}
    assert len(set(map(tuple, many.values()))) == 1
    assert all(r["n"] == 8 for r in res["many"].values())   # 2 passages × 4 questions, for every method
    # Sleep slept once per passage; its learning time leaves out its own probe phases
    sleep = res["many"]["sleep_nodream"]["learn"]
    assert [s["passages"] for s in sleep["sleeps"]] == [[p] for p in res["passages_many"]]
    assert sleep["probe_seconds"] > 0 and sleep["seconds"] == pytest.approx(sleep["wall_seconds"] - sleep["probe_seconds"])
    # the untrained model's general numbers are measured once per kind of base and shared
    assert res["many"]["base"]["drift"]["ppl_before"] == res["many"]["passage_sft"]["drift"]["ppl_before"]
    assert (tmp_path / "out" / "knowledge.html").is_file() and json.loads((tmp_path / "out" / "knowledge.json").read_text())

    # a second run with --resume recomputes nothing; the results are the same
    calls = []
    monkeypatch.setattr(Runner, "_knowledge_many", lambda self, *a: calls.append(a) or {})
    monkeypatch.setattr(Runner, "_knowledge_n1", lambda self, *a: calls.append(a) or {})
    again = tiny_runner(resume=True, passages_per_sleep=1).knowledge()
    assert calls == []
    assert again["many"]["passage_sft"]["accuracy"] == res["many"]["passage_sft"]["accuracy"]


def test_interrupted_run_resumes_at_the_unfinished_method(tiny_runner, monkeypatch):
    runner = tiny_runner(many_methods=("base", "passage_sft"), n1_passages=0)
    real = Runner._knowledge_many

    def stop_at_sft(self, name, passages):
        if name == "passage_sft":
            raise KeyboardInterrupt
        return real(self, name, passages)
    monkeypatch.setattr(Runner, "_knowledge_many", stop_at_sft)
    with pytest.raises(KeyboardInterrupt):
        runner.knowledge()
    done = []
    monkeypatch.setattr(Runner, "_knowledge_many", lambda self, name, p: done.append(name) or real(self, name, p))
    res = tiny_runner(resume=True, many_methods=("base", "passage_sft"), n1_passages=0).knowledge()
    assert done == ["passage_sft"] and set(res["many"]) == {"base", "passage_sft"}
    # other settings → nothing reused
    done.clear()
    tiny_runner(resume=True, many_methods=("base", "passage_sft"), n1_passages=0, sft_epochs=2).knowledge()
    assert done == ["base", "passage_sft"]


def test_continual_matrix_and_sft_changes_the_model(tiny_runner):
    res = tiny_runner(sft_epochs=2).continual()
    for name, r in res["methods"].items():
        assert len(r["R"]) == 2 and all(len(row) == 2 for row in r["R"]), name
        assert set(r) >= {"average_accuracy", "forgetting", "bwt", "drift", "ppl_curve"}
        assert r["drift"]["ppl_after"] > 0
    inputs = {name: r["inputs"] for name, r in res["methods"].items()}
    assert len(set(map(tuple, inputs.values()))) == 1
    # training really happened: the adapter moved the perplexity
    sft = res["methods"]["seq_sft"]
    assert sft["ppl_curve"][-1] != pytest.approx(sft["drift"]["ppl_before"], rel=1e-6)
    assert res["methods"]["ewc"]["learn"][-1].get("ewc_penalty_max", 0) > 0
    assert "R[i][j]" in render_html(res)


def test_report_is_self_contained_and_listed(tmp_path):
    result = {"experiment": "continual", "episodes": [["p1"], ["p2"]], "date": "2026-01-01 00:00 UTC",
              "settings": {"preset": "quick"}, "machine": {"cpu": "test"},
              "methods": {"seq_sft": {"R": [[1.0, 0.0], [0.0, 1.0]], "average_accuracy": 0.5, "forgetting": 1.0,
                                      "bwt": -1.0, "fwt": 0.0, "seconds": 3.0, "ppl_curve": [10.0, 11.0],
                                      "drift": {"ppl_before": 10.0, "ppl_after": 11.0, "ppl_change": 0.1}}}}
    html = render_html(result)
    assert "src=\"https://cdn" not in html and "Plotly.newPlot" in html and len(html) > 1_000_000  # plotly.js inlined
    assert "100.0 pts" in table(result)
    write_report(result, tmp_path / "continual.html")
    (tmp_path / "continual.json").write_text(json.dumps(result))
    (tmp_path / "other.json").write_text("{}")
    found = list_reports(tmp_path)
    assert [r["experiment"] for r in found] == ["continual"] and found[0]["html"].endswith("continual.html")


def test_cli_rejects_unknown_method_or_setting_with_exit_2(capsys):
    import launch
    assert launch.main(["lab", "knowledge", "--methods", "nope"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert launch.main(["lab", "knowledge", "--set", "n1_passages=many"]) == 2
    assert "n1_passages must look like" in capsys.readouterr().err
    assert launch.main(["lab", "knowledge", "--set", "nonsense=1"]) == 2


def test_settings_from_the_command_line_keep_their_types():
    e = ExperimentConfig.from_preset("quick", n1_passages="0", sft_lr="5e-4", tta_epochs="1,3")
    assert (e.n1_passages, e.sft_lr, e.tta_epochs) == (0, 5e-4, (1, 3))


def test_median_interval_takes_the_sign_tests_order_statistics():
    from sleep_engine.lab.scoring import median_interval
    # n = 15: P(B ≤ 3) = (1 + 15 + 105 + 455)/2¹⁵ = 0.0176 ≤ 0.025 < P(B ≤ 4) = 0.0592 → x₍₄₎, x₍₁₂₎
    lo, hi, coverage = median_interval([15 - i for i in range(15)])   # order does not matter
    assert (lo, hi) == (4, 12) and abs(coverage - (1 - 2 * 576 / 2 ** 15)) < 1e-12
    # n = 6: P(B ≤ 0) = 1/64 ≤ 0.025 → the extremes, at 1 − 2/64
    assert median_interval([3, 1, 2, 6, 5, 4]) == (1, 6, 1 - 2 / 64)
    # n = 5: even the extremes cover only 1 − 2/32 = 0.9375 < 95%, and say so
    assert median_interval([1, 2, 3, 4, 5]) == (1, 5, 0.9375)


def test_wilson_interval_matches_hand_computed_values():
    from sleep_engine.lab.scoring import wilson
    lo, hi = wilson(5, 10)            # p̂ = 0.5: centre 0.5, half = 1.96·√(0.025 + 0.0096)/1.384 = 0.2634
    assert abs(lo - 0.2366) < 1e-3 and abs(hi - 0.7634) < 1e-3
    lo, hi = wilson(0, 32)            # no successes: the interval still reaches 3.84/35.84 = 0.107
    assert lo == 0.0 and abs(hi - 0.1072) < 1e-3


def test_the_wake_experiments_learning_row_says_where_a_sleeps_budget_went():
    """`lab wake` (make user-check) reports each sleep's parts, so a sleep that trained 1 of 18
    steps shows what took its budget: the teacher's writing, the gates' preparation, the older gates."""
    from sleep_engine.lab.wake_memory import _learning
    summary = {"consolidation": {"steps": 1, "planned_steps": 18, "answered": 44, "prompts": 119, "writing_s": 18.6,
                                 "gate_s": 13.9, "training_s": 2.0},
               "older_gates_s": 11.1, "phases": {"consolidation": 50.7}}
    row = _learning(summary)
    assert (row["steps"], row["planned_steps"]) == (1, 18)
    assert (row["writing_s"], row["gate_s"], row["older_gates_s"], row["training_s"]) == (18.6, 13.9, 11.1, 2.0)
    assert _learning({})["gate_s"] is None   # a sleep refused before consolidating

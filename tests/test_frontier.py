"""The frontier experiment (issue 16): front, budget and time-to-accuracy math on hand-made points,
sweep settings that really reach the learners, the report, and one run on a tiny random model."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama

from app.lab_figures import frontier_figure
from app.lab_report import load_report, render_html, write_report
from sleep_engine.config import ConfigError, LabConfig
from sleep_engine.lab import frontier as F
from sleep_engine.lab.methods import make_learner
from sleep_engine.lab.report import list_reports, table
from sleep_engine.lab.runner import Runner
from sleep_engine.lab.settings import ExperimentConfig

BUDGET = {"max_drift": 0.02, "min_kept": 0.95}


def pt(label, accuracy, drift, kept, seconds, n=12):
    """A hand-made measured point."""
    return {"label": label, "accuracy": accuracy, "correct": round(accuracy * n), "n": n, "ci": [0.0, 1.0],
            "ppl_change": drift, "everyday_kept": kept, "everyday_lost": None if kept is None else 1 - kept,
            "everyday_right_before": 20, "everyday_still_right": None if kept is None else round(20 * kept),
            "seconds": seconds}


# -- the Pareto front ------------------------------------------------------------------------------


def test_pareto_front_by_hand():
    pairs = [(0.0, 0.00),   # base: nothing has less damage
             (0.25, 0.01),  # on: more accuracy than base, less damage than everything above it
             (0.25, 0.05),  # dominated by (0.25, 0.01): same accuracy, more damage
             (0.50, 0.30),  # on
             (0.40, 0.40),  # dominated by (0.50, 0.30)
             (0.50, 0.30),  # equal to an on-front point: neither dominates the other
             (0.10, 0.00)]  # dominates base: same damage, more accuracy
    assert F.pareto_front(pairs) == [False, True, False, True, False, True, True]
    assert F.pareto_front([]) == []
    assert F.pareto_front([(0.3, 2.0)]) == [True]


def test_front_members_skip_failed_and_unmeasured_points():
    points = {"base": [pt("defaults", 0.0, 0.0, 1.0, 0)],
              "sft": [pt("a", 0.5, 1.0, 0.2, 10), pt("b", 0.2, 0.5, 0.9, 5), {"label": "c", "error": "x"}],
              "sleep": [pt("q", 0.25, 0.01, None, 100), pt("f", 0.6, 0.015, 0.97, 300)]}
    assert F.front_members(points, "ppl_change") == {("base", 0), ("sleep", 0), ("sleep", 1)}
    # everyday axis: sleep "q" has no kept share, so it is not placed at all
    assert F.front_members(points, "everyday_lost") == {("base", 0), ("sleep", 1)}


# -- the two summary numbers -----------------------------------------------------------------------


def test_best_accuracy_within_the_damage_budget():
    points = [pt("gentle", 0.10, 0.005, 1.00, 2),
              pt("mid", 0.30, 0.019, 0.95, 8),      # within: both limits are inclusive
              pt("tie", 0.30, -0.01, 0.97, 5),      # same accuracy, fewer seconds: preferred
              pt("strong", 0.60, 0.50, 0.40, 20),   # too much drift
              pt("kept?", 0.70, 0.00, None, 1),     # kept share not measured: does not qualify
              {"label": "failed", "error": "refused"}]
    assert F.best_within_budget(points, **BUDGET)["label"] == "tie"
    assert F.best_within_budget([pt("x", 0.9, 0.021, 1.0, 1), pt("y", 0.9, 0.0, 0.94, 1)], **BUDGET) is None
    assert F.within_budget(pt("edge", 0.1, 0.02, 0.95, 1), **BUDGET)


def test_time_to_accuracy_at_matched_damage_and_at_any_damage():
    # hand-made curves: SFT reaches 25% fast but only by damaging; Sleep reaches it within budget
    sft = [pt("1 ep", 0.0, 0.001, 1.0, 2), pt("3 ep", 0.25, 0.40, 0.6, 6), pt("10 ep", 0.5, 2.4, 0.3, 20),
           pt("1 ep gentle", 0.25, 0.03, 0.99, 9)]   # just over the drift limit
    sleep = [pt("short", 0.0833, 0.004, 1.0, 80), pt("quick", 0.25, 0.006, 0.98, 116), pt("full", 0.5, 0.007, 0.96, 282)]
    assert F.time_to_accuracy(sft, 0.25)["seconds"] == 6                # unconstrained: the 3-epoch point
    assert F.time_to_accuracy(sft, 0.25, **BUDGET) is None              # never within the budget
    assert F.time_to_accuracy(sleep, 0.25, **BUDGET)["label"] == "quick"
    assert F.time_to_accuracy(sleep, 0.25)["seconds"] == 116
    assert F.time_to_accuracy(sleep, 0.75) is None
    assert F.time_to_accuracy(sft, 0.0, **BUDGET)["label"] == "1 ep"   # target 0: the cheapest point in budget


def test_target_is_sleeps_best_within_budget_else_one_question():
    exp = ExperimentConfig.from_preset("quick")
    points = {"passage_sft": [pt("a", 0.5, 2.0, 0.2, 10)],
              "sleep_2tier": [pt("q", 0.25, 0.01, 1.0, 100), pt("f", 0.5, 0.10, 0.9, 300)]}
    assert F.choose_target(points, exp) == {"accuracy": 0.25, "from": "sleep_2tier's best within the budget"}
    points["sleep_2tier"] = [pt("q", 0.0, 0.01, 1.0, 100)]
    assert F.choose_target(points, exp)["accuracy"] == pytest.approx(1 / 12)
    exp.frontier_target = 0.4
    assert F.choose_target(points, exp) == {"accuracy": 0.4, "from": "frontier_target"}


def test_summarise_names_each_methods_numbers_and_front():
    exp = ExperimentConfig.from_preset("quick")
    points = {"base": [pt("defaults", 0.0, 0.0, 1.0, 0)],
              "passage_sft": [pt("1 ep", 0.0833, 0.01, 1.0, 2), pt("10 ep", 0.5, 2.0, 0.2, 16)],
              "sleep_2tier": [pt("quick", 0.25, 0.006, 0.97, 116)]}
    s = F.summarise(points, exp)
    assert s["target"]["accuracy"] == 0.25 and s["budget"] == BUDGET
    sft = s["summary"]["passage_sft"]
    assert sft["best_within_budget"]["label"] == "1 ep" and sft["time_matched"] is None
    assert sft["time_any"]["seconds"] == 16
    assert s["summary"]["sleep_2tier"]["time_matched"]["seconds"] == 116
    assert s["front"]["ppl_change"] == [["base", 0], ["passage_sft", 1], ["sleep_2tier", 0]]
    # Sleep beats "1 ep" on drift (more accuracy, less drift); on everyday questions "1 ep" loses none
    assert sft["on_front"] == {"ppl_change": ["10 ep"], "everyday_lost": ["1 ep", "10 ep"]}


def test_point_numbers_by_hand():
    questions = [("q1", "a"), ("q2", "b"), ("q3", "c"), ("q4", "d")]
    before = {"ppl": 10.0, "right": [True, True, True, False], "replies": ["a", "b", "c", "x"]}
    after = {"ppl": 10.5, "right": [True, False, True, True], "replies": ["a", "kangaroo", "c", "d"]}
    n = F.point_numbers(5, 10, before, after, questions)
    assert n["accuracy"] == 0.5 and n["ppl_change"] == pytest.approx(0.05)
    # kept = |{q1, q3}| / |{q1, q2, q3}|: q4 newly right does not make up for q2
    assert n["everyday_kept"] == pytest.approx(2 / 3) and n["everyday_lost"] == pytest.approx(1 / 3)
    assert n["everyday_lost_replies"] == [["q2", "kangaroo"]]
    assert n["ci"][0] == pytest.approx(0.2366, abs=1e-3) and n["ci"][1] == pytest.approx(0.7634, abs=1e-3)
    none_right = F.point_numbers(0, 4, {**before, "right": [False] * 4}, after, questions)
    assert none_right["everyday_kept"] is None and none_right["everyday_lost"] is None


# -- the sweeps ------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["quick", "full"])
def test_presets_sweep_every_learner_over_its_knob(preset):
    sweeps = ExperimentConfig.from_preset(preset).frontier_sweeps
    for sft in ("passage_sft", "seal_sft"):
        grid = {(p["sft_epochs"], p["sft_lr"]) for p in sweeps[sft]}
        assert len(grid) >= 4 and (1, 1e-4) in grid and (10, 1e-3) in grid   # gentle … SEAL's inner loop
    assert len({p["ewc_lambda"] for p in sweeps["ewc"]}) >= 3
    sleeps = [F.point_label(p) for p in sweeps["sleep_2tier"]]
    assert "full preset" in sleeps and any("distill_epochs" in s for s in sleeps) and len(set(sleeps)) == len(sleeps)


def test_point_configs_differ_reach_the_learner_and_leave_the_run_alone(tmp_path):
    exp = ExperimentConfig.from_preset("quick", sleep_overrides={"dreams": 3, "distill_epochs": 9.0})
    gentle = F.point_config(exp, {"sft_epochs": 1, "sft_lr": 1e-4})
    assert (gentle.sft_epochs, gentle.sft_lr) == (1, 1e-4) and (exp.sft_epochs, exp.sft_lr) == (10, 1e-3)
    lam = F.point_config(exp, {"ewc_lambda": 1e6})
    assert lam.ewc_lambda == 1e6 and exp.ewc_lambda == 1e4
    # Sleep: the point's distill_epochs replaces the run's, the run's other overrides stay
    knobs = [{"sleep_preset": "quick", "sleep_overrides": {"distill_epochs": 1.4}}, {"sleep_preset": "full"}]
    settings = [make_learner("sleep_2tier", LabConfig(), F.point_config(exp, k), None, tmp_path, "frontier").settings()
                for k in knobs]
    assert [(s.preset, s.distill_epochs, s.dreams) for s in settings] == [("quick", 1.4, 3), ("full", 9.0, 3)]
    assert exp.sleep_overrides == {"dreams": 3, "distill_epochs": 9.0}
    assert len({F.point_slug(k) for k in ExperimentConfig.from_preset("full").frontier_sweeps["passage_sft"]}) == 6


def test_cache_keys_follow_what_a_result_depends_on(tmp_path):
    def runner(**over):
        return Runner(LabConfig(), ExperimentConfig.from_preset("quick", **over), tmp_path, progress=False,
                      log=lambda s: None)
    plain, other = runner(), runner(frontier_max_drift=0.05, frontier_sweeps='{"ewc": [{"ewc_lambda": 1}]}')
    ps = plain.test[:3]
    # the knowledge experiment's results do not depend on the frontier's settings: resume keeps them
    assert plain.key("knowledge-many", "base", ps) == other.key("knowledge-many", "base", ps)
    point = F.point_config(plain.exp, {"sft_epochs": 1, "sft_lr": 1e-4})
    assert plain.frontier_key("passage_sft", point, ps) == other.frontier_key("passage_sft", point, ps)
    assert plain.frontier_key("passage_sft", point, ps) != \
        plain.frontier_key("passage_sft", F.point_config(plain.exp, {"sft_epochs": 2, "sft_lr": 1e-4}), ps)


def test_bad_sweeps_are_refused_before_the_run():
    with pytest.raises(ConfigError, match="cannot be swept"):
        ExperimentConfig.from_preset("quick", frontier_sweeps='{"passage_sft": [{"lora_rank": 4}]}')
    with pytest.raises(ConfigError, match="sft_epochs must look like"):
        ExperimentConfig.from_preset("quick", frontier_sweeps='{"passage_sft": [{"sft_epochs": 1.5}]}')
    with pytest.raises(ConfigError, match="unknown method"):
        ExperimentConfig.from_preset("quick", frontier_sweeps='{"sft": [{}]}')
    ok = ExperimentConfig.from_preset("quick", frontier_sweeps='{"ewc": [{"ewc_lambda": 100}]}')
    assert ok.frontier_sweeps == {"ewc": [{"ewc_lambda": 100}]}
    assert ExperimentConfig.from_preset("quick").frontier_sweeps != ok.frontier_sweeps   # the preset is untouched


def test_point_labels_and_file_names():
    assert F.point_label({"sft_epochs": 3, "sft_lr": 1e-3}) == "3 ep, lr 0.001"
    assert F.point_label({"ewc_lambda": 1e4}) == "λ 1e+04"
    assert F.point_label({"sleep_preset": "quick", "sleep_overrides": {"distill_epochs": 1.4}}) == \
        "quick preset, distill_epochs 1.4"
    assert F.point_label({}) == "defaults" and F.point_slug({}) == "defaults"
    assert F.point_slug({"sft_lr": 1e-4, "sft_epochs": 1}) == "sft_epochs-1_sft_lr-0.0001"


# -- report and figure -----------------------------------------------------------------------------


def hand_result() -> dict:
    exp = ExperimentConfig.from_preset("quick")
    points = {"base": [pt("defaults", 0.0, 0.0, 1.0, 0)],
              "passage_sft": [pt("1 ep, lr 0.0001", 0.0833, 0.001, 1.0, 2), pt("10 ep, lr 0.001", 0.5, 2.4, 0.3, 16)],
              "sleep_2tier": [pt("quick preset", 0.25, 0.006, 0.97, 116),
                              {"label": "full preset", "error": "sleep failed: refused"}]}
    return {"experiment": "frontier", "passages": ["p25"], "points": points, "reused": ["base: defaults"],
            "date": "2026-01-01 00:00 UTC", "settings": exp.to_dict(), "machine": {"cpu": "test"},
            **F.summarise(points, exp)}


def test_frontier_table_has_the_two_numbers_per_method_and_a_row_per_point():
    md = table(hand_result())
    assert "Target accuracy 25.0% (sleep_2tier's best within the budget)" in md
    assert "| passage LoRA SFT | 8.3% (1/12) | 1 ep, lr 0.0001 | never | 16 (10 ep, lr 0.001) | 2 / 2 of 2 |" in md
    assert "| Sleep, 2-tier | 25.0% (3/12) | quick preset | 116 (quick preset) | 116 (quick preset) | 1 / 1 of 2 |" in md
    assert "| passage LoRA SFT | 10 ep, lr 0.001 | 50.0% (6/12) [0.0–100.0] | +240.0% | 30.0% (6/20) | 16 | " \
           "drift, everyday |" in md
    assert "| base (closed-book) | defaults | 0.0% (0/12) [0.0–100.0] | +0.0% | 100.0% (20/20) | 0 | drift |" in md
    assert "| Sleep, 2-tier | full preset | failed: sleep failed: refused |" in md
    assert "Reused from earlier runs (same settings): base: defaults." in md
    assert sum(line.startswith("| passage LoRA SFT |") for line in md.splitlines()) == 3   # summary + 2 points


def test_frontier_figure_has_a_line_per_method_the_front_and_error_bars(tmp_path):
    result = hand_result()
    fig = frontier_figure(result)
    names = ["base (closed-book)", "passage LoRA SFT", "Sleep, 2-tier", "Pareto front", "damage budget"]
    for axis in ("x", "x2"):   # two panels: perplexity drift, everyday questions lost
        traces = [t for t in fig.data if t.xaxis == axis]
        assert [t.name for t in traces] == names
        assert all(t.error_y.array is not None for t in traces[:3])
    sft = fig.data[1]   # drift +0.1% and +240%, drawn on a log axis (base's 0% at the 0.1% floor)
    assert list(sft.x) == pytest.approx([0.1, 240.0]) and sft.error_y.arrayminus[1] == pytest.approx(0.5)
    assert list(fig.data[0].x) == [0.1] and fig.layout.xaxis.type == "log"
    front = fig.data[3]   # base, SFT 1 epoch, Sleep quick, SFT 10 epochs: sorted by drift
    assert list(front.y) == pytest.approx([0.0, 0.0833, 0.25, 0.5])
    assert list(fig.data[4].x) == pytest.approx([2.0, 2.0]) and list(fig.data[9].x) == pytest.approx([5.0, 5.0])
    assert len(fig.data[2].x) == 1             # the failed Sleep point is not drawn
    # the report and the app's Inspect tab open it like the other experiments
    (tmp_path / "frontier.json").write_text(json.dumps(result))
    write_report(result, tmp_path / "frontier.html")
    assert [r["experiment"] for r in list_reports(tmp_path)] == ["frontier"]
    view = load_report(tmp_path / "frontier.json")
    assert [f.layout.title.text for f in view["figures"]] == [fig.layout.title.text]
    html = render_html(result)
    assert html.count("<table>") == 2 and "<p>Damage budget" in html


# -- everyday questions ----------------------------------------------------------------------------


def test_everyday_questions_stay_out_of_training_and_anchor_sets():
    from sleep_engine import ASSETS
    from sleep_engine.consolidation import ANCHOR_PROMPTS, GATE_NEGATIVE_PROMPTS
    from sleep_engine.lab.data import general_questions
    questions = [q for q, _ in general_questions()]
    assert len(set(questions)) == len(questions)
    text = " ".join((ASSETS / name).read_text(encoding="utf-8").lower() for name in ("anchor_text.txt", "chat_prompts.txt"))
    prompts = {p.lower() for p in ANCHOR_PROMPTS + GATE_NEGATIVE_PROMPTS}
    assert not [q for q in questions if q.lower() in text or q.lower() in prompts]


# -- one run on a tiny random model ----------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_semantic_model(monkeypatch):
    from sleep_engine.lab import scoring
    monkeypatch.setattr(scoring, "semantic_scores", lambda replies, golds: [0.5] * len(replies))


def tiny_runner(tmp_path, tokenizer, resume=False, **over):
    """A Runner whose every model is a fresh tiny random Llama with the real tokenizer."""
    from sleep_engine.backbone import Backbone

    def backbone():
        model = tiny_llama(vocab_size=len(tokenizer))
        return Backbone(model, tokenizer, "tiny-llama", torch.device("cpu"), torch.float32, "none", 0.0, True)
    lab = LabConfig(model="tiny", quantize="none", state_dir=tmp_path / "state", cache_dir=tmp_path / "cache")
    settings = {"frontier_passages": 1, "answer_tokens": 4, "lora_rank": 2, "lora_alpha": 4, "seal_edits": 1,
                "seal_edit_tokens": 8,
                "frontier_sweeps": {"base": [{}],
                                    "passage_sft": [{"sft_epochs": 1, "sft_lr": 1e-4}, {"sft_epochs": 2, "sft_lr": 1e-2}],
                                    "seal_sft": [{"sft_epochs": 1, "sft_lr": 1e-4}, {"sft_epochs": 1, "sft_lr": 1e-2}],
                                    "ewc": [{"sft_epochs": 2, "ewc_lambda": 1e4}]},   # 2 steps: the penalty acts
                **over}
    runner = Runner(lab, ExperimentConfig.from_preset("quick", **settings), tmp_path / "out", resume=resume,
                    progress=False, log=lambda s: None, backbone_factory=backbone, write_report=write_report)
    runner.generic = runner.generic[:200]
    runner.questions = runner.questions[:2]
    return runner


def test_frontier_run_sweeps_the_learners_and_resumes_point_by_point(tmp_path, tokenizer, monkeypatch):
    res = tiny_runner(tmp_path, tokenizer).frontier()
    sft = res["points"]["passage_sft"]
    # each point trained with its own settings, on the same passages as every other point
    assert [(p["learn"]["epochs"], p["learn"]["lr"]) for p in sft] == [(1, 1e-4), (2, 1e-2)]
    inputs = {tuple(p["inputs"]) for pts in res["points"].values() for p in pts}
    assert len(inputs) == 1
    assert sft[0]["ppl_change"] != pytest.approx(sft[1]["ppl_change"], abs=1e-6)
    seal = res["points"]["seal_sft"]   # the self-edits were written once, and charged to both points
    assert [p["learn"]["edits_reused"] for p in seal] == [False, True]
    assert seal[1]["seconds"] >= seal[1]["learn"]["edit_seconds"] > 0
    ewc = res["points"]["ewc"][0]["learn"]   # anchored at the base: the penalty acts in the first episode
    assert ewc["ewc_penalty_max"] > 0 and ewc["fisher_s"] > 0
    assert res["points"]["base"][0]["ppl_change"] == pytest.approx(0.0, abs=1e-6)
    assert set(res["summary"]) == {"base", "passage_sft", "seal_sft", "ewc"} and res["reused"] == []
    assert (tmp_path / "out" / "frontier.html").is_file()

    # --resume with one more point: only that point is computed, the rest are listed as reused
    calls = []
    real = Runner._frontier_point
    monkeypatch.setattr(Runner, "_frontier_point", lambda self, name, knobs, *a: calls.append((name, knobs))
                        or real(self, name, knobs, *a))
    sweeps = {**res["settings"]["frontier_sweeps"], "ewc": [{"sft_epochs": 2, "ewc_lambda": 1e4},
                                                            {"sft_epochs": 2, "ewc_lambda": 1e2}]}
    again = tiny_runner(tmp_path, tokenizer, resume=True, frontier_sweeps=sweeps, frontier_max_drift=0.5).frontier()
    assert calls == [("ewc", {"sft_epochs": 2, "ewc_lambda": 1e2})]
    assert len(again["reused"]) == 6 and "passage_sft: 2 ep, lr 0.01" in again["reused"]
    assert again["points"]["passage_sft"][1]["accuracy"] == sft[1]["accuracy"]


def test_sleep_points_get_their_budget_and_a_refused_sleep_does_not_stop_the_run(tmp_path, tokenizer, monkeypatch):
    from sleep_engine.lab.methods import SleepMethod
    real = SleepMethod.learn

    def refuse_the_long_one(self, passages):
        if self.settings().distill_epochs == 5.6:
            raise RuntimeError("sleep failed: the sleep changed 40% of the model's everyday answers")
        return real(self, passages)
    monkeypatch.setattr(SleepMethod, "learn", refuse_the_long_one)
    tiny = {"prompts_per_episode": 2, "study_questions": 0, "answer_tokens": 6, "batch_size": 2, "lti": False,
            "replay_per_episode": 1, "anchor_prompts": 1, "anchor_texts": 1, "max_everyday_changed": 1.0, "dreams": 2,
            "gate_negatives": 2, "gate_distractors": 2, "gate_fit_steps": 5}
    sweeps = {"sleep_2tier": [{"sleep_preset": "quick", "sleep_overrides": {"distill_epochs": 0.5}},
                              {"sleep_preset": "quick", "sleep_overrides": {"distill_epochs": 5.6}}]}
    res = tiny_runner(tmp_path, tokenizer, frontier_sweeps=sweeps, sleep_overrides=tiny).frontier()
    done, refused = res["points"]["sleep_2tier"]
    assert done["learn"]["settings"]["distill_epochs"] == 0.5 and done["learn"]["settings"]["dreams"] == 2
    assert done["learn"]["tiers"] == 2 and "accuracy" in done
    assert refused["error"].startswith("sleep failed") and "accuracy" not in refused
    assert res["summary"]["sleep_2tier"]["failed"] == 1 and "failed: sleep failed" in table(res)

"""Figure builders and view shaping on hand-made data: traces, axes, values."""
from dataclasses import dataclass, field

import plotly.graph_objects as go
import pytest

from app import plots, views


@dataclass
class Trace:   # the shape of sleep_engine.memory.RoutingTrace
    layers: list
    expert_ids: list
    steps: list = field(default_factory=list)

    def matrix(self):
        return [[step.get(layer) or [0.0] * len(self.expert_ids) for layer in self.layers] for step in self.steps]


def ev(kind, **data):
    return {"kind": kind, "sleep": 1, "data": data}


TRACE = Trace(layers=[0, 3], expert_ids=["e0", "e1"],
              steps=[{0: [0.9, 0.1], 3: [0.2, 0.3]}, {0: [0.1, 0.4], 3: [0.2, 0.8]}, {0: [0.5, 0.5], 3: [0.6, 0.1]}])
TOKENS = ["Hel", "lo", "!"]
EVENTS = [ev("phase", name="consolidation"), ev("expert", expert_id="e1", tier=2, layers=[0, 3], params=100, born=1),
          ev("loss", phase="consolidation", step=1, total=3, divergence=0.5, reward=None),
          ev("loss", phase="consolidation", step=2, total=3, divergence=0.3, reward=None),
          ev("sample", step=3, prefix="The tower", teacher=" is copper", student=" is tin", semantic=0.6, r_sem=0.0,
             r_abs=0.4, reward=0.2),
          ev("loss", phase="consolidation", step=3, total=3, divergence=0.2, reward=0.25),
          ev("dream", round=1, index=0, text="a dream <b>", prompt="p", grad_score=2.0, kept=True, reward=1,
             metric_before=-3.0, metric_after=-2.5),
          ev("dream", round=1, index=1, text="other", prompt="p", grad_score=0.5, kept=False, reward=None,
             metric_before=-3.0, metric_after=None),
          ev("dream", round=1, index=2, text="third", prompt="p", grad_score=1.0, kept=True, reward=0,
             metric_before=-3.0, metric_after=-3.1)]


def manifest(n, experts, **kw):
    return {"sleep": n, "memory": {"experts": experts}, "episode_ids": [n], **kw}


E0 = {"expert_id": "e0", "tier": 2, "born": 1, "rank": 4, "layers": [0, 3], "params": 100}
E1 = {"expert_id": "e1", "tier": 2, "born": 2, "rank": 4, "layers": [0, 3], "params": 100}
E2 = {"expert_id": "e2", "tier": 3, "born": 3, "rank": 4, "layers": [0, 3], "params": 100}


def test_routing_view_finds_the_dominant_expert_per_cell_and_token():
    v = views.routing_view(TRACE, TOKENS)
    assert v["cell_expert"] == [["e0", "e1"], ["e1", "e1"], ["e0", "e0"]]
    assert v["cell_gate"] == [[0.9, 0.3], [0.4, 0.8], [0.5, 0.6]]
    assert v["dominant"] == ["e0", "e1", "e0"] and v["top_gate"] == [0.9, 0.8, 0.6]
    assert views.token_strip(v) == [("Hel", "e0"), ("lo", "e1"), ("!", "e0")]
    load = views.expert_load(v)
    assert load["mean_gate"] == pytest.approx([(0.9 + 0.2 + 0.1 + 0.2 + 0.5 + 0.6) / 6, (0.1 + 0.3 + 0.4 + 0.8 + 0.5 + 0.1) / 6])
    assert load["dominant_share"] == pytest.approx([2 / 3, 1 / 3])


def test_routing_heatmap_is_tokens_by_layers_with_hover_details():
    fig = plots.routing_heatmap(views.routing_view(TRACE, TOKENS))
    (hm,) = fig.data
    assert isinstance(hm, go.Heatmap)
    assert list(hm.x) == [0, 1, 2] and list(hm.y) == [0, 3]
    assert [list(r) for r in hm.z] == [[0.9, 0.4, 0.5], [0.3, 0.8, 0.6]]     # rows = layers
    assert list(hm.customdata[1][1]) == ["lo", "e1"]
    for word in ("token", "layer", "expert", "gate"):
        assert word in hm.hovertemplate
    assert list(fig.layout.xaxis.ticktext) == ["Hel", "lo", "!"]
    assert fig.layout.uirevision == "routing"


def test_routing_without_experts_or_reply_says_so():
    empty = plots.routing_heatmap(views.routing_view(None, []))
    assert not empty.data and "No reply" in empty.layout.annotations[0].text
    no_experts = plots.routing_heatmap(views.routing_view(Trace([0], [], [{0: []}]), ["a"]))
    assert not no_experts.data and "No routed experts" in no_experts.layout.annotations[0].text
    lines = no_experts.layout.annotations[0].text.split("<br>")
    assert len(lines) > 1 and max(map(len, lines)) <= 50   # a half-width panel shows it whole
    assert " ".join(lines).endswith("Sleep adds the first expert.")


def test_expert_load_bar():
    fig = plots.expert_load_bar(views.expert_load(views.routing_view(TRACE, TOKENS)))
    bar, share = fig.data
    assert list(bar.x) == ["e0", "e1"] and bar.y[0] == pytest.approx(0.4167, abs=1e-3)
    assert list(share.y) == pytest.approx([2 / 3, 1 / 3])


def test_consolidation_figure_has_divergence_and_reward_on_two_axes():
    s = views.loss_series(EVENTS)
    assert s["step"] == [1, 2, 3] and s["divergence"] == [0.5, 0.3, 0.2]
    assert s["reward_step"] == [3] and s["reward"] == [0.25]
    fig = plots.consolidation_fig(s)
    div, rew = fig.data
    assert list(div.y) == [0.5, 0.3, 0.2] and div.yaxis == "y"
    assert list(rew.x) == [3] and rew.yaxis == "y2"
    assert fig.layout.uirevision == "consolidation"
    assert not plots.consolidation_fig(views.loss_series([])).data


def test_a_sleeps_notices_are_read_from_its_events_in_order():
    events = EVENTS + [ev("notice", message="the 180 s budget fit 1 of 18 consolidation steps"),
                       ev("notice", message="no dreaming this time")]
    assert views.sleep_notices(events) == ["the 180 s budget fit 1 of 18 consolidation steps", "no dreaming this time"]
    assert views.sleep_notices(EVENTS) == []


def test_samples_and_dream_tables():
    assert views.sample_rows(EVENTS) == [[3, "The tower", " is copper", " is tin", 0.6, 0.4, 0.2]]
    rows = views.dream_table(views.dream_rows(EVENTS))
    assert [r[3] for r in rows] == ["kept", "rejected", "kept"] and rows[0][-1] == "a dream <b>"
    assert len(rows[0]) == len(views.DREAM_COLUMNS)
    assert len(views.sample_rows(EVENTS)[0]) == len(views.SAMPLE_COLUMNS)


def test_dream_scatter_separates_kept_and_rejected_with_text_on_hover():
    fig = plots.dreams_scatter(views.dream_rows(EVENTS))
    kept, rejected = fig.data
    assert kept.name.startswith("kept") and list(kept.x) == [2.0, 1.0] and list(kept.y) == [1, 0]
    assert list(rejected.x) == [0.5] and list(rejected.y) == [-0.5]
    assert kept.customdata[0][2] == "a dream &lt;b&gt;"      # escaped for the hover label
    assert "customdata[2]" in kept.hovertemplate


def test_forgetting_figure_curves_matrix_and_metrics():
    matrix = {"episodes": [1, 2], "R": [[1.0], [0.5, 0.75]], "average_accuracy": 0.625, "forgetting": 0.5,
              "bwt": -0.5}
    mans = [manifest(1, [E0], general_ppl_before=10.0, general_ppl_after=11.0),
            manifest(2, [E0, E1], general_ppl_before=11.0, general_ppl_after=11.5)]
    v = views.forgetting_view(matrix, mans)
    assert v["R"] == [[1.0, None], [0.5, 0.75]] and v["sleeps"] == [1, 2]
    fig = plots.forgetting_fig(v)
    ep1, ep2, heat, ppl_after, ppl_before = fig.data
    assert list(ep1.x) == [1, 2] and list(ep1.y) == [1.0, 0.5]
    assert list(ep2.y) == [None, 0.75]
    assert [list(r) for r in heat.z] == [[1.0, None], [0.5, 0.75]] and heat.text[1][1] == "0.75"
    assert list(ppl_after.y) == [11.0, 11.5] and list(ppl_before.y) == [10.0, 11.0]
    title = fig.layout.title.text
    assert "avg acc 0.625" in title and "forgetting 0.500" in title and "BWT -0.500" in title
    assert not plots.forgetting_fig(views.forgetting_view({"episodes": [], "R": []}, [])).data


def test_growth_counts_experts_per_tier_and_layer_and_parameters_added():
    mans = [manifest(1, [E0]), manifest(2, [E0, E1]), manifest(3, [E2])]   # sleep 3 consolidated into tier 3
    g = views.growth(mans, running={"sleep": 4, "experts": [{"expert_id": "e3", "tier": 2, "layers": [0],
                                                                   "params": 50}]})
    assert g["sleeps"] == [1, 2, 3, 4] and g["tiers"] == [2, 3]
    assert g["experts_per_tier"] == {2: [1, 2, 0, 1], 3: [0, 0, 1, 1]}
    assert g["experts_per_layer"] == [[1, 2, 1, 2], [1, 2, 1, 1]]
    assert g["params_added"] == [100, 100, -100, 50]
    fig = plots.growth_fig(g)
    t2, t3, added, heat = fig.data
    assert list(t2.y) == [1, 2, 0, 1] and list(t3.y) == [0, 0, 1, 1] and fig.layout.barmode == "stack"
    assert list(t2.x)[-1] == "sleep 4 (running)"
    assert list(added.y) == [100, 100, -100, 50] and added.yaxis == "y2"
    assert [list(r) for r in heat.z] == [[1, 2, 1, 2], [1, 2, 1, 1]]   # manifests without norms: counts
    assert not plots.growth_fig(views.growth([])).data
    # with norms recorded: the last sleep's ‖BA‖ per layer (rows) and expert (columns)
    normed = [manifest(1, [dict(E0, layer_norms=[0.5, 0.25]), dict(E1, layer_norms=[0.0, 2.0])])]
    g = views.growth(normed)
    assert g["norms"] == {"experts": ["e0", "e1"], "layers": [0, 3], "z": [[0.5, 0.0], [0.25, 2.0]]}
    heat = plots.growth_fig(g).data[-1]
    assert list(heat.x) == ["e0", "e1"] and [list(r) for r in heat.z] == [[0.5, 0.0], [0.25, 2.0]]


def test_expert_info_records_the_update_size_per_layer():
    import torch

    from conftest import tiny_llama
    from sleep_engine.config import MemoryConfig
    from sleep_engine.memory import MemoryModel
    memory = MemoryModel(tiny_llama(), MemoryConfig())
    eid = memory.add_expert(tier=2, born=1)
    assert memory.experts()[0].layer_norms == [0.0, 0.0]          # B = 0 at birth: no update yet
    e = memory.expert_modules(eid)[1]
    with torch.no_grad():
        e.B.normal_()
    assert memory.experts()[0].layer_norms[0] == 0.0
    assert abs(memory.experts()[0].layer_norms[1] - float((e.B @ e.A).norm())) < 1e-3


def test_every_figure_keeps_zoom_across_redraws():
    v = views.routing_view(TRACE, TOKENS)
    figs = [plots.routing_heatmap(v), plots.expert_load_bar(views.expert_load(v)),
            plots.consolidation_fig(views.loss_series(EVENTS)), plots.dreams_scatter(views.dream_rows(EVENTS)),
            plots.forgetting_fig(views.forgetting_view({"episodes": [1], "R": [[1.0]]}, [manifest(1, [E0])])),
            plots.growth_fig(views.growth([manifest(1, [E0])]))]
    revisions = [f.layout.uirevision for f in figs]
    assert all(revisions) and len(set(revisions)) == len(revisions)
    # the same data twice gives the same figure: a redraw changes nothing the user set
    assert plots.dreams_scatter(views.dream_rows(EVENTS)).to_json() == figs[3].to_json()


def test_header_tiers_progress_and_inspect_views():
    fields = dict(views.header_fields({"model": "m", "device": "cpu", "quantize": "int4", "episodes": 3,
                                       "params": {"base": 134_500_000, "experts": 12_000, "fast_weights": 0}},
                                      {"state": "sleeping", "sleep": 2, "phase": "dreaming", "progress": 0.5,
                                       "sleeps": 1}))
    assert fields["parameters"] == "base 134.5M · experts 12.0k · fast weights 0"
    assert fields["state"] == "Sleeping · sleep 2 · dreaming 50%" and fields["sleeps"] == "1"
    rows = views.tier_rows([{"tier": 0, "name": "context", "tokens": 40, "limit": 2048},
                            {"tier": 1, "name": "fast weights", "norm": 0.5, "steps": 4, "age_s": 12.0,
                             "params": 4096, "drift": 0.004, "learning": "every 2 turns"},
                            {"tier": 2, "name": "experts (tier 2)", "experts": 1, "params": 100, "ids": ["e0"]}])
    assert rows[0][2] == "40 / 2048 tokens" and rows[1][4] == "updated 12s ago" and rows[2][4] == "e0"
    assert rows[2][2] == "1 expert" and views.count(0, "expert") == "0 experts"
    assert "drift +0.4%" in rows[1][2] and "every 2 turns" in rows[1][2]
    assert views.tier_rows([{"tier": 1, "name": "fast weights", "norm": 0.0, "steps": 0, "age_s": None,
                             "params": 4096}])[0][4].startswith("empty")
    text = views.progress_text({"state": "sleeping", "sleep": 2, "phase": "consolidation", "step": "3/14",
                                "progress": 0.25, "eta_s": 30.0})
    assert text == "Sleep 2 · consolidating into a new expert · step 3/14 · 25% · about 30s left"
    assert "rolled back" in views.progress_text({"state": "awake", "cancelled": 2})

    m = manifest(2, [E0, E1], experts_added=["e1"], probe_accuracy_before={"1": 1.0, "2": 0.0},
                 probe_after={"1": 0.5, "2": 0.75}, episode_ids=[2])
    assert views.probe_rows(m) == [[1, "older", "100%", "50%"], [2, "this sleep's", "0%", "75%"]]
    usage = views.UsageMeter()
    usage.add(views.routing_view(Trace([0, 3], ["e0", "e1"], TRACE.steps), TOKENS))
    (row,) = views.expert_rows(m, usage)
    assert row[0] == "e1" and row[2] == "2" and row[6] == 3 and row[8] == "1 of 3"   # its episodes: the sleep's
    assert views.expert_rows({**m, "expert_episodes": {"e1": [2, 5]}}, usage)[0][2] == "2, 5"
    assert float(row[7]) == pytest.approx(((0.1 + 0.3) / 2 + (0.4 + 0.8) / 2 + (0.5 + 0.1) / 2) / 3, abs=1e-4)
    assert views.matrix_csv({"episodes": [1, 2], "R": [[1.0], [0.5, 0.75]]}).splitlines() == [
        "sleep,episode_1,episode_2", "1,1.0000,", "2,0.5000,0.7500"]


def test_event_log_on_disk_feeds_the_same_views(tmp_path):
    import json
    log = tmp_path / "events.jsonl"
    log.write_text("".join(json.dumps({**e, "seq": i, "t": 0.0}) + "\n" for i, e in enumerate(EVENTS)) + '{"kind": "lo')
    events = views.read_events(log)                      # the torn last line is skipped
    assert len(events) == len(EVENTS)
    assert views.loss_series(events)["divergence"] == [0.5, 0.3, 0.2]
    assert views.read_events(tmp_path / "missing.jsonl") == []


def test_locality_table_shows_each_experts_gates_and_the_target():
    m = {"gate_selectivity": {"e0": {"episodes": [1, 2], "own": 0.4, "everyday": 0.02, "other": 0.1,
                                     "everyday_over_own": 0.05, "meets_target": True},
                              "e1": {"episodes": [3], "own": 0.2, "everyday": 0.05, "other": None,
                                     "everyday_over_own": 0.25, "meets_target": False}}}
    assert views.locality_table(m) == [["e0", "1, 2", "0.400", "0.020", "0.05× ✓", "0.100"],
                                       ["e1", "3", "0.200", "0.050", "0.25× ✗", "–"]]
    assert views.locality_table(None) == [] and views.locality_table({}) == []
    assert len(views.LOCALITY_COLUMNS) == len(views.locality_table(m)[0])

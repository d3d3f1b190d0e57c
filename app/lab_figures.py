"""Figure builders for the lab report: pure functions from result data to a Plotly figure."""
from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from sleep_engine.lab.report import label

from .plots import PALETTE


def accuracy_bars(rows: dict[str, dict], title: str) -> go.Figure:
    """rows: method → {"accuracy", "semantic"?, "seconds"?}; bars of accuracy, hover shows time."""
    names = list(rows)
    fig = go.Figure()
    fig.add_bar(name="exact (gold in reply)", x=[label(n) for n in names], y=[rows[n]["accuracy"] for n in names],
                customdata=[rows[n].get("seconds") for n in names],
                hovertemplate="%{x}<br>accuracy %{y:.3f}<br>wall %{customdata:.0f} s<extra></extra>")
    if all("semantic" in rows[n] for n in names):
        fig.add_bar(name="semantic (mean cosine)", x=[label(n) for n in names], y=[rows[n]["semantic"] for n in names])
    fig.update_layout(title=title, yaxis={"title": "closed-book accuracy", "range": [0, 1]}, barmode="group",
                      height=380, margin={"t": 50, "b": 100})
    return fig


def accuracy_vs_time(rows: dict[str, dict], title: str) -> go.Figure:
    fig = go.Figure()
    for n, r in rows.items():
        fig.add_scatter(x=[r.get("seconds") or 0.0], y=[r["accuracy"]], mode="markers+text", name=label(n),
                        text=[label(n)], textposition="top center", marker={"size": 11})
    fig.update_layout(title=title, xaxis={"title": "wall time to learn (s)", "type": "linear"},
                      yaxis={"title": "closed-book accuracy", "range": [0, 1.05]}, showlegend=False, height=380)
    return fig


def matrix_heatmap(R: list[list[float]], episodes: list[str], title: str) -> go.Figure:
    """R[i][j]: accuracy on episode j after learning episode i (future episodes included)."""
    fig = go.Figure(go.Heatmap(z=R, x=episodes, y=[f"after {e}" for e in episodes[:len(R)]], zmin=0, zmax=1,
                               colorscale="Viridis", text=[[f"{v:.2f}" for v in row] for row in R],
                               texttemplate="%{text}", hovertemplate="%{y}, %{x}: %{z:.2f}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="evaluated on episode", yaxis={"autorange": "reversed"},
                      height=330, margin={"t": 50})
    return fig


def forgetting_curves(methods: dict[str, dict], episodes: list[str]) -> go.Figure:
    """Accuracy on the first episode and mean accuracy on the episodes learned so far, per method."""
    fig = go.Figure()
    xs = list(range(1, len(episodes) + 1))
    for n, r in methods.items():
        R = r["R"]
        fig.add_scatter(x=xs, y=[row[0] for row in R], mode="lines+markers", name=f"{label(n)}: episode 1")
        fig.add_scatter(x=xs, y=[sum(row[:i + 1]) / (i + 1) for i, row in enumerate(R)], mode="lines+markers",
                        line={"dash": "dot"}, name=f"{label(n)}: mean so far")
    fig.update_layout(title="Forgetting: accuracy on episode 1 and on all episodes learned so far",
                      xaxis={"title": "episodes learned", "dtick": 1}, yaxis={"title": "accuracy", "range": [0, 1.05]},
                      height=400)
    return fig


def ppl_curves(methods: dict[str, dict]) -> go.Figure:
    fig = go.Figure()
    for n, r in methods.items():
        base = r["drift"]["ppl_before"]
        fig.add_scatter(x=list(range(len(r["ppl_curve"]) + 1)), y=[base] + r["ppl_curve"], mode="lines+markers",
                        name=label(n))
    fig.update_layout(title="General-text perplexity after each episode", xaxis={"title": "episodes learned", "dtick": 1},
                      yaxis_title="perplexity", height=360)
    return fig


def time_to_accuracy(points: list[dict], sleep_s: float, sleep_acc: float, sleep_label: str) -> go.Figure:
    fig = go.Figure()
    fig.add_scatter(x=[p["train_s"] for p in points], y=[p["accuracy"] for p in points], mode="lines+markers",
                    name="passage LoRA SFT", text=[f"epoch {p['epoch']}" for p in points],
                    hovertemplate="%{text}: %{x:.0f} s, accuracy %{y:.3f}<extra></extra>")
    fig.add_scatter(x=[sleep_s], y=[sleep_acc], mode="markers", marker={"size": 14, "symbol": "star"}, name=sleep_label)
    fig.add_hline(y=sleep_acc, line_dash="dot", annotation_text="Sleep's accuracy")
    fig.update_layout(title="Time to accuracy (closed-book)", xaxis_title="training wall time (s)",
                      yaxis={"title": "accuracy", "range": [0, 1.05]}, height=380)
    return fig


def phase_bars(phases: dict[str, float], title: str) -> go.Figure:
    fig = go.Figure(go.Bar(x=list(phases), y=list(phases.values())))
    fig.update_layout(title=title, yaxis_title="seconds", height=320)
    return fig


DRIFT_FLOOR = 0.1   # % of perplexity drift: below it (measurement noise) points are drawn at it, on a log axis


def frontier_figure(result: dict) -> go.Figure:
    """Accuracy (y) against damage (x): left, general perplexity drift (log axis: SFT's +200% and
    Sleep's +1% both stay readable; drifts under 0.1% are drawn at 0.1%, hover shows the value);
    right, the everyday questions lost. One line per method through its points sorted by damage,
    95% Wilson intervals as error bars, per panel the Pareto front of all points (open rings on a
    dotted staircase) and the damage budget of the summary numbers (dashed)."""
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.06,
                        subplot_titles=("damage = general perplexity drift", "damage = everyday questions lost"))
    budget = result.get("budget", {})
    limits = {"ppl_change": budget.get("max_drift"),
              "everyday_lost": None if budget.get("min_kept") is None else 1 - budget["min_kept"]}
    for col, damage in enumerate(("ppl_change", "everyday_lost"), 1):
        floor = DRIFT_FLOOR if damage == "ppl_change" else 0.0   # the everyday share lost is never below 0
        front = {tuple(m) for m in result.get("front", {}).get(damage, [])}
        on_front = []
        for k, (name, points) in enumerate(result["points"].items()):
            pts = sorted(((i, p) for i, p in enumerate(points) if "accuracy" in p and p.get(damage) is not None),
                         key=lambda ip: ip[1][damage])
            on_front += [p for i, p in pts if (name, i) in front]
            color = PALETTE[k % len(PALETTE)]
            fig.add_scatter(x=[max(100 * p[damage], floor) for _, p in pts], y=[p["accuracy"] for _, p in pts],
                            error_y={"type": "data", "symmetric": False,
                                     "array": [p["ci"][1] - p["accuracy"] for _, p in pts],
                                     "arrayminus": [p["accuracy"] - p["ci"][0] for _, p in pts]},
                            mode="lines+markers", name=label(name), legendgroup=name, showlegend=col == 1,
                            marker={"color": color, "size": 9}, line={"color": color},
                            text=[p["label"] for _, p in pts], customdata=[[100 * p[damage], p["seconds"]] for _, p in pts],
                            hovertemplate=f"{label(name)}, %{{text}}<br>accuracy %{{y:.3f}}<br>"
                                          "damage %{customdata[0]:+.1f}%<br>learning %{customdata[1]:.0f} s<extra></extra>",
                            row=1, col=col)
        on_front.sort(key=lambda p: p[damage])
        fig.add_scatter(x=[max(100 * p[damage], floor) for p in on_front], y=[p["accuracy"] for p in on_front],
                        mode="lines+markers", name="Pareto front", legendgroup="front", showlegend=col == 1,
                        line={"color": "#444", "dash": "dot", "shape": "hv"},
                        marker={"symbol": "circle-open", "size": 18, "color": "#444", "line": {"width": 2}},
                        hoverinfo="skip", row=1, col=col)
        if limits[damage] is not None:
            fig.add_scatter(x=[100 * limits[damage]] * 2, y=[0, 1.05], mode="lines", name="damage budget",
                            legendgroup="budget", showlegend=col == 1, line={"color": "#999", "dash": "dash"},
                            hoverinfo="skip", row=1, col=col)
    fig.update_xaxes(title_text=f"perplexity drift (%, log; ≤ {DRIFT_FLOOR:g}% drawn at {DRIFT_FLOOR:g}%)",
                     type="log", row=1, col=1)
    fig.update_xaxes(title_text="everyday questions lost (%)", row=1, col=2)
    fig.update_yaxes(title_text="closed-book accuracy", range=[0, 1.05], row=1, col=1)
    fig.update_layout(title="Accuracy against damage: every method swept (95% intervals)", height=480,
                      legend={"orientation": "h", "y": -0.22, "yanchor": "top"}, margin={"t": 80, "b": 120})
    return fig

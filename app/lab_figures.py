"""Figure builders for the lab report: pure functions from result data to a Plotly figure."""
from __future__ import annotations

import plotly.graph_objects as go

from sleep_engine.lab.report import label


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

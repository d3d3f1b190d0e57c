"""Plotly figure builders: pure functions from plain data (see views.py) to a Figure.

Every figure carries a constant `layout.uirevision`, so a live redraw (Plotly.react) keeps the
user's zoom and legend choices.
"""
from __future__ import annotations

import html
import textwrap

import plotly.graph_objects as go
from plotly.subplots import make_subplots

PALETTE = ["#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692", "#b6e880",
           "#ff97ff", "#fecb52"]
TIER_COLORS = {2: "#636efa", 3: "#00cc96", 4: "#ab63fa", 5: "#ffa15a", 6: "#19d3f3"}


def expert_color(expert_id: str, experts: list[str]) -> str:
    return PALETTE[experts.index(expert_id) % len(PALETTE)] if expert_id in experts else "#cccccc"


def _base(fig: go.Figure, title: str, revision: str, height: int = 320) -> go.Figure:
    fig.update_layout(title={"text": title, "font": {"size": 14}}, uirevision=revision, height=height,
                      margin={"l": 50, "r": 20, "t": 45, "b": 40}, template="plotly_white",
                      legend={"orientation": "h", "y": -0.3, "yanchor": "top"})
    return fig


def _empty(fig: go.Figure, message: str, width: int = 50) -> go.Figure:
    """The empty state: what will appear and how, in lines a half-width panel shows whole (Plotly
    does not wrap an annotation; one line of 110 characters was cut off at both ends)."""
    fig.add_annotation(text="<br>".join(textwrap.wrap(message, width)), showarrow=False, xref="paper",
                       yref="paper", x=0.5, y=0.5,
                       font={"size": 13, "color": "#888"})
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


def _hover_text(text: str, width: int = 60, limit: int = 400) -> str:
    text = text if len(text) <= limit else text[:limit] + " …"
    return "<br>".join(textwrap.wrap(html.escape(text), width)) or "(empty)"


# -- Wake ---------------------------------------------------------------------------------------


def routing_heatmap(view: dict) -> go.Figure:
    """Tokens (x) × layers (y), colour = the largest gate in the cell; hover: token, layer,
    expert, gate."""
    fig = go.Figure()
    _base(fig, "Routing of the last reply: largest gate per token and layer", "routing", height=300)
    if not view["tokens"]:
        return _empty(fig, "No reply yet.")
    if not view["experts"]:
        return _empty(fig, "No routed experts yet: every token runs through the frozen base MLP "
                           "(and the fast weights). Sleep adds the first expert.")
    x = list(range(len(view["tokens"])))
    z = [[view["cell_gate"][t][li] for t in x] for li in range(len(view["layers"]))]
    custom = [[[repr(view["tokens"][t])[1:-1], view["cell_expert"][t][li] or "–"] for t in x]
              for li in range(len(view["layers"]))]
    fig.add_trace(go.Heatmap(
        x=x, y=view["layers"], z=z, customdata=custom, colorscale="Viridis", zmin=0, zmax=1,
        colorbar={"title": "gate", "thickness": 12},
        hovertemplate="token %{x}: '%{customdata[0]}'<br>layer %{y}<br>expert %{customdata[1]}"
                      "<br>gate %{z:.3f}<extra></extra>"))
    ticks = x if len(x) <= 40 else x[:: max(1, len(x) // 40)]
    fig.update_xaxes(title="generated token", tickvals=ticks,
                     ticktext=[repr(view["tokens"][t])[1:-1][:8] for t in ticks], tickangle=-60)
    fig.update_yaxes(title="layer", autorange="reversed")
    return fig


def expert_load_bar(load: dict) -> go.Figure:
    """Mean gate of each expert over the last reply, and the share of tokens it dominated."""
    fig = go.Figure()
    _base(fig, "Expert load (last reply)", "load", height=280)
    if not load["experts"]:
        return _empty(fig, "No routed experts yet.")
    fig.add_trace(go.Bar(x=load["experts"], y=load["mean_gate"], name="mean gate",
                         marker_color=[expert_color(e, load["experts"]) for e in load["experts"]],
                         hovertemplate="expert %{x}<br>mean gate %{y:.3f}<extra></extra>"))
    fig.add_trace(go.Scatter(x=load["experts"], y=load["dominant_share"], name="share of tokens dominated",
                             mode="markers", marker={"symbol": "diamond", "size": 10, "color": "#333"},
                             hovertemplate="expert %{x}<br>dominates %{y:.0%} of tokens<extra></extra>"))
    fig.update_yaxes(range=[0, 1.05], title="gate / share")
    return fig


# -- Sleep: live panels -------------------------------------------------------------------------


def consolidation_fig(series: dict) -> go.Figure:
    """Divergence (left axis) and LTI reward (right axis) per consolidation step."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    _base(fig, "Consolidation: divergence and LTI reward per step", "consolidation")
    if not series["step"]:
        return _empty(fig, "Waiting for the first consolidation step.")
    fig.add_trace(go.Scatter(x=series["step"], y=series["divergence"], mode="lines+markers", name="divergence",
                             customdata=series["phase"],
                             hovertemplate="step %{x} (%{customdata})<br>divergence %{y:.4f}<extra></extra>"),
                  secondary_y=False)
    fig.add_trace(go.Scatter(x=series["reward_step"], y=series["reward"], mode="markers", name="LTI reward",
                             marker={"size": 11, "symbol": "star", "color": "#ef553b"},
                             hovertemplate="step %{x}<br>mean reward %{y:.3f}<extra></extra>"), secondary_y=True)
    fig.update_xaxes(title="step")
    fig.update_yaxes(title_text="divergence", secondary_y=False)
    fig.update_yaxes(title_text="reward", range=[-0.05, 1.05], secondary_y=True)
    return fig


def dreams_scatter(dreams: list[dict]) -> go.Figure:
    """Gradient score (x) vs reward (y) of each dream; kept ones were tried, rejected ones not.
    Rejected dreams sit on a separate row below the 0/1 rewards."""
    fig = go.Figure()
    _base(fig, "Dreams: gradient score vs reward", "dreams")
    if not dreams:
        return _empty(fig, "No dreams yet (dreaming follows consolidation).")
    for label, pick, y_of, color, symbol in (
            ("kept (tried)", lambda d: d.get("kept"), lambda d: d.get("reward") or 0, "#00cc96", "circle"),
            ("rejected", lambda d: not d.get("kept"), lambda d: -0.5, "#bbbbbb", "x")):
        ds = [d for d in dreams if pick(d)]
        if not ds:
            continue
        fig.add_trace(go.Scatter(
            x=[d.get("grad_score") for d in ds], y=[y_of(d) for d in ds], mode="markers", name=label,
            marker={"size": 12, "color": color, "symbol": symbol, "line": {"width": 1, "color": "#333"}},
            customdata=[[d.get("round"), d.get("index"), _hover_text(d.get("text", ""))] for d in ds],
            hovertemplate="round %{customdata[0]}, dream %{customdata[1]}<br>grad score %{x:.4g}"
                          "<br>reward %{y}<br>%{customdata[2]}<extra></extra>"))
    fig.update_xaxes(title="gradient-norm score")
    fig.update_yaxes(title="reward", tickvals=[-0.5, 0, 1], ticktext=["rejected", "0", "1"], range=[-0.8, 1.3])
    return fig


def forgetting_fig(view: dict) -> go.Figure:
    """Probe accuracy per episode vs sleep number, the accuracy-matrix heatmap and general-ability
    perplexity; average accuracy, forgetting (Chaudhry: best earlier − final) and BWT in the title."""
    fig = make_subplots(rows=1, cols=3, column_widths=[0.4, 0.35, 0.25], horizontal_spacing=0.09,
                        subplot_titles=("probe accuracy per episode", "accuracy matrix R[sleep][episode]",
                                        "general perplexity"))
    metrics = " · ".join(f"{name} {view[key]:.3f}" for name, key in
                         (("avg acc", "average_accuracy"), ("forgetting", "forgetting"), ("BWT", "bwt"))
                         if view.get(key) is not None)
    _base(fig, "Forgetting curves" + (f" — {metrics}" if metrics else ""), "forgetting", height=340)
    if not view["R"]:
        return _empty(fig, "No completed sleep yet: curves start after the first sleep.")
    sleeps, eps, R = view["sleeps"], view["episodes"], view["R"]
    for j, ep in enumerate(eps):
        fig.add_trace(go.Scatter(x=sleeps, y=[row[j] for row in R], mode="lines+markers", name=f"episode {ep}",
                                 line={"color": PALETTE[j % len(PALETTE)]}, legendgroup="ep",
                                 hovertemplate=f"episode {ep}<br>after sleep %{{x}}: %{{y:.2f}}<extra></extra>"),
                      row=1, col=1)
    fig.add_trace(go.Heatmap(z=R, x=[str(e) for e in eps], y=[str(s) for s in sleeps], zmin=0, zmax=1,
                             colorscale="Blues", showscale=False, text=[["" if v is None else f"{v:.2f}" for v in row]
                                                                      for row in R],
                             texttemplate="%{text}",
                             hovertemplate="after sleep %{y}, episode %{x}: %{z:.2f}<extra></extra>"), row=1, col=2)
    fig.add_trace(go.Scatter(x=sleeps, y=view["ppl_after"][:len(sleeps)], mode="lines+markers", name="ppl after",
                             line={"color": "#333"}), row=1, col=3)
    fig.add_trace(go.Scatter(x=sleeps, y=view["ppl_before"][:len(sleeps)], mode="markers", name="ppl before",
                             marker={"color": "#aaa", "symbol": "circle-open", "size": 9}), row=1, col=3)
    fig.update_yaxes(range=[-0.05, 1.05], title_text="accuracy", row=1, col=1)
    fig.update_xaxes(title_text="sleep", dtick=1, row=1, col=1)
    fig.update_xaxes(title_text="episode", type="category", row=1, col=2)
    fig.update_yaxes(title_text="sleep", type="category", autorange="reversed", row=1, col=2)
    fig.update_xaxes(title_text="sleep", dtick=1, row=1, col=3)
    return fig


def growth_fig(data: dict) -> go.Figure:
    """Experts per tier after each sleep (stacked bars), parameters added; per layer and expert the
    update size ‖BA‖ (every layer gets one expert per sleep, so a count per layer is one flat block;
    older state dirs without norms show that count)."""
    norms = data.get("norms") or {}
    by_norm = bool(norms.get("experts"))
    fig = make_subplots(rows=1, cols=2, column_widths=[0.55, 0.45], specs=[[{"secondary_y": True}, {}]],
                        subplot_titles=("experts per tier · parameters added",
                                        "update size ‖BA‖ per layer and expert" if by_norm else "experts per layer"))
    _base(fig, "Expert growth over sleeps", "growth", height=320)
    if not data["sleeps"]:
        return _empty(fig, "No experts yet: each sleep adds one low-rank expert per layer.")
    x = [f"sleep {s}" + (" (running)" if data["running"] and i == len(data["sleeps"]) - 1 else "")
         for i, s in enumerate(data["sleeps"])]
    for t in data["tiers"]:
        fig.add_trace(go.Bar(x=x, y=data["experts_per_tier"][t], name=f"tier {t}",
                             marker_color=TIER_COLORS.get(t, "#999")), row=1, col=1, secondary_y=False)
    fig.add_trace(go.Scatter(x=x, y=data["params_added"], name="parameters added", mode="lines+markers",
                             line={"color": "#ef553b"}), row=1, col=1, secondary_y=True)
    if by_norm:
        fig.add_trace(go.Heatmap(z=norms["z"], x=norms["experts"], y=[str(layer) for layer in norms["layers"]],
                                 colorscale="Greens", showscale=False,
                                 hovertemplate="expert %{x}, layer %{y}: ‖BA‖ = %{z:.3g}<extra></extra>"), row=1, col=2)
        fig.update_xaxes(title_text="expert", type="category", row=1, col=2)
    else:
        fig.add_trace(go.Heatmap(z=data["experts_per_layer"], x=x, y=[str(layer) for layer in data["layers"]],
                                 colorscale="Greens", showscale=False,
                                 hovertemplate="%{x}<br>layer %{y}: %{z} experts<extra></extra>"), row=1, col=2)
    fig.update_layout(barmode="stack")
    fig.update_yaxes(title_text="experts", row=1, col=1, secondary_y=False)
    fig.update_yaxes(title_text="parameters", row=1, col=1, secondary_y=True, showgrid=False, rangemode="tozero")
    fig.update_yaxes(title_text="layer", type="category", row=1, col=2)
    return fig

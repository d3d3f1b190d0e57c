"""One self-contained HTML report per lab experiment (plotly.js inlined: opens offline): the
Markdown table of `sleep_engine.lab.report` plus the figures of `app.lab_figures`."""
from __future__ import annotations

import html
import json
from pathlib import Path

from sleep_engine.lab.report import EXPERIMENTS, label, table

from . import lab_figures as F


def figures(result: dict) -> list:
    kind = result["experiment"]
    if kind == "frontier":
        return [F.frontier_figure(result)]
    if kind == "knowledge":
        out = []
        for key, title in (("n1", "n=1: one passage at a time, fresh state"), ("many", "n=many: all passages together")):
            rows = {n: {**r, "seconds": r.get("seconds", r.get("seconds_mean"))} for n, r in result.get(key, {}).items()}
            if rows:
                out += [F.accuracy_bars(rows, f"Closed-book accuracy, {title}"),
                        F.accuracy_vs_time(rows, f"Accuracy vs wall time, {title}")]
        return out
    if kind == "continual":
        eps = ["+".join(e) for e in result["episodes"]]
        ms = result.get("methods", {})
        out = [F.matrix_heatmap(r["R"], eps, f"R[i][j], {label(n)}") for n, r in ms.items()]
        return ([F.forgetting_curves(ms, eps), F.ppl_curves(ms)] + out) if ms else []
    s, _t = result["sleep"], result["time_to_accuracy"]
    out = [F.time_to_accuracy(result["sft_curve"]["points"], s["seconds"], s["accuracy"], label(s["method"]))]
    if s.get("phases"):
        out.append(F.phase_bars(s["phases"], "Sleep seconds per phase"))
    return out


def _md_to_html(md: str) -> str:
    """The tables (and lines of text between them) of `sleep_engine.lab.report`, blocks split by a
    blank line."""
    return "\n".join(_table_html(b) if b.startswith("|") else f"<p>{html.escape(b)}</p>"
                     for b in (block.strip() for block in md.split("\n\n")) if b)


def _table_html(md: str) -> str:
    rows = [r for r in md.splitlines() if r.startswith("|") and not set(r) <= set("|-")]
    cells = [[html.escape(c.strip()) for c in r.strip("|").split("|")] for r in rows]
    head = "".join(f"<th>{c}</th>" for c in cells[0])
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in cells[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(result: dict) -> str:
    figs = figures(result)
    parts = [f.to_html(full_html=False, include_plotlyjs=(i == 0), default_width="100%") for i, f in enumerate(figs)]
    m = result.get("machine", {})
    settings = html.escape(json.dumps(result.get("settings", {}), indent=1))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Sleep Lab — {result['experiment']}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}pre{{background:#f6f6f6;padding:1em;overflow:auto;max-height:20em}}</style>
</head><body><h1>Sleep Lab — {html.escape(result['experiment'])} experiment</h1>
<p>{html.escape(result.get('date', ''))} · {html.escape(str(m.get('cpu', '')))} · {m.get('cores', '?')} cores ·
torch {html.escape(str(m.get('torch', '')))} · preset <b>{html.escape(str(result.get('settings', {}).get('preset', '')))}</b></p>
{_md_to_html(table(result))}
{''.join(parts)}
<h2>Settings</h2><pre>{settings}</pre></body></html>"""


def load_report(path) -> dict:
    """A lab result JSON (as `launch.py lab` writes it) read for viewing: {"result", "table",
    "figures", "html"}. Raises ValueError with a readable message for anything else."""
    path = Path(path)
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(result, dict) or result.get("experiment") not in EXPERIMENTS:
            raise ValueError(f"not a lab result (no {'/'.join(EXPERIMENTS)} experiment in it)")
        view = {"result": result, "table": table(result), "figures": figures(result)}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"cannot open lab report {path.name}: {e}") from None
    html_path = path.with_suffix(".html")
    view["html"] = str(html_path) if html_path.is_file() else None
    return view


def write_report(result: dict, path: Path) -> Path:
    path = Path(path)
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(render_html(result), encoding="utf-8")
    tmp.replace(path)
    return path

"""One self-contained HTML report per experiment (plotly.js inlined: opens offline), plus the
Markdown tables the CLI prints and the README shows. `list_reports(dir)` is what the app's
Inspect tab uses to find reports."""
from __future__ import annotations

import html
import json
from pathlib import Path

from . import figures as F


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _s(x) -> str:
    return "–" if x is None else f"{x:.0f}"


def knowledge_table(result: dict) -> str:
    lines = ["| method | n=1 acc | n=1 s/passage | n=many acc | semantic | n=many s | ppl drift | general Q |",
             "|---|---|---|---|---|---|---|---|"]
    names = list(dict.fromkeys(list(result.get("n1", {})) + list(result.get("many", {}))))
    for n in names:
        a, b = result.get("n1", {}).get(n, {}), result.get("many", {}).get(n, {})
        d = b.get("drift", {})
        drift_txt = f"{100 * d['ppl_change']:+.1f}%" if d else "–"
        gq = (f"{_pct(d.get('general_accuracy_before'))} → {_pct(d.get('general_accuracy_after'))}"
              if "general_accuracy_after" in d else "–")
        lines.append(f"| {F.label(n)} | {_pct(a.get('accuracy'))} ({a.get('correct', '–')}/{a.get('n', '–')}) | "
                     f"{_s(a.get('seconds_mean'))} | {_pct(b.get('accuracy'))} ({b.get('correct', '–')}/{b.get('n', '–')}) | "
                     f"{_pct(b.get('semantic_accuracy'))} | {_s(b.get('seconds'))} | "
                     f"{drift_txt} | {gq} |")
    return "\n".join(lines)


def continual_table(result: dict) -> str:
    lines = ["| method | avg acc | forgetting | BWT | FWT | ppl drift | general Q | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for n, r in result.get("methods", {}).items():
        d = r["drift"]
        gq = f"{_pct(d.get('general_accuracy_before'))} → {_pct(d.get('general_accuracy_after'))}"
        fwt = f"{100 * r['fwt']:+.1f} pts" if "fwt" in r else "–"
        lines.append(f"| {F.label(n)} | {_pct(r['average_accuracy'])} | {100 * r['forgetting']:.1f} pts | "
                     f"{100 * r['bwt']:+.1f} pts | {fwt} | "
                     f"{100 * d['ppl_change']:+.1f}% | {gq} | {_s(r['seconds'])} |")
    return "\n".join(lines)


def speed_table(result: dict) -> str:
    w, s, t = result["wake"], result["sleep"], result["time_to_accuracy"]
    rows = [("Wake tokens/s, lab (6 routed experts)", w.get("lab_tokens_per_s")),
            ("Wake tokens/s, dense transformers (same storage)", w.get("dense_tokens_per_s")),
            ("Wake tokens/s, dense transformers fp32", w.get("dense_fp32_tokens_per_s")),
            ("time to first token, lab (ms)", w.get("ttft_ms")),
            (f"Sleep wall s ({F.label(s['method'])}, {len(result['passages'])} passages)", s["seconds"]),
            *[(f"  phase {k} s", v) for k, v in (s.get("phases") or {}).items()],
            ("Sleep closed-book accuracy", _pct(s["accuracy"])),
            ("passage SFT training s to reach it", t["sft_s"] if t["sft_s"] is not None else "not reached"),
            ("SFT / Sleep wall-time ratio", t["ratio_sft_over_sleep"]),
            ("peak RSS of the run (MB)", result.get("peak_rss_mb"))]
    return "\n".join(["| measure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def table(result: dict) -> str:
    return {"knowledge": knowledge_table, "continual": continual_table, "speed": speed_table}[result["experiment"]](result)


def figures(result: dict) -> list:
    kind = result["experiment"]
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
        out = [F.matrix_heatmap(r["R"], eps, f"R[i][j], {F.label(n)}") for n, r in ms.items()]
        return ([F.forgetting_curves(ms, eps), F.ppl_curves(ms)] + out) if ms else []
    s, _t = result["sleep"], result["time_to_accuracy"]
    out = [F.time_to_accuracy(result["sft_curve"]["points"], s["seconds"], s["accuracy"], F.label(s["method"]))]
    if s.get("phases"):
        out.append(F.phase_bars(s["phases"], "Sleep seconds per phase"))
    return out


def _md_to_html(md: str) -> str:
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


def write_report(result: dict, path: Path) -> Path:
    path = Path(path)
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(render_html(result), encoding="utf-8")
    tmp.replace(path)
    return path


def list_reports(directory) -> list[dict]:
    """Reports under `directory` (newest first): {"html", "json", "experiment", "date", "preset"}."""
    out = []
    for j in Path(directory).expanduser().rglob("*.json"):
        h = j.with_suffix(".html")
        if not h.is_file():
            continue
        try:
            d = json.loads(j.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(d, dict) and d.get("experiment") in ("knowledge", "continual", "speed"):
            out.append({"html": str(h), "json": str(j), "experiment": d["experiment"], "date": d.get("date"),
                        "preset": d.get("settings", {}).get("preset"), "mtime": h.stat().st_mtime})
    return sorted(out, key=lambda r: -r["mtime"])

"""The Markdown tables the CLI prints and the README shows, and `list_reports(dir)`, which the
app's Inspect tab uses to find reports. The HTML report itself (Plotly) is drawn in
`app/lab_report.py`: the engine knows nothing of figures."""
from __future__ import annotations

import json
from pathlib import Path

LABELS = {"base": "base (closed-book)", "in_context": "in-context (ceiling)", "passage_sft": "passage LoRA SFT",
          "seal_sft": "SEAL-style SFT", "seq_sft": "sequential LoRA SFT", "ewc": "EWC (LoRA)",
          "sleep_nodream": "Sleep, no dreaming", "sleep_2tier": "Sleep, 2-tier", "sleep_3tier": "Sleep, 3-tier"}


EXPERIMENTS = ("knowledge", "continual", "speed", "frontier")   # the lab results a report is drawn for


def label(method: str) -> str:
    return LABELS.get(method, method)


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
        lines.append(f"| {label(n)} | {_pct(a.get('accuracy'))} ({a.get('correct', '–')}/{a.get('n', '–')}) | "
                     f"{_s(a.get('seconds_mean'))} | {_pct(b.get('accuracy'))} ({b.get('correct', '–')}/{b.get('n', '–')}) | "
                     f"{_pct(b.get('semantic_accuracy'))} | {_s(b.get('seconds'))} | "
                     f"{drift_txt} | {gq} |")
    return "\n".join(lines)


def continual_table(result: dict) -> str:
    lines = ["| method | acc before | avg acc | forgetting | BWT | FWT | ppl drift | general Q | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n, r in result.get("methods", {}).items():
        d = r["drift"]
        before = sum(r["initial"]) / len(r["initial"]) if r.get("initial") else None
        gq = f"{_pct(d.get('general_accuracy_before'))} → {_pct(d.get('general_accuracy_after'))}"
        fwt = f"{100 * r['fwt']:+.1f} pts" if "fwt" in r else "–"
        lines.append(f"| {label(n)} | {_pct(before)} | {_pct(r['average_accuracy'])} | {100 * r['forgetting']:.1f} pts | "
                     f"{100 * r['bwt']:+.1f} pts | {fwt} | "
                     f"{100 * d['ppl_change']:+.1f}% | {gq} | {_s(r['seconds'])} |")
    return "\n".join(lines)


def speed_table(result: dict) -> str:
    w, s, t = result["wake"], result["sleep"], result["time_to_accuracy"]
    rows = [("Wake tokens/s, lab (6 routed experts)", w.get("lab_tokens_per_s")),
            ("Wake tokens/s, dense transformers (same storage)", w.get("dense_tokens_per_s")),
            ("Wake tokens/s, dense transformers fp32", w.get("dense_fp32_tokens_per_s")),
            ("time to first token, lab (ms)", w.get("ttft_ms")),
            (f"Sleep wall s ({label(s['method'])}, {len(result['passages'])} passages)", s["seconds"]),
            *[(f"  phase {k} s", v) for k, v in (s.get("phases") or {}).items()],
            ("Sleep closed-book accuracy", _pct(s["accuracy"])),
            ("passage SFT training s to reach it", t["sft_s"] if t["sft_s"] is not None else "not reached"),
            ("SFT / Sleep wall-time ratio", t["ratio_sft_over_sleep"]),
            ("peak RSS of the run (MB)", result.get("peak_rss_mb"))]
    return "\n".join(["| measure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def _summary_cells(s: dict) -> list[str]:
    best, matched, anyhow = s["best_within_budget"], s["time_matched"], s["time_any"]
    return [f"{_pct(best['accuracy'])} ({best['correct']}/{best['n']})" if best else "none within budget",
            best["label"] if best else "–",
            f"{_s(matched['seconds'])} ({matched['label']})" if matched else "never",
            f"{_s(anyhow['seconds'])} ({anyhow['label']})" if anyhow else "never",
            f"{len(s['on_front']['ppl_change'])} / {len(s['on_front']['everyday_lost'])} of {s['points']}"]


def _point_cells(p: dict, front: set) -> list[str]:
    if "accuracy" not in p:
        return [p["label"], f"failed: {p.get('error', '?')}", "–", "–", "–", "–"]
    lo, hi = p["ci"]
    kept = (f"{_pct(p['everyday_kept'])} ({p['everyday_still_right']}/{p['everyday_right_before']})"
            if p.get("everyday_kept") is not None else "–")
    on = [axis for axis, damage in (("drift", "ppl_change"), ("everyday", "everyday_lost")) if damage in front]
    return [p["label"], f"{_pct(p['accuracy'])} ({p['correct']}/{p['n']}) [{100 * lo:.1f}–{100 * hi:.1f}]",
            f"{100 * p['ppl_change']:+.1f}%", kept, _s(p["seconds"]), ", ".join(on) or "–"]


def frontier_table(result: dict) -> str:
    """Two tables: per method the two summary numbers (best accuracy within the damage budget;
    learning seconds to the target accuracy within that budget, and at any damage), then a row
    per point; a line names the points reused from earlier runs."""
    b, t = result["budget"], result["target"]
    goal = _pct(t["accuracy"])
    lines = [f"Damage budget: perplexity drift ≤ {100 * b['max_drift']:+.1f}% and ≥ {_pct(b['min_kept'])} of the "
             f"everyday questions kept. Target accuracy {goal} ({t['from']}).", "",
             f"| method | best accuracy within budget | at | learn s to {goal} within budget | "
             f"learn s to {goal} at any damage | on the front (drift / everyday) |", "|---|---|---|---|---|---|"]
    lines += [f"| {label(n)} | " + " | ".join(_summary_cells(s)) + " |" for n, s in result["summary"].items()]
    lines += ["", "| method | setting | accuracy [95% CI] | ppl drift | everyday kept | learn s | on the front |",
              "|---|---|---|---|---|---|---|"]
    fronts = {(m, i): {d for d, members in result["front"].items() if [m, i] in members}
              for m, pts in result["points"].items() for i in range(len(pts))}
    for n, pts in result["points"].items():
        lines += [f"| {label(n)} | " + " | ".join(_point_cells(p, fronts[(n, i)])) + " |" for i, p in enumerate(pts)]
    if result.get("reused"):
        lines += ["", "Reused from earlier runs (same settings): " + "; ".join(result["reused"]) + "."]
    return "\n".join(lines)


def table(result: dict) -> str:
    return {"knowledge": knowledge_table, "continual": continual_table, "speed": speed_table,
            "frontier": frontier_table}[result["experiment"]](result)


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
        if isinstance(d, dict) and d.get("experiment") in EXPERIMENTS:
            out.append({"html": str(h), "json": str(j), "experiment": d["experiment"], "date": d.get("date"),
                        "preset": d.get("settings", {}).get("preset"), "mtime": h.stat().st_mtime})
    return sorted(out, key=lambda r: -r["mtime"])

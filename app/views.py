"""Pure data shaping for the lab page: engine events, traces and state in, plain dicts/lists out.

Nothing here touches gradio, plotly or the model; every function is testable on hand-made data.
"""
from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

# -- Wake: routing ----------------------------------------------------------------------------


def routing_view(trace, tokens: list[str]) -> dict:
    """Tokens × layers × experts gate values of one reply, with the dominant expert per cell and
    per token. `trace` is a RoutingTrace (or any object with layers, expert_ids, matrix())."""
    gates = trace.matrix() if trace is not None else []
    n = min(len(gates), len(tokens))
    gates, tokens = gates[:n], tokens[:n]
    experts = list(trace.expert_ids) if trace is not None else []
    layers = list(trace.layers) if trace is not None else []
    dominant, top = [], []          # per token: expert id with the largest gate (any layer), that gate
    cell_expert, cell_gate = [], []  # per token and layer
    for per_layer in gates:
        row_e, row_g = [], []
        best_e, best_g = None, 0.0
        for g in per_layer:
            if experts and g:
                k = max(range(len(g)), key=g.__getitem__)
                row_e.append(experts[k])
                row_g.append(float(g[k]))
                if g[k] > best_g:
                    best_e, best_g = experts[k], float(g[k])
            else:
                row_e.append(None)
                row_g.append(0.0)
        cell_expert.append(row_e)
        cell_gate.append(row_g)
        dominant.append(best_e)
        top.append(best_g)
    return {"tokens": tokens, "layers": layers, "experts": experts, "gates": gates,
            "cell_expert": cell_expert, "cell_gate": cell_gate, "dominant": dominant, "top_gate": top}


def expert_load(view: dict) -> dict:
    """Per expert: mean gate over every token × layer, and the share of tokens it dominates."""
    experts, gates = view["experts"], view["gates"]
    cells = [g for per_layer in gates for g in per_layer if g]
    mean = [sum(c[k] for c in cells) / len(cells) if cells else 0.0 for k in range(len(experts))]
    n = len(view["dominant"]) or 1
    share = [sum(1 for d in view["dominant"] if d == e) / n for e in experts]
    return {"experts": experts, "mean_gate": mean, "dominant_share": share}


def token_strip(view: dict) -> list[tuple[str, str | None]]:
    """(token, dominant expert) pairs for a per-token strip coloured by expert."""
    return [(t, d) for t, d in zip(view["tokens"], view["dominant"])]


class UsageMeter:
    """Running usage of each expert over the replies seen by this server (Inspect tab)."""

    def __init__(self):
        self.tokens: dict[str, int] = {}
        self.gate_sum: dict[str, float] = {}
        self.dominant: dict[str, int] = {}

    def add(self, view: dict) -> None:
        for k, e in enumerate(view["experts"]):
            for per_layer in view["gates"]:
                g = [x[k] for x in per_layer if x]
                if g:
                    self.tokens[e] = self.tokens.get(e, 0) + 1
                    self.gate_sum[e] = self.gate_sum.get(e, 0.0) + sum(g) / len(g)
        for d in view["dominant"]:
            if d is not None:
                self.dominant[d] = self.dominant.get(d, 0) + 1

    def stats(self, expert_id: str) -> dict:
        n = self.tokens.get(expert_id, 0)
        return {"tokens": n, "mean_gate": self.gate_sum.get(expert_id, 0.0) / n if n else None,
                "dominant_tokens": self.dominant.get(expert_id, 0)}


# -- header, tiers, status --------------------------------------------------------------------


def human(n: float | None) -> str:
    if n is None:
        return "–"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(int(n)) if float(n).is_integer() else f"{n:.3g}"


def state_badge(status: dict) -> str:
    if status.get("state") == "sleeping":
        return (f"Sleeping · sleep {status.get('sleep', '?')} · {status.get('phase', '')} "
                f"{100 * status.get('progress', 0.0):.0f}%")
    return "Awake"


def header_fields(info: dict, status: dict) -> list[tuple[str, str]]:
    p = info.get("params", {})
    return [("model", str(info.get("model"))), ("device", str(info.get("device"))),
            ("quantization", str(info.get("quantize"))),
            ("parameters", (f"base {human(p.get('base'))} · experts {human(p.get('experts'))} · "
                           f"fast weights {human(p.get('fast_weights'))}")),
            ("state", state_badge(status)), ("sleeps", str(status.get("sleeps", 0))),
            ("episodes", str(info.get("episodes", 0)))]


def tier_rows(tiers: list[dict]) -> list[list]:
    """memory_tiers() rows as a table: tier, what, size, parameters, age/detail."""
    rows = []
    for t in tiers:
        if t["tier"] == 0:
            rows.append([0, t["name"], f"{t['tokens']} / {t['limit']} tokens", "–", "this conversation"])
        elif t["tier"] == 1:
            if not t["steps"]:
                age = "empty (nothing learned since the last sleep)"
            else:
                age = "" if t.get("age_s") is None else f"updated {t['age_s']:.0f}s ago"
            drift = "" if t.get("drift") is None else f", generic-text drift {100 * t['drift']:+.1f}%"
            rows.append([1, t["name"], f"norm {t['norm']:.3g}, {t['steps']} steps{drift}; learning "
                         f"{t.get('learning', 'on')}", human(t["params"]), age])
        else:
            ids = ", ".join(t.get("ids", [])) or "none yet"
            rows.append([t["tier"], t["name"], count(t["experts"], "expert"), human(t["params"]), ids])
    return rows


def count(n: int, noun: str) -> str:
    """'1 expert', '2 experts', '0 experts'."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


# the engine's phase names, as a person reads them
PHASE_NAMES = {"starting": "starting", "probe_before": "testing what it knows (before)",
               "consolidation": "consolidating into a new expert", "dreaming": "dreaming",
               "reset": "clearing the fast weights", "probe_after": "testing what it knows (after)",
               "checkpoint": "saving"}


def progress_text(status: dict) -> str:
    if status.get("state") != "sleeping":
        if status.get("error"):
            return f"Awake. The last sleep failed and was rolled back: {status['error']}"
        if status.get("cancelled"):
            return f"Awake. Sleep {status['cancelled']} was stopped; the model was rolled back to its pre-sleep state."
        if status.get("last_sleep"):
            return f"Awake. Sleep {status['last_sleep']} finished."
        if status.get("sleeps"):
            return f"Awake. The panels show sleep {status['sleeps']}, the last completed one (from its log)."
        return "Awake. No sleep yet: teach or chat, then Sleep now."
    parts = [f"Sleep {status.get('sleep')}", PHASE_NAMES.get(status.get("phase"), str(status.get("phase")))]
    if status.get("step"):
        parts.append(f"step {status['step']}")
    parts.append(f"{100 * status.get('progress', 0.0):.0f}%")
    if status.get("eta_s") is not None:
        parts.append(f"about {status['eta_s']:.0f}s left")
    elif status.get("state") == "sleeping":
        parts.append("time left: after the first training step")
    return " · ".join(parts)


# -- Sleep: events → panel data ---------------------------------------------------------------


def _d(ev) -> tuple[str, dict]:
    """Events come as engine Event objects or as dicts read back from an events.jsonl file."""
    return (ev["kind"], ev["data"]) if isinstance(ev, dict) else (ev.kind, ev.data)


def sleep_notices(events) -> list[str]:
    """What a sleep told its user on the way (a budget that cut the steps or the dreams, a deferred
    tier step, the teacher without fast weights), in order."""
    return [d.get("message", "") for kind, d in map(_d, events) if kind == "notice"]


def loss_series(events) -> dict:
    """Consolidation steps: divergence per step and the LTI reward where a step had one."""
    out = {"step": [], "divergence": [], "reward_step": [], "reward": [], "phase": []}
    n = 0
    for ev in events:
        kind, d = _d(ev)
        if kind == "loss":
            n += 1
            out["step"].append(n)
            out["divergence"].append(d["divergence"])
            out["phase"].append(d.get("phase", ""))
            if d.get("reward") is not None:
                out["reward_step"].append(n)
                out["reward"].append(d["reward"])
    return out


SAMPLE_COLUMNS = ["step", "prefix", "teacher text", "student completion", "semantic", "edit score", "reward"]
DREAM_COLUMNS = ["round", "#", "grad score", "kept", "reward", "τ before", "τ after", "prompt", "dream"]


def sample_rows(events) -> list[list]:
    rows = []
    for ev in events:
        kind, d = _d(ev)
        if kind == "sample":
            rows.append([d.get("step"), d.get("prefix", ""), d.get("teacher", ""), d.get("student", ""),
                         d.get("semantic"), d.get("r_abs"), d.get("reward")])
    return rows


def dream_rows(events) -> list[dict]:
    return [dict(d) for kind, d in map(_d, events) if kind == "dream"]


def dream_table(dreams: list[dict]) -> list[list]:
    return [[d.get("round"), d.get("index"), d.get("grad_score"), "kept" if d.get("kept") else "rejected",
             d.get("reward"), d.get("metric_before"), d.get("metric_after"), d.get("prompt", ""), d.get("text", "")]
            for d in dreams]


EPISODE_COLUMNS = ["id", "kind", "source", "characters", "when", "status", "text"]


def episode_table(rows: list[dict]) -> list[list]:
    """engine.episode_rows() as table rows (newest first: what the next sleep takes is on top)."""
    return [[r["id"], r["kind"], r["source"], f"{r['chars']:,}", time.strftime("%Y-%m-%d %H:%M", time.localtime(r["time"])),
             r["status"], r["preview"]] for r in reversed(rows)]


def parse_ids(text: str | None) -> list[int]:
    """'3, 5-7' → [3, 5, 6, 7]; ValueError with the bad part named."""
    ids: set[int] = set()
    for part in (text or "").replace(" ", "").split(","):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        if not (lo.isdigit() and (not sep or hi.isdigit())):
            raise ValueError(f"episode ids are numbers or ranges like 5-7; {part!r} is neither")
        if sep and int(hi) - int(lo) > 100_000:
            raise ValueError(f"the range {part} is too long")
        ids.update(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    if not ids:
        raise ValueError("name the episodes by id, e.g. 3 or 5-7")
    return sorted(ids)


def live_experts(events) -> list[dict]:
    return [dict(d) for kind, d in map(_d, events) if kind == "expert"]


def growth(manifests: list[dict], running: dict | None = None) -> dict:
    """Experts per tier and per layer after each completed sleep, and parameters added by each;
    each expert's update size ‖BA‖ per layer after the last one (`norms`, where the manifests
    record it). `running` = {"sleep": n, "experts": [expert events]} adds the sleep in progress."""
    sleeps, per_tier, per_layer, added = [], [], [], []
    layers: set[int] = set()
    prev_params = 0
    for m in manifests:
        experts = m.get("memory", {}).get("experts", [])
        sleeps.append(m["sleep"])
        tiers: dict[int, int] = {}
        lay: dict[int, int] = {}
        for e in experts:
            tiers[e["tier"]] = tiers.get(e["tier"], 0) + 1
            for layer in e.get("layers", []):
                lay[layer] = lay.get(layer, 0) + 1
                layers.add(layer)
        total = sum(e.get("params", 0) for e in experts)
        per_tier.append(tiers)
        per_layer.append(lay)
        added.append(total - prev_params)
        prev_params = total
    if running and running.get("experts"):
        tiers = dict(per_tier[-1]) if per_tier else {}
        lay = dict(per_layer[-1]) if per_layer else {}
        params = 0
        for e in running["experts"]:
            tiers[e["tier"]] = tiers.get(e["tier"], 0) + 1
            for layer in e.get("layers", []):
                lay[layer] = lay.get(layer, 0) + 1
                layers.add(layer)
            params += e.get("params", 0) or 0
        sleeps.append(running["sleep"])
        per_tier.append(tiers)
        per_layer.append(lay)
        added.append(params)
    all_tiers = sorted({t for d in per_tier for t in d})
    last = [e for e in (manifests[-1].get("memory", {}).get("experts", []) if manifests else []) if e.get("layer_norms")]
    norm_layers = sorted({layer for e in last for layer in e["layers"]})
    norms = {"experts": [e["expert_id"] for e in last], "layers": norm_layers,   # after the last completed sleep
             "z": [[dict(zip(e["layers"], e["layer_norms"])).get(layer) for e in last] for layer in norm_layers]}
    return {"sleeps": sleeps, "tiers": all_tiers, "layers": sorted(layers), "norms": norms,
            "experts_per_tier": {t: [d.get(t, 0) for d in per_tier] for t in all_tiers},
            "experts_per_layer": [[d.get(layer, 0) for d in per_layer] for layer in sorted(layers)],
            "params_added": added, "running": bool(running and running.get("experts"))}


def forgetting_view(matrix: dict, manifests: list[dict]) -> dict:
    """Accuracy matrix R (rows = sleeps, columns = episodes; None where an episode was not yet
    learned), per-episode curves, summary metrics and general-ability perplexity per sleep."""
    eps = matrix.get("episodes", [])
    R = [list(r) + [None] * (len(eps) - len(r)) for r in matrix.get("R", [])]
    sleeps = [m["sleep"] for m in manifests][:len(R)]
    return {"episodes": eps, "sleeps": sleeps, "R": R,
            "average_accuracy": matrix.get("average_accuracy"), "forgetting": matrix.get("forgetting"),
            "bwt": matrix.get("bwt"),
            "ppl_before": [m.get("general_ppl_before") for m in manifests],
            "ppl_after": [m.get("general_ppl_after") for m in manifests]}


# -- Inspect: past sleeps on disk -------------------------------------------------------------


def read_events(path: Path) -> list[dict]:
    """An events.jsonl file; unreadable lines (a torn tail) are skipped."""
    out = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    except OSError:
        return []
    return out


def sleep_summary(manifest: dict) -> list[tuple[str, str]]:
    phases = manifest.get("phases", {})
    c = manifest.get("consolidation", {}) or {}
    d = manifest.get("dreams", {}) or {}
    acc_b, acc_a = manifest.get("probe_accuracy_before", {}), manifest.get("probe_accuracy_after", {})

    def mean(x):
        return f"{sum(x.values()) / len(x):.2f}" if x else "–"

    def num(x, fmt):
        return "–" if x is None else format(x, fmt)

    return [("episodes", ", ".join(map(str, manifest.get("episode_ids", [])))),
            ("preset", str((manifest.get("settings") or {}).get("preset", "–"))),
            ("wall time", f"{sum(phases.values()):.1f}s (" + ", ".join(f"{k} {v:.1f}s" for k, v in phases.items()) + ")"),
            ("experts added", ", ".join(manifest.get("experts_added", [])) or "none"),
            ("divergence", (f"{num(c.get('first_divergence'), '.4f')} → {num(c.get('final_divergence'), '.4f')} "
                           f"over {steps_text(c)}")),
            ("LTI mean reward", num(c.get("mean_reward"), ".3f")),
            ("dreams", f"{d.get('generated', 0)} generated, {d.get('kept', 0)} kept, {d.get('rewarded', 0)} rewarded"),
            ("probe accuracy (mean over episodes)", f"{mean(acc_b)} → {mean(acc_a)}" + probes_read_text(manifest)),
            ("general perplexity", (f"{num(manifest.get('general_ppl_before'), '.2f')} → "
                                   f"{num(manifest.get('general_ppl_after'), '.2f')}")),
            ("everyday answers changed", everyday_text(manifest))] + selectivity_rows(manifest)


def probes_read_text(manifest: dict) -> str:
    """" (every taught episode, 8 of 40 chat turns)" when a sleep sampled the chat turns it probed."""
    read = manifest.get("probes_read")
    return f" (every taught episode, {read['chat_turns']} of {read['of']} chat turns)" if read else ""


def steps_text(consolidation: dict) -> str:
    """"12 steps", or "3 of 18 planned steps" when the time budget cut them; ", layers 15 up" when
    the experts trained in the top layers only (`SleepConfig.trained_layers`)."""
    steps, planned = consolidation.get("steps", "–"), consolidation.get("planned_steps")
    text = f"{steps} of {planned} planned steps" if planned and steps != planned else f"{steps} steps"
    start = consolidation.get("trained_from_layer")
    return text + (f", layers {start} up" if start else "")


def everyday_text(manifest: dict) -> str:
    """How much a sleep changed everyday chat (the pre-sleep model's own answers, tier 1 off)."""
    changed, drift = manifest.get("everyday_changed"), manifest.get("everyday_drift")
    if changed is None:
        return "–"
    return f"{100 * changed:.1f}% of their greedy tokens; their perplexity {100 * drift:+.1f}%"


def selectivity_rows(manifest: dict) -> list[tuple[str, str]]:
    """One line per expert of the sleep's gate selectivity (issue 13): its mean gate on its own
    episodes' probe questions, on the fixed everyday questions and on other episodes' probes."""
    def num(x):
        return "–" if x is None else f"{x:.3f}"
    rows = []
    for eid, s in (manifest.get("gate_selectivity") or {}).items():
        ratio = s.get("everyday_over_own")
        verdict = "" if s.get("meets_target") is None else (" ✓ ≤ 0.1×" if s["meets_target"] else " ✗ > 0.1×")
        rows.append((f"gate of {eid} (episodes {', '.join(map(str, s.get('episodes', [])))})",
                     f"own {num(s.get('own'))}, everyday {num(s.get('everyday'))}"
                     + ("" if ratio is None else f" ({ratio:.2f}× own{verdict})")
                     + f", other episodes {num(s.get('other'))}"))
    return rows


LOCALITY_COLUMNS = ["expert", "its episodes", "gate on their questions", "on everyday questions",
                    "everyday ÷ own (target ≤ 0.1)", "on other episodes' questions"]


def locality_table(manifest: dict | None) -> list[list]:
    """Each expert's gate selectivity after the last completed sleep, as rows of LOCALITY_COLUMNS."""
    def num(x, fmt=".3f"):
        return "–" if x is None else format(x, fmt)
    rows = []
    for eid, s in ((manifest or {}).get("gate_selectivity") or {}).items():
        ratio = s.get("everyday_over_own")
        verdict = "" if s.get("meets_target") is None else (" ✓" if s["meets_target"] else " ✗")
        rows.append([eid, ", ".join(map(str, s.get("episodes", []))), num(s.get("own")), num(s.get("everyday")),
                     ("–" if ratio is None else f"{ratio:.2f}×{verdict}"), num(s.get("other"))])
    return rows


def probe_rows(manifest: dict) -> list[list]:
    before = {str(k): v for k, v in (manifest.get("probe_accuracy_before") or {}).items()}
    after = {str(k): v for k, v in (manifest.get("probe_after") or manifest.get("probe_accuracy_after") or {}).items()}
    new = {str(e) for e in manifest.get("episode_ids", [])}
    def pct(v):
        return "–" if v is None else f"{100 * v:.0f}%"
    return [[int(k), "this sleep's" if k in new else "older", pct(before.get(k)), pct(v)]
            for k, v in sorted(after.items(), key=lambda kv: int(kv[0]))]


def expert_rows(manifest: dict, usage: UsageMeter | None = None) -> list[list]:
    added = set(manifest.get("experts_added", []))
    held = manifest.get("expert_episodes") or {e: manifest.get("episode_ids", []) for e in added}
    rows = []
    for e in manifest.get("memory", {}).get("experts", []):
        if e["expert_id"] not in added and e.get("born") != manifest.get("sleep"):
            continue
        u = usage.stats(e["expert_id"]) if usage else {"tokens": 0, "mean_gate": None, "dominant_tokens": 0}
        episodes = ", ".join(str(i) for i in held.get(e["expert_id"], [])) or "–"
        rows.append([e["expert_id"], e["tier"], episodes, e.get("rank"), len(e.get("layers", [])), human(e.get("params")),
                     u["tokens"], "–" if u["mean_gate"] is None else f"{u['mean_gate']:.4f}",
                     f"{u['dominant_tokens']} of {u['tokens']}"])
    return rows


def matrix_csv(matrix: dict) -> str:
    """The accuracy matrix as CSV: one row per sleep, one column per episode (blank = not learned yet)."""
    eps = matrix.get("episodes", [])
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["sleep"] + [f"episode_{e}" for e in eps])
    for i, row in enumerate(matrix.get("R", []), 1):
        w.writerow([i] + [f"{v:.4f}" for v in row] + [""] * (len(eps) - len(row)))
    return buf.getvalue()

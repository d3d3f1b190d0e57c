"""Take the slept model out of the lab: an export folder in Hugging Face conventions (docs/export.md).

    DIR/config.json, tokenizer files, *.safetensors   the frozen base, loadable by transformers alone
    DIR/memory.safetensors                              every expert (A, B, gate, gate bias) and the fast weights
    DIR/sleep_lab.json                                  schema, memory layout, experts, sleeps, consolidated episodes
    DIR/README.md                                       a model card: what was consolidated, when, and how it measured

Three ways back in: `launch.py --model DIR` (the lab: its memory is loaded into a new state dir),
`load_pretrained(DIR)` (a transformers model whose `generate` gives the lab's tokens) and, for
the base alone, any transformers-compatible tool. Nothing on these paths unpickles or runs remote code.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import MemoryConfig

EXPORT_FILE = "sleep_lab.json"
MEMORY_FILE = "memory.safetensors"
EXPORT_SCHEMA = 1
# what of a base directory is copied: weights (safetensors only — never a pickle), config, tokenizer
BASE_FILES = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json")


class ExportError(RuntimeError):
    """The export could not be written or read; the message says why in one line."""


def read_export(path) -> dict | None:
    """The export manifest of a directory, or None when it is not a Sleep Lab export."""
    f = Path(path).expanduser() / EXPORT_FILE
    if not f.is_file():
        return None
    try:
        manifest = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"{f} is unreadable ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "sleep-lab-export":
        raise ExportError(f"{f} is not a Sleep Lab export manifest")
    if not isinstance(manifest.get("schema"), int) or manifest["schema"] > EXPORT_SCHEMA:
        raise ExportError(f"{f} has schema {manifest.get('schema')!r}; this Sleep Lab reads up to {EXPORT_SCHEMA}")
    return manifest


def export_memory_config(manifest: dict) -> MemoryConfig:
    known = {f.name for f in dataclasses.fields(MemoryConfig)}
    saved = {"gate_floor": 0.0, **manifest.get("memory_config", {})}   # exports before the floor ran without one
    cfg = MemoryConfig(**{k: v for k, v in saved.items() if k in known})
    cfg.validate()
    return cfg


def read_export_memory(path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, memory manifest) of an export, as `MemoryModel.load_memory_state` takes them."""
    path = Path(path).expanduser()
    manifest = read_export(path)
    if manifest is None:
        raise ExportError(f"{path} is not a Sleep Lab export (no {EXPORT_FILE})")
    try:
        tensors = load_file(str(path / MEMORY_FILE))
    except Exception as e:  # noqa: BLE001 — safetensors raises several kinds
        raise ExportError(f"{path / MEMORY_FILE} is unreadable ({str(e)[:200]})") from None
    return tensors, manifest["memory"]


# -- writing --------------------------------------------------------------------------------------
def _base_dir(source: str) -> Path | None:
    """The local directory holding the base's files: the source itself or its hub snapshot."""
    if not source:
        return None
    p = Path(source).expanduser()
    if p.is_dir():
        return p
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(source, local_files_only=True))   # never a download
    except Exception:  # noqa: BLE001 — not in the local hub cache
        return None


def _write_base(engine, out: Path) -> None:
    """The frozen base: its own files copied when they are safetensors; else saved from memory
    when its weights there are float (a quantized base in memory is not what the files hold)."""
    src = _base_dir(engine.backbone.source)
    weights = sorted(src.glob("*.safetensors")) if src else []
    if weights:
        for pattern in BASE_FILES:
            for f in src.glob(pattern):
                shutil.copy2(f, out / f.name)
    elif engine.backbone.quantize in ("none", "bf16"):
        with engine.memory.unwrapped() as lm:
            lm.save_pretrained(out, safe_serialization=True)
    else:
        raise ExportError(f"cannot export the base model: no safetensors weights in {src or engine.backbone.source!r} "
                          f"and its weights in memory are quantized ({engine.backbone.quantize})")
    engine.tokenizer.save_pretrained(out)


def _sleep_record(m: dict) -> dict:
    keys = ("sleep", "committed", "episode_ids", "experts_added", "probe_accuracy_before", "probe_accuracy_after",
            "general_ppl_before", "general_ppl_after", "answer_logprob_before", "answer_logprob_after",
            "gate_selectivity", "teacher_note")
    return {k: m.get(k) for k in keys if k in m} | {"preset": (m.get("settings") or {}).get("preset")}


def _episode_record(ep) -> dict:
    """What a model card may say of an episode: a taught text's source and opening words; of a
    chat turn only that it was one (conversations stay private)."""
    rec = {"id": ep.id, "kind": ep.kind, "time": ep.time, "chars": len(ep.text)}
    if ep.kind == "taught":
        rec["source"] = ep.source
        rec["preview"] = " ".join(ep.text.split())[:80]
    return rec


def export_manifest(engine, memory_manifest: dict) -> dict:
    sleeps = [_sleep_record(m) for m in engine.state.sleep_manifests()]
    consolidated = [_episode_record(ep) for ep in engine.state.episodes.all()
                    if ep.id <= engine.state.consolidated_through()]
    return {"format": "sleep-lab-export", "schema": EXPORT_SCHEMA, "created": time.time(),
            "base_model": engine.backbone.name, "quantize": engine.backbone.quantize,
            "memory_config": dataclasses.asdict(engine.cfg.memory), "memory": memory_manifest,
            "wake": {k: getattr(engine.cfg.wake, k) for k in ("system_prompt", "temperature", "top_p",
                                                              "repetition_penalty")},
            "sleeps": sleeps, "consolidated": consolidated,
            "pending_episodes": len(engine.pending_episodes())}


def export(engine, out, force: bool = False) -> dict:
    """Write the engine's current model (base + memory) to `out`, atomically: a folder appears
    complete or not at all. Refused while a sleep runs or when `out` holds other files."""
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()) and not (force and read_export(out) is not None):
        raise ExportError(f"{out} exists and is not empty" + ("" if force else "; choose a new folder "
                          "(--force replaces an earlier export)"))
    if engine.asleep_notice():
        raise ExportError("a sleep is running: export after it ends (or stop it)")
    engine.wake.wait_for_learning()   # the export holds what tier 1 is learning now
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        with engine.lock:
            tensors, memory_manifest = engine.memory.memory_state()
            manifest = export_manifest(engine, memory_manifest)
            _write_base(engine, tmp)
        save_file(tensors, str(tmp / MEMORY_FILE), metadata={"format": "pt", "schema": str(EXPORT_SCHEMA)})
        (tmp / EXPORT_FILE).write_text(json.dumps(manifest, indent=1))
        (tmp / "README.md").write_text(model_card(manifest))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"out": str(out), "experts": len(memory_manifest["experts"]), "sleeps": len(manifest["sleeps"]),
            "consolidated": len(manifest["consolidated"]),
            "bytes": sum(f.stat().st_size for f in out.iterdir() if f.is_file())}


# -- the model card -------------------------------------------------------------------------------
def _pct(d: dict | None) -> str:
    if not d:
        return "–"
    return f"{100 * sum(d.values()) / len(d):.0f}% of {len(d)} episode(s)"


def model_card(m: dict) -> str:
    experts = m["memory"]["experts"]
    lines = ["---", "library_name: transformers", "tags: [sleep-lab, continual-learning, mixture-of-experts]", "---",
             f"# {m['base_model']} after {len(m['sleeps'])} sleep(s) in Sleep Lab", "",
             f"Exported {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(m['created']))}. The base model is "
             "frozen; what was learned lives in `memory.safetensors`: low-rank experts, each with an "
             "input-dependent sigmoid gate, added to the MLP of every receiving layer, plus the fast weights.", "",
             "## Load it", "",
             "- In the lab: `python launch.py --model THIS_DIR --state-dir NEW_STATE_DIR` (chat, teach, sleep on).",
             "- In Python: `from sleep_engine import load_pretrained; model = load_pretrained('THIS_DIR')` gives a "
             "transformers model; `AutoTokenizer.from_pretrained('THIS_DIR')` its tokenizer. The lab's Wake "
             f"replies use the system prompt {m['wake']['system_prompt']!r} and repetition penalty "
             f"{m['wake']['repetition_penalty']:g} on the reply's own tokens: in `generate`, "
             "`logits_processor=[RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=len(prompt))]`.",
             "- Runtimes without input-gated experts (llama.cpp, Ollama, plain `AutoModelForCausalLM`) load the "
             "**base only**: the experts are not in their graph. Serve the slept model with "
             "`python launch.py serve --model THIS_DIR` (an OpenAI-compatible endpoint) instead.", "",
             "## Memory", "",
             "| expert | tier | born in sleep | rank | layers | parameters |", "|---|---|---|---|---|---|"]
    lines += [f"| {e['expert_id']} | {e['tier']} | {e['born']} | {e['rank']} | {len(e['layers'])} | {e['params']:,} |"
              for e in experts] or ["| (none) | | | | | |"]
    steps = m["memory"].get("fast_weight_steps", 0)
    lines += ["", f"Fast weights (tier 1): {steps} update step(s) since the last sleep.", "", "## Sleeps", ""]
    if not m["sleeps"]:
        lines.append("None yet.")
    for s in m["sleeps"]:
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(s["committed"])) if s.get("committed") else "?"
        ppl = (f"general perplexity {s['general_ppl_before']:.2f} → {s['general_ppl_after']:.2f}"
               if s.get("general_ppl_before") and s.get("general_ppl_after") else "")
        lines.append(f"- Sleep {s.get('sleep')} ({when}, preset {s.get('preset')}): episodes "
                     f"{s.get('episode_ids')}, experts added {s.get('experts_added')}; probe accuracy "
                     f"{_pct(s.get('probe_accuracy_before'))} → {_pct(s.get('probe_accuracy_after'))}; {ppl}")
    lines += ["", "## What was consolidated", ""]
    taught = [e for e in m["consolidated"] if e["kind"] == "taught"]
    turns = len(m["consolidated"]) - len(taught)
    lines += [f"- episode {e['id']} ({time.strftime('%Y-%m-%d %H:%M', time.gmtime(e['time']))}, "
              f"{e.get('source')}): {e.get('preview', '')}" for e in taught]
    lines.append(f"- {turns} chat turn(s) (their text is not listed here)")
    if m.get("pending_episodes"):
        lines.append(f"- {m['pending_episodes']} episode(s) were not consolidated yet (only the fast weights hold them)")
    return "\n".join(lines) + "\n"


# -- loading outside the lab ----------------------------------------------------------------------
def load_pretrained(path, quantize: str | None = None, device: str = "cpu"):
    """A transformers model of an export, memory included: `generate` gives the lab's tokens.

    quantize: None = the storage the lab ran with (int4/int8 kernels on CPU give its exact
    tokens); "none" = float32 weights throughout."""
    from transformers import AutoModelForCausalLM

    from .backbone import quantize_linears
    from .memory import MemoryModel
    path = Path(path).expanduser()
    tensors, memory_manifest = read_export_memory(path)
    manifest = read_export(path)
    mode = quantize or manifest.get("quantize", "none")
    if mode in ("int8", "int4") and device != "cpu":
        mode = "none"
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False).to(device)
    lm.eval().requires_grad_(False)
    if mode in ("int8", "int4"):
        quantize_linears(lm, mode)
    memory = MemoryModel(lm, export_memory_config(manifest))
    memory.load_memory_state({k: v.to(device) for k, v in tensors.items()}, memory_manifest)
    lm.sleep_lab_memory = memory   # the API over its tiers (experts, gates, traces), if wanted
    return lm

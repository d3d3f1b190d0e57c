"""docs/export.md on the tiny model: an export of a slept model reloads with the same greedy
tokens in the lab (`--model DIR`) and through `load_pretrained`; it holds no pickle; bad folders
get a clear error."""
import json

import pytest
import torch
from conftest import make_tiny_engine
from test_reliability import quick
from test_sleep import QA, TEXTS

from sleep_engine.chat_format import encode_chat
from sleep_engine.config import LabConfig
from sleep_engine.export import EXPORT_FILE, ExportError, export, load_pretrained

PROMPT = "Where does the river flow?"


@pytest.fixture(scope="module")
def slept(tmp_path_factory, tokenizer):
    """A tiny engine after one sleep, its memory made loud (random B, open gates, fast weights) so
    that a reply with and without it differ; exported once."""
    root = tmp_path_factory.mktemp("export")
    engine = make_tiny_engine(root, tokenizer)
    engine.cfg.wake.repetition_penalty = 1.1     # the default Wake decoding, which generate must reproduce
    engine.wake.teach(TEXTS[0], qa=QA[0])
    engine.sleep(quick(), wait=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mlp in engine.memory.mlps.values():
            for e in mlp.experts:
                e.B.copy_(torch.randn(e.B.shape, generator=g) * 0.5)
                e.gate_bias.fill_(0.0)
            mlp.fast_B.copy_(torch.randn(mlp.fast_B.shape, generator=g) * 0.2)
    engine.save_memory()
    lab_reply = engine.wake.reply(PROMPT).token_ids
    result = export(engine, root / "out")
    engine.close()
    return {"engine": engine, "out": root / "out", "reply": lab_reply, "result": result, "root": root}


def prompt_ids(tokenizer, cfg):
    return encode_chat(tokenizer, [{"role": "system", "content": cfg.wake.system_prompt},
                                   {"role": "user", "content": PROMPT}])


def test_export_folder_is_self_describing_and_pickle_free(slept):
    out = slept["out"]
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "memory.safetensors", EXPORT_FILE, "README.md"} <= names
    assert "tokenizer.json" in names or "tokenizer_config.json" in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".py"))]
    manifest = json.loads((out / EXPORT_FILE).read_text())
    assert manifest["schema"] == 1 and manifest["memory_config"]["tiers"] == 3
    assert [e["expert_id"] for e in manifest["memory"]["experts"]] == ["e0"]
    assert manifest["memory"]["experts"][0]["born"] == 1
    assert manifest["sleeps"][0]["sleep"] == 1 and manifest["consolidated"][0]["kind"] == "taught"
    card = (out / "README.md").read_text()
    assert "| e0 | 2 | 1 |" in card and "Sleep 1" in card and TEXTS[0].split()[0] in card
    assert slept["result"]["experts"] == 1 and slept["result"]["sleeps"] == 1


def lab_generate(lm, ids, n, penalty):
    """transformers' generate as the lab's Wake decodes: greedy, the penalty on the reply's own tokens."""
    from transformers import RepetitionPenaltyLogitsProcessor
    procs = [RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=ids.shape[1])] if penalty != 1 else []
    return lm.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, logits_processor=procs)[0, ids.shape[1]:].tolist()


def test_load_pretrained_generates_the_lab_tokens(slept, tokenizer):
    lm = load_pretrained(slept["out"])
    cfg = slept["engine"].cfg
    ids = torch.tensor([prompt_ids(tokenizer, cfg)])
    want = slept["reply"]
    assert json.loads((slept["out"] / EXPORT_FILE).read_text())["wake"]["repetition_penalty"] == cfg.wake.repetition_penalty
    assert lab_generate(lm, ids, len(want), cfg.wake.repetition_penalty) == want
    lm.sleep_lab_memory.remove_experts(lm.sleep_lab_memory.expert_ids())   # control: the memory is what mattered
    lm.sleep_lab_memory.reset_fast_weights()
    assert lab_generate(lm, ids, len(want), cfg.wake.repetition_penalty) != want


def test_model_dir_reopens_in_the_lab_with_nothing_lost(slept, tokenizer):
    from sleep_engine.engine import SleepEngine
    before = load_pretrained(slept["out"]).sleep_lab_memory.memory_state()[0]
    cfg = LabConfig(model=str(slept["out"]), quantize="none", state_dir=slept["root"] / "reopened",
                    cache_dir=slept["root"] / "cache")
    cfg.wake.max_new_tokens, cfg.wake.fast_update_every = 8, 0
    cfg.memory.tiers = 2      # asked otherwise: the export's own layout wins
    engine = SleepEngine(cfg)
    try:
        assert engine.memory.expert_ids() == ["e0"] and engine.cfg.memory.tiers == 3
        tensors = engine.memory.memory_state()[0]
        assert tensors.keys() == before.keys() and all(torch.equal(tensors[k], before[k]) for k in tensors)
        assert any("export" in n for n in engine.notices())
        assert engine.wake.reply(PROMPT).token_ids == slept["reply"]
    finally:
        engine.close()
    engine = SleepEngine(cfg)   # the state dir now holds the memory itself
    try:
        assert engine.memory.expert_ids() == ["e0"] and not any("export" in n for n in engine.notices())
    finally:
        engine.close()


def test_export_refuses_a_folder_in_use_and_reports_a_bad_manifest(slept, tokenizer, tmp_path):
    engine = make_tiny_engine(tmp_path, tokenizer)
    try:
        (tmp_path / "taken").mkdir()
        (tmp_path / "taken" / "notes.txt").write_text("mine")
        with pytest.raises(ExportError, match="not empty"):
            export(engine, tmp_path / "taken", force=True)   # --force replaces only an earlier export
        assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
        again = export(engine, tmp_path / "first")
        assert export(engine, tmp_path / "first", force=True)["out"] == again["out"]
    finally:
        engine.close()
    (tmp_path / "first" / EXPORT_FILE).write_text("{not json")
    with pytest.raises(ExportError, match="unreadable"):
        load_pretrained(tmp_path / "first")


def test_cli_export_then_chat_on_the_export(tmp_path, embedded_source):
    from stress_state import TINY_SLEEP, ForkServer, make_tiny_model
    make_tiny_model(tmp_path / "m", embedded_source)
    (tmp_path / "fact.txt").write_text(TEXTS[0])
    common = ["--quantize", "none", "--threads", "1", "--max-new-tokens", "8"]
    server = ForkServer({"OMP_NUM_THREADS": "1"})
    try:
        def cli(*args):
            code, out = server.run(list(args), tmp_path / f"{len(list(tmp_path.glob('*.log')))}.log", cwd=tmp_path)
            assert code == 0, out[-2000:]
            return out
        cli("sleep", "--model", "m", *common, "--state-dir", "s", "--teach", "fact.txt",
            *[a for s in TINY_SLEEP for a in ("--set", s)])
        reply = cli("chat", "--model", "m", *common, "--state-dir", "s", "--once", "Where is it?")
        result = json.loads(cli("export", "--model", "m", *common, "--state-dir", "s", "--out", "x",
                                "--json").strip().splitlines()[-1])
        assert result["experts"] == 1 and result["sleeps"] == 1
        again = cli("chat", "--model", "x", *common, "--state-dir", "s2", "--once", "Where is it?")
        notice, _, again = again.partition("\n")
        assert notice == "warning: memory loaded from the export x: 1 expert(s)"
        assert again == reply       # this random model's reply is mostly newlines; the same ones
        code, out = server.run(["export", "--model", "m", *common, "--state-dir", "s", "--out", "x"],
                               tmp_path / "refused.log", cwd=tmp_path)
        assert code == 2 and "not empty" in out and "Traceback" not in out
    finally:
        server.close()

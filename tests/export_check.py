"""Export of a slept embedded model: lab replies vs load_pretrained(generate) vs --model DIR."""
import json, shutil, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import launch
from sleep_engine.config import LabConfig, SleepConfig

def main():
    root = Path(sys.argv[2] if len(sys.argv) > 2 else "/tmp/sleep-lab-export-check"); shutil.rmtree(root, ignore_errors=True); root.mkdir()
    cfg = LabConfig(state_dir=root / "state", threads=int(sys.argv[1]) if len(sys.argv) > 1 else 1).validate()
    cfg.wake.max_new_tokens = 48
    launch.quiet_libraries(cfg)
    from sleep_engine.engine import SleepEngine
    from sleep_engine.lab.data import load_passages
    from sleep_engine.chat_format import encode_chat
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor
    p = load_passages("dev")
    eng = SleepEngine(cfg)
    eng.wake.teach(p[0].text, qa=[{"q": q, "a": a} for q, a in p[0].qa])
    t = time.time(); eng.sleep(SleepConfig.from_preset("quick"), wait=True); sleep_s = time.time() - t
    eng.wake.teach(p[1].text)            # fast weights hold this one (tier 1)
    eng.set_fast_learning(0)
    prompts = [p[0].qa[0][0], p[1].qa[0][0], "What is the capital of France?", "Write a haiku about rain."]
    lab = [eng.wake.reply(q, session=f"s{i}").token_ids for i, q in enumerate(prompts)]
    t = time.time(); res = __import__("sleep_engine.export", fromlist=["export"]).export(eng, root / "out"); export_s = time.time() - t
    fast_norm = eng.memory.fast_weight_norm(); experts = eng.memory.expert_ids()
    sys_prompt = cfg.wake.system_prompt
    eng.close()
    from sleep_engine import load_pretrained
    out = {"sleep_s": round(sleep_s), "export_s": round(export_s, 1), "export": res, "fast_norm": fast_norm,
           "experts": experts, "prompts": prompts}
    tok = eng.tokenizer
    for mode in (None, "none"):
        t = time.time(); lm = load_pretrained(root / "out", quantize=mode); load_s = time.time() - t
        same = []
        for q, want in zip(prompts, lab):
            ids = torch.tensor([encode_chat(tok, [{"role": "system", "content": sys_prompt}, {"role": "user", "content": q}])])
            procs = [RepetitionPenaltyLogitsProcessor(cfg.wake.repetition_penalty, prompt_ignore_length=ids.shape[1])] \
                if cfg.wake.repetition_penalty != 1 else []       # as the lab's Wake decodes
            got = lm.generate(ids, max_new_tokens=len(want), do_sample=False, pad_token_id=tok.pad_token_id,
                              logits_processor=procs)[0, ids.shape[1]:].tolist()
            same.append(got == want)
        out[f"load_pretrained[{mode or 'lab storage'}]"] = {"identical": same, "load_s": round(load_s, 1)}
        del lm
    cfg2 = LabConfig(model=str(root / "out"), state_dir=root / "state2", threads=cfg.threads).validate()
    cfg2.wake.max_new_tokens, cfg2.wake.fast_update_every = 48, 0
    eng2 = SleepEngine(cfg2)
    again = [eng2.wake.reply(q, session=f"s{i}").token_ids for i, q in enumerate(prompts)]
    out["model_dir"] = {"identical": [a == b for a, b in zip(again, lab)], "quantize": eng2.backbone.quantize,
                        "experts": eng2.memory.expert_ids(), "fast_norm": eng2.memory.fast_weight_norm(),
                        "notices": eng2.notices()}
    out["replies"] = [tok.decode(x, skip_special_tokens=True) for x in lab]
    eng2.close()
    print(json.dumps(out, indent=1))

if __name__ == "__main__":
    main()

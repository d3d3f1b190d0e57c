"""Wake speed benchmark: the lab's memory model against plain transformers, in one run.

Same prompts, greedy, a fixed number of new tokens (no early stop), median over prompts.
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ..backbone import embedded_gguf_path, load_backbone, native_bf16
from ..config import LabConfig
from ..decoding import FastLlamaDecoder, generate_tokens, make_decoder
from ..memory import MemoryModel

PROMPTS = ["What is the capital of France?",
           "Write two sentences about the ocean.",
           "Explain what the gears on a bicycle do."]
from .. import ASSETS


def _chat_ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _median_rate(run, prompts_ids, repeats: int = 1) -> float:
    rates = []
    for ids in prompts_ids:
        for _ in range(repeats):
            t = time.perf_counter()
            n = run(ids)
            rates.append(n / (time.perf_counter() - t))
    return statistics.median(rates)


def dense_rate(model, prompts_ids, tokens: int) -> float:
    """Plain transformers `generate`, greedy, exactly `tokens` new tokens."""
    def run(ids):
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids], device=model.device), max_new_tokens=tokens, min_new_tokens=tokens,
                                 do_sample=False, pad_token_id=0)
        return out.shape[1] - len(ids)
    run(prompts_ids[0][:8])  # warm-up
    return _median_rate(run, prompts_ids)


def lab_rate(memory: MemoryModel, prompts_ids, tokens: int, beside_work: bool = False,
             cuda_graphs: bool = True) -> tuple[float, float]:
    """Lab decoder with routing traces on; returns (tokens/s, median time to first token in s)."""
    decoder = make_decoder(memory.lm, max(len(i) for i in prompts_ids) + tokens + 8, beside_work=beside_work,
                           cuda_graphs=cuda_graphs)
    ttfts = []

    def run(ids):
        decoder.reset()
        t = time.perf_counter()
        n = 0
        with memory.tracing():
            for _ in generate_tokens(decoder, ids, tokens, stop_ids=set()):
                if n == 0:
                    ttfts.append(time.perf_counter() - t)
                n += 1
        return n
    run(prompts_ids[0])  # warm-up
    ttfts.clear()
    return _median_rate(run, prompts_ids), statistics.median(ttfts)


LONG_PROMPT_TOKENS = 1000


def long_prompt_ids(tokenizer, n: int = LONG_PROMPT_TOKENS) -> list[int]:
    """A user turn of `n` tokens (the generic text, repeated as needed) in the chat template."""
    body = tokenizer((ASSETS / "generic_text.txt").read_text())["input_ids"]
    body = body * (1 + n // max(len(body), 1))
    keep = n - (len(_chat_ids(tokenizer, "x")) - 1)
    for _ in range(5):   # decoding and encoding again may merge or split a few tokens
        ids = _chat_ids(tokenizer, tokenizer.decode(body[:keep]))
        if len(ids) == n:
            break
        keep += n - len(ids)
    return ids


def _median_seconds(run, repeats: int) -> float:
    """Median seconds of `run()` over `repeats` calls after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def prefill_seconds(memory: MemoryModel, ids: list[int], repeats: int = 3, bf16_prompts: bool | None = None) -> float:
    """Median seconds from an empty cache to the first new token of `ids` (the whole prompt
    prefilled, routing traces on), after a warm-up."""
    decoder = make_decoder(memory.lm, len(ids) + 8, bf16_prompts=bf16_prompts)

    def first_token():
        decoder.reset()
        with memory.tracing():
            next(iter(generate_tokens(decoder, ids, 1, stop_ids=set())))
    return _median_seconds(first_token, repeats)


def llama_cpp_prefill_seconds(gguf_path, ids: list[int], threads: int, repeats: int = 3) -> float | None:
    """llama.cpp's time to the first token of `ids` from an empty cache, timed like
    `prefill_seconds`; None without `llama-cpp-python`."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(gguf_path), n_ctx=len(ids) + 8, n_threads=threads, n_threads_batch=threads,
                n_batch=len(ids), verbose=False)

    def first_token():
        llm.reset()
        next(iter(llm.generate(ids, top_k=1, temp=0.0, reset=True)))
    try:
        return _median_seconds(first_token, repeats)
    finally:
        llm.close()


def llama_cpp_rate(gguf_path, prompts_ids, tokens: int, threads: int) -> dict | None:
    """llama.cpp on the same GGUF file, same token ids, greedy, exactly `tokens` new tokens
    (its raw `generate` loop, which never stops on its own), timed like `lab_rate`; None when
    the optional package `llama-cpp-python` is not installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(gguf_path), n_ctx=max(len(i) for i in prompts_ids) + tokens + 8,
                n_threads=threads, n_threads_batch=threads, verbose=False)
    ttfts = []

    def run(ids):
        # generate(reset=True) still reuses the longest prefix cached from the last call (the
        # bench prompts share their chat template's system turn): 51 ms to the first token, 138 ms
        # when the whole prompt is prefilled. The lab's decoder starts empty too (`lab_rate`).
        llm.reset()
        t = time.perf_counter()
        for n, _ in enumerate(llm.generate(ids, top_k=1, temp=0.0, reset=True), start=1):
            if n == 1:
                ttfts.append(time.perf_counter() - t)
            if n == tokens:
                break
        return n
    try:
        run(prompts_ids[0])  # warm-up
        ttfts.clear()
        rate = _median_rate(run, prompts_ids)
    finally:
        llm.close()   # its threads would otherwise stay and slow what runs next (the lab 111 → 95 tokens/s)
    import llama_cpp
    return {"tokens_per_s": round(rate, 2), "ttft_ms": round(statistics.median(ttfts) * 1000, 1),
            "version": getattr(llama_cpp, "__version__", "?")}


def against_llama_cpp(memory: MemoryModel, prompts_ids, tokens: int, rounds: int = 3) -> dict:
    """The lab (its experts as they are) and llama.cpp on the same GGUF file in turns, `rounds`
    times: this VM's speed drifts by ±25% within minutes and a row measured after other work
    read up to 40% low, so the ratio is the median of ratios of neighbouring measurements."""
    lab, ref = [], []
    for _ in range(rounds):
        lab.append(lab_rate(memory, prompts_ids, tokens))
        ref.append(llama_cpp_rate(embedded_gguf_path(), prompts_ids, tokens, torch.get_num_threads()))
        if ref[-1] is None:
            return {"llama_cpp": "not installed (pip install llama-cpp-python)"}
    ratios = [a[0] / b["tokens_per_s"] for a, b in zip(lab, ref)]
    return {"llama_cpp": {"tokens_per_s": round(statistics.median(b["tokens_per_s"] for b in ref), 2),
                          "ttft_ms": round(statistics.median(b["ttft_ms"] for b in ref), 1),
                          "version": ref[0]["version"], "rounds": [b["tokens_per_s"] for b in ref]},
            "lab_rounds": [round(a[0], 2) for a in lab], "lab_ttft_ms_rounds": [round(a[1] * 1000, 1) for a in lab],
            "ratio_vs_llama_cpp": round(statistics.median(ratios), 3),
            "ratio_vs_llama_cpp_rounds": [round(r, 3) for r in ratios]}


def in_a_thread(fn):
    """fn() run in a fresh thread, its result returned. The web app decodes each reply in a
    thread of its own; OpenMP behaves differently there (README "Measured": a token once took
    twice as long as from the main thread), so the bench measures that case too."""
    out = []
    worker = threading.Thread(target=lambda: out.append(fn()))
    worker.start()
    worker.join()
    if not out:
        raise RuntimeError("the benchmark thread failed (see its error above)")
    return out[0]


def beside_training(fn):
    """(fn() in a thread while another thread trains a layer the size of the embedded model's MLP,
    as a sleep does while Wake answers from the pre-sleep memory; the trainer's steps per second)."""
    stop, steps = threading.Event(), []

    def train():
        x = torch.randn(256, 576, requires_grad=True)
        w = torch.randn(1536, 576, requires_grad=True)
        n = 0
        while not stop.is_set():
            F.linear(x, w).relu().sum().backward()
            n += 1
        steps.append(n)
    trainer = threading.Thread(target=train)
    trainer.start()
    t = time.perf_counter()
    try:
        result = in_a_thread(fn)
    finally:
        stop.set()
        trainer.join()
    return result, steps[0] / (time.perf_counter() - t)


def add_trained_looking_experts(memory: MemoryModel, n: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        eid = memory.add_expert(tier=2, born=0)
        with torch.no_grad():
            for e in memory.expert_modules(eid):
                e.B.copy_(torch.randn(e.B.shape, generator=g) * 1e-3)
                e.gate.copy_(torch.randn(e.gate.shape, generator=g) * 0.05)


def quality(model, tokenizer) -> dict:
    """Paris check (greedy reply) and perplexity on the generic text in assets/."""
    memory = model if isinstance(model, MemoryModel) else None
    lm = memory.lm if memory else model
    ids = _chat_ids(tokenizer, "What is the capital of France?")
    decoder = make_decoder(lm, len(ids) + 40)
    reply = tokenizer.decode(list(generate_tokens(decoder, ids, 32, stop_ids={tokenizer.eos_token_id})))
    text = (ASSETS / "generic_text.txt").read_text()
    enc = tokenizer(text, return_tensors="pt")["input_ids"][:, :1024].to(lm.device)
    out = {"paris": "paris" in reply.lower(), "reply": reply.strip()[:80]}
    with torch.inference_mode():
        out["general_ppl"] = round(float(torch.exp(lm(input_ids=enc, labels=enc).loss)), 3)
        if isinstance(decoder, FastLlamaDecoder):   # the same text as one long Wake prompt, both ways
            ids = enc[0].tolist()
            for key, bf16 in (("general_ppl_wake_prompt_float32", False), ("general_ppl_wake_prompt", None)):
                logits = FastLlamaDecoder(lm, len(ids) + 1, bf16_prompts=bf16).prompt_logits(ids)
                out[key] = round(float(torch.exp(F.cross_entropy(logits[:-1], enc[0, 1:]))), 3)
    return out


def start_times(cfg: LabConfig) -> dict:
    """Seconds from a fresh process start to a ready engine: cold (empty cache) and warm."""
    probe = ("import time; t=time.perf_counter(); import sys; sys.argv=['launch.py']; import launch; "
             "from sleep_engine.config import LabConfig; "
             f"cfg=LabConfig(cache_dir={{c!r}}, state_dir={{s!r}}, quantize={cfg.quantize!r}).validate(); "
             "launch.quiet_libraries(cfg); from sleep_engine.engine import SleepEngine; SleepEngine(cfg); "
             "print(time.perf_counter()-t)")
    root = Path(__file__).resolve().parents[2]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label in ("cold", "warm"):
            code = probe.format(c=str(Path(tmp) / "cache"), s=str(Path(tmp) / "state"))
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], cwd=root, check=True, capture_output=True)
            out[f"load_s_{label}"] = round(time.perf_counter() - t, 2)
    return out


def bench_wake(cfg: LabConfig, tokens: int = 64, modes: list[str] = (), cold: bool = True, log=print) -> dict:
    torch.manual_seed(cfg.seed)
    torch.set_flush_denormal(True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    result: dict = {}
    if cold and cfg.model == "embedded":
        log("measuring cold and warm start (fresh processes) …")
        result.update(start_times(cfg))

    lab_bb = load_backbone(cfg)
    tok = lab_bb.tokenizer
    prompts_ids = [_chat_ids(tok, p) for p in PROMPTS]
    result.update(quantize=lab_bb.quantize, device=str(lab_bb.device), threads=torch.get_num_threads(),
                  tokens=tokens, prompts=len(PROMPTS), model=lab_bb.name)

    log(f"dense transformers, {lab_bb.quantize} …")
    dense = load_backbone(cfg).model  # same storage, not upcycled
    result["dense_tokens_per_s"] = round(dense_rate(dense, prompts_ids, tokens), 2)
    del dense
    log("dense transformers, fp32 …")
    dense32 = load_backbone(replace(cfg, quantize="none")).model
    result["dense_fp32_tokens_per_s"] = round(dense_rate(dense32, prompts_ids, tokens), 2)
    result["quality_fp32"] = quality(dense32, tok)
    del dense32

    memory = MemoryModel(lab_bb.model, cfg.memory)
    log("lab model, no routed experts …")
    result["lab_no_experts_tokens_per_s"] = round(lab_rate(memory, prompts_ids, tokens)[0], 2)
    add_trained_looking_experts(memory, 6, cfg.seed)
    log("lab model, 6 routed experts per layer …")
    rate, ttft = lab_rate(memory, prompts_ids, tokens)
    result["lab_tokens_per_s"] = round(rate, 2)
    result["ttft_ms"] = round(ttft * 1000, 1)
    result["ratio"] = round(result["lab_tokens_per_s"] / result["dense_tokens_per_s"], 3)
    result["speedup_vs_fp32"] = round(result["lab_tokens_per_s"] / result["dense_fp32_tokens_per_s"], 3)
    if lab_bb.device.type == "cuda":
        log("lab model, 6 routed experts, without the CUDA graph …")
        rate, ttft = lab_rate(memory, prompts_ids, tokens, cuda_graphs=False)
        result.update(lab_no_graph_tokens_per_s=round(rate, 2), no_graph_ttft_ms=round(ttft * 1000, 1))
    log("lab model, 6 routed experts, decoding in another thread (as the web app does) …")
    result["lab_thread_tokens_per_s"] = round(in_a_thread(lambda: lab_rate(memory, prompts_ids, tokens))[0], 2)
    log("… and beside a training thread (chat during a sleep), with the threads' pauses for either case …")
    for name, beside in (("beside_training", True), ("beside_training_alone_pauses", False)):
        (rate, _), trainer = beside_training(lambda: lab_rate(memory, prompts_ids, tokens, beside_work=beside))
        result[f"lab_{name}_tokens_per_s"] = round(rate, 2)
        result[f"lab_{name}_trainer_steps_per_s"] = round(trainer, 1)
    long_ids = long_prompt_ids(tok)
    log(f"lab model, 6 routed experts, a {len(long_ids)}-token prompt to its first token …")
    result["long_prompt_tokens"] = len(long_ids)
    result["lab_long_prompt_ttft_s"] = round(prefill_seconds(memory, long_ids), 3)
    if native_bf16():   # what the bfloat16 products of a long prompt bought
        result["lab_long_prompt_float32_ttft_s"] = round(prefill_seconds(memory, long_ids, bf16_prompts=False), 3)
    if cfg.model == "embedded":
        log("llama.cpp on the same GGUF file, alternating with the lab (if llama-cpp-python is installed) …")
        result.update(against_llama_cpp(memory, prompts_ids, tokens))
        ref = llama_cpp_prefill_seconds(embedded_gguf_path(), long_ids, torch.get_num_threads())
        if ref is not None:
            result["llama_cpp_long_prompt_ttft_s"] = round(ref, 3)
    memory.remove_experts(memory.expert_ids())
    result["quality"] = quality(memory, tok)

    if modes:
        result["modes"] = {}
        for mode in modes:
            log(f"mode {mode} …")
            bb = load_backbone(replace(cfg, quantize=mode))
            mem = MemoryModel(bb.model, cfg.memory)
            add_trained_looking_experts(mem, 6, cfg.seed)
            rate, ttft = lab_rate(mem, prompts_ids, tokens)
            mem.remove_experts(mem.expert_ids())
            result["modes"][mode] = {"lab_tokens_per_s": round(rate, 2), "ttft_ms": round(ttft * 1000, 1),
                                     **quality(mem, tok)}
            del bb, mem
    return result

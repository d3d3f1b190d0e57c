"""The lab's compiled CPU kernels (sleep_engine/quant_matvec.cpp) against the torch arithmetic
they replace, and the Wake decoder's one-token path against its torch path."""
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_llama
from sleep_engine import kernels
from sleep_engine.backbone import QuantLinear, quantize_linears, resolve_quantize
from sleep_engine.config import ConfigError, MemoryConfig
from sleep_engine.decoding import FastLlamaDecoder, generate_tokens
from sleep_engine.memory import MemoryModel

K = kernels.load()
needs_kernels = pytest.mark.skipif(K is None, reason="no C++ compiler or no AVX2 here")


def test_the_kernels_build_on_a_machine_with_a_compiler_and_avx2():
    import shutil
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") and shutil.which("c++"):
        assert K is not None   # otherwise Wake silently runs ~2x slower


@needs_kernels
def test_a_later_start_imports_the_build_without_waiting_on_a_build_lock(tmp_path):
    """A start with the kernels built imports them directly: a `lock` a killed build left (torch's
    FileBaton) made every later start wait for ever, silently."""
    import shutil
    import subprocess
    import sys
    import time
    built = kernels._build_dir()
    cache = tmp_path / "cache"
    target = cache / "sleep-lab" / built.name
    shutil.copytree(built, target, ignore=shutil.ignore_patterns("lock", "build.flock"))
    (target / "lock").touch()
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", "from sleep_engine import kernels; "
                          "print(kernels.load() is not None, kernels._build_dir())"],
                         env={**os.environ, "XDG_CACHE_HOME": str(cache)}, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", str(target)]
    assert time.monotonic() - start < 60 and (target / "lock").exists()   # imported, lock untouched


def test_a_build_removes_the_lock_a_killed_build_left_and_records_what_it_built(tmp_path, monkeypatch):
    """The build runs under an OS lock its holder's death releases, so a torch `lock` found under
    it is a dead build's: removed, not waited on. The built file is recorded for later starts."""
    import types
    import torch.utils.cpp_extension as cpp
    target = tmp_path / "kernels"
    target.mkdir()
    (target / "lock").touch()
    calls = []

    def fake_build(name, sources, build_directory, **kw):
        assert not (Path(build_directory) / "lock").exists()   # torch's baton would wait on it
        calls.append(Path(sources[0]))
        return types.SimpleNamespace(__file__=str(Path(build_directory) / f"{name}_v1.so"))

    monkeypatch.setattr(cpp, "load", fake_build)
    module = kernels._build(target)
    assert calls == [target / kernels.SOURCE.name]   # built from a copy, not from this checkout
    assert calls[0].read_bytes() == kernels.SOURCE.read_bytes()
    assert (target / "built").read_text().strip() == f"{kernels.NAME}_v1.so" == Path(module.__file__).name
    assert kernels._import_built(target) is None   # the recorded file is not there: not imported


@needs_kernels
@pytest.mark.parametrize("rows", [1, 3, 5, 6, 8, 40])
def test_q4_and_q8_linear_equal_the_dequantized_float_product(rows):
    """Up to 5 rows the int4 kernel reads x as int16 per block (relative error ≤ 2⁻¹⁵); from 6
    (prompts) it multiplies float32 weights dequantized four rows at a time, with 42 output rows
    leaving a remainder of two (and 40 input rows one of x: 3 per pass)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 42, bias=False)
    x = torch.randn(rows, 96)
    for mode, tol in (("int4", 1e-4 if rows < 6 else 2e-6), ("int8", 1e-5)):
        q = QuantLinear(lin, mode)
        ref = x @ q.dequantized().T
        got = q(x)
        assert ((got - ref).abs().max() / ref.abs().max()) < tol, mode
        # torch's packed kernels (the fallback) agree up to their bfloat16 input
        q.use_kernels = False
        assert ((q(x) - ref).abs().max() / ref.abs().max()) < 2e-2, mode


@needs_kernels
def test_q4_dequant_gives_the_codes_times_step_plus_lo():
    """The kernel that dequantizes a whole int4 weight for long prompts and sleeps, against the
    formula done with torch ops (w = code · step + lo per block of 32)."""
    torch.manual_seed(0)
    q = QuantLinear(torch.nn.Linear(96, 40, bias=False), "int4")
    n, k = q.out_features, q.in_features
    ref = (q.codes().view(n, k // 32, 32).float() * q.step[..., None] + q.lo[..., None]).view(n, k)
    got = K.q4_dequant(q.qweight, q.step, q.lo)
    assert got.shape == (n, k) and torch.equal(got, ref)   # bit for bit: cached readings stay valid
    assert torch.equal(q.dequantized(), got)
    # in bfloat16 (a long prompt's products): torch's rounding of those floats, bit for bit
    assert torch.equal(K.q4_dequant(q.qweight, q.step, q.lo, True), ref.to(torch.bfloat16))
    assert torch.equal(q.dequantized(torch.bfloat16), ref.to(torch.bfloat16))


@needs_kernels
def test_the_quantize_kernels_give_the_torch_ops_codes_bit_for_bit(monkeypatch):
    """Loading quantizes every base weight with the lab's kernels; machines without them use the
    torch ops. Both must store the same codes and scales (an export made on one is loaded on the
    other), including a constant block (its step is the 1e-8 floor) and exact halves."""
    torch.manual_seed(0)
    w = torch.randn(48, 96)
    w[0, :32] = 0.25                                     # a constant block
    w[1, :32] = torch.arange(32) / 2                     # codes that land on .5 before rounding
    fast4, fast8, fast8_row = QuantLinear.quantize_int4(w), QuantLinear.quantize_int8(w, 3), QuantLinear.quantize_int8(w, 1)
    monkeypatch.setattr(kernels, "load", lambda: None)
    slow4, slow8, slow8_row = QuantLinear.quantize_int4(w), QuantLinear.quantize_int8(w, 3), QuantLinear.quantize_int8(w, 1)
    for fast, slow in ((fast4, slow4), (fast8, slow8), (fast8_row, slow8_row)):
        assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(fast, slow))


def test_auto_quantize_keeps_the_embedded_model_in_bf16_on_cuda(monkeypatch):
    """nf4 cost the embedded model +28.6% perplexity on an H200 (README "On a GPU"); other models
    get nf4 on CUDA only where bitsandbytes is installed."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_quantize("auto", cpu) == "int4" and resolve_quantize("auto", cpu, embedded=False) == "int8"
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object() if name == "bitsandbytes" else None)
    assert resolve_quantize("auto", cuda) == "bf16"
    assert resolve_quantize("auto", cuda, embedded=False) == "nf4"
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    assert resolve_quantize("auto", cuda, embedded=False) == "bf16"
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        resolve_quantize("nf4", cpu)


def test_q4_packing_round_trips():
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    q = QuantLinear(torch.nn.Linear(64, 5, bias=False), "int4")
    q.qweight = kernels.pack_q4(codes)
    assert torch.equal(q.codes(), codes)


@needs_kernels
def test_rms_norm_by_hand():
    x = torch.tensor([[3.0, 4.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    w = torch.full((8,), 2.0)
    rms = math.sqrt(25 / 8 + 1e-6)
    assert torch.allclose(K.rms_norm(x, w, 1e-6), x / rms * 2, atol=1e-6)
    y, wt = torch.randn(3, 64), torch.rand(64)
    assert torch.allclose(K.rms_norm(y, wt, 1e-5), F.rms_norm(y, (64,), wt, 1e-5), atol=1e-5)


@needs_kernels
def test_attend_one_equals_rotary_plus_sdpa_and_writes_the_cache():
    torch.manual_seed(1)
    H, KV, d, L, pos = 4, 2, 16, 10, 6
    k_cache, v_cache = torch.randn(KV, L, d), torch.randn(KV, L, d)
    qkv = torch.randn(H + 2 * KV, d)
    angle = torch.rand(d // 2) * 3
    cos, sin = torch.cat([angle.cos()] * 2), torch.cat([angle.sin()] * 2)

    def rotate(t):   # transformers' apply_rotary_pos_emb: t·cos + rotate_half(t)·sin
        return t * cos + torch.cat([-t[..., d // 2:], t[..., :d // 2]], -1) * sin
    q, k, v = rotate(qkv[:H]), rotate(qkv[H:H + KV]), qkv[H + KV:]
    keys, values = k_cache.clone(), v_cache.clone()
    keys[:, pos], values[:, pos] = k, v
    want = F.scaled_dot_product_attention(q[None, :, None], keys[None, :, :pos + 1], values[None, :, :pos + 1],
                                          enable_gqa=True).reshape(-1)
    got = K.attend_one(qkv.contiguous(), k_cache, v_cache, cos, sin, H, pos)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(k_cache[:, pos], k, atol=1e-6) and torch.equal(v_cache[:, pos], v)


@needs_kernels
@pytest.mark.parametrize("floor", [0.0, 0.3])
def test_memory_delta_kernel_equals_the_torch_path(floor):
    torch.manual_seed(2)
    lab = tiny_llama()
    mem = MemoryModel(lab, MemoryConfig(expert_rank=4, gate_floor=floor))
    for _ in range(3):
        eid = mem.add_expert(2, 1)
        with torch.no_grad():
            for e in mem.expert_modules(eid):
                e.B.normal_(std=0.2)
                e.gate.normal_(std=1.0)
    mlp = next(iter(mem.mlps.values()))
    with torch.no_grad():
        mlp.fast_B.normal_(std=0.1)
    x = torch.randn(1, 2, 64)
    fused = mlp.fused_weights(torch.float32)
    with torch.inference_mode():
        mlp.trace = []
        got = mlp.delta(x, fused)
        mlp.use_kernels = False
        want = mlp.delta(x, fused)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(mlp.trace[0], mlp.trace[1], atol=1e-6)   # the routing trace too
    if floor:   # some gates fell in the dead zone and are exactly shut, in both paths
        assert (mlp.trace[0] == 0).any() and (mlp.trace[1] == 0).any()


@needs_kernels
@pytest.mark.parametrize("quantize", ["none", "int4"])
def test_one_token_path_gives_the_torch_paths_tokens(quantize):
    torch.manual_seed(3)
    lab = tiny_llama()
    if quantize != "none":
        quantize_linears(lab, quantize)
    mem = MemoryModel(lab, MemoryConfig(expert_rank=4))
    eid = mem.add_expert(2, 1)
    with torch.no_grad():
        for e in mem.expert_modules(eid):
            e.B.normal_(std=0.2)
            e.gate.normal_(std=1.0)
    prompt = [5, 9, 33, 2, 71, 100]
    fast, slow = FastLlamaDecoder(lab, 64), FastLlamaDecoder(lab, 64)
    slow.one = False
    assert fast.one
    with mem.tracing() as t_fast:
        a = list(generate_tokens(fast, prompt, 16, stop_ids=set()))
    with mem.tracing() as t_slow:
        b = list(generate_tokens(slow, prompt, 16, stop_ids=set()))
    assert a == b
    assert len(t_fast.steps) == len(t_slow.steps) == 16
    layer = next(iter(t_fast.steps[-1]))
    assert t_fast.steps[-1][layer] == pytest.approx(t_slow.steps[-1][layer], abs=1e-5)


@needs_kernels
@pytest.mark.parametrize("quantize,memory", [("int8", "experts"), ("none", "fast weights only"),
                                             ("int4", "forced expert"), ("int4", "bias"), ("int4", "long prompt")])
def test_compiled_step_gives_the_torch_paths_tokens_and_gates(quantize, memory):
    """The compiled decode step (DecodePlan) on each kind of weight it reads, with a memory of
    fast weights only, with projection biases (Qwen2-style), and handing back to torch where it
    cannot run (a forced expert while dreaming), and after a prompt too long for it (prefilled by
    torch, then decoded by it): the same tokens and routing gates."""
    torch.manual_seed(4)
    lab = tiny_llama(attention_bias=memory == "bias", seed=4)
    if quantize != "none":
        quantize_linears(lab, quantize)
    mem = MemoryModel(lab, MemoryConfig(expert_rank=4))
    with torch.no_grad():
        if memory == "fast weights only":
            for mlp in mem.mlps.values():
                mlp.fast_B.normal_(std=0.2)
        else:
            eid = mem.add_expert(2, 1)
            for e in mem.expert_modules(eid):
                e.B.normal_(std=0.2)
                e.gate.normal_(std=1.0)
            if memory == "forced expert":
                for mlp in mem.mlps.values():
                    mlp.forced_expert = eid
    prompt = [5, 9, 33, 2, 71, 100] * (12 if memory == "long prompt" else 1)
    fast, slow = FastLlamaDecoder(lab, 96), FastLlamaDecoder(lab, 96)
    slow.one = False
    assert fast.one and (len(prompt) > fast.PLAN_MAX_TOKENS) == (memory == "long prompt")
    with mem.tracing() as t_fast:
        a = list(generate_tokens(fast, prompt, 12, stop_ids=set()))
    assert fast.plan_ready == (memory != "forced expert")
    with mem.tracing() as t_slow:
        b = list(generate_tokens(slow, prompt, 12, stop_ids=set()))
    assert a == b
    assert len(t_fast.steps) == len(t_slow.steps) == 12
    for layer in t_fast.steps[-1]:
        assert t_fast.steps[-1][layer] == pytest.approx(t_slow.steps[-1][layer], abs=1e-5)


@needs_kernels
def test_embedded_model_int4_kernels_give_the_float_models_greedy_text(embedded_source):
    """The embedded model: int4 blocks and the int8 head through the kernels against float32
    weights through transformers' own generate, greedy until the end-of-turn token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from sleep_engine.decoding import stop_token_ids
    tok = AutoTokenizer.from_pretrained(embedded_source)
    ref = AutoModelForCausalLM.from_pretrained(embedded_source, dtype=torch.float32).eval()
    stops = stop_token_ids(tok, ref)
    prompts = []
    for text in ("Write two sentences about the ocean.", "Explain what the gears on a bicycle do."):
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    with torch.inference_mode():
        wants = [[t for t in ref.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False,
                                          pad_token_id=0)[0, len(ids):].tolist() if t not in stops] for ids in prompts]
    quantize_linears(ref, "int4")
    MemoryModel(ref, MemoryConfig())
    for ids, want in zip(prompts, wants):
        dec = FastLlamaDecoder(ref, len(ids) + 56)
        assert dec.one
        assert list(generate_tokens(dec, ids, 48, stop_ids=stops)) == want


@pytest.mark.parametrize("T,start", [(1, 0), (5, 0), (64, 0), (130, 0), (70, 50), (3, 100)])
def test_prompt_attention_in_bfloat16_is_the_bfloat16_rounded_softmax_attention(T, start):
    """`attend_prompt_bf16` (AVX512-BF16 only): causal grouped-query attention of T new positions
    after `start` cached ones, on bfloat16-rounded q/8, k, v and weights with float32 sums; q
    strided as the decoder hands it."""
    K = kernels.load()
    if K is None or not K.bf16_dot_supported():
        pytest.skip("needs the lab's kernels on a CPU with AVX512-BF16")
    g, L = torch.Generator().manual_seed(T), start + T
    qkv = torch.randn(T, 6, 64, generator=g) * 2
    q = qkv[:, :4].transpose(0, 1)                        # (4 heads, T, 64), rows strided
    k, v = torch.randn(2, L + 3, 64, generator=g)[:, :L], torch.randn(2, L, 64, generator=g)
    got = K.attend_prompt_bf16(q, k, v, start).double()    # (T, 4, 64)
    mask = torch.ones(T, L, dtype=torch.bool).tril(start)
    r = lambda x: x.bfloat16().double()
    s = (r(q / 8).view(2, 2, T, 64) @ r(k)[:, None].transpose(-1, -2)).masked_fill(~mask, float("-inf"))
    w = torch.exp(s - s.amax(-1, keepdim=True))
    want = (r(w.float()) @ r(v)[:, None]) / w.sum(-1, keepdim=True)   # (2, 2, T, 64)
    assert torch.allclose(got, want.reshape(4, T, 64).transpose(0, 1), atol=2e-3, rtol=0)
    exact = torch.nn.functional.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, enable_gqa=True)
    assert torch.allclose(got.float(), exact[0].transpose(0, 1), atol=0.05)


@pytest.mark.parametrize("shape", [(300, 3072), (3, 70), (2, 5, 34)])
def test_the_bfloat16_mlp_activation_is_silu_times_up_rounded_once(shape):
    """`silu_mul_bf16` (AVX512-BF16 only): [gate | up] → silu(gate) · up, computed in float32 and
    rounded once to bfloat16; odd widths take the masked tail. Torch's two bfloat16 ops (the path
    it replaces) round twice and agree with this reference on ~70% of elements only."""
    K = kernels.load()
    if K is None or not K.bf16_dot_supported():
        pytest.skip("needs the lab's kernels on a CPU with AVX512-BF16")
    gate_up = (torch.randn(*shape, generator=torch.Generator().manual_seed(shape[-1])) * 3).bfloat16()
    got = K.silu_mul_bf16(gate_up)
    g, u = gate_up.float().chunk(2, -1)
    want = (torch.nn.functional.silu(g) * u).bfloat16()
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    # its exp is a polynomial (relative error ~2e-7): a rounding boundary may fall the other way
    assert (got != want).float().mean() < 1e-4
    assert torch.allclose(got.float(), want.float(), rtol=2 ** -7, atol=0)


def test_a_model_with_kernels_can_be_deep_copied():
    """Sleeps and tests deepcopy models: the compiled module must not live on an nn.Module."""
    import copy
    mem = MemoryModel(tiny_llama(), MemoryConfig(expert_rank=4))
    q = QuantLinear(torch.nn.Linear(64, 32, bias=False), "int4")
    x = torch.randn(2, 64)
    assert torch.equal(copy.deepcopy(q)(x), q(x))
    twin = copy.deepcopy(mem)
    a, b = next(iter(mem.mlps.values())), next(iter(twin.mlps.values()))
    assert a is not b and a.use_kernels == b.use_kernels
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


@needs_kernels
def test_compiled_step_from_other_threads_gives_the_same_tokens():
    """The web app decodes in a thread per reply: the step's own worker team must give the
    same tokens there as in the main thread, reply after reply, with any torch thread count and
    however long its threads spin (a decoder beside a sleep's training spins less; < 0: torch's
    own threads serve the loops)."""
    import threading
    torch.manual_seed(5)
    lab = tiny_llama(layers=3, seed=5)
    quantize_linears(lab, "int4")
    MemoryModel(lab, MemoryConfig(expert_rank=4))
    dec = FastLlamaDecoder(lab, 64)
    prompt = [7, 3, 99, 41]
    want = list(generate_tokens(dec, prompt, 20, stop_ids=set()))
    got, threads = [], torch.get_num_threads()
    try:
        for n, pauses in ((2, 2048), (1, 2048), (2, 0), (2, -1)):
            torch.set_num_threads(n)
            dec.pauses = pauses
            t = threading.Thread(target=lambda: got.append(list(generate_tokens(dec, prompt, 20, stop_ids=set()))))
            t.start()
            t.join(timeout=60)
            assert not t.is_alive()
    finally:
        torch.set_num_threads(threads)
    assert got == [want] * 4
    assert FastLlamaDecoder(lab, 64, beside_work=True).pauses < FastLlamaDecoder(lab, 64).pauses

"""The Wake decoder and the quantized base layers against plain transformers."""
import pytest
import torch

from conftest import tiny_llama
from sleep_engine.backbone import QuantLinear, float_weights
from sleep_engine.config import MemoryConfig
from sleep_engine.decoding import FastLlamaDecoder, HFDecoder, generate_tokens, sample_next
from sleep_engine.memory import MemoryModel


def hf_greedy(model, prompt, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _with_experts(lab, n):
    mem = MemoryModel(lab, MemoryConfig(expert_rank=4))
    for _ in range(n):
        eid = mem.add_expert(2, 1)
        with torch.no_grad():
            for e in mem.expert_modules(eid):
                e.B.normal_(std=0.2)
                e.gate.normal_(std=1.0)
    return mem


@pytest.mark.parametrize("experts", [0, 2])
def test_fast_decoder_matches_transformers_generate(experts):
    lab = tiny_llama()
    _with_experts(lab, experts)
    prompt = [5, 9, 33, 2, 71, 100]
    want = hf_greedy(lab, prompt, 12)
    dec = FastLlamaDecoder(lab, 64)
    assert list(generate_tokens(dec, prompt, 12, stop_ids=set())) == want
    assert list(generate_tokens(HFDecoder(lab, 64), prompt, 12, stop_ids=set())) == want


@pytest.mark.parametrize("quantize", [None, "int4"])
def test_prompts_longer_than_the_compiled_step_match_the_full_forward(quantize):
    """Long prompts go through torch: from an empty cache as plain causal attention, a long chunk
    after cached tokens under a mask; both give the model's own next-token logits."""
    from sleep_engine.backbone import quantize_linears
    lab = tiny_llama()
    if quantize:
        quantize_linears(lab, quantize)
    _with_experts(lab, 2)
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(3, 120, (200,), generator=g).tolist()
    n = FastLlamaDecoder.PLAN_MAX_TOKENS
    dec = FastLlamaDecoder(lab, 256, bf16_prompts=False)
    with torch.no_grad():
        dec.begin()
        for end in (n + 30, 2 * n + 60):   # from the start, then a long chunk after the cached part
            want = lab(input_ids=torch.tensor([seq[:end]])).logits[:, -1].float()
            assert torch.allclose(dec.feed(seq[:end]), want, atol=1e-4, rtol=1e-4), end


def test_many_rows_in_bfloat16_are_bfloat16_products_only_without_a_gradient():
    """`bf16_many_rows`: above KERNEL_MAX_ROWS rows a QuantLinear multiplies bfloat16 x by its
    bfloat16 weight (float32 bias after); fewer rows, or a gradient, keep their float32 path."""
    from sleep_engine.backbone import bf16_many_rows
    lin = torch.nn.Linear(64, 48)
    q = QuantLinear(lin, "int4")
    w = q.dequantized()
    many, few = torch.randn(QuantLinear.KERNEL_MAX_ROWS + 1, 64), torch.randn(3, 64)
    with bf16_many_rows():
        got_many, got_few = q(many), q(few)
        graded = q(many.clone().requires_grad_())
    want = torch.nn.functional.linear(many.bfloat16(), w.bfloat16()).float() + q.bias
    assert got_many.dtype == torch.float32 and torch.equal(got_many, want)
    assert torch.equal(got_few, q(few))   # the kernels' float32 x, as outside the block
    assert torch.allclose(graded, many @ w.T + q.bias, atol=1e-5)
    assert not torch.allclose(got_many, many @ w.T + q.bias, atol=1e-5)


@pytest.mark.parametrize("head_dim", [16, 64])   # 64: attention through the lab's kernel where it runs
def test_a_long_prompt_in_bfloat16_stays_within_bfloat16_rounding_of_float32(head_dim):
    """The decoder's bf16_prompts: a prompt longer than the compiled step takes gives logits within
    bfloat16's rounding of the float32 path's, and the same next token; a short one is untouched."""
    from sleep_engine import kernels
    from sleep_engine.backbone import quantize_linears
    lab = tiny_llama(hidden_size=64 * 2, num_attention_heads=2, num_key_value_heads=1) if head_dim == 64 else tiny_llama()
    quantize_linears(lab, "int4")
    _with_experts(lab, 2)
    seq = torch.randint(3, 120, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    f32, b16 = FastLlamaDecoder(lab, 256, bf16_prompts=False), FastLlamaDecoder(lab, 256, bf16_prompts=True)
    K = kernels.load()
    assert b16.bf16_attention == (head_dim == 64 and K is not None and K.bf16_dot_supported())
    with torch.no_grad():
        for dec in (f32, b16):
            dec.begin()
        for end in (80, 150):   # from the start, then a long chunk after the cached part
            a, b = f32.feed(seq[:end]), b16.feed(seq[:end])
            assert not torch.equal(a, b)
            assert (a - b).abs().max() <= 0.02 * a.abs().max() and a.argmax() == b.argmax()
        f32.reset(), b16.reset()
        assert torch.equal(f32.feed(seq[:20]), b16.feed(seq[:20]))


def test_bfloat16_prompts_by_default_only_for_a_quantized_base_on_a_native_bfloat16_cpu():
    from sleep_engine.backbone import native_bf16, quantize_linears
    lab = tiny_llama()
    assert FastLlamaDecoder(lab, 16).bf16_prompts is False   # --quantize none stays float32
    quantize_linears(lab, "int4")
    assert FastLlamaDecoder(lab, 16).bf16_prompts == native_bf16()


def test_prompt_logits_are_the_full_forwards_logits_at_every_position():
    """`prompt_logits` (the bench's perplexity of the long-prompt path) on the float32 path."""
    lab = tiny_llama()
    _with_experts(lab, 2)
    seq = torch.randint(3, 120, (100,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        want = lab(input_ids=torch.tensor([seq])).logits[0].float()
        dec = FastLlamaDecoder(lab, 128, bf16_prompts=False)
        dec.begin()
        assert torch.allclose(dec.prompt_logits(seq), want, atol=1e-4, rtol=1e-4)
        assert dec.tokens == seq


def test_static_step_matches_the_step_and_traces_the_same_gates():
    """The step a CUDA graph records (fixed shapes, whole-cache attention under a mask) gives the
    logits and routing gates of the usual step, token by token after a prefilled prompt."""
    lab = tiny_llama()
    mem = _with_experts(lab, 2)
    ref, static = FastLlamaDecoder(lab, 64), FastLlamaDecoder(lab, 64)
    ref.one = static.one = False   # the torch path on both (the compiled step is CPU-only)
    seq = [5, 9, 33, 2, 71, 100]
    with torch.no_grad():
        for dec in (ref, static):
            dec.begin()
            dec.feed(seq)
        for t in (17, 42, 8):
            pos = len(seq)
            seq = seq + [t]
            with mem.tracing() as tr_ref:
                a = ref.feed(seq)
            with mem.tracing() as tr_static:
                b = static.static_step(torch.tensor([[t]]), torch.tensor([pos]))
            assert torch.allclose(a, b, atol=1e-5)
            assert torch.allclose(torch.tensor(tr_ref.matrix()), torch.tensor(tr_static.matrix()), atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_decoding_writes_the_same_tokens_and_follows_memory_changes():
    lab = tiny_llama().cuda()
    mem = _with_experts(lab, 2)
    prompt = [5, 9, 33, 2, 71, 100]

    def both():
        plain = list(generate_tokens(FastLlamaDecoder(lab, 64, cuda_graphs=False), prompt, 12, stop_ids=set()))
        return plain, list(generate_tokens(graphed, prompt, 12, stop_ids=set()))
    graphed = FastLlamaDecoder(lab, 64)
    plain, got = both()
    assert got == plain
    # the first change turns the fast weights on (new shapes: recorded again), the second keeps the
    # shapes: the graph's weights are refreshed in place, the same graph replays
    for std in (0.5, 0.3):
        recorded = graphed.graph.graph
        with torch.no_grad():
            for m in mem.mlps.values():
                m.fast_B.normal_(std=std)
        plain, got = both()
        assert got == plain
    assert graphed.graph.graph is recorded
    mem.add_expert(2, 2)    # a new expert: the graph is recorded again
    plain, got = both()
    assert got == plain and graphed.graph.graph is not None


def test_prefix_reuse_gives_the_same_logits_as_a_fresh_cache():
    lab = tiny_llama()
    MemoryModel(lab, MemoryConfig())
    reused = FastLlamaDecoder(lab, 64)
    with torch.no_grad():
        reused.feed([4, 5, 6, 7, 8])
        reused.feed([4, 5, 6, 7, 8, 9, 10])        # extends the cache
        a = reused.feed([4, 5, 6, 11, 12])          # diverges at position 3
        b = FastLlamaDecoder(lab, 64).feed([4, 5, 6, 11, 12])
    assert torch.allclose(a, b, atol=1e-5)


def test_changed_memory_invalidates_the_cache():
    lab = tiny_llama()
    mem = MemoryModel(lab, MemoryConfig())
    dec = FastLlamaDecoder(lab, 64)
    with torch.no_grad():
        dec.begin()
        dec.feed([4, 5, 6, 7])
        for m in mem.mlps.values():
            m.fast_B.normal_(std=0.5)
        dec.begin()
        assert dec.tokens == []
        a = dec.feed([4, 5, 6, 7])
        b = lab(input_ids=torch.tensor([[4, 5, 6, 7]])).logits[:, -1]
    assert torch.allclose(a, b, atol=1e-4)


def test_stop_event_and_budget():
    import threading
    lab = tiny_llama()
    dec = FastLlamaDecoder(lab, 16)
    stop = threading.Event()
    got = []
    for t in generate_tokens(dec, [3, 4], 100, stop_ids=set(), stop_event=stop):
        got.append(t)
        if len(got) == 3:
            stop.set()
    assert len(got) == 3
    assert len(list(generate_tokens(dec, [3, 4], 100, stop_ids=set()))) == 14  # cache holds 16


@pytest.mark.parametrize("mode,tol", [("int8", 0.02), ("int4", 0.15)])
def test_quant_linear_close_to_float_and_fusable(mode, tol):
    torch.manual_seed(0)
    lin_a, lin_b = torch.nn.Linear(64, 96, bias=False), torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(3, 64)
    qa, qb = QuantLinear(lin_a, mode), QuantLinear(lin_b, mode)
    with torch.inference_mode():
        ya = qa(x)
        fused = QuantLinear.concat([qa, qb])(x)
        ref = lin_a(x)
        assert ((ya - ref).norm() / ref.norm()) < tol
        assert torch.allclose(fused, torch.cat([ya, qb(x)], -1), atol=1e-2)
    # with a gradient to carry, the dequantized path gives the same values
    xg = x.clone().requires_grad_(True)
    yg = qa(xg)
    yg.sum().backward()
    assert xg.grad is not None and torch.allclose(yg.detach(), ya, atol=2e-2)
    # a cached float32 copy (as during a Sleep) gives the same values and gradients, and goes away
    model = torch.nn.Sequential(qa)
    with float_weights(model):
        assert qa.float_weight is not None
        xc = x.clone().requires_grad_(True)
        yc = qa(xc)
        yc.sum().backward()
    assert qa.float_weight is None
    assert torch.equal(yc.detach(), yg.detach()) and torch.equal(xc.grad, xg.grad)


def test_int4_is_exact_on_4bit_grid_weights():
    """The embedded model's Q4_1 blocks: int4 storage reproduces them up to bf16 rounding."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 16, bias=False)
    with torch.no_grad():
        groups = lin.weight.view(16, 2, 32)
        lo, step = groups.amin(-1, keepdim=True), (groups.amax(-1, keepdim=True) - groups.amin(-1, keepdim=True)) / 15
        lin.weight.copy_((((groups - lo) / step).round() * step + lo).view(16, 64))
    x = torch.randn(4, 64)
    with torch.inference_mode():
        on_grid = QuantLinear(lin, "int4")(x)
        ref = lin(x)
    assert ((on_grid - ref).norm() / ref.norm()) < 5e-3   # random weights lose ~8% (test above)


def test_sampling_respects_top_p_and_seed():
    logits = torch.tensor([[5.0, 4.9, -10.0, -10.0]])
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a = [sample_next(logits, 1.0, 0.9, g1) for _ in range(20)]
    b = [sample_next(logits, 1.0, 0.9, g2) for _ in range(20)]
    assert a == b and set(a) <= {0, 1}
    assert sample_next(logits, 0.0, 1.0, None) == 0


def test_repetition_penalty_by_hand_and_against_a_loop():
    class Fixed:                 # a decoder whose logits never change
        max_len = 64

        def __init__(self, z):
            self.z = torch.tensor([z])

        def begin(self):
            pass

        def feed(self, seq):
            return self.z.clone()
    # by hand, θ = 2: z = [2, -1, 0.5, 3] after token 3 was said → [2, -1, 0.5, 1.5]: 0 now leads
    assert list(generate_tokens(Fixed([2.0, -1.0, 0.5, 3.0]), [9], 2, set(), repetition_penalty=2.0)) == [3, 0]
    # a negative logit is multiplied (−1 → −2 < −1.5), not divided (−0.5 would still lead)
    assert list(generate_tokens(Fixed([-1.0, -1.5, -3.0]), [9], 2, set(), repetition_penalty=2.0)) == [0, 1]
    # greedy repeats its favourite; the penalty moves on; the prompt's own tokens are not counted
    plain = list(generate_tokens(Fixed([0.0] * 7 + [1.0, 0.9, 0.8]), [1, 2, 3], 6, set()))
    penalised = list(generate_tokens(Fixed([0.0] * 7 + [1.0, 0.9, 0.8]), [1, 2, 3, 7], 6, set(), repetition_penalty=1.5))
    assert plain == [7] * 6 and penalised[:3] == [7, 8, 9]


def test_the_bench_long_prompt_is_a_whole_chat_turn_of_the_asked_length(tokenizer):
    from sleep_engine.lab.speed import long_prompt_ids
    for n in (300, 1000):
        ids = long_prompt_ids(tokenizer, n)
        assert len(ids) == n
        assert tokenizer.decode(ids[-5:]).endswith("<|im_start|>assistant\n")   # the template is whole

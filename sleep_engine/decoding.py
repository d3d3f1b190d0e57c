"""Token-by-token generation for Wake: a preallocated KV cache and a short decode step.

For Llama-family models (llama, mistral, qwen2) the step below calls the model's own modules
(so quantized base layers and MemoryMLPs run as they are) but skips transformers' generic
forward machinery; with batch 1 that machinery costs as much as the arithmetic. Other models use
their transformers forward with a DynamicCache. Both give the same tokens (tests/test_decoding).
"""
from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import RepetitionPenaltyLogitsProcessor

from . import kernels
from .backbone import QuantLinear, bf16_many_rows, native_bf16
from .memory import MemoryMLP

FAST_MODEL_TYPES = ("llama", "mistral", "qwen2")
_KERNELS = kernels.load() if kernels.supported() else None
_BF16_KERNELS = _KERNELS is not None and _KERNELS.bf16_dot_supported()   # AVX512-BF16, and built with it
_EMPTY = torch.empty(0)


def _fuse(linears: list[nn.Module]) -> nn.Module | None:
    """One linear layer computing all `linears` on the same input in one matmul, or None."""
    if all(isinstance(m, QuantLinear) for m in linears) and len({m.mode for m in linears}) == 1:
        return QuantLinear.concat(linears)
    if all(type(m) is nn.Linear for m in linears):
        w = torch.cat([m.weight for m in linears])
        fused = torch.nn.utils.skip_init(nn.Linear, w.shape[1], w.shape[0], bias=any(m.bias is not None for m in linears),
                                         device=w.device, dtype=w.dtype)
        fused.weight = nn.Parameter(w, requires_grad=False)
        if fused.bias is not None:
            fused.bias = nn.Parameter(torch.cat([m.bias if m.bias is not None else
                                                 torch.zeros(m.out_features, dtype=w.dtype, device=w.device) for m in linears]),
                                      requires_grad=False)
        return fused
    return None


def _kernel_weight(linear: nn.Module) -> list[torch.Tensor] | None:
    """The tensors the compiled decode step reads for one linear layer (bias last, empty when
    there is none), or None where it cannot read this kind of layer."""
    if isinstance(linear, QuantLinear):
        return linear.kernel_tensors()
    if type(linear) is nn.Linear and linear.weight.dtype == torch.float32:
        bias = linear.bias if linear.bias is not None else torch.empty(0)
        return [linear.weight.detach().contiguous(), bias.detach().float().contiguous()]
    return None


class _Layer:
    """What one decoder layer needs per step, resolved once: fused projections and norms."""

    def __init__(self, layer: nn.Module):
        a, mlp = layer.self_attn, layer.mlp
        self.qkv = _fuse([a.q_proj, a.k_proj, a.v_proj])
        self.q, self.k, self.v, self.o = a.q_proj, a.k_proj, a.v_proj, a.o_proj
        self.norm1, self.norm2 = layer.input_layernorm, layer.post_attention_layernorm
        self.memory = mlp if isinstance(mlp, MemoryMLP) else None
        base = mlp.base if self.memory is not None else mlp
        self.gate_up = None
        if all(hasattr(base, n) for n in ("gate_proj", "up_proj", "down_proj")) and \
                getattr(base.act_fn, "__class__", type(None)).__name__ in ("SiLU", "SiLUActivation"):
            self.gate_up, self.down = _fuse([base.gate_proj, base.up_proj]), base.down_proj
            self.inter = base.gate_proj.out_features
        self.mlp_module = mlp
        self.fused_memory = None
        self.eps1, self.eps2 = (getattr(n, "variance_epsilon", getattr(n, "eps", 1e-6)) for n in (self.norm1, self.norm2))

    def add_to(self, plan) -> bool:
        """Hand this layer's weights to the compiled decode step; False where it cannot run it."""
        if self.qkv is None or self.gate_up is None or \
                any(n.weight.dtype != torch.float32 for n in (self.norm1, self.norm2)):
            return False
        weights = [_kernel_weight(m) for m in (self.qkv, self.o, self.gate_up, self.down)]
        if any(w is None for w in weights):
            return False
        qkv, o, gate_up, down = weights
        plan.add_layer(self.norm1.weight.detach(), self.eps1, qkv, o, self.norm2.weight.detach(), self.eps2, gate_up, down)
        return True


def _norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    if x.dtype == torch.float32:
        if _KERNELS is not None and x.shape[-1] % 8 == 0 and norm.weight.dtype == torch.float32:
            return _KERNELS.rms_norm(x, norm.weight, eps)   # 1 µs against F.rms_norm's 15 (60 per token)
        return F.rms_norm(x, (x.shape[-1],), norm.weight, eps)
    # LlamaRMSNorm's arithmetic: normalise in float32, cast, then scale
    return norm.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


class FastLlamaDecoder:
    """Batch-1 decoder with a static KV cache that remembers which tokens it holds, so a new
    chat turn only prefills what is new (the shared prefix is reused). `beside_work`: it decodes
    while other threads of the process compute (chat during a sleep), so its threads spin less."""

    # How long the compiled step's threads spin for the next loop before they sleep (pauses). Measured
    # on 2 cores, 100 tokens decoded in a thread (2026-12-04; `bench wake` rows lab_thread_… and
    # lab_beside_training_…): alone 2,048 → 137–146 tokens/s, 256 → 104–130; beside a 2-thread
    # training loop 2,048 → 35–38 (the spinner holds the core the trainer needs), 256 → 64–67 with
    # the trainer at 57–68 steps/s (torch's own threads: 59–72 tokens/s, trainer 52–60).
    PAUSES_ALONE, PAUSES_BESIDE_WORK = 2048, 256

    def __init__(self, lm: nn.Module, max_len: int, beside_work: bool = False, cuda_graphs: bool = True,
                 bf16_prompts: bool | None = None):
        """`bf16_prompts`: a prompt longer than the compiled step takes has its quantized layers
        multiplied in bfloat16 (`backbone.bf16_many_rows`), and its attention too where the lab's
        kernel runs (AVX512-BF16, head size 64); by default for a quantized base where the CPU
        multiplies bfloat16 natively (`backbone.native_bf16`): a model kept in float32
        (`--quantize none`) stays float32 throughout."""
        cfg = lm.config
        if bf16_prompts is None:
            bf16_prompts = native_bf16() and any(isinstance(m, QuantLinear) for m in lm.modules())
        self.bf16_prompts = bf16_prompts
        self.pauses = self.PAUSES_BESIDE_WORK if beside_work else self.PAUSES_ALONE
        self.lm, self.inner = lm, lm.model
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.max_len = max_len
        emb = self.inner.embed_tokens.weight
        self.dtype = emb.dtype
        self.layers = [_Layer(layer) for layer in self.inner.layers]
        with torch.no_grad():
            cos, sin = self.inner.rotary_emb(emb[:1, None].to(self.dtype), torch.arange(max_len, device=emb.device)[None])
        self.cos, self.sin = cos[0].to(self.dtype), sin[0].to(self.dtype)
        shape = (len(self.layers), 1, self.n_kv, max_len, self.head_dim)
        self.k = torch.zeros(shape, dtype=self.dtype, device=emb.device)
        self.v = torch.zeros(shape, dtype=self.dtype, device=emb.device)
        self.tokens: list[int] = []   # token ids whose keys/values are in the cache
        self.plan_ready = False
        # a long prompt's attention in bfloat16 dot products too (`attend_prompt_bf16`:
        # 5.0 against torch's 13.7 ms a layer at 1,000 tokens, 2026-12-06)
        self.bf16_attention = (self.bf16_prompts and _BF16_KERNELS
                               and self.head_dim == 64 and self.dtype == torch.float32 and emb.device.type == "cpu")
        self.plan = self._plan()
        self.one = self.plan is not None   # one token at a time through the compiled step
        self.graph = CudaGraphStep(self) if cuda_graphs and emb.device.type == "cuda" else None

    def _plan(self):
        """The compiled one-token step (sleep_engine/quant_matvec.cpp `DecodePlan`) over this
        model's weights, or None where it cannot run (no kernels, not float32 on the CPU, a
        layer of another shape): then `_step` does the same arithmetic with torch ops."""
        emb, norm = self.inner.embed_tokens.weight, self.inner.norm
        head = _kernel_weight(self.lm.lm_head)
        if (_KERNELS is None or self.dtype != torch.float32 or emb.device.type != "cpu" or head is None
                or norm.weight.dtype != torch.float32 or emb.shape[1] % 8 or self.head_dim % 2):
            return None
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
        plan = _KERNELS.DecodePlan(emb.detach().contiguous(), norm.weight.detach(), eps, head, self.k, self.v,
                                   self.cos.contiguous(), self.sin.contiguous(), self.n_heads)
        return plan if all(L.add_to(plan) for L in self.layers) else None

    @staticmethod
    def supports(lm: nn.Module) -> bool:
        cfg = getattr(lm, "config", None)
        if getattr(cfg, "model_type", None) not in FAST_MODEL_TYPES:
            return False
        attn = lm.model.layers[0].self_attn
        return all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) and \
            not hasattr(attn, "q_norm")

    def reset(self) -> None:
        self.tokens = []

    def begin(self) -> None:
        """Snapshot the memory weights for one generation (they cannot change mid-reply); if
        they changed since the last one, cached keys/values are stale and are dropped."""
        for i, L in enumerate(self.layers):
            if L.memory is not None:
                fused = L.memory.fused_weights(self.dtype)
                if fused is not L.fused_memory:
                    self.tokens = []
                L.fused_memory = fused
        if self.graph is not None:
            self.graph.refresh()
        self.plan_ready = self.plan is not None and all(self._set_plan_memory(i, L) for i, L in enumerate(self.layers))

    def _set_plan_memory(self, i: int, L: _Layer) -> bool:
        """Layer i's memory path into the compiled step; False where only torch can run it
        (a forced expert while dreaming, a top-k cut)."""
        fused = L.fused_memory
        if fused is None:
            self.plan.set_memory(i, _EMPTY, _EMPTY, _EMPTY, _EMPTY, 0, 0.0)
            return True
        w_in, b_gate, w_out, E, rank, expand, forced, _ = fused
        if forced is not None or (L.memory.top_k and E > L.memory.top_k) or w_in.dtype != torch.float32:
            return False
        self.plan.set_memory(i, w_in.detach().contiguous(), b_gate.detach().contiguous() if E else _EMPTY,
                             w_out.detach().contiguous(), expand, E, L.memory.gate_floor)
        return True

    # The compiled step takes up to this many tokens at once (a new token, or a short prompt);
    # longer prompts go through torch, whose float32 GEMM wins for many rows (README "Measured").
    PLAN_MAX_TOKENS = 64

    def _compiled_step(self, tokens: list[int], pos: int) -> torch.Tensor:
        """`tokens` at `pos`… through the compiled step; the last one's routing gates go to the traces."""
        logits, gates = self.plan.step(tokens, pos, self.pauses)
        for i, L in enumerate(self.layers):
            if L.memory is not None and L.memory.trace is not None:
                fused = L.fused_memory
                L.memory.trace.append(None if fused is None else gates[i, :fused[3]])
        return logits

    def _step(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        T = ids.shape[1]
        if self.one and self.plan_ready and T <= self.PLAN_MAX_TOKENS:
            return self._compiled_step(ids[0].tolist(), start)
        if self.graph is not None and T == 1:
            logits = self.graph(ids, start)
            if logits is not None:
                return logits
        with bf16_many_rows(self.bf16_prompts):
            return self._torch_step(ids, start)

    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Every position's next-token logits (T, vocab) for `token_ids` from an empty cache, by
        the path a long prompt takes: a perplexity of that path (`lab.speed.quality`)."""
        self.reset()
        with bf16_many_rows(self.bf16_prompts):
            logits = self._torch_step(torch.tensor([token_ids], device=self.k.device), 0, every_row=True)
        self.tokens = list(token_ids)
        return logits

    def _torch_step(self, ids: torch.Tensor, start: int, every_row: bool = False) -> torch.Tensor:
        T, end = ids.shape[1], start + ids.shape[1]
        H, KV, hd = self.n_heads, self.n_kv, self.head_dim
        x = self.inner.embed_tokens(ids)
        cos, sin = self.cos[start:end], self.sin[start:end]
        half = hd // 2
        # a prompt from the start is plain causal attention, which SDPA's CPU kernel does in half
        # the arithmetic; later chunks see the cached positions as well, under an explicit mask
        causal = T > 1 and start == 0
        mask = None if T == 1 or causal else torch.ones(T, end, dtype=torch.bool, device=ids.device).tril(start)
        # bfloat16 products (`bf16_many_rows`): the MLP's activations stay bfloat16 between its
        # two products, which then skip a cast each (~3 of ~38 ms a layer at 1,000 tokens)
        bf16_rows = self.bf16_prompts and T > QuantLinear.KERNEL_MAX_ROWS
        for i, L in enumerate(self.layers):
            h = _norm(L.norm1, x)
            if L.qkv is not None:
                qkv = L.qkv(h)
            else:
                qkv = torch.cat([L.q(h), L.k(h), L.v(h)], -1)
            qk = qkv[..., :(H + KV) * hd].view(1, T, H + KV, hd).transpose(1, 2)
            # rotary embedding on queries and keys at once
            qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), -1) * sin
            self.k[i, :, :, start:end] = qk[:, H:]
            self.v[i, :, :, start:end] = qkv[..., (H + KV) * hd:].view(1, T, KV, hd).transpose(1, 2)
            if bf16_rows and self.bf16_attention:   # out [T, H, hd]
                o = _KERNELS.attend_prompt_bf16(qk[0, :H], self.k[i, 0, :, :end], self.v[i, 0, :, :end], start)
            else:
                o = F.scaled_dot_product_attention(qk[:, :H], self.k[i, :, :, :end], self.v[i, :, :, :end],
                                                   attn_mask=mask, is_causal=causal, enable_gqa=KV != H).transpose(1, 2)
            x = x + L.o(o.reshape(1, T, H * hd))
            x = x + self._mlp(L, _norm(L.norm2, x), bf16_rows)
        if every_row:
            return self.lm.lm_head(_norm(self.inner.norm, x))[0].float()
        return self.lm.lm_head(_norm(self.inner.norm, x[:, -1:]))[:, -1].float()

    def static_step(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """`_step` for one token with every shape fixed, so a CUDA graph can record it: the token
        (1, 1) and its position (1,) are tensors, keys and values go in with `index_copy_`, and
        attention reads the whole cache under a mask of the positions up to `pos`."""
        H, KV, hd = self.n_heads, self.n_kv, self.head_dim
        x = self.inner.embed_tokens(token)
        cos, sin = self.cos.index_select(0, pos), self.sin.index_select(0, pos)
        mask = (torch.arange(self.max_len, device=pos.device) <= pos)[None, None, None]
        half = hd // 2
        for i, L in enumerate(self.layers):
            h = _norm(L.norm1, x)
            qkv = L.qkv(h) if L.qkv is not None else torch.cat([L.q(h), L.k(h), L.v(h)], -1)
            qk = qkv[..., :(H + KV) * hd].view(1, 1, H + KV, hd).transpose(1, 2)
            qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), -1) * sin
            self.k[i].index_copy_(2, pos, qk[:, H:])
            self.v[i].index_copy_(2, pos, qkv[..., (H + KV) * hd:].view(1, 1, KV, hd).transpose(1, 2))
            o = F.scaled_dot_product_attention(qk[:, :H], self.k[i], self.v[i], attn_mask=mask, enable_gqa=KV != H)
            x = x + L.o(o.transpose(1, 2).reshape(1, 1, H * hd))
            x = x + self._mlp(L, _norm(L.norm2, x))
        return self.lm.lm_head(_norm(self.inner.norm, x))[:, -1].float()

    @staticmethod
    def _mlp(L: _Layer, h: torch.Tensor, bf16: bool = False) -> torch.Tensor:
        """`bf16`: gate/up and down take bfloat16 activations where they are QuantLinear."""
        if L.gate_up is None:
            y = L.mlp_module(h)
            return y[0] if isinstance(y, tuple) else y
        low = bf16 and isinstance(L.gate_up, QuantLinear) and isinstance(L.down, QuantLinear)
        gate_up = L.gate_up(h.to(torch.bfloat16) if low else h)
        if low and _BF16_KERNELS:   # one pass, rounded once: ~35 ms of a 1,000-token prompt
            y = L.down(_KERNELS.silu_mul_bf16(gate_up))
        else:
            g, u = gate_up.split(L.inter, -1)
            y = L.down(F.silu(g) * u)
        if L.memory is not None:
            d = L.memory.delta(h, L.fused_memory)
            if d is not None:
                y = y + d
        return y

    def feed(self, token_ids: list[int]) -> torch.Tensor:
        """Make the cache hold exactly `token_ids`; return next-token logits (1, vocab)."""
        if len(token_ids) > self.max_len:
            raise ValueError(f"sequence of {len(token_ids)} tokens exceeds the cache ({self.max_len})")
        n = len(self.tokens)
        if n < len(token_ids) and token_ids[:n] == self.tokens:
            same = n   # the usual case: one more token than last time
        else:
            same, limit = 0, min(n, len(token_ids) - 1)  # always run at least one new token
            while same < limit and self.tokens[same] == token_ids[same]:
                same += 1
        logits = self._step(torch.tensor([token_ids[same:]], device=self.k.device), same)
        self.tokens = list(token_ids)
        return logits


class CudaGraphStep:
    """The one-token step replayed from a CUDA graph. A 135M model on a GPU is bound by kernel
    launches (~400 per token), not arithmetic (H200, 2026-11-26: 71 tokens/s with 6 experts
    through `_step`). The graph records `static_step` once and reads the memory path's weights by
    address: when they change with the same shapes (fast weights after a Wake update, experts after
    a sleep) `refresh` copies the new values in; anything else (an expert added or removed, a forced
    one) records it again. Routing gates are recorded into graph memory and copied to the traces."""

    def __init__(self, decoder: FastLlamaDecoder):
        self.dec = decoder
        dev = decoder.k.device
        self.token = torch.zeros(1, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.graph = None
        self.fused: list = []          # per layer, the memory tensors the graph reads
        self.logits = None
        self.gates: list = []          # per layer, the graph's gate tensor (None: no experts there)

    @staticmethod
    def _tensors(fused) -> list[torch.Tensor]:
        return [] if fused is None else [t for t in fused[:3] if t is not None]

    def refresh(self) -> None:
        """Take the layers' current memory weights (`FastLlamaDecoder.begin`)."""
        if self.graph is None:
            return
        now = [L.fused_memory for L in self.dec.layers]
        same = all((a is None) == (b is None) and (a is None or (a[3:5] == b[3:5] and a[6] == b[6] and
                   torch.equal(a[5], b[5]) and torch.equal(a[7], b[7]) and   # the same experts, gate floors
                   all(x.shape == y.shape for x, y in zip(a[:3], b[:3]))))
                   for a, b in zip(self.fused, now))
        if not same:
            self.graph = None
            return
        for a, b in zip(self.fused, now):
            for x, y in zip(self._tensors(a), self._tensors(b)):
                if x is not y:
                    x.copy_(y)

    def _record(self) -> None:
        layers = list(self.dec.layers)
        saved = [L.memory.trace if L.memory is not None else None for L in layers]
        traces = [[] for _ in layers]
        for L, t in zip(layers, traces):
            if L.memory is not None:
                L.memory.trace = t
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):   # warm-up outside the graph, as CUDA graphs require
                for _ in range(2):
                    self.dec.static_step(self.token, self.pos)
            torch.cuda.current_stream().wait_stream(side)
            for t in traces:
                t.clear()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.logits = self.dec.static_step(self.token, self.pos)
        finally:
            for L, t in zip(layers, saved):
                if L.memory is not None:
                    L.memory.trace = t
        self.gates = [t[-1] if t and t[-1] is not None and t[-1].numel() else None for t in traces]
        self.fused = [L.fused_memory for L in layers]
        self.graph = graph

    def __call__(self, ids: torch.Tensor, start: int) -> torch.Tensor | None:
        """The next-token logits, or None when the step cannot be recorded (the decoder then runs
        without a graph from here on)."""
        self.token.copy_(ids)
        self.pos.fill_(start)
        if self.graph is None:
            try:
                self._record()   # its warm-up already wrote this token's keys and values; replaying rewrites them
            except RuntimeError as e:   # a layer whose kernels cannot be recorded (a host sync, say)
                warnings.warn(f"decoding without a CUDA graph: {e}")
                self.dec.graph = None
                return None
        self.graph.replay()
        for L, g in zip(self.dec.layers, self.gates):
            if L.memory is not None and L.memory.trace is not None:
                L.memory.trace.append(None if g is None else g.clone())
        return self.logits.clone()


class HFDecoder:
    """Any causal LM through its own forward and a DynamicCache (no prefix reuse)."""

    def __init__(self, lm: nn.Module, max_len: int):
        self.lm, self.max_len = lm, max_len
        self.tokens: list[int] = []
        self.cache = None

    def reset(self) -> None:
        self.tokens, self.cache = [], None

    def begin(self) -> None:
        pass

    def feed(self, token_ids: list[int]) -> torch.Tensor:
        from transformers import DynamicCache
        dev = next(self.lm.parameters()).device
        n = len(self.tokens)
        if self.cache is None or token_ids[:n] != self.tokens or n >= len(token_ids):
            self.cache, n = DynamicCache(config=self.lm.config), 0
        out = self.lm(input_ids=torch.tensor([token_ids[n:]], device=dev), cache=self.cache, use_cache=True)
        self.tokens = list(token_ids)
        return out.logits[:, -1].float()


def make_decoder(lm: nn.Module, max_len: int, fast: bool = True, beside_work: bool = False, cuda_graphs: bool = True,
                 bf16_prompts: bool | None = None):
    if fast and FastLlamaDecoder.supports(lm):
        return FastLlamaDecoder(lm, max_len, beside_work, cuda_graphs, bf16_prompts)
    return HFDecoder(lm, max_len)


def stop_token_ids(tokenizer, lm) -> set[int]:
    ids = set()
    for v in (tokenizer.eos_token_id, getattr(getattr(lm, "generation_config", None), "eos_token_id", None)):
        ids.update(v if isinstance(v, (list, tuple)) else [v] if v is not None else [])
    for tok in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None and tid >= 0:
            ids.add(tid)
    return ids


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logits.argmax(-1))
    probs = torch.softmax(logits.float() / temperature, -1)[0]
    if top_p < 1.0:
        sorted_p, idx = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter_(0, idx[keep], sorted_p[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))   # the generator is a CPU one


@torch.inference_mode()
def generate_tokens(decoder, prompt_ids: list[int], max_new_tokens: int, stop_ids: set[int],
                    temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                    stop_event: threading.Event | None = None, repetition_penalty: float = 1.0) -> Iterator[int]:
    """Yield new token ids until a stop token, the budget, the cache end or `stop_event`.

    `repetition_penalty` θ > 1 is CTRL's (Keskar et al. 2019), on the reply's own tokens only: for
    each token t already in the reply, z_t ← z_t/θ if z_t > 0 else z_t·θ. The prompt is not
    counted (a question's names stay free to be answered with): transformers'
    RepetitionPenaltyLogitsProcessor with prompt_ignore_length, so `generate` can do the same."""
    gen = torch.Generator().manual_seed(seed) if temperature > 0 else None
    penalty = (RepetitionPenaltyLogitsProcessor(float(repetition_penalty), prompt_ignore_length=len(prompt_ids))
               if repetition_penalty != 1.0 else None)
    decoder.begin()
    seq = list(prompt_ids)
    for _ in range(min(max_new_tokens, decoder.max_len - len(seq))):
        if stop_event is not None and stop_event.is_set():
            return
        logits = decoder.feed(seq)
        if penalty is not None:
            logits = penalty(torch.tensor([seq], device=logits.device), logits)
        tok = sample_next(logits, temperature, top_p, gen)
        if tok in stop_ids:
            return
        seq.append(tok)
        yield tok

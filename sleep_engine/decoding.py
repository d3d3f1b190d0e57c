"""Token-by-token generation for Wake: a preallocated KV cache and a short decode step.

For Llama-family models (llama, mistral, qwen2) the step below calls the model's own modules
(so quantized base layers and MemoryMLPs run as they are) but skips transformers' generic
forward machinery; with batch 1 that machinery costs as much as the arithmetic. Other models use
their transformers forward with a DynamicCache. Both give the same tokens (tests/test_decoding).
"""
from __future__ import annotations

import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import RepetitionPenaltyLogitsProcessor

from . import kernels
from .memory import MemoryMLP

FAST_MODEL_TYPES = ("llama", "mistral", "qwen2")
_KERNELS = kernels.load() if kernels.supported() else None


def _fuse(linears: list[nn.Module]):
    """One callable computing all `linears` on the same input in one matmul, or None."""
    from .backbone import QuantLinear
    if all(isinstance(m, QuantLinear) for m in linears) and len({m.mode for m in linears}) == 1:
        return QuantLinear.concat(linears)
    if all(type(m) is nn.Linear for m in linears):
        w = torch.cat([m.weight for m in linears])
        b = None if all(m.bias is None for m in linears) else torch.cat(
            [m.bias if m.bias is not None else torch.zeros(m.out_features, dtype=w.dtype, device=w.device) for m in linears])
        return lambda x: F.linear(x, w, b)
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
        # the one-token path calls these on [1, d] float32 rows, past nn.Module and QuantLinear's
        # checks (~10 µs a call, 120 calls a token)
        self.eps1, self.eps2 = (getattr(n, "variance_epsilon", getattr(n, "eps", 1e-6)) for n in (self.norm1, self.norm2))
        self.one = (self.qkv is not None and self.gate_up is not None and
                    all(_row_fn(m) is not None for m in (self.qkv, self.o, self.gate_up, self.down)))
        if self.one:
            self.qkv_fn, self.o_fn, self.gate_up_fn, self.down_fn = (
                _row_fn(m) for m in (self.qkv, self.o, self.gate_up, self.down))


def _row_fn(linear):
    """x[m, in] → x·Wᵀ for a few float32 rows through the compiled kernels, or None."""
    from .backbone import QuantLinear
    if isinstance(linear, QuantLinear):
        return linear.rows_fn()
    if isinstance(linear, nn.Linear):
        return lambda x: F.linear(x, linear.weight, linear.bias)
    return linear if callable(linear) and not isinstance(linear, nn.Module) else None   # a _fuse of Linears


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
    chat turn only prefills what is new (the shared prefix is reused)."""

    def __init__(self, lm: nn.Module, max_len: int):
        cfg = lm.config
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
        self.one = (_KERNELS is not None and self.dtype == torch.float32 and emb.device.type == "cpu"
                    and all(L.one and L.norm1.weight.dtype == torch.float32 for L in self.layers)
                    and self.head_dim % 2 == 0 and self.inner.norm.weight.shape[0] % 8 == 0)

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
        for L in self.layers:
            if L.memory is not None:
                fused = L.memory.fused_weights(self.dtype)
                if fused is not L.fused_memory:
                    self.tokens = []
                L.fused_memory = fused

    def _step_one(self, token: int, pos: int) -> torch.Tensor:
        """One new token at `pos` through the compiled kernels (sleep_engine/quant_matvec.cpp):
        the same arithmetic as `_step`, ~5 calls per layer instead of ~40 small ops."""
        K, H = _KERNELS, self.n_heads
        x = self.inner.embed_tokens.weight[token].view(1, -1)
        cos, sin = self.cos[pos], self.sin[pos]
        for i, L in enumerate(self.layers):
            qkv = L.qkv_fn(K.rms_norm(x, L.norm1.weight, L.eps1))
            x = x + L.o_fn(K.attend_one(qkv.view(-1), self.k[i, 0], self.v[i, 0], cos, sin, H, pos).view(1, -1))
            h = K.rms_norm(x, L.norm2.weight, L.eps2)
            g, u = L.gate_up_fn(h).split(L.inter, -1)
            y = L.down_fn(F.silu(g) * u)
            if L.memory is not None:
                d = L.memory.delta(h, L.fused_memory)
                if d is not None:
                    y = y + d
            x = x + y
        return self.lm.lm_head(_norm(self.inner.norm, x)).float()

    def _step(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        T, end = ids.shape[1], start + ids.shape[1]
        if T == 1 and self.one:
            return self._step_one(int(ids[0, 0]), start)
        H, KV, hd = self.n_heads, self.n_kv, self.head_dim
        x = self.inner.embed_tokens(ids)
        cos, sin = self.cos[start:end], self.sin[start:end]
        half = hd // 2
        mask = None if T == 1 else torch.ones(T, end, dtype=torch.bool, device=ids.device).tril(start)
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
            o = F.scaled_dot_product_attention(qk[:, :H], self.k[i, :, :, :end], self.v[i, :, :, :end],
                                               attn_mask=mask, enable_gqa=KV != H)
            x = x + L.o(o.transpose(1, 2).reshape(1, T, H * hd))
            x = x + self._mlp(L, _norm(L.norm2, x))
        return self.lm.lm_head(_norm(self.inner.norm, x[:, -1:]))[:, -1].float()

    @staticmethod
    def _mlp(L: _Layer, h: torch.Tensor) -> torch.Tensor:
        if L.gate_up is None:
            y = L.mlp_module(h)
            return y[0] if isinstance(y, tuple) else y
        g, u = L.gate_up(h).split(L.inter, -1)
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


def make_decoder(lm: nn.Module, max_len: int, fast: bool = True):
    return FastLlamaDecoder(lm, max_len) if fast and FastLlamaDecoder.supports(lm) else HFDecoder(lm, max_len)


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

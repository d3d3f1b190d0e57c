"""The losses of knowledge seeding, as small pure functions."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def generalized_jsd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                         mask: torch.Tensor | None = None, beta: float = 0.0,
                         temperature: float = 1.0) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence per token, averaged over the masked tokens (GKD).

        M     = (1−β)·p_s + β·p_t
        JSD_β = β·KL(p_t ‖ M) + (1−β)·KL(p_s ‖ M)
        β = 0 → KL(p_t ‖ p_s)   (forward KL)        β = 1 → KL(p_s ‖ p_t)   (reverse KL)

    Same definition as TRL's `GKDTrainer.generalized_jsd_loss`. Logits: (..., vocab); mask: (...)
    with 1 for tokens that count.
    """
    s = F.log_softmax(student_logits.float() / temperature, -1)
    t = F.log_softmax(teacher_logits.float() / temperature, -1)
    if beta == 0:
        per_token = (t.exp() * (t - s)).sum(-1)
    elif beta == 1:
        per_token = (s.exp() * (s - t)).sum(-1)
    else:
        m = torch.logsumexp(torch.stack([s + math.log(1 - beta), t + math.log(beta)]), 0)
        per_token = beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def sequence_logprob(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_t log p(target_t) over masked positions, per sequence. logits[:, t] predicts targets[:, t]."""
    lp = torch.gather(F.log_softmax(logits.float(), -1), -1, targets.unsqueeze(-1)).squeeze(-1)
    return (lp * mask).sum(-1)


def group_policy_gradient_loss(logprobs: torch.Tensor, rewards: torch.Tensor, lengths: torch.Tensor,
                               group_size: int) -> torch.Tensor:
    """REINFORCE with a group baseline (as in GRPO/RLOO without clipping):

        A_i = r_i − mean(r over the completions of the same prefix)
        loss = − mean_i  A_i · log p(completion_i) / |completion_i|

    `logprobs`, `rewards`, `lengths`: (n_prefixes · group_size,), grouped consecutively."""
    r = rewards.view(-1, group_size)
    advantage = (r - r.mean(-1, keepdim=True)).reshape(-1).to(logprobs.dtype)
    return -(advantage * logprobs / lengths.clamp(min=1).to(logprobs.dtype)).mean()


def weighted_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy with a weight per predicted token (test-time learning of tier 1):

        loss = Σ_t w_t · (−log p(x_t | x_<t)) / Σ_t w_t          (t ≥ 1; logits[:, t−1] predict x_t)

    `weights` (batch, seq) holds w_t for the token at position t: 1 for what the user brought,
    a small weight for the model's own reply, 0 for template tokens and padding."""
    lp = F.log_softmax(logits[:, :-1].float(), -1)
    nll = -torch.gather(lp, -1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    w = weights[:, 1:].to(nll.dtype)
    return (nll * w).sum() / w.sum().clamp(min=1e-8)


def gate_closing_loss(z_keep: torch.Tensor, p_keep: torch.Tensor, z_close: torch.Tensor) -> torch.Tensor:
    """An older expert's gate shut on a new sleep's inputs and left as it was elsewhere:

        loss = ½ · mean_keep BCE(σ(z), p⁰) + ½ · mean_close BCE(σ(z), 0)

    z: the gate's logits on the tokens to keep (whose probabilities before were p⁰, a soft
    target: BCE(σ(z), p⁰) is least at z = logit p⁰) and on the tokens to close. Either part is
    left out when it has no tokens."""
    parts = []
    if z_keep.numel():
        parts.append(F.binary_cross_entropy_with_logits(z_keep, p_keep))
    if z_close.numel():
        parts.append(F.binary_cross_entropy_with_logits(z_close, torch.zeros_like(z_close)))
    return sum(parts) / len(parts) if parts else z_keep.sum() * 0

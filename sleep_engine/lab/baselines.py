"""LoRA baselines (PEFT on the float32 base): passage SFT, SEAL-style SFT on self-written
implications, sequential SFT and EWC.

One PEFT-wrapped model serves all of them; `reset()` puts the adapter back to its seeded initial
weights (B = 0, so the model is exactly the base model again) and clears the EWC memory.
"""
from __future__ import annotations

import random
import time
import warnings

import torch

from ..sampling import chat_ids, generate_batch

# SEAL's self-edit prompt for knowledge incorporation ("implications" of the passage)
IMPLICATIONS_PROMPT = ("Let's read the following passage and produce a list of implications derived directly or "
                       "indirectly from the content.\n\nPassage:\n{title}\n{passage}\n\nImplications:")


class LoraTrainer:
    def __init__(self, model, tokenizer, exp, seed: int = 0):
        from peft import LoraConfig, get_peft_model
        self.tok, self.exp, self.seed = tokenizer, exp, seed
        torch.manual_seed(seed)
        lcfg = LoraConfig(r=exp.lora_rank, lora_alpha=exp.lora_alpha, lora_dropout=exp.lora_dropout,
                          target_modules=list(exp.lora_targets), bias="none", task_type="CAUSAL_LM")
        with warnings.catch_warnings():   # peft calls a transformers API deprecated for v6
            warnings.simplefilter("ignore", FutureWarning)
            self.lm = get_peft_model(model, lcfg)
        self.lm.eval()
        self.params = [p for p in self.lm.parameters() if p.requires_grad]
        self.initial = [p.detach().clone() for p in self.params]
        self.fisher: list[torch.Tensor] | None = None
        self.anchor: list[torch.Tensor] | None = None
        self.ewc_lambda = 0.0

    def reset(self) -> None:
        with torch.no_grad():
            for p, p0 in zip(self.params, self.initial):
                p.copy_(p0)
        self.fisher = self.anchor = None

    def _loss(self, texts: list[str]) -> torch.Tensor:
        """Mean LM loss over the tokens of a batch of raw texts (right-padded, pads masked)."""
        eos = self.tok.eos_token or ""
        enc = self.tok([t + eos for t in texts], return_tensors="pt", padding=True, padding_side="right",
                       truncation=True, max_length=512)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        return self.lm(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels).loss

    def _penalty(self) -> torch.Tensor | None:
        """EWC: (λ/2)·mean_i F̂_i (θ_i − θ*_i)² with F̂ the mean-normalised diagonal Fisher."""
        if not self.ewc_lambda or self.fisher is None:
            return None
        total = sum(((p - a) ** 2 * f).sum() for p, a, f in zip(self.params, self.anchor, self.fisher))
        return 0.5 * self.ewc_lambda * total / sum(p.numel() for p in self.params)

    def train(self, texts: list[str], epochs: int, on_epoch=None, rng_seed: int | None = None,
              lr: float | None = None) -> dict:
        """AdamW at `lr` (default `exp.sft_lr`: the learner passes its own, which a frontier point
        sets), `epochs` passes over `texts` in a seeded shuffled order, `exp.sft_batch` texts per
        step. `on_epoch(epoch, train_s)` runs outside the timed region (time-to-accuracy curve)."""
        lr = self.exp.sft_lr if lr is None else lr
        opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)
        rng = random.Random(self.seed if rng_seed is None else rng_seed)
        self.lm.train()
        train_s, losses, penalties = 0.0, [], []
        try:
            for epoch in range(1, epochs + 1):
                order = list(texts)
                rng.shuffle(order)
                t0 = time.perf_counter()
                bs = self.exp.sft_batch
                for i in range(0, len(order), bs):
                    loss = self._loss(order[i:i + bs])
                    pen = self._penalty()
                    total = loss if pen is None else loss + pen
                    opt.zero_grad(set_to_none=True)
                    total.backward()
                    opt.step()
                    losses.append(loss.item())
                    if pen is not None:
                        penalties.append(pen.item())
                train_s += time.perf_counter() - t0
                if on_epoch is not None:
                    self.lm.eval()
                    on_epoch(epoch, train_s)
                    self.lm.train()
        finally:
            self.lm.eval()
        out = {"epochs": epochs, "lr": lr, "steps": len(losses), "train_s": round(train_s, 2),
               "loss_first": losses[0] if losses else None,
               "loss_last": losses[-1] if losses else None}
        if penalties:
            out["ewc_penalty_max"] = max(penalties)
        return out

    def consolidate_fisher(self, texts: list[str]) -> float:
        """After an episode: add its (mean-normalised) empirical Fisher and move the anchor here."""
        t0 = time.perf_counter()
        grads = [torch.zeros_like(p) for p in self.params]
        for text in texts:
            self.lm.zero_grad(set_to_none=True)
            self._loss([text]).backward()
            for g, p in zip(grads, self.params):
                if p.grad is not None:
                    g += p.grad.detach() ** 2
        self.lm.zero_grad(set_to_none=True)
        mean = sum(float(g.sum()) for g in grads) / sum(g.numel() for g in grads)
        fisher = [g / max(mean, 1e-30) for g in grads]
        self.fisher = fisher if self.fisher is None else [a + b for a, b in zip(self.fisher, fisher)]
        self.anchor = [p.detach().clone() for p in self.params]
        return time.perf_counter() - t0

    @torch.no_grad()
    def implications(self, passages, edits: int, tokens: int, temperature: float, seed: int) -> dict[str, list[str]]:
        """SEAL self-edits: the current (base) model lists implications of each passage; each
        non-empty line becomes one training sequence."""
        prompts, owners = [], []
        for p in passages:
            for _ in range(edits):
                prompts.append(chat_ids(self.tok, IMPLICATIONS_PROMPT.format(title=p.title, passage=p.text)))
                owners.append(p.id)
        outs = generate_batch(self.lm, self.tok, prompts, tokens, temperature=temperature, top_p=1.0, seed=seed)
        lines: dict[str, list[str]] = {p.id: [] for p in passages}
        for pid, ids in zip(owners, outs):
            text = self.tok.decode(ids, skip_special_tokens=True)
            lines[pid] += [ln.strip(" -*•\t") for ln in text.splitlines() if len(ln.strip(" -*•\t0123456789.")) > 8]
        return lines

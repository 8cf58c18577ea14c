"""Preference training: DPO (sigmoid), IPO, hinge, SimPO and ORPO as one training method.

A batch holds whole pairs (chatkit.data.collate_pairs): each pair's chosen and rejected sequences are
two documents of one row, so a packed row of several pairs gives the same log-probabilities as one
pair per row. A reply's log-probability is the sum over its scored tokens (the reply and its end of
turn, the template's labels); per-token averages are that sum over the same tokens.

The losses are written as TRL 1.16 writes them, and tests compare against TRL itself:
- sigmoid (DPO), hinge, ipo: `trl/trainer/dpo_trainer.py` `_compute_loss` (IPO on log-ratios
  averaged per reply token, as TRL does after checking with the IPO authors);
- simpo: `trl/experimental/cpo/cpo_trainer.py` `cpo_loss` with loss_type="simpo", cpo_alpha=0
  (averaged log-probabilities, no reference, margin `simpo_gamma`);
- orpo: `trl/experimental/orpo/orpo_trainer.py` `odds_ratio_loss`, plus the chosen reply's NLL. Our
  NLL is averaged per pair over the reply's scored tokens (the template's labels, as everywhere in
  chatkit); TRL's `concatenated_forward` averages over every non-padding token of its chosen rows,
  prompt included, so the two agree when prompts are one token and chosen replies are of equal length
  (tests/test_trl_parity.py compares there).

The reference model of DPO, IPO and hinge is the model before training: its log-probabilities are
computed once (`chatkit.train.reference`), so no second model is held in memory. With LoRA the model
before training is the base with zero-initialised adapters, which is what disabling the adapters
gives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from chatkit.tokenization import IGNORE_INDEX
from chatkit.train.loss import Output

Batch = dict[str, torch.Tensor]

LOSSES = ("sigmoid", "ipo", "hinge", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")
STATS = (
    "reward_accuracy",
    "reward_margin",
    "chosen_reward",
    "rejected_reward",
    "chosen_logps",
    "rejected_logps",
)
"""Per-pair means logged beside the loss: accuracy is the share of pairs whose chosen reward is above
the rejected one; log-probabilities are summed over each reply's tokens."""


@dataclass(frozen=True)
class PreferenceLoss:
    kind: str = "sigmoid"
    beta: float = 0.1
    simpo_gamma: float = 0.5

    @property
    def needs_reference(self) -> bool:
        return self.kind not in REFERENCE_FREE


def sequence_logps(output: Output, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities and scored-token counts of every sequence, (2P,) each, in
    `sequence_ids` order (pair k's chosen at 2k, rejected at 2k+1). From the logits, at most one
    (B, T, V) float tensor is formed, as for the supervised loss; from hidden states, none."""
    return sequence_sums(output.token_logps(batch["labels"]), batch)


def sequence_sums(token_logps: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logps` from per-position log-probabilities (B, T-1) already taken."""
    scored = batch["labels"][:, 1:] != IGNORE_INDEX
    seq = batch["sequence_ids"][:, 1:][scored]
    n = 2 * batch["pair_weight"].numel()
    sums = torch.zeros(n, dtype=token_logps.dtype, device=token_logps.device).index_add(
        0, seq, token_logps[scored]
    )
    counts = torch.zeros(n, dtype=token_logps.dtype, device=token_logps.device).index_add(
        0, seq, torch.ones_like(seq, dtype=token_logps.dtype)
    )
    return sums, counts


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (as TRL's ORPO computes it)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def pair_losses(
    loss: PreferenceLoss, logps: torch.Tensor, counts: torch.Tensor, reference: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards), (P,) each, from summed sequence logps."""
    chosen, rejected = logps[0::2], logps[1::2]
    n_c, n_r = counts[0::2].clamp(min=1), counts[1::2].clamp(min=1)
    beta = loss.beta
    if loss.kind in ("simpo", "orpo"):
        avg_c, avg_r = chosen / n_c, rejected / n_r
        if loss.kind == "simpo":
            losses = -F.logsigmoid(beta * (avg_c - avg_r) - loss.simpo_gamma)
        else:
            log_odds = (avg_c - avg_r) - (log1mexp(avg_c) - log1mexp(avg_r))
            losses = -avg_c - beta * F.logsigmoid(log_odds)
        return losses, beta * avg_c.detach(), beta * avg_r.detach()
    ref = reference.to(logps.dtype)
    ratio_c, ratio_r = chosen - ref[:, 0], rejected - ref[:, 1]
    delta = ratio_c - ratio_r
    if loss.kind == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif loss.kind == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss.kind == "ipo":
        losses = (ratio_c / n_c - ratio_r / n_r - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown preference loss {loss.kind!r}; known: {', '.join(LOSSES)}")
    return losses, beta * ratio_c.detach(), beta * ratio_r.detach()


def preference_loss(loss: PreferenceLoss, output: Output, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's summed pair loss and its summed statistics (STATS order); filler pairs add nothing."""
    logps, counts = sequence_logps(output, batch)
    losses, r_c, r_r = pair_losses(loss, logps, counts, batch["reference"])
    w = batch["pair_weight"].to(losses.dtype)
    stats = torch.stack(
        [
            ((r_c > r_r).to(w.dtype) * w).sum(),
            ((r_c - r_r) * w).sum(),
            (r_c * w).sum(),
            (r_r * w).sum(),
            (logps[0::2].detach() * w).sum(),
            (logps[1::2].detach() * w).sum(),
        ]
    )
    return (losses * w).sum(), stats


def pair_count(batch: Batch) -> int:
    """The pairs the loss is averaged over (filler pairs excluded)."""
    return int(batch["pair_weight"].sum())

"""What a step optimises (train.objective): next-token SFT, or a preference loss on {prompt, chosen, rejected} pairs.

A preference batch holds 2B rows, TRL's layout: the B chosen completions, then the B rejected ones, each after
its prompt, whose tokens are labelled IGNORE (aletheia_ds.data collates pairs so). The losses and their knobs are
TRL's, so that a run can be checked against it (tests/unit/test_objectives.py does, to 1e-5):

  dpo    DPOTrainer, loss_type "sigmoid": -logsigmoid(beta x ((pi_c - ref_c) - (pi_r - ref_r))) with summed
         completion log-probs; the reference is the base model with the adapters disabled; rewards are
         beta x (pi - ref).
  simpo  CPOTrainer, loss_type "simpo" (reference-free): -logsigmoid(beta x (avg_c - avg_r) - simpo_gamma) with
         per-token mean log-probs, plus cpo_alpha x the chosen rows' NLL (0: plain SimPO); rewards beta x avg.

Pure torch: no DeepSpeed, no distributed calls (the train loop sums the statistics over ranks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

IGNORE = -100  # aletheia_ds.data.IGNORE; repeated so that this module imports torch only
OBJECTIVES = ("sft", "dpo", "simpo")


@dataclass(frozen=True)
class SequenceLogps:
    """Per row: the sum of the completion tokens' log-probabilities and how many tokens that is."""

    total: torch.Tensor  # (rows,)
    tokens: torch.Tensor  # (rows,)

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.tokens.clamp(min=1)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> SequenceLogps:
    """log p(label_t | tokens < t) summed over each row's labelled positions, in float32.

    Row by row, so that the float32 copy of the logits is one row's (rows x seq x vocab at once is what makes
    preference steps run out of memory at large vocabularies).
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE
    totals = []
    for row_logits, row_targets, row_mask in zip(logits[:, :-1], targets, mask):
        row = row_logits.float()
        picked = row.gather(-1, row_targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        totals.append(((picked - torch.logsumexp(row, dim=-1)) * row_mask).sum())
    return SequenceLogps(torch.stack(totals), mask.sum(dim=1))


@dataclass
class PreferenceOutput:
    """A preference micro-batch's loss (mean over its pairs) and per-pair rewards (detached)."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor  # (pairs,)
    rejected_rewards: torch.Tensor  # (pairs,)

    def sums(self) -> torch.Tensor:
        """[pairs, sum of chosen rewards, sum of rejected rewards, pairs ranked right] (float64): summable over
        micro-batches and ranks; `reward_metrics` turns the totals into the logged means."""
        return torch.stack(
            [
                torch.tensor(float(self.chosen_rewards.numel()), dtype=torch.float64, device=self.loss.device),
                self.chosen_rewards.double().sum(),
                self.rejected_rewards.double().sum(),
                (self.chosen_rewards > self.rejected_rewards).double().sum(),
            ]
        )


def reward_metrics(sums: torch.Tensor) -> dict[str, float]:
    """metrics.jsonl's reward fields from summed `PreferenceOutput.sums()` (TRL's rewards/* means)."""
    pairs, chosen, rejected, right = (float(v) for v in sums)
    if pairs == 0:
        return {}
    return {
        "reward_chosen": chosen / pairs,
        "reward_rejected": rejected / pairs,
        "reward_margin": (chosen - rejected) / pairs,
        "reward_accuracy": right / pairs,
    }


def dpo_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair sigmoid DPO losses and the chosen/rejected rewards, from summed completion log-probs."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def simpo_loss(
    chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, beta: float, gamma: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair SimPO losses and rewards, from per-token mean completion log-probs (no reference)."""
    losses = -F.logsigmoid(beta * (chosen_mean - rejected_mean - gamma / beta))
    return losses, beta * chosen_mean.detach(), beta * rejected_mean.detach()


@dataclass(frozen=True)
class Objective:
    """train.objective with its knobs (TRL's names: beta, simpo_gamma, cpo_alpha)."""

    name: str = "sft"
    beta: float = 0.1
    simpo_gamma: float = 0.5
    cpo_alpha: float = 0.0

    @classmethod
    def from_train(cls, train) -> "Objective":
        return cls(train.objective, train.beta, train.simpo_gamma, train.cpo_alpha)

    @property
    def preference(self) -> bool:
        return self.name != "sft"

    @property
    def uses_reference(self) -> bool:
        return self.name == "dpo"

    def start_loss(self, model, batch: dict) -> torch.Tensor:
        """The loss the probe measures, before any adapter exists: the policy is then the reference, so the
        reference log-probs are the policy's own, detached (the same value as a second pass, and the gradient
        DPO starts from: beta/2 x the gradient of log p(rejected) - log p(chosen)). SFT: the token loss."""
        if not self.preference:
            return model(**batch, use_cache=False).loss
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        logits = model(**inputs, use_cache=False).logits
        reference = sequence_logps(logits.detach(), batch["labels"]) if self.uses_reference else None
        return self.loss(logits, batch["labels"], reference).loss

    def loss(
        self, logits: torch.Tensor, labels: torch.Tensor, reference: Optional[SequenceLogps] = None
    ) -> PreferenceOutput:
        """The preference loss of a 2B-row batch's policy logits; `reference`: the reference model's
        log-probs of the same rows (DPO). At the start of training, when the policy is the reference, the
        probe passes the policy's own log-probs detached: same value, and the gradient DPO starts from."""
        policy = sequence_logps(logits, labels)
        pairs = labels.shape[0] // 2
        if self.name == "dpo":
            if reference is None:
                raise ValueError("dpo: the reference model's log-probabilities are needed")
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                policy.total[:pairs],
                policy.total[pairs:],
                reference.total[:pairs],
                reference.total[pairs:],
                self.beta,
            )
            return PreferenceOutput(losses.mean(), chosen_rewards, rejected_rewards)
        if self.name == "simpo":
            mean = policy.mean
            losses, chosen_rewards, rejected_rewards = simpo_loss(
                mean[:pairs], mean[pairs:], self.beta, self.simpo_gamma
            )
            loss = losses.mean()
            if self.cpo_alpha:
                # the chosen rows' mean token NLL (CPO's behaviour-cloning term)
                loss = loss - self.cpo_alpha * policy.total[:pairs].sum() / policy.tokens[:pairs].sum().clamp(min=1)
            return PreferenceOutput(loss, chosen_rewards, rejected_rewards)
        raise ValueError(f"objective {self.name!r} is not a preference objective")


def router_aux_loss_coef(model_config, requested: Optional[float]) -> float:
    """The weight of a mixture-of-experts model's router load-balancing loss in the training loss (0: none).

    As TRL's trainers decide it: a model whose config has `output_router_logits` returns that loss when asked;
    `requested` None takes the architecture's own `router_aux_loss_coef`. Asking for a weight on a model without
    one is a configuration error (raised as ValueError; the caller names the field)."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    if not hasattr(text, "output_router_logits"):
        if requested:
            raise ValueError(
                f"{getattr(text, 'model_type', 'this model')} is not a mixture-of-experts model with a router "
                "load-balancing loss; leave train.router_aux_loss_coef unset"
            )
        return 0.0
    if requested is not None:
        return float(requested)
    return float(getattr(text, "router_aux_loss_coef", 0.0) or 0.0)

"""Preference losses on sequence log-probs: DPO (sigmoid), IPO and hinge, with TRL's metrics.

Inputs are per pair: the policy's and the reference's summed log-probs of the chosen and the
rejected answer (response tokens only) and each answer's number of response tokens. With
h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)):
- sigmoid (DPO, Rafailov et al. 2023): -log sigmoid(beta h); with label smoothing e
  (conservative DPO: a label is wrong with probability e) -(1-e) log sigmoid(beta h) - e log sigmoid(-beta h).
- ipo (Azar et al. 2023): (h' - 1 / (2 beta))^2, where h' uses per-token *mean* log-ratios (each
  side's log-ratio divided by its response length), as TRL computes it (agreed with the authors).
- hinge (SLiC, Zhao et al. 2023): max(0, 1 - beta h).
The loss is the mean over pairs. Metrics carry TRL DPOTrainer's names and definitions:
rewards/chosen = mean beta (log pi(y_w) - log ref(y_w)), likewise rewards/rejected;
rewards/accuracies = share of pairs with chosen reward > rejected reward; rewards/margins = mean
difference; logps/chosen, logps/rejected = mean policy sequence log-probs.

Functions return *sums* over pairs: the step divides by the global pair count once, so the value
does not depend on how the batch is split (as the SFT loss, train/step.py).
Not here: computing log-probs (preference_step.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from alpaca_jax.config import PreferenceConfig

METRIC_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected")


def pair_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, len_chosen, len_rejected,
                cfg: PreferenceConfig) -> jax.Array:
    """Per-pair loss, any shape; lengths are response-token counts (>= 1 for a real pair)."""
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    if cfg.loss == "ipo":
        delta = chosen_ratio / jnp.maximum(len_chosen, 1) - rejected_ratio / jnp.maximum(len_rejected, 1)
        return (delta - 1 / (2 * cfg.beta)) ** 2
    logits = cfg.beta * (chosen_ratio - rejected_ratio)
    if cfg.loss == "hinge":
        return jax.nn.relu(1 - logits)
    smoothing = cfg.label_smoothing
    return -(1 - smoothing) * jax.nn.log_sigmoid(logits) - smoothing * jax.nn.log_sigmoid(-logits)


def pair_metric_sums(policy_chosen, policy_rejected, ref_chosen, ref_rejected, valid,
                     beta: float) -> dict[str, jax.Array]:
    """Sums over the valid pairs of each TRL metric's per-pair value (divide by the pair count)."""
    chosen_reward = beta * jax.lax.stop_gradient(policy_chosen - ref_chosen)
    rejected_reward = beta * jax.lax.stop_gradient(policy_rejected - ref_rejected)
    per_pair = {
        "rewards/chosen": chosen_reward,
        "rewards/rejected": rejected_reward,
        "rewards/accuracies": (chosen_reward > rejected_reward).astype(jnp.float32),
        "rewards/margins": chosen_reward - rejected_reward,
        "logps/chosen": jax.lax.stop_gradient(policy_chosen),
        "logps/rejected": jax.lax.stop_gradient(policy_rejected),
    }
    return {name: jnp.sum(value * valid) for name, value in per_pair.items()}

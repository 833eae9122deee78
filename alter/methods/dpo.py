"""DPO for unlearning (Rafailov et al., 2023; as an unlearning baseline, Maini et al., 2024,
TOFU): the preferred answer y_w (an alternate answer: "I don't know" for ``idk_dpo``) over
the forget answer y_l for the same question, against the starting model, plus the retain NLL.

    loss = gamma * -(2/beta) mean_i log sigmoid(beta * (log pi(y_w|x)/pi_ref(y_w|x) - log pi(y_l|x)/pi_ref(y_l|x)))
           + alpha * NLL(retain)
"""
import torch

from alter.methods.losses import npo_loss


def dpo_loss(win_logprob: torch.Tensor, win_ref: torch.Tensor, lose_logprob: torch.Tensor,
             lose_ref: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO's term (scaled by 2/beta as open-unlearning's), a mean over samples. Each
    argument a ``[B]`` sequence log-probability (the references without gradient). NPO is
    its case without a preferred answer: ``npo_loss`` of the log-ratios."""
    return npo_loss(lose_logprob - lose_ref, win_logprob - win_ref, beta)

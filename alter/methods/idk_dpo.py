"""IdkDPO (Maini et al., 2024, TOFU; open-unlearning's DPO on TOFU_QA_forget_idk,
configs/experiment/unlearn/tofu/idk.yaml): DPO whose preferred answer to each forget
question is an "I don't know" (:data:`alter.data.idk.IDK_ANSWERS`).

One answer is drawn per question, seeded by the run's seed, for the whole run (its
reference log-probability is computed once); open-unlearning draws one afresh each time it
reads the row.
"""
import torch

from alter.data.idk import IDK_ANSWERS
from alter.methods import register
from alter.methods.dpo import DPO


@register
class IdkDPO(DPO):
    name = "idk_dpo"
    defaults = {"beta": 0.1, "alpha": 1.0, "gamma": 1.0}  # open-unlearning configs/trainer/DPO.yaml

    def preferred_answers(self, data) -> list[str]:
        generator = torch.Generator().manual_seed(self.args.seed)
        drawn = torch.randint(len(IDK_ANSWERS), (len(data),), generator=generator)
        return [IDK_ANSWERS[i] for i in drawn.tolist()]

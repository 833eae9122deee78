"""DPO for unlearning (Rafailov et al., 2023; as an unlearning baseline, Maini et al., 2024,
TOFU): the preferred answer y_w (an alternate answer: "I don't know" for ``idk_dpo``) over
the forget answer y_l for the same question, against the starting model, plus the retain NLL.

    loss = gamma * -(2/beta) mean_i log sigmoid(beta * (log pi(y_w|x)/pi_ref(y_w|x) - log pi(y_l|x)/pi_ref(y_l|x)))
           + alpha * NLL(retain)
"""
import torch

from alter.data import collate, encode_qa
from alter.methods import register
from alter.methods.base import Method
from alter.methods.data import base_model_pass, check_dataset, encode_dataset, reference_logprobs, with_fields
from alter.methods.losses import npo_loss, sequence_logprob
from alter.methods.retain import samples, with_retain_nll


def dpo_loss(win_logprob: torch.Tensor, win_ref: torch.Tensor, lose_logprob: torch.Tensor,
             lose_ref: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO's term (scaled by 2/beta as open-unlearning's), a mean over samples. Each
    argument a ``[B]`` sequence log-probability (the references without gradient). NPO is
    its case without a preferred answer: ``npo_loss`` of the log-ratios."""
    return npo_loss(lose_logprob - lose_ref, win_logprob - win_ref, beta)


@register
class DPO(Method):
    """The preferred answers come from the forget set's ``alternate_key`` column: by default
    TOFU's ``perturbed_answer`` (a list: its first, a plausible wrong answer; TOFU's
    ``*_perturbed`` configs and ``tofu_mini`` have it), or e.g. AltPO's generated
    ``alternate`` (open-unlearning community/methods/AltPO/run.sh, ``alternate_key=alternate``).
    The forget rows must be QA rows: a text row has no question to put the preferred answer
    after. Both answers' reference log-probabilities are computed once, in :meth:`prepare`."""

    name = "dpo"
    # open-unlearning configs/trainer/DPO.yaml (retain_loss_type NLL); alternate_key: the data's choice there
    defaults = {"beta": 0.1, "alpha": 1.0, "gamma": 1.0, "alternate_key": "perturbed_answer"}

    def preferred_answers(self, data) -> list[str]:
        key = self.hparams["alternate_key"]
        if key not in data.column_names:
            raise ValueError(f"{self.name} prefers an alternate answer to each forget answer: the forget set needs "
                             f"a {key!r} column (method_args alternate_key), it has {sorted(data.column_names)}")
        return [answer[0] if isinstance(answer, list) else answer for answer in data[key]]

    def encode(self, tokenizer, data, name, max_length):
        examples = encode_dataset(tokenizer, data, name, max_length)
        if name != "forget":
            return examples
        kinds = check_dataset(data, name)
        if "text" in kinds:
            raise ValueError(f"{self.name} needs QA rows in the forget set (forget[{kinds.index('text')}] is a text "
                             "row): the preferred answer follows the same question, and a text row has none")
        wins = [encode_qa(tokenizer, row["question"], answer, max_length)
                for row, answer in zip(data, self.preferred_answers(data))]
        return with_fields(examples, win=wins)

    def prepare(self, model, forget_examples, retain_examples, pad_id):
        self.pad_id = pad_id
        wins = [example["win"] for example in forget_examples]
        if self.parameters.adapter:  # the adapters' forwards read each token's entropy and the row's expert
            _, entropy = base_model_pass(model, wins, pad_id, self.config.tsallis_q, self.args.batch_size)
            wins = with_fields(wins, entropy=entropy, expert=[example["expert"] for example in forget_examples])
        win_ref = reference_logprobs(model, wins, pad_id, self.args.batch_size)
        lose_ref = reference_logprobs(model, forget_examples, pad_id, self.args.batch_size)
        return with_fields(forget_examples, win=wins, win_ref=win_ref, lose_ref=lose_ref), retain_examples

    def loss(self, model, forget, retain):
        hp = self.hparams
        win = collate(forget["win"], self.pad_id, device=forget["input_ids"].device)
        win_logprob = sequence_logprob(self.logits(model, win, True), win["labels"])
        lose_logprob = sequence_logprob(self.logits(model, forget, True), forget["labels"])
        forget_loss = dpo_loss(win_logprob, forget["win_ref"], lose_logprob, forget["lose_ref"], hp["beta"])
        loss, logs, _ = with_retain_nll(self, model, forget_loss, samples(forget), retain, hp["gamma"], hp["alpha"])
        return loss, logs

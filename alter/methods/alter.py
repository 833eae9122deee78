"""ALTER (the paper's method): AsymLoRA guided by the base model's token entropy.

    loss = beta * IHL_w(forget) + gamma * NLL(retain) + lam * structural
           + gamma * NLL(the forget rows' predictable tokens; under the floor those below it)
           (+ the routing loss, added by the asym_lora parameterization)

Under ``config.forget_tokens="unpredictable"`` (the default) the IHL acts on the forget
tokens the retain rows do not predict and the last NLL keeps the others
(:func:`alter.methods.forget_tokens.split_predictable`); under ``"all"`` the IHL acts on every
forget token and the last term is absent. Under ``config.forget_floor`` every forget
token is aimed at the log-probability the retain n-gram gives it: the IHL pushes down the
tokens above it, kept ones included, and the last NLL holds up only the kept tokens below
it (:meth:`Method.toward_floor`).

The forget IHL weights high-entropy tokens by ``config.high_entropy_weight``; the
structural term (eq. 8, over the high-entropy tokens of both batches) keeps the adapter
from moving the entropy of structural tokens; A learns from high-entropy tokens only
when ``config.a_learns_from_high_entropy_only`` (the paper's setting; off by default, see
:class:`~alter.config.AlterConfig`).
"""
from alter.methods import register
from alter.methods.base import Method, labelled
from alter.methods.losses import (_high_entropy_tokens, entropy_drift, shift_labels, structural_exact,
                                  structural_surrogate, token_nll)
from alter_kernels import token_losses
from alter_kernels.ihl import reduce_weighted


@register
class Alter(Method):
    name = "alter"
    default_params = "asym_lora"
    supported_params = ("asym_lora",)
    refused_params = dict.fromkeys(
        ("full", "lora"), "ALTER is an AsymLoRA method: its forget experts and structural term (the base model's cached "
        "entropy, the adapters' A) exist under params 'asym_lora' only")
    reads_config_weights = True

    def config_changes(self, config) -> dict:
        return {}  # the user's a_learns_from_high_entropy_only

    def structural(self, logits, batch):
        """The structural term of a batch, a mean over its high-entropy tokens."""
        cfg = self.config
        if self.args.structural == "exact":
            return structural_exact(logits, batch, cfg.tsallis_q, cfg.entropy_threshold, self.parameters.A)
        return structural_surrogate(logits, batch, cfg.tsallis_q, cfg.entropy_threshold, cfg.backend)

    def loss(self, model, forget, retain):
        cfg = self.config
        loss, logs = 0.0, {}
        for batch, is_forget in ((forget, True), (retain, False)):
            logits = self.logits(model, batch, is_forget)
            if is_forget:
                batch = self.toward_floor(logits, batch)
            if self.in_one_pass(is_forget):
                term, count, structure = self.terms_in_one_pass(logits, batch, is_forget)
            else:
                if is_forget:
                    term, count = self.ihl(logits, batch["labels"], cfg.high_entropy_weight)
                else:
                    term, count = token_nll(logits, batch["labels"]), labelled(batch["labels"])
                structure = self.structural(logits, batch) if cfg.lam > 0 else None
            loss = loss + (cfg.beta if is_forget else cfg.gamma) * self.global_mean(term, count)
            logs["forget" if is_forget else "retain"] = term.detach()
            if is_forget:
                loss = self.with_kept_tokens(loss, logs, logits, batch)
            if cfg.lam > 0:
                high = _high_entropy_tokens(batch, cfg.entropy_threshold).sum()
                loss = loss + cfg.lam * self.global_mean(structure, high)
                logs["structural"] = logs.get("structural", 0.0) + structure.detach()
        return loss, logs

    def in_one_pass(self, is_forget: bool) -> bool:
        """Whether a batch's loss term and structural surrogate come from one
        ``token_losses`` call (one forward and one backward pass over its logits instead
        of two and an add): with the surrogate, and the IHL as the forget loss."""
        cfg = self.config
        return (cfg.lam > 0 and self.args.structural != "exact"
                and not (is_forget and cfg.forget_loss == "nll_ascent"))

    def terms_in_one_pass(self, logits, batch, is_forget):
        """(the batch's loss term, the count it is a mean over, its structural term) from
        one ``token_losses`` call: the forget batch's weighted IHL mean or the retain
        batch's NLL mean, and the entropy drift of every token."""
        cfg = self.config
        flat_logits, flat_labels = shift_labels(logits, batch["labels"])
        losses = token_losses(flat_logits, flat_labels, cfg.tsallis_q, cfg.entropy_threshold, cfg.high_entropy_weight,
                              backend=cfg.backend, nll=not is_forget, ihl=is_forget)
        if is_forget:
            term = reduce_weighted(losses.ihl, losses.weight, "mean")
            count = None if self.reduce_sum is None else losses.weight.sum()
        else:
            count = labelled(batch["labels"])
            term = losses.nll.sum() / count
        return term, count, entropy_drift(losses.entropy.view(logits.shape[:-1]), batch, cfg.entropy_threshold)

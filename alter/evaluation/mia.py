"""Membership inference, as open-unlearning's attacks (``src/evals/metrics/mia``) and MUSE's
privleak define it: per-text attack scores from
:func:`alter.evaluation.scoring.token_statistics`, the AUC of telling members from
non-members by them, and PrivLeak."""
from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np
from scipy import stats

from alter.data import PromptFormat, encode_qa, encode_text, prompt_format_of
from alter.evaluation.scoring import context_length, token_statistics
from alter.evaluation.validation import check_pairs, check_samples, check_scored, check_texts

MIA_ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus", "reference")


def _encode_for_mia(fn: str, model, tokenizer, texts, questions, prompt_format, max_length) -> list[dict]:
    texts = check_texts(fn, "texts", texts)
    if not texts:
        raise ValueError(f"{fn}: texts is empty")
    if questions is not None:
        questions, texts = check_pairs(fn, questions, texts)
        fmt = prompt_format_of(prompt_format)
        encoded = [encode_qa(tokenizer, q, t, context_length(model), fmt) for q, t in zip(questions, texts)]
    else:
        limit = max_length if max_length is not None else context_length(model)
        encoded = [encode_text(tokenizer, t, limit, truncate=max_length is not None) for t in texts]
    return encoded


def _lowest_mean(values: np.ndarray, k: float) -> float:
    """Mean of the ``max(1, int(k * n))`` smallest of ``values``."""
    return float(np.sort(values)[:max(1, int(len(values) * k))].mean())


def _attack_scores(stats_list: list[dict], texts: Sequence[str], k: float, reference_stats=None) -> dict:
    """Every attack's score per example (see :func:`mia_scores`), float64 ``[n]`` each."""
    loss = np.array([-st["logp"].mean() for st in stats_list])
    scores = {
        "loss": loss,
        "zlib": loss / np.array([len(zlib.compress(t.encode("utf-8"))) for t in texts]),
        "min_k": np.array([-_lowest_mean(st["token_logp"], k) for st in stats_list]),
        "min_k_plus_plus": np.array([
            -_lowest_mean((st["token_logp"] - st["mu"]) / np.sqrt(np.maximum(st["var"], 1e-6)), k)
            for st in stats_list]),
    }
    if reference_stats is not None:
        scores["reference"] = loss - np.array([-st["logp"].mean() for st in reference_stats])
    return scores


def all_mia_scores(model, tokenizer, texts, questions, prompt_format, k, reference_model, batch_size,
                   max_length=None, fn="mia_scores", target_stats: list[dict] | None = None) -> dict:
    """Every attack's scores of :func:`mia_scores` (float64 ``[n]`` each, keyed by attack;
    ``"reference"`` only with a ``reference_model``). ``target_stats``: the model's
    :func:`~alter.evaluation.scoring.token_statistics` of the same texts when the caller
    has them already (the forget answers that memorization scored), saving that pass."""
    if not isinstance(k, (int, float)) or isinstance(k, bool) or not 0.0 < k <= 1.0:
        raise ValueError(f"{fn}: k must be in (0, 1], got {k!r}")
    encoded = _encode_for_mia(fn, model, tokenizer, texts, questions, prompt_format, max_length)
    target = token_statistics(model, tokenizer, encoded, batch_size, fn) if target_stats is None else target_stats
    check_scored(fn, target, list(texts))
    reference = None if reference_model is None else token_statistics(reference_model, tokenizer, encoded,
                                                                        batch_size, fn)
    return _attack_scores(target, list(texts), k, reference)


def mia_scores(model, tokenizer, texts: Sequence[str], attack: str, questions: Sequence[str] | None = None,
               k: float = 0.4, reference_model=None, prompt_format: str | PromptFormat | None = None,
               max_length: int | None = None, batch_size: int = 16) -> np.ndarray:
    """Membership-inference score of each text (float64 ``[n]``), as open-unlearning's
    attacks (``src/evals/metrics/mia``) define them. Sign: **higher means less likely a
    member** (a loss), open-unlearning's convention; :func:`mia_auc` reads them so.

    With ``questions``, each text is the answer to its question (prompted by
    ``prompt_format``) and only the answer tokens and EOS are scored, as open-unlearning does
    on TOFU; without, the whole text (and EOS) is, as MUSE does on its corpora (texts longer
    than ``max_length`` tokens are cut there when it is given; open-unlearning uses 2048).
    ``texts`` (and ``questions``): ``n`` strings. With ``log p_t = log p(x_t | x_<t)`` the
    model's log-probability of scored token t given the tokens before it:

    * ``"loss"`` (Yeom et al. 2018): ``-mean_t log p_t`` over the scored tokens, EOS included;
    * ``"zlib"`` (Carlini et al. 2021): the loss divided by ``len(zlib.compress(text))``, the
      zlib-compressed length in bytes of the UTF-8 text;
    * ``"min_k"`` (Min-K% Prob, Shi et al. 2024): ``-mean`` of the ``max(1, int(k n))``
      smallest ``log p_t`` over the ``n`` scored tokens without the final EOS;
    * ``"min_k_plus_plus"`` (Min-K%++, Zhang et al. 2024): the same over
      ``z_t = (log p_t - mu_t) / sigma_t``, with ``mu_t = sum_v p(v) log p(v)`` and
      ``sigma_t^2 = sum_v p(v) (log p(v))^2 - mu_t^2`` (clamped at 1e-6) over the vocabulary
      at position t;
    * ``"reference"`` (Carlini et al. 2022): the loss minus ``reference_model``'s loss.

    MUSE's own privleak code scores texts without EOS (LOSS, ZLib differ slightly from the
    above; Min-K%, its privleak attack, leaves the EOS out here too).
    """
    fn = "mia_scores"
    if attack not in MIA_ATTACKS:
        raise ValueError(f"{fn}: attack must be one of {MIA_ATTACKS}, got {attack!r}")
    if (attack == "reference") != (reference_model is not None):
        raise ValueError(f"{fn}: reference_model is required by the 'reference' attack, and used by no other")
    return all_mia_scores(model, tokenizer, texts, questions, prompt_format, k, reference_model, batch_size,
                          max_length, fn)[attack]


def mia_auc(member_scores, nonmember_scores) -> float:
    """ROC AUC of telling members from non-members by :func:`mia_scores` (lower = member):
    ``P(s_nonmember > s_member) + P(tie) / 2`` over all pairs, i.e. the Mann-Whitney
    ``U / (n_member * n_nonmember)`` with ``U`` the statistic of the non-member sample
    (``scipy.stats.mannwhitneyu``). 1: the members are the likelier texts (a model that
    memorized them); 0.5: indistinguishable. This is open-unlearning's ``mia_*`` AUC (forget
    as members, holdout as non-members); MUSE's AUC is ``1 - mia_auc``."""
    members = check_samples("mia_auc", "member_scores", member_scores)
    nonmembers = check_samples("mia_auc", "nonmember_scores", nonmember_scores)
    u = stats.mannwhitneyu(nonmembers, members, method="asymptotic").statistic
    return float(u / (len(members) * len(nonmembers)))


def privleak(auc_unlearned: float, auc_retain: float) -> float:
    """MUSE's PrivLeak, ``(AUC_unlearned - AUC_retain) / AUC_retain * 100`` with MUSE's AUC
    (``1 - mia_auc``) of the Min-K% (k = 0.4) attack on forget vs holdout, for the unlearned
    and the retain model; arguments are :func:`mia_auc` values, converted here as
    open-unlearning's ``privleak`` does. Near 0: the unlearned model leaks as little as the
    retain model; negative: under-unlearned (forget texts still likelier); positive:
    over-unlearned."""
    values = check_samples("privleak", "AUCs", [auc_unlearned, auc_retain])
    if ((values < 0) | (values > 1)).any():
        raise ValueError(f"privleak: AUCs must be in [0, 1], got {auc_unlearned!r}, {auc_retain!r}")
    muse_unlearned, muse_retain = 1.0 - values
    if muse_retain == 0:
        raise ValueError("privleak: the retain model's MUSE AUC (1 - auc_retain) is 0; the ratio is undefined")
    return float((muse_unlearned - muse_retain) / muse_retain * 100.0)

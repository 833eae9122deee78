"""Issue 18, items 4 and 5: where ALTER's routers send forget and retained tokens, what a
per-token router can know under causal attention, what isolated routing buys, and a stop
rule aimed at the oracle. docs/routing.md gives the numbers; reproduce with

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/routing_study.py SCENARIO SEED [SCENARIO SEED ...]
    ... routing_study.py --stop SCENARIO SEED ...            # stop_study: entity rule, 40 steps
    ... routing_study.py --probe-route LAYER SCENARIO SEED ... # stop_study with ProbeRouting
    ... routing_study.py --tables STUDY.jsonl STOP.jsonl [PROBE.jsonl]

(development scenarios and seeds only: alter.data.scenarios.DEVELOPMENT, and comets /
chefs / lighthouses / beetles, seeds 0, 1, 400-404). Each pair prints one JSON line.

Per (scenario, seed): the target (memorizes forget + retain, as ``alter quality``) and the
oracle (the same recipe on the retain rows only). Then

* ``positions``: per position type, the share of forget positions whose context contains
  the entity (the ceiling of any causal per-token router);
* ``probe``: per hidden layer of the target, a class-balanced logistic regression of forget
  vs retained positions after the entity mention (fit on all rows, as the routers are, and
  on half the entities, tested on the other half); recall of forget positions and leak of
  retained ones;
* ``routers``: ``unlearn(method="alter")`` with its defaults, then the routers' forget-expert
  weight per decoder layer, module kind and position type;
* ``isolated``: the same run with every router replaced by the entity rule (a position goes
  to a forget expert iff a forget entity's tokens occur at or before it): forget / retain
  accuracy and the stop-rule statistic along the run, against the oracle.
"""
from __future__ import annotations

import copy
import json
import sys
import warnings

import numpy as np
import torch

from alter.adapters import alter_layers
from alter.adapters.layers import AlterRouter
from alter.config import AlterConfig
from alter.data import format_qa
from alter.data.scenarios import DEVELOPMENT, HELD_OUT, build_scenario, fact_token_mask, model_text
from alter.quality import ABLATIONS, fact_accuracy, memorize
from alter.training.report import forget_expert_weight
from alter.training.loop import unlearn

SCENARIOS = {s.name: s for s in DEVELOPMENT + HELD_OUT}
KINDS = ("before", "entity", "after", "fact")  # position types, see row_positions


# ------------------------------------------------------------------ positions of a row


def row_positions(tokenizer, row: dict) -> dict:
    """Token ids of a row and per position (the token read, predicting the next one): its type,
    ``"before"`` the entity's first character, ``"entity"`` inside its first mention,
    ``"after"`` it, ``"fact"`` predicting a fact-value token (wherever it is); ``knows``:
    the position's context holds the entity's first token; ``labelled``: it predicts a
    labelled token (QA: the answer; text: every token)."""
    ids, fact = fact_token_mask(tokenizer, row)
    text = model_text(row)
    start = text.index(row["entity"])
    end = start + len(row["entity"])
    answer_from = len(format_qa(row["question"])) if "question" in row else 0
    offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
    kinds, knows, labelled, entity_end = [], [], [], None
    for t, (_, tok_end) in enumerate(offsets):
        knows.append(tok_end > start)
        labelled.append(t + 1 < len(ids) and offsets[t + 1][0] >= answer_from)
        if t + 1 < len(ids) and fact[t + 1]:
            kinds.append("fact")
        elif tok_end <= start:
            kinds.append("before")
        elif tok_end < end:
            kinds.append("entity")
        else:
            kinds.append("after")
        if entity_end is None and tok_end >= end:
            entity_end = t
    return {"ids": ids, "kinds": kinds, "knows": knows, "labelled": labelled, "entity": row["entity"],
            "entity_end": entity_end}


def entity_pieces(tokenizer, rows: list[dict]) -> set[tuple[int, ...]]:
    """The token sequences that spell each forget entity where it occurs in ``rows``."""
    pieces = set()
    for row in rows:
        text = model_text(row)
        start = text.index(row["entity"])
        end = start + len(row["entity"])
        enc = tokenizer(text, return_offsets_mapping=True)
        span = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > start and a < end]
        pieces.add(tuple(enc["input_ids"][span[0]: span[-1] + 1]))
    return pieces


def entity_flags(ids: torch.Tensor, pieces: set[tuple[int, ...]]) -> torch.Tensor:
    """[B, L] bool: a forget entity's pieces occur at or before each position (causal)."""
    flags = torch.zeros(ids.shape, dtype=torch.bool)
    rows = ids.tolist()
    for b, row in enumerate(rows):
        for piece in pieces:
            n = len(piece)
            for t in range(n - 1, len(row)):
                if tuple(row[t - n + 1: t + 1]) == piece:
                    flags[b, t:] = True
                    break
    return flags


# ------------------------------------------------------------------ probes


def _hidden(model, tokenizer, rows: list[dict]) -> list[torch.Tensor]:
    """Per row, the target's hidden states [layers + 1, len, D] (embeddings first)."""
    out = []
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([fact_token_mask(tokenizer, row)[0]])
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
            out.append(torch.stack([h[0] for h in hs]).double())
    return out


def _fit(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class-balanced L2 logistic regression on standardized features (LBFGS)."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    w = torch.zeros(x.shape[1], dtype=x.dtype, requires_grad=True)
    b = torch.zeros((), dtype=x.dtype, requires_grad=True)
    pos = y.float().mean().clamp(1e-3, 1 - 1e-3)
    weight = torch.where(y.bool(), 0.5 / pos, 0.5 / (1 - pos)).to(x.dtype)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y.to(x.dtype), weight=weight)
                + 1e-3 * w.pow(2).sum())
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach(), mean, std


def _rates(params, x, y) -> tuple[float, float, float]:
    """(forget recall, retained leak) at the fitted threshold, and the recall at the
    threshold that lets 5% of the retained positions through."""
    w, b, mean, std = params
    score = ((x - mean) / std) @ w + b
    pred = score > 0
    at5 = score[~y].quantile(0.95)
    return float(pred[y].float().mean()), float(pred[~y].float().mean()), float((score[y] > at5).float().mean())


def probe(model, tokenizer, rows: dict, kinds=("after", "fact")) -> list[dict]:
    """Per hidden layer (0 = embeddings): forget recall / retained leak of a linear probe on
    the positions of ``kinds`` (or ``"entity_end"``: one position per row, the entity's last
    token: a per-sequence route) (fit on every row, as the routers are trained), the recall at
    5% leak, and the same fit on every other row of each split, tested on the rest."""
    pos = {split: [row_positions(tokenizer, r) for r in rows[split]] for split in ("forget", "retain")}
    hid = {split: _hidden(model, tokenizer, rows[split]) for split in ("forget", "retain")}
    layers = hid["forget"][0].shape[0]
    result = []
    for layer in range(layers):
        xs, ys, fold = [], [], []
        for split in ("forget", "retain"):
            for i, (p, h) in enumerate(zip(pos[split], hid[split])):
                keep = [p["entity_end"]] if kinds == "entity_end" else \
                    [t for t, k in enumerate(p["kinds"]) if k in kinds]
                xs.append(h[layer, keep])
                ys += [split == "forget"] * len(keep)
                fold += [i % 2 == 0] * len(keep)
        x, y, fold = torch.cat(xs), torch.tensor(ys), torch.tensor(fold)
        recall, leak, recall5 = _rates(_fit(x, y), x, y)
        test_recall, test_leak, test_recall5 = _rates(_fit(x[fold], y[fold]), x[~fold], y[~fold])
        result.append({"layer": layer, "recall": recall, "leak": leak, "recall_at_5pct_leak": recall5,
                       "heldout_rows_recall": test_recall, "heldout_rows_leak": test_leak,
                       "heldout_rows_recall_at_5pct_leak": test_recall5})
    return result


def position_shares(tokenizer, rows: dict) -> dict:
    """Of the forget rows' positions (all; labelled ones, which the forget loss trains on;
    fact-predicting ones): each type's share, and the share whose context holds the entity
    (the ceiling of a causal per-token router)."""
    out = {}
    for subset in ("all", "labelled", "fact"):
        counts = {k: 0 for k in KINDS}
        knows = total = 0
        for row in rows["forget"]:
            p = row_positions(tokenizer, row)
            for t, k in enumerate(p["kinds"]):
                if (subset == "labelled" and not p["labelled"][t]) or (subset == "fact" and k != "fact"):
                    continue
                counts[k] += 1
                knows += p["knows"][t]
                total += 1
        out[subset] = {**{k: counts[k] / total for k in KINDS}, "knowable": knows / total}
    return out


# ------------------------------------------------------------------ routers after a run


def router_shares(model, tokenizer, rows: dict) -> dict:
    """Forget-expert weight of the model's routers, per split, per (decoder layer, module
    kind) and per position type: ``{split: {kind: {"L0.q_proj": share, ...}}}`` plus the
    mean over layers per position type."""
    config = model.alter_config
    layers = alter_layers(model)
    record: dict = {}

    def hook_for(name):
        def hook(router, inputs, logits):
            record[name] = forget_expert_weight(logits, inputs[1], config)
        return hook

    short = {name: f"L{name.split('layers.')[1].split('.')[0]}.{name.rsplit('.', 1)[1]}" for name in layers}
    handles = [layer.router.register_forward_hook(hook_for(short[n])) for n, layer in layers.items()]
    out = {}
    try:
        with torch.no_grad():
            for split in ("forget", "retain"):
                sums: dict = {k: {} for k in KINDS}
                counts = {k: 0 for k in KINDS}
                for row in rows[split]:
                    p = row_positions(tokenizer, row)
                    model(input_ids=torch.tensor([p["ids"]]))
                    for t, k in enumerate(p["kinds"]):
                        counts[k] += 1
                        for name, share in record.items():
                            sums[k][name] = sums[k].get(name, 0.0) + float(share[t])
                out[split] = {k: {n: v / max(counts[k], 1) for n, v in sums[k].items()} for k in KINDS}
                out[split]["mean"] = {k: float(np.mean(list(out[split][k].values()))) if counts[k] else None
                                      for k in KINDS}
    finally:
        for h in handles:
            h.remove()
    return out


# ------------------------------------------------------------------ the entity rule as router


class EntityRouting:
    """Replaces every router's logits by the entity rule: a token after a forget entity's
    pieces goes to a forget expert (1 + the entity's index mod N-1), any other to the
    retention expert. The original logits stay in the graph with weight 0 (router_loss
    needs a gradient path)."""

    def __init__(self, model, pieces: set[tuple[int, ...]]):
        self.model, self.pieces = model, sorted(pieces)
        self.flags = None
        n = AlterConfig().num_experts
        # The model is patched inside unlearn: the routers are found by class, at each call.
        self.handles = [model.register_forward_pre_hook(self.read_ids, with_kwargs=True),
                        torch.nn.modules.module.register_module_forward_hook(self.replace)]
        self.expert_of = {piece: 1 + i % (n - 1) for i, piece in enumerate(self.pieces)}

    def read_ids(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        experts = torch.zeros(ids.shape, dtype=torch.long)
        for piece in self.pieces:
            experts[entity_flags(ids.cpu(), {piece})] = self.expert_of[piece]
        self.flags = experts.reshape(-1)

    def replace(self, router, inputs, logits):
        if not isinstance(router, AlterRouter):
            return None
        if self.flags is None or self.flags.numel() != logits.shape[0]:
            return None  # the base-model prepass or an unrelated call: routers unchanged
        hard = torch.nn.functional.one_hot(self.flags.to(logits.device), logits.shape[1]).to(logits.dtype) * 30.0
        return hard + 0.0 * logits

    def remove(self):
        for h in self.handles:
            h.remove()


class ProbeRouting(EntityRouting):
    """A learned per-sequence route: a linear probe on the frozen target's hidden state
    ``layer`` scores each position; a position goes to forget expert 1 from the first
    position the probe fires on (carried forward, so causal), else to the retention expert."""

    def __init__(self, model, base, layer: int, params):
        self.base, self.layer, self.params = base, layer, params
        super().__init__(model, set())

    def fired(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, L] bool: the probe fired at or before each position."""
        w, b, mean, std = self.params
        with torch.no_grad():
            hidden = self.base(input_ids=ids, output_hidden_states=True).hidden_states[self.layer].double()
        return ((((hidden - mean) / std) @ w + b) > 0).cpu().long().cummax(dim=1).values.bool()

    def read_ids(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.flags = self.fired(ids).long().reshape(-1)


def fit_entity_probe(base, tokenizer, rows: dict, layer: int):
    """The probe of :class:`ProbeRouting`: positive at each forget row's entity end, negative
    at every retained position and every forget position before the entity end. Its bias
    puts the threshold midway between the highest negative and the lowest positive score
    when they separate: carried forward, one false firing leaks the rest of its row."""
    xs, ys = [], []
    for split in ("forget", "retain"):
        for row, hidden in zip(rows[split], _hidden(base, tokenizer, rows[split])):
            end = row_positions(tokenizer, row)["entity_end"]
            n = hidden.shape[1] if split == "retain" else end + 1
            xs.append(hidden[layer, :n])
            ys += [False] * n if split == "retain" else [False] * end + [True]
    x, y = torch.cat(xs), torch.tensor(ys)
    w, b, mean, std = _fit(x, y)
    score = ((x - mean) / std) @ w + b
    low, high = score[y].min(), score[~y].max()
    if high < low:
        b = b - (low + high) / 2
    return w, b, mean, std


def carried_shares(routing: ProbeRouting, tokenizer, rows: dict) -> dict:
    """Share of the forget rows' positions after the entity (after / fact types) that the
    carried route sends to a forget expert, and of every retained position (the leak)."""
    counts = {"forget": [0, 0], "retain": [0, 0]}
    for split in counts:
        for row in rows[split]:
            p = row_positions(tokenizer, row)
            fired = routing.fired(torch.tensor([p["ids"]]))[0]
            keep = [t for t, k in enumerate(p["kinds"]) if split == "retain" or k in ("after", "fact")]
            counts[split][0] += int(fired[keep].sum())
            counts[split][1] += len(keep)
    return {"forget_share": counts["forget"][0] / counts["forget"][1],
            "retain_leak": counts["retain"][0] / counts["retain"][1]}


# ------------------------------------------------------------------ stop-rule statistic


def truth_gap(model, tokenizer, rows: list[dict], pool: list[dict]) -> float:
    """Median over ``rows`` of log P(true value ...) - mean log P(perturbed value ...), each
    summed over the tokens from the value to the end of the text; the perturbed values are
    the values other rows of ``pool`` give for the same template (up to 5). 0: the model
    prefers the truth no more than the other values (TOFU's truth ratio, as a log)."""
    def template(row):
        text = model_text(row)
        a, b = row["spans"][0]
        return text[:a].replace(row["entity"], "{e}"), text[b:].replace(row["entity"], "{e}"), text[a:b]

    values: dict = {}
    for row in pool:
        head, tail, value = template(row)
        values.setdefault((head, tail), []).append(value)

    def score(text, start):
        enc = tokenizer(text, return_offsets_mapping=True)
        ids = torch.tensor([enc["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        tok = logp.gather(1, ids[0, 1:, None])[:, 0]
        keep = torch.tensor([a >= start or b > start for a, b in enc["offset_mapping"][1:]])
        return float(tok[keep].sum())

    gaps = []
    was_training = model.training
    model.eval()
    for row in rows:
        head, tail, value = template(row)
        others = [v for v in values.get((head, tail), []) if v != value][:5]
        if not others:
            continue
        text = model_text(row)
        a, b = row["spans"][0]
        true = score(text, a)
        fake = np.mean([score(text[:a] + v + text[b:], a) for v in others])
        gaps.append(true - fake)
    model.train(was_training)
    return float(np.median(gaps)) if gaps else float("nan")


# ------------------------------------------------------------------ one pair


def ngram_prior(tokenizer, rows: dict) -> dict:
    """What a model that never saw the forget facts can predict, from the retain rows alone:
    each labelled forget token predicted as the retain rows' most frequent successor of the
    two tokens before it (else of the one before). Accuracy on the fact-value tokens and on
    every labelled token (computable by a run: it has the retain set, not the oracle)."""
    from collections import Counter, defaultdict

    counts = defaultdict(Counter)
    for row in rows["retain"]:
        ids = fact_token_mask(tokenizer, row)[0]
        for t in range(1, len(ids)):
            counts[tuple(ids[max(t - 2, 0): t])][ids[t]] += 1
            counts[(ids[t - 1],)][ids[t]] += 1
    hits = {"fact": [0, 0], "labelled": [0, 0]}
    for row in rows["forget"]:
        p = row_positions(tokenizer, row)
        ids = p["ids"]
        for t in range(len(ids) - 1):
            if not p["labelled"][t]:
                continue
            guess = counts.get(tuple(ids[max(t - 1, 0): t + 1])) or counts.get((ids[t],))
            right = bool(guess) and guess.most_common(1)[0][0] == ids[t + 1]
            for subset in ("labelled",) + (("fact",) if p["kinds"][t] == "fact" else ()):
                hits[subset][0] += right
                hits[subset][1] += 1
    return {k: h / max(n, 1) for k, (h, n) in hits.items()}


def labelled_accuracy(model, tokenizer, rows: list[dict]) -> float:
    """Argmax accuracy of ``model`` over the labelled positions of ``rows`` (micro-average)."""
    hits = total = 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for row in rows:
            p = row_positions(tokenizer, row)
            pred = model(input_ids=torch.tensor([p["ids"]])).logits[0].argmax(-1).tolist()
            for t in range(len(p["ids"]) - 1):
                if p["labelled"][t]:
                    hits += pred[t] == p["ids"][t + 1]
                    total += 1
    model.train(was_training)
    return hits / max(total, 1)


# Runs of a pair: unlearn's arguments, and whether the entity rule replaces the routers.
# The study is of the per-token routers, under the defaults it was run with (the default
# routes by sequence on every forget token the retain rows do not predict since
# docs/routing.md (f); alter.quality's "alter-token-routing-all-tokens").
STUDIED = AlterConfig(**ABLATIONS["alter-token-routing-all-tokens"])
VARIANTS = {
    "alter": (dict(config=STUDIED, early_stop_share=None), False),  # default length, no early stop
    "alter-long-warmup": (dict(config=STUDIED, router_warmup=600, router_lr=1e-2, max_steps=600), False),
    "isolated": (dict(config=STUDIED, router_warmup=0, max_steps=200), True),  # the early stop of then (0.4)
    "isolated-nostop": (dict(config=STUDIED, router_warmup=0, max_steps=40, early_stop_share=None), True),
}
CHECKS = set(range(2, 21, 2)) | set(range(30, 1001, 10))


def _accuracies(model, tok, rows) -> dict:
    return {"forget_acc": fact_accuracy(model, tok, rows["forget"]),
            "retain_acc": fact_accuracy(model, tok, rows["retain"]),
            "forget_labelled_acc": labelled_accuracy(model, tok, rows["forget"])}


def target_and_oracle(name: str, seed: int):
    """(scenario, built scenario, target, oracle) of a pair, memorized as ``alter quality``
    memorizes them (:func:`alter.quality.memorize`: the target on every phrasing's rows, the
    oracle on the retained ones, same initialization and seed); one thread."""
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    scenario = SCENARIOS[name]
    built = build_scenario(scenario, seed)
    init = copy.deepcopy(built["model"])
    target = memorize(built["model"], built["tokenizer"], built["memorize"], scenario, seed)
    oracle = memorize(init, built["tokenizer"], built["oracle"], scenario, seed)
    return scenario, built, target, oracle


def study(name: str, seed: int, variants=tuple(VARIANTS)) -> dict:
    scenario, built, target, oracle = target_and_oracle(name, seed)
    tok, rows = built["tokenizer"], built["rows"]
    qa_or_text = scenario.format != "bio"
    pool = rows["retain"] + rows["forget"]
    result = {"scenario": name, "seed": seed, "positions": position_shares(tok, rows),
              "target": _accuracies(target, tok, rows), "oracle": _accuracies(oracle, tok, rows),
              "prior": ngram_prior(tok, rows)}
    if qa_or_text:
        result["target"]["gap"] = truth_gap(target, tok, rows["forget"], pool)
        result["oracle"]["gap"] = truth_gap(oracle, tok, rows["forget"], pool)
    result["probe"] = probe(target, tok, rows)
    result["probe_entity_end"] = probe(target, tok, rows, "entity_end")
    runs = {}
    for variant in variants:
        kwargs, isolated = VARIANTS[variant]
        model = copy.deepcopy(target)
        trajectory = []
        rule = EntityRouting(model, entity_pieces(tok, rows["forget"])) if isolated else None

        def check(step, logs, model=model, isolated=isolated):
            if isolated and step in CHECKS:
                point = {"step": step, **_accuracies(model, tok, rows)}
                if qa_or_text and step % 10 == 0:
                    point["gap"] = truth_gap(model, tok, rows["forget"], pool)
                trajectory.append(point)

        unlearn(model, tok, built["forget"], built["retain"], seed=seed, progress=False, callback=check, **kwargs)
        report = model.unlearn_report
        runs[variant] = {"trajectory": trajectory, "steps": report.steps, "stopped_early": report.stopped_early,
                         "forget_routing_share": report.forget_routing_share,
                         "retain_leak_share": report.retain_leak_share, **_accuracies(model, tok, rows)}
        if not isolated:
            runs[variant]["routers"] = router_shares(model, tok, rows)
        if rule is not None:
            rule.remove()
    result["runs"] = runs
    return result


def value_logprob(model, tokenizer, rows: list[dict], unknown_entity: bool = False) -> float:
    """Mean over ``rows`` of the log-probability of the fact values (summed over their
    tokens). ``unknown_entity``: every token of the entity's mentions replaced by the UNK
    token, i.e. the values' log-probability for an entity the model never saw (a level a
    run can compute from the model it starts from, without the oracle)."""
    values = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for row in rows:
            p = row_positions(tokenizer, row)
            ids = list(p["ids"])
            if unknown_entity:
                text, entity = model_text(row), row["entity"]
                spans = [(a, a + len(entity)) for a in range(len(text)) if text.startswith(entity, a)]
                offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
                for t, (a, b) in enumerate(offsets):
                    if any(b > s0 and a < s1 for s0, s1 in spans):
                        ids[t] = tokenizer.unk_token_id
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            values.append(sum(float(logp[t, p["ids"][t + 1]]) for t, k in enumerate(p["kinds"]) if k == "fact"))
    model.train(was_training)
    return float(np.mean(values))


def stop_study(name: str, seed: int, steps: int = 40, probe_layer: int | None = None) -> dict:
    """Item 5 under isolated routing: along an entity-rule run without early stop, the forget
    facts' fact accuracy and value log-probability, against the oracle's and against the
    never-seen-entity level of the target (:func:`value_logprob` with ``unknown_entity``).
    ``probe_layer``: route by :class:`ProbeRouting` on that hidden layer instead of the rule."""
    scenario, built, target, oracle = target_and_oracle(name, seed)
    tok, rows = built["tokenizer"], built["rows"]
    result = {"scenario": name, "seed": seed,
              "target": {**_accuracies(target, tok, rows), "value_logprob": value_logprob(target, tok, rows["forget"]),
                         "unknown_entity_logprob": value_logprob(target, tok, rows["forget"], True)},
              "oracle": {**_accuracies(oracle, tok, rows), "value_logprob": value_logprob(oracle, tok, rows["forget"]),
                         "unknown_entity_logprob": value_logprob(oracle, tok, rows["forget"], True)}}
    model = copy.deepcopy(target)
    trajectory = []

    def check(step, logs):
        if step % 2 == 0:
            trajectory.append({"step": step, **_accuracies(model, tok, rows),
                               "value_logprob": value_logprob(model, tok, rows["forget"])})

    if probe_layer is None:
        rule = EntityRouting(model, entity_pieces(tok, rows["forget"]))
    else:
        base = copy.deepcopy(target)
        rule = ProbeRouting(model, base, probe_layer, fit_entity_probe(base, tok, rows, probe_layer))
        halves = [{split: rows[split][k::2] for split in rows} for k in (0, 1)]
        heldout = ProbeRouting(model, base, probe_layer, fit_entity_probe(base, tok, halves[0], probe_layer))
        heldout.remove()
        result["carried_route"] = {"layer": probe_layer, **carried_shares(rule, tok, rows),
                                   "heldout_rows": carried_shares(heldout, tok, halves[1])}
    unlearn(model, tok, built["forget"], built["retain"], seed=seed, progress=False, callback=check,
            config=STUDIED, router_warmup=0, max_steps=steps, early_stop_share=None)
    rule.remove()
    result["trajectory"] = trajectory
    return result


def tables(study_lines: list[dict], stop_lines: list[dict]) -> str:
    """The markdown tables of docs/routing.md from the JSON lines of :func:`study` and
    :func:`stop_study`."""
    out = ["| pair | knowable (all / labelled) | per-token probe by layer: recall / leak (recall at 5% leak; "
           "held-out rows) | entity-end probe by layer: recall / leak (held-out rows) |", "|---|---|---|---|"]
    for r in study_lines:
        pos = r["positions"]
        tok = "; ".join(f"L{p['layer']} {p['recall']:.2f}/{p['leak']:.2f} ({p['recall_at_5pct_leak']:.2f}; "
                        f"{p['heldout_rows_recall']:.2f}/{p['heldout_rows_leak']:.2f})" for p in r["probe"])
        ent = "; ".join(f"L{p['layer']} {p['recall']:.2f}/{p['leak']:.2f} ({p['heldout_rows_recall']:.2f}/"
                        f"{p['heldout_rows_leak']:.2f})" for p in r["probe_entity_end"])
        out.append(f"| {r['scenario']} {r['seed']} | {pos['all']['knowable']:.2f} / {pos['labelled']['knowable']:.2f}"
                   f" | {tok} | {ent} |")
    out += ["", "| pair | run | steps | forget share | retain leak | forget share by type (before / entity / after "
            "/ fact) | retain leak by type | forget acc (oracle) | retain acc |", "|---|---|---|---|---|---|---|---|---|"]
    for r in study_lines:
        for name, run in r["runs"].items():
            by = run.get("routers")
            types = lambda split: " / ".join("-" if by[split]["mean"][k] is None else f"{by[split]['mean'][k]:.2f}"
                                             for k in KINDS) if by else "(rule)"
            out.append(f"| {r['scenario']} {r['seed']} | {name} | {run['steps']} | {run['forget_routing_share']:.2f} | "
                       f"{run['retain_leak_share']:.2f} | {types('forget')} | {types('retain')} | "
                       f"{run['forget_acc']:.2f} ({r['oracle']['forget_acc']:.2f}) | {run['retain_acc']:.2f} |")
    out += ["", "| pair | route | oracle forget acc | value log-prob: target / oracle / target, entity unknown | "
            "first step at or below the unknown-entity level: forget acc, retain acc | step nearest the oracle's acc |",
            "|---|---|---|---|---|---|"]
    for r in stop_lines:
        level = r["target"]["unknown_entity_logprob"]
        fired = next((p for p in r["trajectory"] if p["value_logprob"] <= level), None)
        best = min(r["trajectory"], key=lambda p: abs(p["forget_acc"] - r["oracle"]["forget_acc"]))
        rule = "never" if fired is None else \
            f"step {fired['step']}: {fired['forget_acc']:.2f}, {fired['retain_acc']:.2f}"
        carried = r.get("carried_route")
        route = "entity rule" if carried is None else \
            (f"carried probe L{carried['layer']}: {carried['forget_share']:.2f}/{carried['retain_leak']:.2f} "
             f"(held-out rows {carried['heldout_rows']['forget_share']:.2f}/{carried['heldout_rows']['retain_leak']:.2f})")
        out.append(f"| {r['scenario']} {r['seed']} | {route} | {r['oracle']['forget_acc']:.2f} | "
                   f"{r['target']['value_logprob']:.2f} / {r['oracle']['value_logprob']:.2f} / {level:.2f} | {rule} | "
                   f"step {best['step']}: {best['forget_acc']:.2f}, {best['retain_acc']:.2f} |")
    return "\n".join(out)


if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv and argv[0] == "--tables":  # --tables STUDY.jsonl STOP.jsonl [PROBE-ROUTE.jsonl ...]
        read = lambda path: [json.loads(line) for line in open(path)]
        print(tables(read(argv[1]), [r for path in argv[2:] for r in read(path)]))
        sys.exit()
    run = study
    if argv and argv[0] == "--stop":
        run, argv = stop_study, argv[1:]
    elif argv and argv[0] == "--probe-route":  # --probe-route LAYER SCENARIO SEED ...
        layer = int(argv[1])
        run, argv = (lambda name, seed: stop_study(name, seed, probe_layer=layer)), argv[2:]
    for i in range(0, len(argv), 2):
        print(json.dumps(run(argv[i], int(argv[i + 1]))), flush=True)

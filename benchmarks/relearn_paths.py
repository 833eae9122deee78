"""Where the relearning column's excess over the oracle comes from (docs/routing.md (j)).

For each scenario and seed: the target and the oracle memorize the rows as in ``alter
quality``, the default ``unlearn`` call runs on a copy of the target, and the held-back
half of the forgotten entities (:func:`alter.quality.relearn_split`) is scored before the
relearning attack and after it, with the attack training every weight (the report's), the
adapters only or the base only; the oracle under the same attack next to it. The excess
of the report's relearning accuracy over the oracle's splits into

* the gap before any attack: the held-back facts the run left known (the stop and the
  kept tokens, not relearning);
* the revival: what the attack brings back on top;
* minus the oracle's own change under the attack.

    python benchmarks/relearn_paths.py --scenarios fortresses-qa-100,chefs-bio-bpe --seeds 0,1
"""
from __future__ import annotations

import copy
import statistics
import warnings

import torch

from alter.cli_parser import scenario_pairs_parser
from alter.data.scenarios import build_scenario
from alter.evaluation.facts import fact_accuracy
from alter.quality import ATTACKED_WEIGHTS, memorize, relearn_split, relearned_scores, scores_accuracy
from alter.training.loop import unlearn


def relearn_paths(scenario, seed: int) -> dict:
    """Held-back accuracies of one pair: ``oracle`` / ``oracle_attacked``, ``before`` (the
    unlearned model) and one per :data:`~alter.quality.ATTACKED_WEIGHTS` key."""
    torch.set_num_threads(1)
    built = dict(build_scenario(scenario, seed), format=scenario.format)
    tokenizer, init = built["tokenizer"], copy.deepcopy(built["model"])
    unlearned = memorize(built["model"], tokenizer, built["memorize"], scenario, seed)  # the target, until unlearn
    oracle = memorize(init, tokenizer, built["oracle"], scenario, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unlearn(unlearned, tokenizer, built["forget"], built["retain"], seed=seed, progress=False)
    _, held = relearn_split(built["rows"]["forget"])
    accuracies = {"oracle": fact_accuracy(oracle, tokenizer, held),
                  "oracle_attacked": scores_accuracy(relearned_scores(oracle, built, seed)),
                  "before": fact_accuracy(unlearned, tokenizer, held)}
    for weights in ATTACKED_WEIGHTS:
        accuracies[weights] = scores_accuracy(relearned_scores(unlearned, built, seed, weights))
    return accuracies


def main() -> None:
    args = scenario_pairs_parser(__doc__.split("\n\n")[0]).parse_args()
    print("| pair | held back before (oracle) | after the attack: all / adapters / base (oracle) | gap before | "
          "revival | excess |\n|---|---|---|---|---|---|")
    parts = []
    for scenario in args.scenarios:
        for seed in args.seeds:
            acc = relearn_paths(scenario, seed)
            gap, revival = acc["before"] - acc["oracle"], acc["all"] - acc["before"]
            excess = acc["all"] - acc["oracle_attacked"]
            parts.append((gap, revival, excess))
            print(f"| {scenario.name} {seed} | {acc['before']:.2f} ({acc['oracle']:.2f}) | {acc['all']:.2f} / "
                  f"{acc['adapters']:.2f} / {acc['base']:.2f} ({acc['oracle_attacked']:.2f}) | {gap:+.2f} | "
                  f"{revival:+.2f} | {excess:+.2f} |", flush=True)
    means = [statistics.mean(column) for column in zip(*parts)]
    print(f"\nmean over {len(parts)} pairs: gap before {means[0]:+.3f}, revival {means[1]:+.3f}, excess {means[2]:+.3f}; "
          f"excess > 0.1 on {sum(e > 0.1 for *_, e in parts)}, of which the gap before alone > 0.1 on "
          f"{sum(e > 0.1 and g > 0.1 for g, _, e in parts)}")


if __name__ == "__main__":
    main()

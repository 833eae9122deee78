"""How many rows of each phrasing hold a sequence-route key (docs/routing.md (g)).

For each scenario and seed: the keys ``unlearn`` finds from the unlearned phrasing's forget
and retain rows (``alter.methods.data.route_keys``, with and without the tokenizer), then,
per phrasing, the forget rows in which a key fires (the route reaches a forget expert) and
the retained rows in which one does (a leak). Builds the scenarios' rows and tokenizers
only; no model is trained.

    python benchmarks/key_coverage.py --scenarios satellites-text-word,glaciers-qa-bpe --seeds 0,1
"""
from __future__ import annotations

import torch

from alter.adapters.sequence_route import KeyTable
from alter.cli_parser import scenario_pairs_parser
from alter.data.scenarios import build_scenario, to_dataset
from alter.methods.data import encode_dataset, route_keys


def rows_holding_a_key(table: KeyTable, examples: list[dict]) -> int:
    return sum(int(table.route(torch.tensor([e["input_ids"]]), None)[0].any()) for e in examples)


def coverage(scenario, seed: int, with_tokenizer: bool) -> dict:
    """{phrasing: (forget rows holding a key, forget rows, retained rows holding one, retained rows)}."""
    built = build_scenario(scenario, seed)
    tokenizer = built["tokenizer"]
    forget = encode_dataset(tokenizer, built["forget"], "forget", None)
    retain = encode_dataset(tokenizer, built["retain"], "retain", None)
    keys = route_keys(forget, retain, [1] * len(forget), tokenizer if with_tokenizer else None)
    table = KeyTable(keys, torch.device("cpu"))
    counts = {}
    for phrasing, split in built["phrasings"].items():
        rows = {name: encode_dataset(tokenizer, to_dataset(split[name]), name, None) for name in ("forget", "retain")}
        counts[phrasing] = (rows_holding_a_key(table, rows["forget"]), len(rows["forget"]),
                            rows_holding_a_key(table, rows["retain"]), len(rows["retain"]))
    return {"keys": len(keys), "phrasings": counts}


def main() -> None:
    args = scenario_pairs_parser(__doc__.split("\n\n")[0]).parse_args()
    for scenario in args.scenarios:
        for seed in args.seeds:
            for with_tokenizer in (False, True):
                result = coverage(scenario, seed, with_tokenizer)
                cells = [f"{p} {f}/{nf} (retained {r}/{nr})" for p, (f, nf, r, nr) in result["phrasings"].items()]
                print(f"{scenario.name} seed {seed} {'with' if with_tokenizer else 'without'} the tokenizer: "
                      f"{result['keys']} keys; " + "; ".join(cells), flush=True)

if __name__ == "__main__":
    main()

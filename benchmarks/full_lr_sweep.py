"""The measurement behind ``alter.methods.params.full_lr`` (docs/training.md,
"Full-parameter learning rate"): grad_diff and npo on every weight, at fixed learning
rates and at the default (``rule``), on development scenarios only.

    OMP_NUM_THREADS=1 python benchmarks/full_lr_sweep.py \\
        --scenarios dev-authors-qa,orchids-qa-240,dev-companies-qa,ships-bio-bpe \\
        --lrs 3e-5,1e-4,3e-4,1e-3,rule --out full_lr_sweep.json

Each (scenario, seed) is memorized once (``alter.quality.memorize``, as ``run_pair``);
each (method, lr) unlearns a copy with the default call otherwise and is scored with
``alter.quality.evaluate_run``. One thread; about 35 min for the command above.
"""
import argparse
import copy
import json
import warnings

import torch

from alter.data.scenarios import DEVELOPMENT, DEVELOPMENT_SEEDS, build_scenario
from alter.methods.params import full_lr
from alter.quality import evaluate_run, memorize
from alter.training.loop import unlearn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", required=True, help="comma-separated development scenario names")
    parser.add_argument("--lrs", default="3e-5,1e-4,3e-4,1e-3,rule", help="rates; 'rule': unlearn's default")
    parser.add_argument("--out", default="full_lr_sweep.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    scenarios = {s.name: s for s in DEVELOPMENT}
    rows = []
    for name in args.scenarios.split(","):
        scenario = scenarios[name]  # development scenarios only: never tune on held-out ones
        for seed in DEVELOPMENT_SEEDS:
            built = build_scenario(scenario, seed)
            target = memorize(built, scenario, seed)
            before = evaluate_run(target, built)
            for method in ("grad_diff", "npo"):
                for lr in args.lrs.split(","):
                    model = copy.deepcopy(target)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        unlearn(model, built["tokenizer"], built["forget"], built["retain"], method=method, seed=seed,
                                progress=False, lr=None if lr == "rule" else float(lr))
                    after = evaluate_run(model, built)
                    rows.append({"scenario": name, "seed": seed, "method": method, "lr": lr,
                                 "lr_used": full_lr(target) if lr == "rule" else float(lr),
                                 "steps": model.unlearn_report.steps,
                                 "forget_ratio": after["forget_acc"] / before["forget_acc"],
                                 "retain_ratio": after["retain_acc"] / before["retain_acc"]})
                    print(json.dumps(rows[-1]), flush=True)
                    with open(args.out, "w") as f:
                        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

"""Outside check of ``alter.unlearn``: one scenario x seed.

Does ``alter.unlearn(model, tokenizer, forget, retain)`` bring a model to the level of an
oracle, the same model trained without the forget entities? The scenarios, models,
training and metrics were written by an outside tester (see gen.py, common.py) and share
no code with ``alter.data.scenarios``, ``alter.evaluation.facts`` or ``alter.quality``;
the library is used only through its public ``alter.unlearn`` and ``alter.AlterConfig``.

Steps: build the scenario; train a tokenizer on its text; train the target (all facts, QA
and statement phrasings) until it has memorised them and the oracle (retain facts only)
for as many epochs, or load both from <out>/<scenario>_s<seed>/models/ when present, so
variants (--tag, --config) compare against the same pair; evaluate oracle and target; run
``alter.unlearn`` on a copy of the target with each method, given the QA rows only, and
evaluate the result. Writes <out>/<scenario>_s<seed>/<tag>/results.json and log.txt.

    python benchmarks/outside_check/run.py --scenario ships --seed 0
    python benchmarks/outside_check/run.py --scenario ships --seed 0 --tag floor \\
        --methods alter --config '{"forget_floor": true}'
"""
import argparse
import contextlib
import copy
import dataclasses
import io
import json
import os
import sys
import time
import traceback
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from scipy.stats import ks_2samp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gen  # noqa: E402
from common import (acc, build_tokenizer, encode_fact, generation_hits, make_model,  # noqa: E402
                    qa_text, score_facts, train_lm)

# Per scenario: tokenizer kind and vocab, architecture and size. Chosen to vary what the
# library must cope with (single-token vs multi-token values, Llama vs Qwen2 with grouped KV).
MODEL_CFG = {
    "ships": dict(tok="word", vocab=None, arch="llama", hidden=64, layers=2, heads=4, kv=4, inter=128),
    "scientists": dict(tok="bpe_meta", vocab=400, arch="llama", hidden=96, layers=3, heads=4, kv=4, inter=192),
    "observatories": dict(tok="word", vocab=None, arch="llama", hidden=128, layers=4, heads=4, kv=4, inter=256),
    "monasteries": dict(tok="bpe_byte", vocab=500, arch="qwen2", hidden=64, layers=2, heads=4, kv=2, inter=128),
}
STOP_AT = 0.97  # target value-token accuracy on all facts at which training stops
REPORT_FIELDS = ("steps", "warmup_steps", "stopped_early", "end_reason", "verdict")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", required=True, choices=gen.SCENARIOS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="alter,asym_lora", help="comma list of alter.unlearn methods")
    ap.add_argument("--config", default=None,
                    help="AlterConfig fields as a JSON object, e.g. '{\"forget_floor\": true}', for every "
                         "method's call; without it unlearn gets no config (the library default)")
    ap.add_argument("--tag", default="default", help="name of this variant: results go to <out>/<scenario>_s<seed>/<tag>/")
    ap.add_argument("--out", default="outside_check_out", help="output folder")
    ap.add_argument("--max_epochs", type=int, default=400, help="cap on target training epochs")
    args = ap.parse_args(argv)
    if os.sep in args.tag or args.tag in ("", ".", "..", "models"):
        ap.error(f"--tag {args.tag!r}: a plain folder name other than 'models'")
    if args.config is not None:
        args.config = json.loads(args.config)
        if not isinstance(args.config, dict):
            ap.error("--config must be a JSON object of AlterConfig fields")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    import alter  # after the thread settings; only alter.unlearn and alter.AlterConfig are used

    cfg = MODEL_CFG[args.scenario]
    run_dir = os.path.join(args.out, f"{args.scenario}_s{args.seed}")
    model_dir = os.path.join(run_dir, "models")
    out = os.path.join(run_dir, args.tag)
    # Build the config first: a bad field fails before minutes of training.
    try:
        config = alter.AlterConfig(**args.config) if args.config is not None else None
    except (TypeError, ValueError) as e:
        raise SystemExit(f"--config {json.dumps(args.config)}: {e}")
    os.makedirs(model_dir, exist_ok=True)
    os.makedirs(out, exist_ok=True)

    with open(os.path.join(out, "log.txt"), "a") as logf:
        def log(*a):
            s = " ".join(str(x) for x in a)
            print(s, flush=True)
            logf.write(s + "\n")
            logf.flush()

        results = run(args, cfg, model_dir, out, config, alter, log)
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        log(f"==== done {time.ctime()}: {os.path.join(out, 'results.json')}")


def run(args, cfg, model_dir, out, config, alter, log):
    log(f"==== {time.ctime()} scenario {args.scenario} seed {args.seed} tag {args.tag} "
        f"config {args.config} model {cfg}")
    data = gen.build(args.scenario, args.seed)
    facts = data["facts"]
    fset = set(data["forget_entities"])
    forget_facts = [f for f in facts if f["entity"] in fset]
    retain_facts = [f for f in facts if f["entity"] not in fset]
    log(f"entities {len(data['entities'])} facts {len(facts)} forget entities {len(fset)} "
        f"forget facts {len(forget_facts)}")

    # The tokenizer is trained on the text of all facts; deterministic, so rebuilt rather than cached.
    corpus = [qa_text(f["question"], f["answer"]) for f in facts] + [f["statement"] for f in facts]
    tok = build_tokenizer(cfg["tok"], corpus, cfg["vocab"])
    ex = forget_facts[0]
    log(f"tokenizer {cfg['tok']} vocab {len(tok)}; example QA tokens:",
        tok.convert_ids_to_tokens(tok(qa_text(ex["question"], ex["answer"]))["input_ids"]))

    def items(fs, phrasing):
        return [encode_fact(tok, qa_text(f["question"], f["answer"]) if phrasing == "qa" else f["statement"],
                            f["value"]) for f in fs]

    I = {"forget_qa": items(forget_facts, "qa"), "forget_st": items(forget_facts, "st"),
         "retain_qa": items(retain_facts, "qa"), "retain_st": items(retain_facts, "st")}
    all_items = [x for v in I.values() for x in v]
    # Rows in scenario order (entities interleaved), QA then statements: the order fixes the
    # batches, and this one reproduces the outside tester's models.
    seqs_target = [ids for ids, _ in items(facts, "qa") + items(facts, "st")]
    seqs_oracle = [ids for ids, _ in I["retain_qa"] + I["retain_st"]]

    def new_model():
        return make_model(cfg["arch"], tok, cfg["hidden"], cfg["layers"], cfg["heads"], cfg["kv"],
                          cfg["inter"], seed=1234 + args.seed)

    tpath, opath = os.path.join(model_dir, "target.pt"), os.path.join(model_dir, "oracle.pt")
    meta_path = os.path.join(model_dir, "train_meta.json")
    if os.path.exists(tpath) and os.path.exists(opath) and os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("vocab", len(tok)) != len(tok):
            raise RuntimeError(f"{model_dir}: cached models have vocab {meta['vocab']}, tokenizer has {len(tok)}")
        target, oracle = new_model(), new_model()
        target.load_state_dict(torch.load(tpath))
        oracle.load_state_dict(torch.load(opath))
        target.eval()
        oracle.eval()
        log("loaded cached target/oracle", meta)
    else:
        t0 = time.time()
        target = new_model()
        log(f"params {sum(p.numel() for p in target.parameters())}; train rows target {len(seqs_target)} "
            f"oracle {len(seqs_oracle)}")
        ep = train_lm(target, seqs_target, args.max_epochs, seed=args.seed, pad_id=tok.pad_token_id,
                      eval_fn=lambda m: acc(score_facts(m, all_items)), stop_at=STOP_AT, log=log)
        t1 = time.time()
        log(f"target trained {ep} epochs in {t1 - t0:.0f}s")
        # Same init, data order seed and epochs as the target: the oracle differs only in its rows.
        oracle = new_model()
        train_lm(oracle, seqs_oracle, ep, seed=args.seed, pad_id=tok.pad_token_id, log=log)
        log(f"oracle trained {ep} epochs in {time.time() - t1:.0f}s")
        torch.save(target.state_dict(), tpath)
        torch.save(oracle.state_dict(), opath)
        meta = dict(epochs=ep, target_train_s=t1 - t0, target_all_acc=acc(score_facts(target, all_items)),
                    vocab=len(tok))
        with open(meta_path, "w") as f:
            json.dump(meta, f)

    def evaluate(model, name, oracle_res=None):
        r = {}
        sc = {k: score_facts(model, v) for k, v in I.items()}
        for k, v in sc.items():
            r[f"acc_{k}"] = acc(v)
        r["lp_forget_qa"] = [s[2] for s in sc["forget_qa"]]
        r["lp_forget_st"] = [s[2] for s in sc["forget_st"]]
        if oracle_res is not None:
            r["fq_qa"] = float(ks_2samp(r["lp_forget_qa"], oracle_res["lp_forget_qa"]).pvalue)
            r["fq_st"] = float(ks_2samp(r["lp_forget_st"], oracle_res["lp_forget_st"]).pvalue)
        P = data["pools"]
        r["gen_hits_forget"], r["gen_typed_forget"], s_qa = generation_hits(model, tok, forget_facts, P, "qa")
        r["gen_hits_forget_st"], r["gen_typed_forget_st"], s_st = generation_hits(model, tok, forget_facts, P, "st")
        # 40 retain facts are enough to see whether generation of kept facts survived.
        r["gen_hits_retain"], r["gen_typed_retain"], _ = generation_hits(model, tok, retain_facts[:40], P, "qa")
        log(f"[{name}] " + " ".join(f"{k}={v:.3f}" for k, v in r.items() if isinstance(v, float)))
        for s in s_qa[:2] + s_st[:1]:
            log(f"   gen sample: {s}")
        return r

    results = {"scenario": args.scenario, "seed": args.seed, "tag": args.tag, "methods": args.methods.split(","),
               "config": args.config,
               "config_resolved": dataclasses.asdict(config) if config is not None else None,
               "meta": meta, "cfg": cfg, "n_entities": len(data["entities"]), "n_forget_entities": len(fset),
               "n_forget_facts": len(forget_facts), "vocab": len(tok)}
    results["oracle"] = evaluate(oracle, "oracle")
    results["target"] = evaluate(target, "target", results["oracle"])

    # unlearn is given the QA phrasing only; the statements measure generalisation.
    from datasets import Dataset
    forget_ds = Dataset.from_dict({"question": [f["question"] for f in forget_facts],
                                   "answer": [f["answer"] for f in forget_facts]})
    retain_ds = Dataset.from_dict({"question": [f["question"] for f in retain_facts],
                                   "answer": [f["answer"] for f in retain_facts]})

    for meth in args.methods.split(","):
        model = copy.deepcopy(target)
        kw = {"method": meth}
        if config is not None:
            kw["config"] = copy.deepcopy(config)
        buf = io.StringIO()
        t0 = time.time()
        try:
            with warnings.catch_warnings(record=True) as W, contextlib.redirect_stderr(buf):
                warnings.simplefilter("always")
                model = alter.unlearn(model, tok, forget_ds, retain_ds, seed=args.seed, progress=False, **kw)
            dt = time.time() - t0
        except Exception as e:
            # A crash is a result of the check: record it and go on with the other methods.
            log(f"[{meth}] CRASH: {type(e).__name__}: {e}")
            log(traceback.format_exc())
            results[meth] = {"crash": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            continue
        warns = [f"{w.category.__name__}: {w.message} ({os.path.basename(w.filename)}:{w.lineno})" for w in W]
        for w in warns:
            log(f"[{meth}] WARNING: {w}")
        if buf.getvalue().strip():
            log(f"[{meth}] stderr: {buf.getvalue()[-2000:]}")
        rep = getattr(model, "unlearn_report", None)
        rep_s = str(rep)
        with open(os.path.join(out, f"{meth}_report.txt"), "w") as f:
            f.write(rep_s)
        # A few report fields, read by name so that a change in the report type cannot break the check.
        rep_d = {}
        for attr in REPORT_FIELDS:
            if rep is not None and hasattr(rep, attr):
                v = getattr(rep, attr)
                try:
                    json.dumps(v)
                except TypeError:
                    v = str(v)
                rep_d[attr] = v
        lines = [ln.strip() for ln in rep_s.splitlines()]
        rep_d["ended"] = next((ln for ln in lines if ln.startswith("ended")), None)
        rep_d["verdict_line"] = next((ln for ln in lines if ln.startswith("verdict")), None)
        log(f"[{meth}] unlearn time {dt:.1f}s report {rep_d}")
        R = evaluate(model, meth, results["oracle"])
        R.update(time_s=dt, report=rep_d, warnings=warns)
        results[meth] = R
    return results


if __name__ == "__main__":
    main()

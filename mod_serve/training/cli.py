"""``mod-serve train`` and ``mod-serve eval``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def train_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mod-serve train", description="MoDification training: LLaMA or MoD checkpoint -> MoD. "
                                "Re-running the same command resumes from the last checkpoint in the output directory.")
    p.add_argument("config", help="YAML or TOML run config (see configs/default.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (YAML value; data.seq_len=512 reaches into data)")
    p.add_argument("--output", help="output directory (overrides the config's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines still go to stderr)")
    args = p.parse_args(argv)
    from .config import load

    try:
        cfg = load(args.config, args.set)
    except (ValueError, OSError) as e:
        p.error(str(e))
    if args.output:
        cfg.output = args.output
    from .trainer import train

    try:
        summary = train(cfg, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:  # bad config values, data sources, resume mismatch
        p.error(str(e))
    print(json.dumps({"output": cfg.output, "steps": summary["steps"], "last": summary["last"]}))
    return 0


def eval_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mod-serve eval", description="held-out perplexity, routed fraction per layer and "
                                "implied KV-memory ratio of a MoD model, against its dense original")
    p.add_argument("model", help="MoD checkpoint dir, routers .safetensors file, or a `mod-serve train` output dir")
    p.add_argument("--base", default="default", help="base checkpoint: the weights under a routers file, and "
                   "the dense baseline (default: a run's recorded base, else the default base)")
    p.add_argument("--heldout", help="data.pt of a run, or a run config to build the held-out split from "
                   "(default: the run dir's data.pt)")
    p.add_argument("--max-sequences", type=int, default=32)
    p.add_argument("--threshold", type=float, action="append", help="evaluate at these thresholds too (repeatable)")
    p.add_argument("--questions", action="store_true", help="also greedy-answer the question set (accuracy vs dense)")
    p.add_argument("--no-dense", action="store_true", help="skip the dense baseline")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--markdown", action="store_true", help="also print the rows as a markdown table")
    args = p.parse_args(argv)
    import torch

    from .evaluate import load_dense, load_for_eval, perplexity, run_base
    from .model import resolve_base

    model = load_for_eval(args.model, args.base)
    heldout_src = args.heldout or (str(Path(args.model) / "data.pt") if Path(args.model).is_dir() else None)
    if heldout_src is None or not Path(heldout_src).exists():
        p.error("no held-out data: pass --heldout (a run's data.pt or a run config)")
    if heldout_src.endswith(".pt"):
        heldout = torch.load(heldout_src)["heldout"]
    else:
        from transformers import AutoTokenizer

        from . import data
        from .config import load

        cfg = load(heldout_src)
        heldout = data.build(cfg.data, AutoTokenizer.from_pretrained(resolve_base(args.base)))[1]
    heldout = heldout[: args.max_sequences]
    results: dict = {"model": args.model, "heldout_tokens": heldout.numel(), "routing": model.config.mod, "rows": []}
    tok = None
    if args.questions:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(resolve_base(args.base))
    from .questions import accuracy

    def row(label, routing=None, of=None):
        of = model if of is None else of
        r = {"label": label, **perplexity(of, heldout, routing)}
        if tok is not None:
            r["accuracy"], r["answers"] = accuracy(of, tok, routing)
        results["rows"].append(r)
        extra = f" acc={r['accuracy']:.3f}" if "accuracy" in r else ""
        print(f"{label:>16}: ppl={r['ppl']:.3f} routed_mean={r['routed_mean']:.3f} kv_ratio={r['kv_ratio']:.3f} "
              f"({1 / r['kv_ratio']:.2f}x less KV){extra}", file=sys.stderr)
        print(f"{'':>16}  routed per layer: {r['routed']}", file=sys.stderr)

    if not args.no_dense:
        dense = load_dense(run_base(args.model, args.base))
        row("dense", of=dense)
        del dense
    row(f"p={model.routing.threshold}" if model.routing.router == "threshold" else f"topk c={model.routing.capacity}")
    for t in args.threshold or []:
        model.set_threshold(t)
        row(f"p={t}")
    if args.markdown:
        from .evaluate import markdown_rows

        print("| model | routed fraction (mean) | KV vs dense | held-out ppl | question accuracy |\n|---|---|---|---|---|")
        print("\n".join(markdown_rows(results)))
    text = json.dumps(results, indent=2)
    if args.json:
        Path(args.json).write_text(text)
    print(text if not args.json else args.json)
    return 0

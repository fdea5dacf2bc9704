"""``mod-serve`` command line: one subcommand per task, each implemented in its own module."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> ("module:function taking argv", one-line help)
SUBCOMMANDS = {
    "serve": ("server.cli:main", "serve a MoD model over an OpenAI-compatible HTTP API (default model if none given)"),
    "convert": ("mod_serve.cli:convert_main", "convert a Hugging Face LLaMA checkpoint into a MoD checkpoint"),
    "prepare": ("mod_serve.cli:prepare_main", "prepare the default MoD model in the cache and print its path"),
    "generate": ("mod_serve.cli:generate_main", "greedy-generate with the reference MoD model (no vLLM)"),
    "bench": ("mod_serve.bench:main", "benchmark a MoD model against its dense original on vLLM"),
    "train": ("mod_serve.training.cli:train_main", "MoDification training: LLaMA or MoD checkpoint -> MoD"),
    "eval": ("mod_serve.training.cli:eval_main", "held-out perplexity and routing statistics of a checkpoint"),
    "chat-data": ("mod_serve.training.chatdata:main", "chat conversations written by the dense model, for distillation"),
}


def convert_main(argv: list[str]) -> int:
    from .convert import ConversionError, convert

    p = argparse.ArgumentParser(prog="mod-serve convert", description=SUBCOMMANDS["convert"][1])
    p.add_argument("src", help="Hugging Face LLaMA checkpoint directory")
    p.add_argument("dst", help="output MoD checkpoint directory (written atomically)")
    p.add_argument("--threshold", type=float, default=0.5, help="router threshold p (default 0.5)")
    p.add_argument(
        "--routed-layers", default="every-other", help="all | every-other (default) | none | 1,3,5 | 2-10"
    )
    p.add_argument("--sink-tokens", type=int, default=0,
                   help="first positions of every sequence always routed in (the attention sink; default 0)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    args = p.parse_args(argv)
    try:
        dst = convert(args.src, args.dst, args.threshold, args.routed_layers, overwrite=args.force,
                      sink_tokens=args.sink_tokens)
    except ConversionError as e:
        p.error(str(e))
    except ValueError as e:  # --routed-layers parse errors name the option themselves
        p.error(str(e))
    print(dst)
    return 0


def prepare_main(argv: list[str]) -> int:
    from .default_model import prepare_default_model

    p = argparse.ArgumentParser(prog="mod-serve prepare", description=SUBCOMMANDS["prepare"][1])
    p.add_argument("--force", action="store_true", help="prepare again even if cached")
    args = p.parse_args(argv)
    print(prepare_default_model(force=args.force))
    return 0


def generate_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mod-serve generate", description=SUBCOMMANDS["generate"][1])
    p.add_argument("prompt", help="user message (the chat template is applied)")
    p.add_argument("--model", help="MoD checkpoint directory (default: the default model)")
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args(argv)
    if args.max_tokens < 1:
        p.error("--max-tokens must be >= 1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import greedy_generate
    from .default_model import prepare_default_model

    path = args.model or prepare_default_model()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    if hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    out, routed = greedy_generate(model, list(ids), args.max_tokens, tok.eos_token_id)
    print(tok.decode(out, skip_special_tokens=True))
    n = len(ids) + len(out) - 1
    frac = {i: round(c / n, 3) for i, c in routed.items()}
    print(f"[mod-serve] routed fraction per routed layer: {frac}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in SUBCOMMANDS:
        width = max(map(len, SUBCOMMANDS))
        lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
        msg = "usage: mod-serve <command> [options]\n\ncommands:\n" + "\n".join(lines)
        if argv and argv[0] not in {"-h", "--help"}:
            print(f"mod-serve: unknown command {argv[0]!r}\n\n{msg}", file=sys.stderr)
            return 2
        print(msg)
        return 0 if argv else 2
    module, func = SUBCOMMANDS[argv[0]][0].split(":")
    return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())

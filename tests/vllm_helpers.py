"""Helpers for tests that run the real vLLM engine in-process (engine core and worker)."""

from __future__ import annotations

import contextlib

import torch

from mod_serve.inproc import inproc_llm as _inproc_llm
from mod_serve.inproc import scheduler, worker  # noqa: F401  (re-exported for the tests)
from mod_serve.vllm_internals import RoutedKVManager

BLOCK_SIZE = 32
COMPILED = {"enforce_eager": False}  # vLLM's default: the MoD model compiled like its Llama

PROMPT_TEXTS = [
    "The capital of France is",
    "Write a haiku about the sea:",
    "1, 2, 3, 4,",
    "Explain why the sky is blue in one sentence.",
    "Once upon a time, in a small village by the mountains, there lived an old clockmaker who",
    "def fibonacci(n):\n    ",
    "The following is a list of the planets of the solar system in order: Mercury,",
    "Translate to French: I would like a cup of coffee, please.",
]


def mixed_prompts(tokenizer, n: int = 16) -> list[list[int]]:
    """n prompts of mixed lengths (about 5 to 300 tokens), as token ids."""
    prompts = []
    for i in range(n):
        text = PROMPT_TEXTS[i % len(PROMPT_TEXTS)]
        text = (" ".join(PROMPT_TEXTS[: 1 + i % 5]) + " ") * (1 + (i * 7) % 9) + text if i % 3 else text
        prompts.append(tokenizer(text).input_ids[:300])
    return prompts


@contextlib.contextmanager
def inproc_llm(model: str, **kwargs):
    """The in-process engine with the tests' defaults: float32, block size 32, 256 MiB of KV, eager.

    Eager by default: torch.compile costs 20-80 s per engine start here, and the routed layers run
    the same code either way (one custom op, called directly when eager). Tests of the compiled
    path pass ``enforce_eager=False`` (``COMPILED``)."""
    args = dict(
        enforce_eager=True,
        dtype="float32",
        max_model_len=1024,
        block_size=BLOCK_SIZE,
        max_num_seqs=32,
        seed=0,
        kv_cache_memory_bytes=256 << 20,
        disable_log_stats=False,
    )
    with _inproc_llm(model, **{**args, **kwargs}) as llm:
        yield llm


def routed_managers(llm) -> dict[int, RoutedKVManager]:
    return scheduler(llm).routed_managers()


def free_blocks(llm) -> int:
    return scheduler(llm).kv_cache_manager.block_pool.get_num_free_blocks()


def metric(llm, name: str) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == name)


def greedy(max_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def token_ids(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def reference_generate(model_dir, prompts, max_tokens):
    """Greedy tokens and per-layer routed counts from the reference model (float32)."""
    from transformers import AutoModelForCausalLM

    import mod_serve

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs, routed = [], {}
    for p in prompts:
        tokens, counts = mod_serve.greedy_generate(model, p, max_tokens)
        outs.append(tokens)
        for layer, c in counts.items():
            routed[layer] = routed.get(layer, 0) + c
    return outs, routed

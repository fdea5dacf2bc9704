"""``mod-serve eval``: held-out perplexity, routed fraction per layer, and the KV-memory ratio
against dense that this routing implies (KV bytes scale with (unrouted layers + sum of routed
fractions) / layers, since layer j caches only the tokens routed into it).

The dense baseline is the base checkpoint itself (``--base``, or the run's base), routing off:
not the evaluated weights with routing off, which after a LoRA run are the adapted weights and
would hide what the adapter changed (chat behaviour, domain perplexity).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..modeling import MoDLlamaForCausalLM
from .export import read_routers
from .model import load_on_base
from .trainer import kv_ratio


@torch.no_grad()
def perplexity(model: MoDLlamaForCausalLM, heldout: torch.Tensor, routing=None, batch_size: int = 4) -> dict:
    nll, count = 0.0, 0
    routed: dict[int, float] = {}
    for i in range(0, len(heldout), batch_size):
        ids = heldout[i : i + batch_size]
        out = model(ids, routing=routing)
        logp = torch.log_softmax(out.logits[:, :-1].float(), -1)
        nll -= logp.gather(-1, ids[:, 1:, None]).sum().item()
        count += ids[:, 1:].numel()
        for j, m in out.routed_masks.items():
            routed[j] = routed.get(j, 0.0) + m.float().sum().item()
    n_tok = heldout.numel()
    fractions = {j: v / n_tok for j, v in routed.items()}
    return {
        "ppl": float(torch.exp(torch.tensor(nll / count))),
        "routed": {j: round(f, 4) for j, f in fractions.items()},
        "routed_mean": round(sum(fractions.values()) / len(fractions), 4) if fractions else 1.0,  # dense: all in
        "kv_ratio": round(kv_ratio(fractions, model.config.num_hidden_layers), 4),
    }


def run_base(target: str, base: str = "default") -> str:
    """The base checkpoint of an eval target: a run dir's recorded base unless ``base`` is given."""
    run_cfg = Path(target) / "train_config.json"
    if base == "default" and run_cfg.is_file():
        return json.loads(run_cfg.read_text()).get("base", base)
    return base


def load_dense(base: str = "default", dtype=torch.float32) -> MoDLlamaForCausalLM:
    """The dense original: the base checkpoint with no routed layer."""
    return load_on_base(base, None, dtype).eval()


def load_for_eval(target: str, base: str = "default", dtype=torch.float32) -> MoDLlamaForCausalLM:
    """A MoD checkpoint dir, a routers file, or a run dir (its routers.safetensors on ``base``)."""
    import mod_serve  # noqa: F401  (registers mod_llama)
    from transformers import AutoModelForCausalLM

    path = Path(target)
    if path.is_dir() and (path / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    adapter = None
    base = run_base(target, base)
    if path.is_dir():
        adapter = path / "adapter" if (path / "adapter").is_dir() else None
        path = path / "routers.safetensors"
    tensors, mod = read_routers(path)
    model = load_on_base(base, mod, dtype).eval()
    missing = model.load_state_dict(tensors, strict=False).unexpected_keys
    if missing:
        raise ValueError(f"routers file has tensors for layers this model does not route: {missing[:3]}")
    if adapter is not None:  # a routers + LoRA run: merge the adapter into the base weights
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()
    return model


def markdown_rows(results: dict, dense: dict | None = None) -> list[str]:
    """Table rows: label | routed mean | KV ratio (x less) | ppl (vs dense) | accuracy (vs dense)."""
    rows = results["rows"]
    dense = dense or next((r for r in rows if r["label"] == "dense"), None)
    out = []
    for r in rows:
        ppl = f"{r['ppl']:.2f}" + (f" ({r['ppl'] / dense['ppl'] - 1:+.1%})" if dense and r is not dense else "")
        acc = ""
        if "accuracy" in r:
            acc = f"{r['accuracy']:.0%}" + (f" ({100 * (r['accuracy'] - dense['accuracy']):+.0f} pt)"
                                             if dense and "accuracy" in dense and r is not dense else "")
        out.append(f"| {r['label']} | {r['routed_mean']:.3f} | {r['kv_ratio']:.3f} ({1 / r['kv_ratio']:.2f}x) | {ppl} | {acc} |")
    return out

"""How much does skipping tokens in a layer cost the default base, with no training at all?

An upper-bound probe for choosing routed layers (docs/training.md, "What skipping costs"): per
layer j, the tokens whose own update ||layer(h) - h|| / ||h|| is smallest skip layer j (neither
query nor key there, exactly MoD's semantics, gate 1); everything else is dense. It uses the
layer's own output to choose, which no router can, so real routers do no better than this
without adapting the weights.

    .venv/bin/python scripts/skip_oracle.py per-layer      # each layer alone, 50 % and 90 % skipped
    .venv/bin/python scripts/skip_oracle.py cumulative 5,25,13,4,26,3  # growing sets of layers
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["per-layer", "cumulative"])
    p.add_argument("order", nargs="?", help="cumulative: comma-separated layers, cheapest first")
    p.add_argument("--sink", type=int, default=1, help="first positions never skipped (default 1)")
    p.add_argument("--sequences", type=int, default=8)
    p.add_argument("--config", default="configs/default.yaml", help="run config whose held-out split to use")
    args = p.parse_args()

    from transformers import AutoTokenizer

    from mod_serve.modeling import decoder_layer_forward, routed_attention_mask
    from mod_serve.training import data
    from mod_serve.training.config import load
    from mod_serve.training.evaluate import load_dense
    from mod_serve.training.model import resolve_base

    cfg = load(args.config)
    model = load_dense()
    ids = data.build(cfg.data, AutoTokenizer.from_pretrained(resolve_base("default")))[1][: args.sequences]
    num_layers = model.config.num_hidden_layers

    @torch.no_grad()
    def run(skip: float, layers) -> tuple[float, float]:
        m = model.model
        h = m.embed_tokens(ids)
        B, T = ids.shape
        cos, sin = m.rotary_emb(h, torch.arange(T).unsqueeze(0).expand(B, T))
        full = routed_attention_mask(torch.ones(B, T, dtype=torch.bool))
        kept = []
        for i, layer in enumerate(m.layers):
            out = decoder_layer_forward(layer, h, cos, sin, full)
            if i not in layers:
                h, _ = out, kept.append(1.0)
                continue
            score = (out - h).norm(dim=-1) / h.norm(dim=-1)
            score[:, : args.sink] = float("inf")
            routed = score > torch.quantile(score[:, args.sink :].flatten(), skip)
            out = decoder_layer_forward(layer, h, cos, sin, routed_attention_mask(routed))
            h = torch.where(routed.unsqueeze(-1), out, h)
            kept.append(routed.float().mean().item())
        logits = model.lm_head(m.norm(h)).float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        return math.exp(nll.item()), sum(kept) / num_layers

    print(f"dense ppl {run(0.0, [])[0]:.2f} on {ids.numel()} held-out tokens")
    if args.mode == "per-layer":
        print("| layer | ppl, 50 % skipped | ppl, 90 % skipped |\n|---|---|---|")
        for j in range(num_layers):
            print(f"| {j} | {run(0.5, [j])[0]:.2f} | {run(0.9, [j])[0]:.2f} |", flush=True)
        return
    if not args.order:
        p.error("cumulative needs the layer order, e.g. 5,25,13,4")
    order = [int(x) for x in args.order.split(",")]
    print("| skipped | layers | ppl | KV vs dense |\n|---|---|---|---|")
    for skip in (0.9, 0.6):
        for k in range(2, len(order) + 1, 2):
            ppl, kv = run(skip, order[:k])
            print(f"| {skip:.0%} | {k} | {ppl:.2f} | {kv:.3f} ({1 / kv:.2f}x) |", flush=True)


if __name__ == "__main__":
    main()

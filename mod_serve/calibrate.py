"""Set router biases so that a chosen fraction of tokens routes into every routed layer.

Used to build test and benchmark models with a known sparsity (e.g. half the tokens skip each
routed layer), and as a router initialisation before training. Layers are calibrated in order,
because routing at one layer changes the hidden states the next router sees.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .modeling import MoDLlamaForCausalLM


@torch.no_grad()
def calibrate_routers(
    model: MoDLlamaForCausalLM,
    input_ids: torch.Tensor,
    routed_fraction: float,
    attention_mask: torch.Tensor | None = None,
    weight_std: float | None = None,
    seed: int = 0,
) -> dict[int, float]:
    """Give every router random weights (if ``weight_std``) and a bias that routes
    ``routed_fraction`` of the sample tokens in at the model's threshold. Returns the fractions."""
    if not 0 < routed_fraction <= 1:
        raise ValueError(f"routed_fraction must be in (0, 1], got {routed_fraction}")
    p = model.routing.threshold
    if not 0 < p < 1:
        raise ValueError(f"calibration needs a threshold in (0, 1), got {p}")
    gen = torch.Generator().manual_seed(seed)
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    routers = model.routers()
    target = math.log(p / (1 - p))

    def set_bias(layer: int, hidden: torch.Tensor, valid: torch.Tensor) -> None:
        router = routers[layer]
        if weight_std is not None:
            router.weight.copy_(torch.randn(router.weight.shape, generator=gen) * weight_std)
        logits = F.linear(hidden.float(), router.weight.float()).squeeze(-1)
        # route in the top `routed_fraction` of scores: that quantile moves to logit(p) (plus
        # 1e-3, so the sample token at the cut is not left exactly on the threshold)
        scores = logits[valid].double()
        cut = torch.quantile(scores, 1.0 - routed_fraction).item() if routed_fraction < 1 else scores.min().item() - 1
        router.bias.fill_(target - cut + 1e-3)

    out = model(input_ids, attention_mask=attention_mask, router_hook=set_bias)
    return out.routed_fraction(valid)

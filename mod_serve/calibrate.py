"""Set router biases so that a chosen fraction of tokens routes into every routed layer.

Used to build test and benchmark models with a known sparsity (e.g. half the tokens skip each
routed layer), and as a router initialisation before training. Layers are calibrated in order,
because routing at one layer changes the hidden states the next router sees.
"""

from __future__ import annotations

import math

import torch

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
    for i, router in model.routers().items():
        if weight_std is not None:
            router.weight.copy_(torch.randn(router.weight.shape, generator=gen) * weight_std)
        router.bias.zero_()
        logits = model(input_ids, attention_mask=attention_mask).router_logits[i][valid].double()
        # route in the top `routed_fraction` of scores: shift so that quantile sits at logit(p)
        cut = torch.quantile(logits, 1.0 - routed_fraction).item() if routed_fraction < 1 else logits.min().item() - 1
        bias = math.log(p / (1 - p)) - cut
        # place the cut midway between neighbouring scores so rounding cannot flip a decision
        router.bias.fill_(bias + 1e-3)
    out = model(input_ids, attention_mask=attention_mask)
    return out.routed_fraction(valid)

"""Per-coordinate preconditioning of router weights, for the attention sink's sake.

The residual stream of SmolLM2 (like most LLaMAs) carries "massive activations": the first token
of a sequence has a few coordinates around 2e4 from layer ~12 on, while ordinary tokens' stay near
1-10. Adam takes steps of about ``lr`` on every coordinate whatever the gradient's size, so even a
tiny, consistent gradient on a massive coordinate moves the sink's router logit by ``lr * 2e4`` per
step: measured here, after 10 steps at lr 3e-5 the sink dropped to g ~ 0.01-0.2 in layers 12-23
while every other token stayed at g ~ 0.9, and the model fell apart (KL 0.6 with "all" tokens in).

Fix: train ``u`` with ``w = u / s``, ``s_k = max_t |h_tk|`` over a sample of layer inputs, so no
token's logit moves by more than ``lr * hidden`` per step and ordinary coordinates keep their
usual rate. It is a torch parametrization: the router's ``weight`` attribute, the forward pass
and the exported tensors are unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize


class InverseScale(nn.Module):
    def __init__(self, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return u / self.scale

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.scale


@torch.no_grad()
def input_scales(model, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    from .init import layer_inputs

    hs = layer_inputs(model, ids)
    return {j: hs[j].abs().amax(dim=(0, 1)).clamp(min=1.0).view(1, -1) for j in model.routers()}


def precondition(model, ids: torch.Tensor, massive_ratio: float = 0.0) -> None:
    """``massive_ratio`` > 0 also freezes (scale 1e12) the coordinates whose max |h| exceeds that many
    times the median coordinate's: the sink's massive activations then cannot move its logit."""
    for j, s in input_scales(model, ids).items():
        if massive_ratio > 0:
            s = torch.where(s > massive_ratio * s.median(), torch.full_like(s, 1e12), s)
        router = model.routers()[j]
        parametrize.register_parametrization(router, "weight", InverseScale(s.to(router.weight.dtype)))


def remove(model) -> None:
    for router in model.routers().values():
        if parametrize.is_parametrized(router, "weight"):
            parametrize.remove_parametrizations(router, "weight", leave_parametrized=True)

"""Router initialisation before training.

Converted routers (weight 0, bias 12) route everything in with sigmoid saturated at 1 - 6e-6, so
the gradient g(1-g) through them is ~6e-6 and training would barely move them. Options:

* ``keep``: leave routers as loaded (continue training a MoD checkpoint);
* ``bias``: weight 0, bias logit(init_gate) (g = 0.9 gives g(1-g) = 0.09, all tokens still in):
  the method's own start, but every token leaves together once the bias crosses logit(p) unless
  the LM gradient has differentiated tokens by then;
* ``calibrate``: random weights, bias set for ``init_fraction`` routed in (mod_serve.calibrate);
* ``importance`` (default): weights fitted by ridge regression of log(||layer(h)-h|| / ||h||),
  the relative size of each token's update, on the layer input h of the dense model, scaled so the
  logits have std ``init_sharpness`` (routed-in tokens then get g close to 1, so the gate scaling
  costs little), and the bias routes in ``init_fraction`` of tokens. The first token of every
  sequence (the attention sink) is labelled as important. Training then refines this with the
  real objective; it only starts from routing that is already informed, which a short CPU budget
  cannot discover from the bias alone.
"""

from __future__ import annotations

import math

import torch

from ..calibrate import calibrate_routers
from ..modeling import MoDLlamaForCausalLM
from .model import dense_routing


@torch.no_grad()
def layer_inputs(model: MoDLlamaForCausalLM, ids: torch.Tensor) -> list[torch.Tensor]:
    """Residual stream entering each layer (and the final norm) of the dense model: L+1 x [B, T, H]."""
    captured: list[torch.Tensor] = []
    mods = [layer.input_layernorm for layer in model.model.layers] + [model.model.norm]
    hooks = [m.register_forward_pre_hook(lambda _m, a: captured.append(a[0].float())) for m in mods]
    try:
        model(ids, routing=dense_routing())
    finally:
        for h in hooks:
            h.remove()
    return captured


@torch.no_grad()
def importance_init(model: MoDLlamaForCausalLM, ids: torch.Tensor, fraction: float, sharpness: float = 4.0,
                    ridge: float = 1e-2, at_threshold: float | None = None) -> dict[int, float]:
    """``fraction`` of tokens score above ``at_threshold`` (default: the model's p). Runs at several
    p from one ``at_threshold`` start from the same router logits: the threshold alone differs."""
    hs = layer_inputs(model, ids)
    p = model.routing.threshold if at_threshold is None else at_threshold
    logit_p = math.log(p / (1 - p)) if 0 < p < 1 else 0.0
    for j, router in model.routers().items():
        h, nxt = hs[j], hs[j + 1]
        y = torch.log((nxt - h).norm(dim=-1) / h.norm(dim=-1).clamp(min=1e-6) + 1e-6)
        y[:, 0] = y.max()  # the attention sink must stay routed in
        X, y = h.reshape(-1, h.shape[-1]).double(), y.reshape(-1).double()
        mu, sd = X.mean(0), X.std(0).clamp(min=1e-6)
        Z = (X - mu) / sd
        w = torch.linalg.solve(Z.T @ Z / len(Z) + ridge * torch.eye(Z.shape[1], dtype=Z.dtype), Z.T @ (y - y.mean()) / len(Z))
        w = w / sd  # back to raw h
        s = X @ w
        w = w * sharpness / s.std().clamp(min=1e-9)
        s = X @ w
        cut = torch.quantile(s, 1 - fraction).item() if fraction < 1 else s.min().item() - 1
        router.weight.copy_(w.to(router.weight.dtype).view_as(router.weight))
        router.bias.fill_(logit_p - cut + 1e-3)
    out = model(ids)
    return out.routed_fraction()


@torch.no_grad()
def init_routers(model: MoDLlamaForCausalLM, how: str, ids: torch.Tensor | None = None, gate: float = 0.9,
                 fraction: float = 0.5, sharpness: float = 4.0, seed: int = 0,
                 at_threshold: float | None = None) -> dict[int, float] | None:
    if how == "keep":
        return None
    if how == "bias":
        for r in model.routers().values():
            r.weight.zero_()
            r.bias.fill_(math.log(gate / (1 - gate)))
        return None
    if ids is None:
        raise ValueError(f"router init {how!r} needs sample sequences")
    if how == "calibrate":
        std = 1.0 / model.config.hidden_size**0.5
        return calibrate_routers(model, ids, fraction, weight_std=std, seed=seed)
    if how == "importance":
        return importance_init(model, ids, fraction, sharpness, at_threshold=at_threshold)
    raise ValueError(f"unknown router init {how!r}")

"""The MoDification objective: L = lm * L_lm + alpha * sum_j F_j G_j + distill * KL(dense || MoD).

F_j is the fraction of valid tokens routed into layer j (a count: no gradient), G_j the mean
router probability over the same tokens (with gradient). The product reads as the load-balancing
loss of a two-expert MoE whose second expert is a no-op: its gradient pushes every router
probability down in proportion to how loaded the layer is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..modeling import MoDOutput


def aux_loss(out: MoDOutput, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[int, float]]:
    """Return (sum_j F_j * G_j, {layer: F_j})."""
    total = torch.zeros((), dtype=torch.float32)
    fractions: dict[int, float] = {}
    for j, g in out.router_probs.items():
        v = torch.ones_like(g, dtype=torch.bool) if valid is None else valid.bool()
        n = v.sum().clamp(min=1)
        f = (out.routed_masks[j] & v).sum().float() / n  # no gradient: a count
        g_mean = (g * v).sum() / n
        total = total.to(g.device) + f.detach() * g_mean
        fractions[j] = float(f)
    return total, fractions


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean per-token KL(teacher || student) over the vocabulary."""
    s = F.log_softmax(student_logits.float(), -1)
    t = F.log_softmax(teacher_logits.float(), -1)
    kl = (t.exp() * (t - s)).sum(-1)
    if valid is None:
        return kl.mean()
    v = valid.float()
    return (kl * v).sum() / v.sum().clamp(min=1)


def lm_loss(logits: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    labels = ids[:, 1:].clone()
    if valid is not None:
        labels[~valid[:, 1:].bool()] = -100
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)

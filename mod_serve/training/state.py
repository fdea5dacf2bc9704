"""Checkpoint and resume: only what training changes (trainable tensors, optimizer, scheduler,
step, RNG), written to a temporary file and renamed, so a kill -9 at any moment leaves the previous
checkpoint intact and resuming loses at most one ``checkpoint_every`` interval.

The data order is a pure function of (seed, step) (``data.batches``), so it needs no saving.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch

STATE = "train_state.pt"


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def save(out: Path, model, optimizer, scheduler, step: int, extra: dict | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "params": trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        "extra": extra or {},
    }
    tmp = out / f".{STATE}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, out / STATE)
    return out / STATE


def load(out: Path, model, optimizer, scheduler) -> tuple[int, dict] | None:
    """Restore from ``out``; returns (step, extra) or None when there is no checkpoint."""
    path = out / STATE
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    params = dict(model.named_parameters())
    missing = set(state["params"]) - set(params)
    if missing:
        raise ValueError(f"checkpoint {path} has parameters this model lacks: {sorted(missing)[:3]}")
    with torch.no_grad():
        for n, t in state["params"].items():
            params[n].copy_(t)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    return state["step"], state["extra"]

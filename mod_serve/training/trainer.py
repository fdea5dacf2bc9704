"""The training loop: accelerate for devices/precision/DeepSpeed, resumable, with a progress bar.

The forward pass is the reference ``MoDLlamaForCausalLM.forward`` (batched masked path): routed-only
attention, gate scaling h + g * (layer(h) - h), threshold g >= p (or top-k), differentiable through
g. Nothing here re-implements the routing.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import data, export, state
from .config import TrainConfig
from .init import init_routers
from .precondition import precondition, remove
from .model import base_model, load_model, resolve_base, setup_trainable, teacher
from .objective import aux_loss, distill_kl, lm_loss


def kv_ratio(fractions: dict[int, float], num_layers: int) -> float:
    """KV bytes against dense: (unrouted layers + sum of routed fractions) / layers."""
    return (num_layers - len(fractions) + sum(fractions.values())) / num_layers


def _accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    kwargs = {"mixed_precision": "bf16" if cfg.bf16 else "no", "cpu": not torch.cuda.is_available()}
    if cfg.deepspeed:
        from accelerate.utils import DeepSpeedPlugin

        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=cfg.deepspeed)
    if cfg.flash_attention:
        if not torch.cuda.is_available():
            raise ValueError("flash_attention needs a GPU (set flash_attention: false on CPU)")
        torch.backends.cuda.enable_flash_sdp(True)
        torch.backends.cuda.enable_mem_efficient_sdp(True)
    return Accelerator(**kwargs)


def _schedule(cfg: TrainConfig, total: int):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return f


def train(cfg: TrainConfig, model=None, train_ids: torch.Tensor | None = None, heldout: torch.Tensor | None = None,
          tokenizer=None, stop_after: int | None = None, progress: bool = True) -> dict:
    """Train (or resume) the run in ``cfg.output``; returns a summary. ``stop_after`` ends the
    process-equivalent after that many steps without a final checkpoint (used to test resume)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    _check_same_run(out, cfg)
    (out / "train_config.json").write_text(cfg.to_json())
    if model is None:
        model = load_model(cfg)
    if tokenizer is None and train_ids is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(resolve_base(cfg.base))
    if train_ids is None:
        train_ids, heldout = data.build(cfg.data, tokenizer)
        torch.save({"train": train_ids, "heldout": heldout}, out / "data.pt")
    resuming = (out / state.STATE).is_file()
    if not resuming:
        sample = train_ids[: cfg.init_sequences]
        init = init_routers(model, cfg.init, sample, cfg.init_gate, cfg.init_fraction, cfg.init_sharpness, cfg.seed,
                            at_threshold=cfg.init_threshold)
        if init is not None:
            tqdm.write(f"router init {cfg.init}: routed fraction {json.dumps({k: round(v, 3) for k, v in init.items()})}")
    if cfg.precondition:  # recomputed identically on resume: same sample, same weights
        precondition(model, train_ids[: max(1, min(4, cfg.init_sequences))], cfg.massive_ratio)
    model = setup_trainable(model, cfg)
    model.train()
    weights = [p for n, p in model.named_parameters() if p.requires_grad and ".router." in n and not n.endswith("bias")]
    biases = [p for n, p in model.named_parameters() if p.requires_grad and ".router.bias" in n]
    others = [p for n, p in model.named_parameters() if p.requires_grad and ".router." not in n]
    router_lr = cfg.router_lr or cfg.lr
    groups = [{"params": weights, "lr": router_lr}, {"params": biases, "lr": cfg.bias_lr or router_lr}]
    if others:
        groups.append({"params": others, "lr": cfg.lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    steps_total = cfg.max_steps or max(1, len(train_ids) // (cfg.batch_size * cfg.grad_accum))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg, steps_total))
    accel = _accelerator(cfg)
    model, optimizer, scheduler = accel.prepare(model, optimizer, scheduler)
    start = 0
    restored = state.load(out, accel.unwrap_model(model), optimizer, scheduler)
    if restored is not None:
        start = restored[0]
        tqdm.write(f"resumed {out} at step {start}")
    batches = data.batches(train_ids, cfg.batch_size, cfg.seed, start * cfg.grad_accum)
    num_layers = base_model(accel.unwrap_model(model)).config.num_hidden_layers
    bar = tqdm(total=steps_total, initial=start, disable=not progress or not accel.is_main_process, dynamic_ncols=True)
    log = open(out / "log.jsonl", "a")
    t0, done, last = time.time(), 0, {}
    for step in range(start, steps_total):
        if stop_after is not None and done >= stop_after:
            break
        stats = {"loss": 0.0, "lm": 0.0, "aux": 0.0, "kl": 0.0}
        fr_sum: dict[int, float] = {}
        for _ in range(cfg.grad_accum):
            ids = next(batches).to(accel.device)
            with accel.autocast():
                res = model(ids)
                lm = lm_loss(res.logits, ids)
                valid = torch.ones_like(ids, dtype=torch.bool)
                valid[:, : max(cfg.aux_skip_first, cfg.sink_tokens)] = False  # forced in: no load to reduce
                aux, fr = aux_loss(res, valid)
                loss = cfg.lm_weight * lm + cfg.alpha * aux
                kl = torch.zeros(())
                if cfg.distill:
                    with teacher(accel.unwrap_model(model)) as dense:
                        t_logits = dense(ids)
                    kl = distill_kl(res.logits, t_logits)
                    loss = loss + cfg.distill * kl
            accel.backward(loss / cfg.grad_accum)
            for k, v in (("loss", loss), ("lm", lm), ("aux", aux), ("kl", kl)):
                stats[k] += float(v.detach()) / cfg.grad_accum
            for j, f in fr.items():
                fr_sum[j] = fr_sum.get(j, 0.0) + f / cfg.grad_accum
        accel.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done += 1
        mean_f = sum(fr_sum.values()) / max(1, len(fr_sum))
        last = {"step": step + 1, **{k: round(v, 5) for k, v in stats.items()}, "routed_mean": round(mean_f, 4),
                "kv_ratio": round(kv_ratio(fr_sum, num_layers), 4), "routed": {j: round(f, 3) for j, f in fr_sum.items()},
                "lr": scheduler.get_last_lr()[0], "elapsed_s": round(time.time() - t0, 1)}
        bar.set_postfix(loss=f"{stats['lm']:.3f}", aux=f"{stats['aux']:.3f}", kl=f"{stats['kl']:.3f}",
                        routed=f"{mean_f:.3f}", kv=f"{last['kv_ratio']:.3f}")
        bar.update(1)
        if accel.is_main_process:
            log.write(json.dumps(last) + "\n")
            log.flush()
            if (step + 1) % cfg.log_every == 0:
                tqdm.write("step {step} routed per layer {routed}".format(**last))
        if (step + 1) % cfg.checkpoint_every == 0 and accel.is_main_process:
            state.save(out, accel.unwrap_model(model), optimizer, scheduler, step + 1)
    bar.close()
    log.close()
    finished = start + done >= steps_total
    unwrapped = accel.unwrap_model(model)
    if finished and accel.is_main_process:
        state.save(out, unwrapped, optimizer, scheduler, start + done)
    if cfg.precondition:
        remove(base_model(unwrapped))
    if finished and accel.is_main_process:
        _export(cfg, unwrapped, out)
    return {"steps": start + done, "finished": finished, "last": last, "model": unwrapped}


RESUME_MAY_CHANGE = {"output", "threads", "log_every"}


def _check_same_run(out: Path, cfg: TrainConfig) -> None:
    """Resuming continues the run in ``out``: refuse (before touching it) a config that differs."""
    old = out / "train_config.json"
    if not (out / state.STATE).is_file() or not old.is_file():
        return
    before, now = json.loads(old.read_text()), json.loads(cfg.to_json())
    changed = sorted(k for k in set(before) | set(now) if k not in RESUME_MAY_CHANGE and before.get(k) != now.get(k))
    if changed:
        raise ValueError(f"{out} holds a run with a different config ({', '.join(changed)} differ): "
                         "resume with the same config, or pass another --output")


def _export(cfg: TrainConfig, model, out: Path) -> None:
    mod = base_model(model)
    if "routers" in cfg.export:
        export.save_routers(mod, out / export.ROUTERS_FILE, {"base": cfg.base, "trainable": cfg.trainable})
    if "adapter" in cfg.export and hasattr(model, "save_pretrained") and hasattr(model, "peft_config"):
        model.save_pretrained(out / "adapter")
        export.save_adapter(model, out / export.ADAPTER_FILE, dtype=getattr(torch, cfg.adapter_dtype))
    if "checkpoint" in cfg.export:
        tok = resolve_base(cfg.base) if cfg.base != "none" else None
        export.save_checkpoint(export.merged(model), out / "model", tokenizer_dir=tok)

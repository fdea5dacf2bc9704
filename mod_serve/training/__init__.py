"""Offline MoDification training: turn a LLaMA (or MoD) checkpoint into a trained MoD model.

One idea per module: ``config`` (the run description), ``data`` (mixture, packing, held-out
split), ``objective`` (LM + load-reducing aux + distillation), ``init`` (router initialisation),
``model`` (load, freeze, LoRA), ``state`` (checkpoint/resume), ``export`` (routers file, adapter,
servable checkpoint), ``trainer`` (the loop), ``evaluate`` and ``questions`` (``mod-serve eval``).
The forward pass is always the reference ``MoDLlamaForCausalLM.forward``, so what is trained is
exactly what is served.
"""

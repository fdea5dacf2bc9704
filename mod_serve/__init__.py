"""mod-serve: Mixture-of-Depths (MoDification) LLaMA models, served with vLLM.

Importing this package registers the MoD config and reference model with transformers' Auto
classes, so ``AutoModelForCausalLM.from_pretrained(mod_checkpoint)`` returns the MoD model.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .config import MOD_ARCHITECTURE, MOD_MODEL_TYPE, MoDLlamaConfig, RoutingConfig, parse_routed_layers
from .modeling import MoDLlamaForCausalLM, MoDOutput, RoutedKVCache, greedy_generate


def register_with_transformers() -> None:
    """Idempotent: register ``mod_llama`` with AutoConfig and AutoModelForCausalLM."""
    try:
        AutoConfig.register(MOD_MODEL_TYPE, MoDLlamaConfig)
    except ValueError:  # already registered
        pass
    try:
        AutoModelForCausalLM.register(MoDLlamaConfig, MoDLlamaForCausalLM)
    except ValueError:
        pass


register_with_transformers()

__all__ = [
    "MOD_ARCHITECTURE",
    "MOD_MODEL_TYPE",
    "MoDLlamaConfig",
    "MoDLlamaForCausalLM",
    "MoDOutput",
    "RoutedKVCache",
    "RoutingConfig",
    "greedy_generate",
    "parse_routed_layers",
]

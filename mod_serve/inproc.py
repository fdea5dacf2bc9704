"""A vLLM ``LLM`` whose engine core and worker run in this process.

The benchmark and the tests read vLLM's own state (the scheduler's KV managers and block pool,
the worker's block tables) instead of trusting counters, which needs them in-process.
"""

from __future__ import annotations

import contextlib
import gc
import os


@contextlib.contextmanager
def inproc_llm(model: str, **kwargs):
    from vllm import LLM

    old = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    llm = LLM(model=model, distributed_executor_backend="uni", **kwargs)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        if old is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = old


def scheduler(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def worker(llm):
    return llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker

"""A vLLM ``LLM`` whose engine core and worker run in this process.

The benchmark and the tests read vLLM's own state (the scheduler's KV managers and block pool,
the worker's block tables) instead of trusting counters, which needs them in-process.
"""

from __future__ import annotations

import contextlib
import gc
import os


@contextlib.contextmanager
def llm_session(model: str, **kwargs):
    """A vLLM ``LLM`` whose engine is shut down (and its memory freed) on exit."""
    from vllm import LLM

    llm = LLM(model=model, **kwargs)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


@contextlib.contextmanager
def inproc_llm(model: str, **kwargs):
    old = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        with llm_session(model, distributed_executor_backend="uni", **kwargs) as llm:
            yield llm
    finally:
        if old is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = old


def scheduler(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def worker(llm):
    return llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker

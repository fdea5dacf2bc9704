"""In-process A/B of the routed layers' direct CPU attention kernels (``CpuAttentionKernels``).

    .venv/bin/python scripts/attention_ab.py MODEL_DIR [BATCH]

One compiled engine (512-token prompts, float32, 1 OpenMP thread as served); six rounds of 24
decode steps per request, the direct kernels on in rounds 0, 2, 4 and off (vLLM's impl called as
``Attention.forward`` would) in rounds 1, 3, 5, so both halves share the engine, the compiled graph
and the machine's state. Prints the median per decode step (us) of the whole step, the routed
attention call and the per-step layer constants, for each half. Both paths run the same kernels on
the same arguments, so the tokens are the same; only the host work around them differs.
"""

from __future__ import annotations

import collections
import os
import statistics
import sys
import time

import step_breakdown as sb

STEPS = 24


def main() -> None:
    import torch

    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    import mod_serve.vllm_model as vm
    from mod_serve import bench
    from mod_serve.inproc import worker
    from mod_serve.vllm_internals import attention

    sb.wrap(attention, "_layer_steps", "layer constants")
    sb.wrap(vm, "routed_attention", "routed attention call")
    model, batch, length = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1, 512
    tok = AutoTokenizer.from_pretrained(model)
    corpus = bench.corpus_token_ids(tok, length * batch + length)
    out = collections.defaultdict(list)
    with bench.engine(model, 2 << 30, length + 64, sb.DTYPE) as llm:
        eng = llm.llm_engine
        attns = [m for m in worker(llm).model_runner.model.modules() if hasattr(m, "mod_cpu_kernels")]
        for rnd in range(6):
            direct = rnd % 2 == 0
            for a in attns:
                a.mod_cpu_kernels = None if direct else False  # None: bind at the next call
            for i, p in enumerate(bench.prompts_of(corpus, length, batch)):
                eng.add_request(f"{rnd}-{i}", {"prompt_token_ids": p}, bench._params(STEPS + 4))
            n = 0
            while eng.has_unfinished_requests():
                sb.ACC.clear()
                t = time.perf_counter()
                eng.step()
                total = time.perf_counter() - t
                n += 1
                if n > 3:  # decode steps only
                    out[(direct, "step")].append(total)
                    for k, v in sb.ACC.items():
                        out[(direct, k)].append(v)
    print("| kernels | step | routed attention call | layer constants | steps |")
    print("|---|---:|---:|---:|---:|")
    for direct in (False, True):
        med = {k: round(1e6 * statistics.median(v)) for (d, k), v in out.items() if d == direct}
        print(f"| {'direct' if direct else 'vLLM impl'} | {med['step']} | {med.get('routed attention call', 0)} | "
              f"{med.get('layer constants', 0)} | {len(out[(direct, 'step')])} |")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

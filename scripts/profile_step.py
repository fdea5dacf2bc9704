"""One engine's decode steps under the torch profiler: the ops with the most self time per step.

    LENGTH=2048 [BATCH=8] [DTYPE=bfloat16] .venv/bin/python scripts/profile_step.py MODEL_DIR

Batch BATCH (default 1) of LENGTH-token prompts (default 2048), float32 (or DTYPE), 1 OpenMP thread as
served; the second of two batches is profiled from its fourth step (decode steps only). Per op: calls, self and total
CPU microseconds per step (profiler overhead included: compare models profiled the same way).
"""

from __future__ import annotations

import os
import sys

DECODE_TOKENS = 28


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoTokenizer

    from mod_serve import bench

    torch.set_num_threads(1)
    model = sys.argv[1]
    length = int(os.environ.get("LENGTH", "2048"))
    tok = AutoTokenizer.from_pretrained(model)
    batch = int(os.environ.get("BATCH", "1"))
    prompts = bench.prompts_of(bench.corpus_token_ids(tok, (batch + 1) * length), length, batch)
    with bench.engine(model, 2 << 30, length + 64, os.environ.get("DTYPE", "float32")) as llm:
        eng = llm.llm_engine
        for rep in range(2):  # the first batch warms up
            for i, prompt in enumerate(prompts):
                eng.add_request(f"r{rep}-{i}", {"prompt_token_ids": prompt}, bench._params(DECODE_TOKENS))
            n, prof = 0, None
            while eng.has_unfinished_requests():
                n += 1
                if rep == 1 and n == 4:
                    prof = profile(activities=[ProfilerActivity.CPU])
                    prof.__enter__()
                eng.step()
            if prof is not None:
                prof.__exit__(None, None, None)
                steps = n - 3
                print(f"{os.path.basename(model.rstrip('/'))}: {steps} decode steps profiled")
                for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:40]:
                    print(f"{e.key[:70]:70s} calls/step {e.count / steps:7.1f}  self us/step "
                          f"{e.self_cpu_time_total / steps:9.1f}  total us/step {e.cpu_time_total / steps:9.1f}")


if __name__ == "__main__":
    main()

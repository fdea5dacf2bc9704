"""A per-request routing threshold (``SamplingParams(extra_args={"mod_threshold": p})``): each
request of one batch routes at its own p, exactly like the reference model run at that p."""

from __future__ import annotations

import json
import shutil

import pytest
from vllm import SamplingParams

from tests.test_vllm_layouts import MAX_TOKENS, random_prompts, small_mod_dir
from tests.vllm_helpers import COMPILED, inproc_llm, reference_generate, routed_managers, scheduler

pytestmark = pytest.mark.slow

THRESHOLDS = [0.3, None, 0.7]  # None: the checkpoint's p (0.5)


def at_threshold(model_dir, p, tmp_path):
    dst = tmp_path / f"p{p}"
    if dst.exists():
        return dst
    shutil.copytree(model_dir, dst)
    config = json.loads((dst / "config.json").read_text())
    config["mod"]["threshold"] = p
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def params(p):
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                          extra_args=None if p is None else {"mod_threshold": p})


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_mixed_thresholds_in_one_batch_equal_the_reference_at_each_p(mode, tmp_path):
    model_dir = small_mod_dir(tmp_path / "m", [1, 2, 3, 5])
    prompts = random_prompts(n=9, seed=4)
    want = []
    for i, prompt in enumerate(prompts):
        p = THRESHOLDS[i % 3]
        ref_dir = model_dir if p is None else at_threshold(model_dir, p, tmp_path)
        want.append(reference_generate(ref_dir, [prompt], MAX_TOKENS)[0][0])
    with inproc_llm(str(model_dir), skip_tokenizer_init=True, max_model_len=512,
                    **(COMPILED if mode == "compiled" else {})) as llm:  # per-token p in the graph's route op
        engine = llm.llm_engine
        for i, prompt in enumerate(prompts):  # the same prompt at the three thresholds, too
            engine.add_request(f"r{i}", {"prompt_token_ids": prompt}, params(THRESHOLDS[i % 3]))
            engine.add_request(f"same{i % 3}", {"prompt_token_ids": prompts[0]}, params(THRESHOLDS[i % 3])) \
                if i < 3 else None
        engine.step()  # prefill, then settle: blocks held per request of the same prompt
        internal = {r: next(i for i in scheduler(llm).requests if i.startswith(r)) for r in ("same0", "same1", "same2")}
        held = {r: sum(len(m.req_to_blocks.get(i, ())) for m in routed_managers(llm).values())
                for r, i in internal.items()}
        got = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    got[out.request_id] = list(out.outputs[0].token_ids)
    assert [got[f"r{i}"] for i in range(len(prompts))] == want
    assert held["same0"] > held["same1"] > held["same2"], held  # p = 0.3 > 0.5 > 0.7 blocks


def test_threshold_out_of_range_is_refused():
    from mod_serve.vllm_internals import request_threshold

    assert request_threshold(None, 0.5) == 0.5
    assert request_threshold({"mod_threshold": 0.6049}, 0.5) == 0.6
    assert request_threshold({"mod_threshold": 1}, 0.5) == 1.0
    for bad in (-0.1, 1.5, "0.6", True, float("nan")):
        with pytest.raises(ValueError, match="mod_threshold must be a number in"):
            request_threshold({"mod_threshold": bad}, 0.5)

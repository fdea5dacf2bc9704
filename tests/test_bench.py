"""mod_serve.bench's arithmetic: repeats reduced to medians, ratios against dense, the ideal."""

from __future__ import annotations

import json
import re
import types

import pytest

from mod_serve import bench


def _run(ttft: float, tpot: float, kv: float = 1000.0) -> dict:
    return {"ttft_s": ttft, "tpot_s": tpot, "itl_p50_s": tpot * 0.8, "kv_bytes_per_token": kv}


def test_median_of_repeats_takes_the_middle_repeat_and_keeps_the_range():
    r = bench.median_of_repeats([_run(1.0, 0.050), _run(3.0, 0.040), _run(2.0, 0.090)])
    assert r["ttft_s"] == 2.0 and r["tpot_s"] == 0.050
    assert r["ttft_s_range"] == (1.0, 3.0) and r["tpot_s_range"] == (0.040, 0.090)
    assert r["itl_p50_s"] == pytest.approx(0.8 * 0.050)
    assert len(r["repeats"]) == 3 and r["kv_bytes_per_token"] == 1000.0


def test_paired_ratio_needs_the_same_rounds():
    dense = bench.median_of_repeats([_run(1, 0.040), _run(1, 0.050)])
    assert bench.paired_ratio(dense, bench.median_of_repeats([_run(1, 0.020), _run(1, 0.100)])) == pytest.approx(1.25)
    assert bench.paired_ratio(dense, bench.median_of_repeats([_run(1, 0.020)])) is None


def test_ideal_speedup_against_a_plain_mac_count():
    config = types.SimpleNamespace(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100)
    assert bench.ideal_speedup(config, {}, 512) == pytest.approx(1.0)
    assert bench.ideal_speedup(config, {"1": 1.0, "3": 1.0}, 512) == pytest.approx(1.0)
    hd = 16
    linear = 64 * 4 * hd + 2 * 64 * 2 * hd + 4 * hd * 64 + 3 * 64 * 128
    attn, head = 2 * 4 * hd * 512, 64 * 100
    dense = 4 * (linear + attn) + head
    mod = 2 * (linear + attn) + 2 * (0.5 * linear + 0.25 * attn) + head
    assert bench.ideal_speedup(config, {"1": 0.5, "3": 0.5}, 512) == pytest.approx(dense / mod)


def test_time_ideal_against_a_hand_count():
    """Per layer: body (forward - attention) / L and attention / L; a routed layer at r saves body x
    (1 - share(r)) and attention x (1 - r^2); the rest of the step is never saved."""
    from mod_serve import time_ideal as ti

    phase = {"steps": 2, "step_s": 10.0, "forward_s": 8.0, "attention_s": 2.0}
    assert ti.time_ideal(phase, 4, {}, lambda r: r) == pytest.approx(1.0)
    assert ti.time_ideal(phase, 4, {1: 1.0, 3: 1.0}, lambda r: r) == pytest.approx(1.0)  # every token routed in
    saved = 2 * (1.5 * 0.5 + 0.5 * 0.75)  # two layers at r = 0.5: body 6 / 4, attention 2 / 4
    assert ti.time_ideal(phase, 4, {1: 0.5, 3: 0.5}, lambda r: r) == pytest.approx(10 / (10 - saved))
    # a weight-bound layer (its linears cost the same at any row count) keeps them unless every token skips
    saved = 2 * (1.5 * 0.5 ** 8 + 0.5 * 0.75)
    bound = [0.0] + [1.0] * 8
    assert ti.time_ideal(phase, 4, {1: 0.5, 3: 0.5}, lambda r: ti.expected_share(bound, 8, r)) == pytest.approx(
        10 / (10 - saved))
    assert ti.time_ideal({"steps": 0, "step_s": 0.0, "forward_s": 0.0, "attention_s": 0.0}, 4, {1: 0.5},
                         lambda r: r) != ti.time_ideal(phase, 4, {1: 0.5}, lambda r: r)  # nan: nothing measured


def test_expected_share_of_the_linear_time():
    from mod_serve import time_ideal as ti

    linear = [0.0, 1.0, 2.0, 3.0, 4.0]  # compute bound: time in proportion to rows -> E[n] / B = r
    assert ti.expected_share(linear, 4, 0.3) == pytest.approx(0.3)
    bound = [0.0, 5.0, 5.0]  # weight bound: the layer's time unless both tokens skip
    assert ti.expected_share(bound, 2, 0.5) == pytest.approx(0.75)
    assert ti.expected_share(bound, 1, 0.5) == pytest.approx(0.5)  # batch 1: the routed fraction
    assert ti.expected_share(bound, 2, 1.0) == pytest.approx(1.0)


def test_report_ratios_are_medians_against_dense(tmp_path):
    """A two-length grid with three repeats: the table's ratios are dense's median over the model's,
    whatever the repeats' order, and the plot and JSON are written."""
    from transformers import LlamaConfig

    dense_dir = tmp_path / "dense"
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=100).save_pretrained(dense_dir)
    timing = {}
    for length in (512, 2048):
        for batch in (1, 8):
            timing[f"dense|{length}|{batch}"] = bench.median_of_repeats(
                [_run(2.0, 0.040, 1000), _run(9.0, 0.041, 1000), _run(1.9, 0.080, 1000)])  # medians 2.0, 0.041
            timing[f"mod|{length}|{batch}"] = bench.median_of_repeats(
                [_run(1.0, 0.0205, 750), _run(1.5, 0.021, 750), _run(0.5, 0.010, 750)])  # medians 1.0, 0.0205
    results = {
        "models": {"dense": str(dense_dir), "mod": str(dense_dir)},
        "args": {"lengths": [512, 2048], "batches": [1, 8], "decode_tokens": 16, "repeats": 3, "case_seconds": 240, "interleave": True, "budget_mib": 512,
                 "concurrency_length": 512, "concurrency_requests": 48},
        "timing": timing,
        "routing": {"mod": {"1": 0.5, "3": 0.5}},
        "concurrency": {"dense": 20, "mod": 26},
        "threads": 1,
        "profile": {"512|1": {"prefill": {"steps": 1, "step_s": 2.0, "forward_s": 1.6, "attention_s": 0.4},
                              "decode": {"steps": 15, "step_s": 0.6, "forward_s": 0.48, "attention_s": 0.12}}},
        "linear_s": [0.0, 0.001, 0.0011, 0.0012, 0.0013, 0.0014, 0.0015, 0.0016, 0.0017],
    }
    table = bench.report(results, tmp_path / "out")
    latency = table.split("## Against the CPU-time ideal")[0]
    rows = [line.split("|")[1:-1] for line in latency.splitlines() if re.match(r"\| (512|2048) \| [18] \| mod \|", line)]
    assert len(rows) == 4
    for row in rows:
        cells = [c.strip() for c in row]
        assert cells[3] == "3" and cells[4] == "1.000" and cells[5] == "20.5" and cells[6] == "10.0-21.0"
        assert cells[7] == "2.00" and cells[10] == "2.00"  # TTFT 2.0 / 1.0, TPOT 41 / 20.5
        assert cells[13] == "16.4" and cells[14] == "2.00"  # ITL: 0.8 x the TPOTs, median 0.8 x 20.5
        assert cells[16] == "1.95"  # paired by round: 40 / 20.5, 41 / 21, 80 / 10 -> median 1.95
    assert "| mod | 26 | 1.30 | 1.33 | 0.98 | 1.33 |" in table
    # the CPU-time ideal, for the one profiled case: per layer body (0.48 - 0.12) / 4, attention 0.12 / 4
    # of 0.6 s; two layers at r = 0.5, batch 1 (share r): saved 2 x (0.09 x 0.5 + 0.03 x 0.75)
    time_row = [c.strip() for c in next(line for line in table.splitlines()
                                        if line.startswith("| 512 | 1 | mod | 40.0 |")).split("|")[1:-1]]
    ideal = 0.6 / (0.6 - 2 * (0.09 * 0.5 + 0.03 * 0.75))
    assert time_row[4:6] == ["0.80", "0.20"] and time_row[6] == "2.00"
    assert time_row[9] == "3.80"  # TTFT paired by round: 2 / 1, 9 / 1.5, 1.9 / 0.5 -> median 3.8
    assert time_row[11] == "2.00" and time_row[12] == f"{ideal:.2f}" and time_row[13] == f"{2 / ideal:.2f}"
    assert time_row[14] == "1.95" and time_row[15] == f"{1.95 / ideal:.2f}"
    assert time_row[16] == "2.00" and time_row[17] == f"{2 / ideal:.2f}"  # ITL p50: 0.8 x the TPOTs
    assert "at 1..8 rows: 1.000, 1.100" in table  # 26 / 20 against KV 1000 / 750; ideal 4 / 3
    assert (tmp_path / "out" / "bench.png").stat().st_size > 0
    assert json.loads((tmp_path / "out" / "bench.json").read_text())["timing"]["mod|512|1"]["tpot_s"] == 0.0205


def test_default_concurrency_budget_holds_about_twenty_dense_requests():
    """2 (K and V) x 4 layers x 2 KV heads x 16 dims x 4 bytes = 1024 B per float32 token; 100 tokens
    take 4 blocks of 32, 20.5 requests 2 687 KiB: the budget rounds up to 3 MiB (half that in bf16)."""
    config = types.SimpleNamespace(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4)
    assert bench.default_budget_mib(config, "float32", 100) == 3
    assert bench.default_budget_mib(config, "bfloat16", 100) == 2
    assert bench.default_budget_mib(config, "float32", 100, requests=2000) == -(-2000.5 * 4 * 32 * 1024 // 2**20)


def test_rag_summary_pairs_rounds_with_dense():
    def rag(cold, warm):
        return {"cold_ttft_s": cold, "warm_ttft_s": warm, "warm_held_bytes": 100, "cold_held_bytes": 90,
                "warm_cached_tokens": 2048, "document_tokens": 2048}

    dense = [rag(1.0, 0.050), rag(2.0, 0.040), rag(1.0, 0.100)]
    mod = [rag(0.8, 0.055), rag(1.0, 0.060), rag(0.9, 0.050)]  # warm / dense: 1.1, 1.5, 0.5
    r = bench.rag_summary(mod, dense)
    assert r["cold_ttft_s"] == 0.9 and r["warm_ttft_s"] == 0.055
    assert r["warm_paired"] == pytest.approx(1.1) and r["cold_paired"] == pytest.approx(0.8)
    assert bench.rag_summary(dense, dense)["warm_paired"] == 1.0


def test_each_round_sends_new_text():
    """A MoD model's routed counts follow the text (and size its routed GEMMs): rounds must not
    repeat a prompt, and every model gets the same prompts within a round."""
    corpus = list(range(10_000))
    rounds = [bench.round_prompts(corpus, 512, 8, r) for r in range(7)]
    assert all(len(p) == 512 for prompts in rounds for p in prompts)
    assert len({tuple(p) for prompts in rounds for p in prompts}) == 7 * 8
    assert bench.round_prompts(corpus, 512, 8, 3) == rounds[3]

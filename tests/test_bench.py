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
    }
    table = bench.report(results, tmp_path / "out")
    rows = [line.split("|")[1:-1] for line in table.splitlines() if re.match(r"\| (512|2048) \| [18] \| mod \|", line)]
    assert len(rows) == 4
    for row in rows:
        cells = [c.strip() for c in row]
        assert cells[3] == "3" and cells[4] == "1.000" and cells[5] == "20.5" and cells[6] == "10.0-21.0"
        assert cells[7] == "2.00" and cells[10] == "2.00"  # TTFT 2.0 / 1.0, TPOT 41 / 20.5
        assert cells[13] == "16.4" and cells[14] == "2.00"  # ITL: 0.8 x the TPOTs, median 0.8 x 20.5
        assert cells[16] == "1.95"  # paired by round: 40 / 20.5, 41 / 21, 80 / 10 -> median 1.95
    assert "| mod | 26 | 1.30 | 1.33 | 0.98 | 1.33 |" in table  # 26 / 20 against KV 1000 / 750; ideal 4 / 3
    assert (tmp_path / "out" / "bench.png").stat().st_size > 0
    assert json.loads((tmp_path / "out" / "bench.json").read_text())["timing"]["mod|512|1"]["tpot_s"] == 0.0205

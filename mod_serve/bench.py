"""``mod-serve bench``: a MoD model against its dense original, on the same vLLM engine, in one run.

Three models share the engine settings, the prompts and the machine:

* ``dense``: the base LLaMA checkpoint served by vLLM's own LlamaForCausalLM (torch.compile'd, as
  vLLM runs it by default), and ``dense-eager``: the same without compilation (the MoD model runs
  eagerly: routing makes its shapes data dependent);
* ``mod-all-in``: the same weights converted to MoD with every token routed in (the price of
  routers and routed-KV bookkeeping);
* ``mod``: the MoD model under test (default: routers calibrated so that ``--routed-fraction`` of
  the tokens are routed into every routed layer).

Measured from vLLM itself, with the engine cores in-process (every model's engine up at once and
each case's rounds interleaved across the models, or one engine at a time with ``--sequential``;
medians over rounds): KV blocks the scheduler's managers
hold per request after prefill (bytes per token), routed fraction per layer, the largest number of
requests of one length that run at once under one KV budget, and TTFT / TPOT at several prompt
lengths and batch sizes. Writes a markdown table and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from .inproc import inproc_llm, scheduler
from .time_ideal import dense_profile, expected_share, linear_curve, time_ideal

BLOCK_SIZE = 32


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def corpus_token_ids(tokenizer, n_tokens: int) -> list[int]:
    """English prose that ships with Python: docstrings of standard-library modules, read with
    ``ast`` from the source files (importing them would run their code)."""
    import ast
    import sysconfig

    texts: list[str] = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "test" in path.parts or "site-packages" in path.parts:
            continue
        try:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        if doc and len(doc) > 200:
            texts.append(doc)
        if sum(map(len, texts)) > n_tokens * 6:
            break
    ids = tokenizer("\n\n".join(texts)).input_ids
    while len(ids) < n_tokens:
        ids = ids + ids
    return ids[:n_tokens]


def prompts_of(corpus: list[int], length: int, count: int) -> list[list[int]]:
    step = max(1, (len(corpus) - length) // max(count, 1))
    return [corpus[i * step : i * step + length] for i in range(count)]


ROUND_SHIFT = 101  # tokens: each round's prompts start this much further into the corpus


def round_prompts(corpus: list[int], length: int, count: int, round_: int) -> list[list[int]]:
    """A round's prompts: ``prompts_of`` on the corpus shifted by ``round_ * ROUND_SHIFT`` tokens, so
    that each round sends new text, as served traffic does (a MoD model's routed counts, which
    size its routed layers' GEMMs, follow the text; repeating it would measure caches a served
    model does not hit). Every model gets the same prompts in a round."""
    return prompts_of(corpus[round_ * ROUND_SHIFT:], length, count)


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def ideal_speedup(config, routed_fraction: dict, context: float, lm_head_share: float = 1.0) -> float:
    """dense MACs / MoD MACs per token: layers skipped at the measured routed fractions r_i, and a
    token routed into layer i attends to the r_i * context tokens routed there before it. Zero
    routing overhead, so an upper bound; on this CPU GEMMs are weight-bandwidth bound at batch 8, where
    a layer's weights are read unless every token skips it, so the batch-8 bound is looser.
    ``lm_head_share``: LM-head tokens per token (1 when decoding; 1/prompt for a prefill)."""
    h, f, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    hd = head_dim(config)
    nq, nkv = config.num_attention_heads, config.num_key_value_heads
    linear = h * nq * hd + 2 * h * nkv * hd + nq * hd * h + 3 * h * f
    attn = 2 * nq * hd * context
    head = h * config.vocab_size * lm_head_share
    r = {int(k): v for k, v in routed_fraction.items()}
    mod = head + sum(r[i] * linear + r[i] ** 2 * attn if i in r else linear + attn for i in range(layers))
    return (layers * (linear + attn) + head) / mod


def engine(model: str, kv_bytes: int, max_model_len: int, dtype: str, max_num_seqs: int = 64, eager: bool = False,
           prefix_caching: bool = False):
    """The same engine settings for every model; ``eager`` switches off torch.compile."""
    extra = {"enforce_eager": True, "compilation_config": {"mode": 0}} if eager else {}
    return inproc_llm(
        model,
        dtype=dtype,
        max_model_len=max_model_len,
        block_size=BLOCK_SIZE,
        kv_cache_memory_bytes=kv_bytes,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max(8192, max_model_len),
        enable_prefix_caching=prefix_caching,
        seed=0,
        **extra,
    )


def _params(max_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def held_bytes(llm, req_id: str) -> int:
    """Bytes of KV blocks the scheduler holds for one request, over all KV cache groups."""
    kvm = scheduler(llm).kv_cache_manager
    groups = kvm.kv_cache_config.kv_cache_groups
    return sum(
        len(m.req_to_blocks.get(req_id, ())) * g.kv_cache_spec.page_size_bytes * len(g.layer_names)
        for m, g in zip(kvm.coordinator.single_type_managers, groups)
    )


def timed_run(llm, prompts: list[list[int]], decode_tokens: int, tag: str) -> dict:
    """Add all prompts at once and step the engine; TTFT and TPOT from wall-clock step times.
    Also records the KV bytes held per prompt token right after each request's prefill."""
    engine = llm.llm_engine
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    start = time.perf_counter()
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, {"prompt_token_ids": p}, _params(decode_tokens))
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    count: dict[str, int] = {}
    itl: list[float] = []  # gaps between a request's consecutive tokens
    kv_per_token: list[float] = []
    internal = {}
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            n = len(o.outputs[0].token_ids)
            if n >= 1 and o.request_id not in first:
                first[o.request_id] = now
                internal[o.request_id] = _internal_id(llm, o.request_id)
                if internal[o.request_id] is not None:
                    kv_per_token.append(held_bytes(llm, internal[o.request_id]) / len(prompts[0]))
            elif n > count.get(o.request_id, 0):
                itl.append(now - last[o.request_id])
            count[o.request_id] = n
            last[o.request_id] = now
    ttft = statistics.mean(first[r] - start for r in ids)
    tpot = statistics.mean((last[r] - first[r]) / max(decode_tokens - 1, 1) for r in ids)
    out = {"ttft_s": ttft, "tpot_s": tpot, "kv_bytes_per_token": statistics.mean(kv_per_token) if kv_per_token else None}
    if itl:  # (none with a single output token)
        out["itl_p50_s"] = statistics.median(itl)
    return out


def _internal_id(llm, external_id: str) -> str | None:
    for rid in scheduler(llm).requests:
        if rid == external_id or rid.startswith(external_id):
            return rid
    return None


def peak_concurrency(llm, prompts: list[list[int]], decode_tokens: int) -> int:
    """Most requests running at once when all are submitted together (KV-limited)."""
    engine = llm.llm_engine
    for i, p in enumerate(prompts):
        engine.add_request(f"conc-{i}", {"prompt_token_ids": p}, _params(decode_tokens))
    peak = 0
    while engine.has_unfinished_requests():
        engine.step()
        peak = max(peak, len(scheduler(llm).running))
    return peak


def make_models(work: Path, routed_fraction: float, mod_dir: str | None, dtype: str) -> dict[str, str]:
    """dense (base), mod-all-in (converted) and mod (given, or calibrated to routed_fraction)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .calibrate import calibrate_routers
    from .convert import convert
    from .default_model import prepare_base

    base = prepare_base()
    all_in = work / "mod-all-in"
    if not all_in.exists():
        convert(base, all_in, routed_layers="every-other")
    if mod_dir is None:
        mod = work / f"mod-calibrated-{routed_fraction}"
        if not mod.exists():
            _log(f"calibrating routers for a routed fraction of {routed_fraction}")
            tok = AutoTokenizer.from_pretrained(all_in)
            model = AutoModelForCausalLM.from_pretrained(all_in, dtype=torch.float32).eval()
            sample = torch.tensor(prompts_of(corpus_token_ids(tok, 8192), 512, 8))
            frac = calibrate_routers(model, sample, routed_fraction, weight_std=0.05)
            _log(f"  calibrated fractions: {json.dumps({k: round(v, 3) for k, v in frac.items()})}")
            model.to(getattr(torch, dtype)).save_pretrained(mod)
            tok.save_pretrained(mod)
        mod_dir = str(mod)
    from .default_model import prepare_default_model

    return {"dense": str(base), "dense-eager": str(base), "mod-all-in": str(all_in), "mod": mod_dir,
            "default": str(prepare_default_model())}


def median_of_repeats(runs: list[dict]) -> dict:
    """One case's result from its repeats: the median TTFT, TPOT (each repeat's own figures are
    means over its requests) and median inter-token gap, their ranges, and the KV bytes per token
    (the same in every repeat)."""
    out = {"repeats": runs}
    for key in ("ttft_s", "tpot_s", "itl_p50_s"):
        if not all(key in r for r in runs):
            continue
        values = [r[key] for r in runs]
        out[key] = statistics.median(values)
        out[f"{key}_range"] = (min(values), max(values))
    out["kv_bytes_per_token"] = runs[0]["kv_bytes_per_token"]
    return out


def _timing(llms: dict, corpus: list[int], args, results: dict) -> None:
    """The latency grid over the engines in ``llms``, in rounds: a round of a case runs each engine
    once (several engines: in alternating order); up to ``--repeats`` rounds, none started after
    ``--case-seconds`` per engine; each case's figures are the median over its rounds."""
    for name, llm in llms.items():
        timed_run(llm, prompts_of(corpus, 128, 2), 4, f"{name}-warmup")
    for length in args.lengths:
        for batch in args.batches:
            runs: dict[str, list] = {name: [] for name in llms}
            started = time.perf_counter()
            for rep in range(args.repeats):
                if rep and time.perf_counter() - started > args.case_seconds * len(llms):
                    break  # long cases (a 2048x8 prefill takes a minute per model) run fewer rounds
                prompts = round_prompts(corpus, length, batch, rep)
                for name in (list(llms) if rep % 2 == 0 else list(reversed(llms))):
                    runs[name].append(timed_run(llms[name], prompts, args.decode_tokens, f"{name}-{length}-{batch}-{rep}"))
            if "dense" in llms:  # what the dense step is made of, for the CPU-time ideal (time_ideal)
                results["profile"][f"{length}|{batch}"] = dense_profile(llms["dense"], prompts, args.decode_tokens,
                                                                        _params)
            for name, reps in runs.items():
                r = results["timing"][f"{name}|{length}|{batch}"] = median_of_repeats(reps)
                tpots = ", ".join(f"{1000 * x['tpot_s']:.1f}" for x in reps)
                _log(f"  {name} L={length} B={batch}: TTFT {r['ttft_s']:.3f}s TPOT {1000 * r['tpot_s']:.1f}ms "
                     f"({tpots}) KV {r['kv_bytes_per_token']:.0f} B/token")
    for name, llm in llms.items():
        stats = llm.collective_rpc("mod_kv_stats")[0] if not name.startswith("dense") else {}
        results["routing"][name] = stats.get("routed_fraction", {})
    if "dense" in llms:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(results["models"]["dense"])
        results["linear_s"] = linear_curve(config, args.dtype, max(args.batches))


def paired_ratio(dense: dict, model: dict, key: str = "tpot_s") -> float | None:
    """The median over rounds of dense's TPOT (or ``key``) / the model's in the same round (interleaved runs)."""
    d, m = dense.get("repeats", []), model.get("repeats", [])
    if not d or len(d) != len(m):
        return None
    return statistics.median(a[key] / b[key] for a, b in zip(d, m))


def run(args) -> dict:
    """Every model's timing engine up at once, each round of a case running every model (in
    alternating order), so that dense and MoD are measured seconds apart: this shared 2-core
    machine drifts by 5-15 % within minutes (one engine at a time measured the all-in model at
    0.82x dense at 512x1 and 1.02x at 2048x1 in the same run). ``--sequential``: one engine at a
    time, as ``mod-serve serve`` runs one per process. Each case's figures: medians over rounds."""
    import contextlib

    from transformers import AutoTokenizer

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    models = make_models(work, args.routed_fraction, args.model, args.dtype)
    models = {k: v for k, v in models.items() if k in args.models or k == "dense"}
    tok = AutoTokenizer.from_pretrained(models["dense"])
    longest = max(args.lengths)
    corpus = corpus_token_ids(tok, max(longest * max(args.batches) + longest, 2 * args.concurrency_length)
                              + args.repeats * ROUND_SHIFT)
    max_len = longest + args.decode_tokens + BLOCK_SIZE
    # the concurrency phase has its own prompt length (--concurrency-length), maybe above every timed one
    conc_len = max(max_len, args.concurrency_length + args.decode_tokens + BLOCK_SIZE)
    import torch

    results: dict = {"models": models, "args": vars(args), "timing": {}, "kv": {}, "concurrency": {}, "routing": {},
                     "profile": {}, "threads": torch.get_num_threads()}

    def timing_engine(name: str):
        _log(f"{name}: timing engine ({models[name]})")
        return engine(models[name], args.kv_gib << 30, max_len, args.dtype, eager=name == "dense-eager")

    if args.interleave:
        with contextlib.ExitStack() as stack:
            _timing({name: stack.enter_context(timing_engine(name)) for name in models}, corpus, args, results)
    else:
        for name in models:
            with timing_engine(name) as llm:
                _timing({name: llm}, corpus, args, results)
    if args.budget_mib is None:
        from transformers import AutoConfig

        args.budget_mib = default_budget_mib(AutoConfig.from_pretrained(models["dense"]), args.dtype,
                                             args.concurrency_length + args.decode_tokens)
    for name, path in models.items():
        if name == "dense-eager":
            continue  # same KV footprint as dense
        _log(f"{name}: concurrency under a {args.budget_mib} MiB KV budget")
        # a count of the scheduler's, the same compiled or not: eager spares a compile per model
        with engine(path, args.budget_mib << 20, conc_len, args.dtype, max_num_seqs=256, eager=True) as llm:
            conc_prompts = prompts_of(corpus, args.concurrency_length, args.concurrency_requests)
            results["concurrency"][name] = peak_concurrency(llm, conc_prompts, args.decode_tokens)
            _log(f"  peak running requests of {args.concurrency_length} tokens: {results['concurrency'][name]}")
    return results


def default_budget_mib(config, dtype: str, tokens: int, requests: int = 20) -> int:
    """A KV budget (MiB) that holds ``requests`` dense requests of ``tokens`` tokens and a half more."""
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim(config) * (2 if dtype == "bfloat16" else 4)
    blocks = -(-tokens // BLOCK_SIZE)
    return -(-int((requests + 0.5) * blocks * BLOCK_SIZE * per_token) // 2**20)


def report(results: dict, out_dir: Path) -> str:
    """Markdown table (ratios against dense) and a PNG plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args = results["args"]
    timing = results["timing"]
    names = list(results["models"])
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(results["models"]["dense"])
    repeats = args.get("repeats", 1)
    lines = ["## Latency (ratio = dense / model, > 1 is faster than dense)", "",
             f"{results.get('threads', '?')} OpenMP thread(s) per engine, as `mod-serve serve` runs its worker here. "
             + ("Every model's engine up at once, a round of a case running every model once in alternating "
                "order (dense and MoD seconds apart). " if args.get("interleave") else
                "One engine at a time (as `mod-serve serve` runs one per process). ")
             + f"Each case ran in rounds (up to {repeats}, none started after {args.get('case_seconds', 0):.0f} s per model; "
             "column `n`); TTFT and TPOT are the median over the rounds, each round's "
             "figure the mean over its requests; `TPOT min-max`: the rounds' range; `ITL p50`: the median gap "
             "between a request's consecutive tokens (median over the rounds), a decode step without the "
             "occasional slow one (a prefill chunk, a pause of the machine); `TPOT paired` (interleaved runs; `-` with `--sequential`): "
             "the median over rounds of dense's TPOT / the model's in the same round, seconds apart. "
             "`ideal`: dense MACs / MoD MACs at the measured routed fractions (zero routing overhead, compact "
             "attention; `ideal_speedup`), `of ideal`: measured ratio / ideal ratio.", ""]
    lines.append("| prompt | batch | model | n | TTFT s | TPOT ms | TPOT min-max | TTFT ratio | ideal | of ideal "
                 "| TPOT ratio | ideal | of ideal | ITL p50 ms | ITL ratio | of ideal | TPOT paired | of ideal |")
    lines.append("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for length in args["lengths"]:
        for batch in args["batches"]:
            d = timing[f"dense|{length}|{batch}"]
            for name in names:
                r = timing[f"{name}|{length}|{batch}"]
                routed = results["routing"].get(name, {})
                i_ttft = ideal_speedup(config, routed, length / 2, 1 / length)
                i_tpot = ideal_speedup(config, routed, length + args["decode_tokens"] / 2)
                ttft, tpot = d["ttft_s"] / r["ttft_s"], d["tpot_s"] / r["tpot_s"]
                itl = d["itl_p50_s"] / r["itl_p50_s"] if "itl_p50_s" in r and "itl_p50_s" in d else None
                paired = paired_ratio(d, r) if args.get("interleave") else None
                lo, hi = r.get("tpot_s_range", (r["tpot_s"], r["tpot_s"]))
                lines.append(
                    f"| {length} | {batch} | {name} | {len(r.get('repeats', [r]))} | {r['ttft_s']:.3f} | "
                    f"{1000 * r['tpot_s']:.1f} | "
                    f"{1000 * lo:.1f}-{1000 * hi:.1f} | "
                    f"{ttft:.2f} | {i_ttft:.2f} | {ttft / i_ttft:.2f} | {tpot:.2f} | {i_tpot:.2f} | {tpot / i_tpot:.2f} | "
                    + (f"{1000 * r['itl_p50_s']:.1f} | {itl:.2f} | {itl / i_tpot:.2f} | " if itl is not None else "- | - | - | ")
                    + (f"{paired:.2f} | {paired / i_tpot:.2f} |" if paired is not None else "- | - |")
                )
    lines += time_ideal_table(results, config)
    lines += ["", "## KV memory", ""]
    num_layers = config.num_hidden_layers

    def kv_ideal(name: str) -> float:  # routed-fraction ideal: KV of the MoD model / dense
        routing = results["routing"].get(name, {})
        return (num_layers - len(routing) + sum(routing.values())) / num_layers

    lines.append("| prompt | model | KV bytes/token | ratio to dense | routed-fraction ideal | vs ideal |")
    lines.append("|---:|---|---:|---:|---:|---:|")
    for length in args["lengths"]:
        d = timing[f"dense|{length}|1"]["kv_bytes_per_token"]
        for name in names:
            kv = timing[f"{name}|{length}|1"]["kv_bytes_per_token"]
            lines.append(f"| {length} | {name} | {kv:.0f} | {kv / d:.3f} | {kv_ideal(name):.3f} | "
                         f"{kv / d / kv_ideal(name):.3f} |")
    for name in names:
        routing = results["routing"].get(name)
        if not routing:
            continue
        lines += ["", f"Routed fraction of `{name}` over all tokens its engine saw "
                  f"(mean {statistics.mean(routing.values()):.3f}):", ""]
        lines.append("| layer | " + " | ".join(routing) + " |")
        lines.append("|---|" + "---:|" * len(routing))
        lines.append("| routed | " + " | ".join(f"{v:.2f}" for v in routing.values()) + " |")
    lines += ["", f"## Concurrency under one KV budget ({args['budget_mib']} MiB, prompts of "
              f"{args['concurrency_length']} tokens, {args['concurrency_requests']} submitted)", "",
              "`KV ratio allows`: dense KV bytes per token / the model's, as measured in the latency grid at "
              "the concurrency prompt length when the grid has it (else at its longest prompt), i.e. what the "
              "KV the model really holds allows (block rounding included); `of allowed`: the concurrency ratio / "
              "that; `ideal allows`: 1 / the routed-fraction ideal KV ratio (no block rounding), for reference.", ""]
    lines.append("| model | peak running requests | ratio to dense | KV ratio allows | of allowed | ideal allows |")
    lines.append("|---|---:|---:|---:|---:|---:|")
    at = args["concurrency_length"] if args["concurrency_length"] in args["lengths"] else max(args["lengths"])
    for name in results["concurrency"]:
        c = results["concurrency"][name] / results["concurrency"]["dense"]
        allows = timing[f"dense|{at}|1"]["kv_bytes_per_token"] / timing[f"{name}|{at}|1"]["kv_bytes_per_token"]
        lines.append(f"| {name} | {results['concurrency'][name]} | {c:.2f} | {allows:.2f} | {c / allows:.2f} "
                     f"| {1 / kv_ideal(name):.2f} |")
    table = "\n".join(lines) + "\n"

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name in names:
        for batch, style in zip(args["batches"], ["-o", "--s"]):
            axes[0].plot(args["lengths"], [timing[f"{name}|{l}|{batch}"]["ttft_s"] for l in args["lengths"]], style,
                         label=f"{name} B={batch}")
            axes[1].plot(args["lengths"], [1000 * timing[f"{name}|{l}|{batch}"]["tpot_s"] for l in args["lengths"]],
                         style, label=f"{name} B={batch}")
    axes[0].set(title="TTFT", xlabel="prompt tokens", ylabel="s")
    axes[1].set(title="TPOT", xlabel="prompt tokens", ylabel="ms")
    axes[0].legend(fontsize=7)
    routing = results["routing"].get("mod", {})
    if routing:
        axes[2].bar(list(routing), list(routing.values()))
    axes[2].set(title="routed fraction per routed layer (mod)", xlabel="layer", ylim=(0, 1))
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_dir / "bench.png", dpi=110)
    (out_dir / "bench.md").write_text(table)
    (out_dir / "bench.json").write_text(json.dumps(results, indent=2, default=str))
    return table


def time_ideal_table(results: dict, config) -> list[str]:
    """The latency ratios against the CPU-time ideal (``mod_serve.time_ideal``), with the dense
    step's make-up it comes from. Empty for a run that did not record it."""
    profile, lin = results.get("profile"), results.get("linear_s")
    if not profile or not lin:
        return []
    args, timing, layers = results["args"], results["timing"], config.num_hidden_layers
    lines = ["", "## Against the CPU-time ideal", "",
             "`time ideal`: the dense step time / what it would be with every routed layer skipped at its measured "
             "routed fraction and zero routing overhead (`mod_serve.time_ideal`, the issue's ideal): per case, the "
             "dense engine's decoder layers and attention kernels timed inside one more run, and one layer's linears "
             "at 1..B rows through vLLM's CPU GEMM dispatch, since at batch B a layer reads all its weights unless "
             "all B tokens skip it. `MAC ideal`: the table above's `ideal`. `of it`: measured / time ideal.", "",
             "Dense linears of one layer, ms at 1.." + str(len(lin) - 1) + " rows: "
             + ", ".join(f"{1000 * x:.3f}" for x in lin[1:]), "",
             "| prompt | batch | model | dense decode step ms | layers | attention | TTFT ratio | time ideal | of it "
             "| TTFT paired | of it | TPOT ratio | time ideal | of it | TPOT paired | of it | ITL p50 ratio | of it "
             "| MAC ideal (TPOT) |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for length in args["lengths"]:
        for batch in args["batches"]:
            prof = profile.get(f"{length}|{batch}")
            if prof is None:
                continue
            dec = prof["decode"]
            d = timing[f"dense|{length}|{batch}"]
            for name in results["models"]:
                if name.startswith("dense"):
                    continue
                r = timing[f"{name}|{length}|{batch}"]
                routed = {int(k): v for k, v in results["routing"].get(name, {}).items()}
                t_ttft = time_ideal(prof["prefill"], layers, routed, lambda f: f)
                t_tpot = time_ideal(dec, layers, routed, lambda f: expected_share(lin, batch, f))
                mac = ideal_speedup(config, routed, length + args["decode_tokens"] / 2)
                ttft, tpot = d["ttft_s"] / r["ttft_s"], d["tpot_s"] / r["tpot_s"]
                paired = paired_ratio(d, r) if args.get("interleave") else None
                paired_ttft = paired_ratio(d, r, "ttft_s") if args.get("interleave") else None
                itl = d["itl_p50_s"] / r["itl_p50_s"] if "itl_p50_s" in r and "itl_p50_s" in d else None
                steps = max(dec["steps"], 1)
                lines.append(
                    f"| {length} | {batch} | {name} | {1000 * dec['step_s'] / steps:.1f} | "
                    f"{dec['forward_s'] / dec['step_s']:.2f} | {dec['attention_s'] / dec['step_s']:.2f} | "
                    f"{ttft:.2f} | {t_ttft:.2f} | {ttft / t_ttft:.2f} | "
                    + (f"{paired_ttft:.2f} | {paired_ttft / t_ttft:.2f} | " if paired_ttft is not None else "- | - | ")
                    + f"{tpot:.2f} | {t_tpot:.2f} | {tpot / t_tpot:.2f} | "
                    + (f"{paired:.2f} | {paired / t_tpot:.2f} | " if paired is not None else "- | - | ")
                    + (f"{itl:.2f} | {itl / t_tpot:.2f} | " if itl is not None else "- | - | ")
                    + f"{mac:.2f} |")
    lines += ["", "`dense decode step ms`: the profiled run's mean decode step; `layers`, `attention`: the shares of it "
              "spent in the decoder layers (vLLM's Llama forward) and in their attention kernels. The TPOT time ideal is "
              "that of a decode step; where prompts prefill in chunks between decode steps (long prompts at batch 8) "
              "the mean TPOT mixes both, and `ITL p50` (the median gap between tokens) is the decode step's ratio. "
              "`TTFT paired`: as `TPOT paired`, the median over rounds of dense's TTFT / the model's in the same round."]
    return lines


RAG_QUESTIONS = [
    "Summarise the text above in one sentence.", "What is the main topic?", "Name one function mentioned.",
    "Which module is described first?", "Give a title for this text.", "What would a beginner find hard here?",
    "List three keywords.", "Is anything deprecated?", "What does the text say about errors?",
    "Which data types appear?", "Write one question a reader might ask.", "What is the tone of the text?",
    "Name a class mentioned.", "What is said about files?", "Explain one term used.", "What comes last?",
]


def rag_case(llm, tok, document: list[int], max_tokens: int = 8, tag: str = "rag") -> dict:
    """16 requests sharing one document, each with its own question: the first runs cold, then the
    other 15 one after another (warm: the document's KV comes from vLLM's prefix cache). TTFT per
    request from engine steps; KV bytes the scheduler holds for a warm request at its first token."""
    engine = llm.llm_engine
    ttft, held, cached = [], [], []
    for i, question in enumerate(RAG_QUESTIONS):
        prompt = document + tok("\n\nQuestion: " + question + "\nAnswer:").input_ids
        rid = f"{tag}-{i}"
        start = time.perf_counter()
        engine.add_request(rid, {"prompt_token_ids": prompt}, _params(max_tokens))
        first = None
        while engine.has_unfinished_requests():
            for o in engine.step():
                if first is None and o.outputs[0].token_ids:
                    first = time.perf_counter() - start
                    internal = _internal_id(llm, rid)
                    held.append(held_bytes(llm, internal) if internal else 0)
                if o.finished:
                    cached.append(o.num_cached_tokens or 0)
        ttft.append(first)
    return {"cold_ttft_s": ttft[0], "warm_ttft_s": statistics.mean(ttft[1:]), "warm_held_bytes": statistics.mean(held[1:]),
            "cold_held_bytes": held[0], "warm_cached_tokens": statistics.mean(cached[1:]), "document_tokens": len(document)}


def rag_summary(rounds: list[dict], dense_rounds: list[dict]) -> dict:
    """One model's RAG figures over its rounds: median cold and warm TTFT, the median over rounds of
    its warm TTFT / dense's in the same round, and the KV and cache figures (the same every round)."""
    out = {k: rounds[0][k] for k in ("warm_held_bytes", "cold_held_bytes", "warm_cached_tokens", "document_tokens")}
    out["cold_ttft_s"] = statistics.median(r["cold_ttft_s"] for r in rounds)
    out["warm_ttft_s"] = statistics.median(r["warm_ttft_s"] for r in rounds)
    out["warm_paired"] = statistics.median(r["warm_ttft_s"] / d["warm_ttft_s"] for r, d in zip(rounds, dense_rounds))
    out["cold_paired"] = statistics.median(r["cold_ttft_s"] / d["cold_ttft_s"] for r, d in zip(rounds, dense_rounds))
    out["rounds"] = rounds
    return out


def run_rag(args) -> str:
    """Every model's engine up at once (prefix caching on); each round gives every model, in
    alternating order, a document of its own (so that its first request is cold) and the 16
    requests on it, as the latency grid interleaves its rounds."""
    import contextlib

    from transformers import AutoTokenizer

    work = Path(args.work_dir)
    models = make_models(work, args.routed_fraction, args.model, args.dtype)
    models = {k: v for k, v in models.items() if k in ("dense", "mod", "default") and (k in args.models or k == "dense")}
    tok = AutoTokenizer.from_pretrained(models["dense"])
    n = args.rag_tokens
    corpus = corpus_token_ids(tok, n * (args.rag_rounds + 1))
    documents = [corpus[k * n:(k + 1) * n] for k in range(args.rag_rounds)]
    runs: dict[str, list] = {name: [] for name in models}
    with contextlib.ExitStack() as stack:
        llms = {}
        for name, path in models.items():
            _log(f"{name}: RAG engine, prefix caching on")
            llms[name] = stack.enter_context(engine(path, 1 << 30, n + 128, args.dtype, prefix_caching=True))
            rag_case(llms[name], tok, corpus[args.rag_rounds * n:][:256], 2, "rag-warmup")  # compiled graph, allocator
        for k, document in enumerate(documents):
            for name in (list(llms) if k % 2 == 0 else list(reversed(llms))):
                r = rag_case(llms[name], tok, document, tag=f"rag-{k}")
                runs[name].append(r)
                _log(f"  {name} round {k}: cold TTFT {r['cold_ttft_s']:.3f}s, warm TTFT {r['warm_ttft_s']:.3f}s, "
                     f"{r['warm_cached_tokens']:.0f} cached tokens, {r['warm_held_bytes'] / 2**20:.1f} MiB held")
    results = {name: rag_summary(r, runs["dense"]) for name, r in runs.items()}
    table = rag_report(results, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rag.md").write_text(table)
    (out / "rag.json").write_text(json.dumps(results, indent=2))
    return table


def rag_report(results: dict, args) -> str:
    d = results["dense"]
    rounds = len(d["rounds"])
    lines = [f"## RAG: {len(RAG_QUESTIONS)} requests sharing one {args.rag_tokens}-token document, prefix caching on", "",
             f"Every model's engine up at once; {rounds} rounds, each giving every model (in alternating order) a new "
             "document: its first request cold, the other 15 warm (one after another). TTFT: the median over the "
             "rounds (warm: each round's mean over its 15 requests); `paired`: the median over rounds of the model's "
             "TTFT / dense's in the same round (> 1: slower than dense).", "",
             "| model | cold TTFT s | warm TTFT s | cold / warm | cold vs dense, paired | warm vs dense | warm vs dense, "
             "paired | cached tokens per warm request | KV MiB held per warm request | KV vs dense |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['cold_ttft_s']:.3f} | {r['warm_ttft_s']:.3f} | {r['cold_ttft_s'] / r['warm_ttft_s']:.1f} | "
                     f"{r['cold_paired']:.2f} | {r['warm_ttft_s'] / d['warm_ttft_s']:.2f} | {r['warm_paired']:.2f} | "
                     f"{r['warm_cached_tokens']:.0f} | {r['warm_held_bytes'] / 2**20:.1f} | "
                     f"{r['warm_held_bytes'] / d['warm_held_bytes']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mod-serve bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="MoD checkpoint to benchmark (default: the default base, every other "
                   "layer routed, routers calibrated to --routed-fraction)")
    p.add_argument("--routed-fraction", type=float, default=0.5, help="for the calibrated default (0 < f <= 1)")
    p.add_argument("--lengths", default="512,2048,4096", help="prompt lengths, comma separated")
    p.add_argument("--batches", default="1,8", help="batch sizes, comma separated")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], help="default: bfloat16 where the CPU has "
                   "AVX-512 BF16, else float32 (without it vLLM's bf16 GEMMs fall back from oneDNN to slow PyTorch)")
    p.add_argument("--kv-gib", type=int, default=2, help="KV cache of each model's timing engine (GiB)")
    p.add_argument("--repeats", type=int, default=7, help="rounds of each case; the table gives the median")
    p.add_argument("--sequential", dest="interleave", action="store_false", help="one engine at a time (each "
                   "model's rounds together) instead of every model's engine up at once with each round of a case "
                   "running every model in alternating order (the default: this machine drifts by 5-15 %% between "
                   "minutes, so only rounds seconds apart compare)")
    p.add_argument("--case-seconds", type=float, default=60, help="no new round of a case once its rounds took this "
                   "many seconds per model (at least one round)")
    p.add_argument("--budget-mib", type=int, help="KV budget for the concurrency run (MiB; default: what about 20 "
                   "dense requests hold, so that one request is a small step of the ratio)")
    p.add_argument("--concurrency-length", type=int, default=512, help="prompt tokens of the concurrency run (a "
                   "length the grid times, whose KV bytes per token give the ratio the KV allows)")
    p.add_argument("--concurrency-requests", type=int, default=48)
    p.add_argument("--work-dir", default=str(Path.home() / ".cache" / "mod-serve" / "bench"))
    p.add_argument("--out", default="docs/bench", help="directory for bench.md, bench.png, bench.json")
    p.add_argument("--rag", action="store_true", help="run only the RAG case (shared document, prefix caching "
                   "on; writes rag.md and rag.json)")
    p.add_argument("--rag-tokens", type=int, default=2048, help="the RAG case's shared document length")
    p.add_argument("--rag-rounds", type=int, default=5, help="RAG rounds (a new document each); medians over them")
    p.add_argument("--models", default="dense,dense-eager,mod-all-in,mod,default",
                   help="models to run (dense always runs: the ratios are against it)")
    p.add_argument("--threads", type=int, default=1, help="OpenMP threads per engine (default 1: what a served "
                   "vLLM worker gets on this 2-core machine, one core being reserved)")
    args = p.parse_args(argv)
    try:
        args.lengths = [int(x) for x in args.lengths.split(",")]
        args.batches = [int(x) for x in args.batches.split(",")]
    except ValueError:
        p.error("--lengths and --batches take comma-separated integers")
    if not 0 < args.routed_fraction <= 1:
        p.error("--routed-fraction must be in (0, 1]")
    if args.repeats < 1 or args.rag_rounds < 1:
        p.error("--repeats and --rag-rounds must be at least 1")
    if 1 not in args.batches:
        p.error("--batches must include 1 (KV bytes per token are read from the batch-1 runs)")
    args.models = args.models.split(",")
    if args.dtype is None:
        import torch

        args.dtype = "bfloat16" if torch.cpu._is_avx512_bf16_supported() else "float32"
    import torch

    torch.set_num_threads(args.threads)  # before the engine's worker binds its threads
    if args.rag:
        print(run_rag(args))
        return 0
    results = run(args)
    print(report(results, Path(args.out)))
    return 0

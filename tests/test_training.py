"""The training module on tiny random models: objective, gradients, sparsification, resume, export."""

from __future__ import annotations

import math

import pytest
import torch

from mod_serve.modeling import MoDLlamaForCausalLM
from mod_serve.training.config import from_dict
from mod_serve.training.export import read_routers, save_checkpoint, save_routers
from mod_serve.training.objective import aux_loss
from mod_serve.training.trainer import kv_ratio, train
from tests.conftest import TINY, tiny_llama, tiny_mod


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and on busy shared cores threads cost seconds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _ids(n=16, T=24, seed=0):
    return torch.randint(0, TINY["vocab_size"], (n, T), generator=torch.Generator().manual_seed(seed))


def _cfg(tmp_path, **kw):
    base = {"output": str(tmp_path / "run"), "init": "keep", "batch_size": 2, "checkpoint_every": 2,
            "log_every": 100, "warmup_steps": 1, "schedule": "constant", "lr": 0.05, "seed": 0}
    return from_dict({**base, **kw})


def test_aux_loss_and_gradient_match_hand_computation():
    model = tiny_mod(routed_layers=(1, 3), threshold=0.5)
    ids = _ids(2, 20)
    out = model(ids)
    aux, fractions = aux_loss(out)
    by_hand = 0.0
    for j in (1, 3):
        g = out.router_probs[j]
        f = float((g >= 0.5).float().mean())
        assert math.isclose(fractions[j], f)
        by_hand += f * g.mean()
    torch.testing.assert_close(aux, by_hand)
    # d aux / d bias_3 = F_3 * mean(g (1 - g)) over layer 3's tokens (layer 3's bias reaches only
    # G_3 since F is a count); compare against autograd
    model.zero_grad()
    aux.backward()
    g3 = out.router_probs[3].detach()
    expected = fractions[3] * (g3 * (1 - g3)).mean()
    torch.testing.assert_close(model.model.layers[3].router.bias.grad[0], expected.to(torch.float32), rtol=1e-4, atol=1e-7)


def test_large_alpha_lowers_routed_fraction(tmp_path):
    model = tiny_mod(routed_layers=(1, 3, 5), half_skip=False)
    ids = _ids()
    # Adam moves the bias ~lr per step: from logit(0.9) = 2.2 it crosses logit(0.5) = 0 in ~4 steps
    cfg = _cfg(tmp_path, alpha=50.0, init="bias", init_gate=0.9, max_steps=6, threshold=0.5, lr=0.6,
               routed_layers=[1, 3, 5])
    first = aux_loss(model(ids[:2]))[1]
    assert all(f == 1.0 for f in first.values())
    summary = train(cfg, model=model, train_ids=ids, progress=False)
    assert summary["last"]["routed_mean"] < 0.5, summary["last"]


def test_alpha_zero_all_in_keeps_dense_outputs(tmp_path):
    dense = tiny_llama()
    model = tiny_mod(routed_layers=(1, 3, 5), half_skip=False)
    model.load_state_dict(dense.state_dict(), strict=False)
    ids = _ids()
    cfg = _cfg(tmp_path, alpha=0.0, max_steps=2, routed_layers=[1, 3, 5], init="keep")
    train(cfg, model=model, train_ids=ids, progress=False)
    model.eval()
    with torch.no_grad():  # (on the GPU where there is one: train() leaves the model where it trained)
        x = ids[:2].to(model.device)
        out = model(x)
        assert all(m.all() for m in out.routed_masks.values())
        ref = dense.to(model.device)(x).logits.float()
    torch.testing.assert_close(out.logits, ref, rtol=1e-4, atol=1e-4)


def _router_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if ".router." in k}


def test_kill_and_resume_reaches_same_weights(tmp_path):
    ids = _ids()
    kw = dict(alpha=1.0, max_steps=6, init="bias", routed_layers=[1, 3, 5], distill=0.5)
    whole = train(_cfg(tmp_path / "a", **kw), model=tiny_mod(half_skip=False), train_ids=ids, progress=False)
    # "killed" after 5 steps: the checkpoint of step 4 survives, step 5 is lost
    cfg = _cfg(tmp_path / "b", **kw)
    part = train(cfg, model=tiny_mod(half_skip=False), train_ids=ids, progress=False, stop_after=5)
    assert not part["finished"]
    resumed = train(cfg, model=tiny_mod(half_skip=False), train_ids=ids, progress=False)
    assert resumed["steps"] == 6 and resumed["finished"]
    a, b = _router_state(whole["model"]), _router_state(resumed["model"])
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_resume_with_a_different_config_is_refused_before_touching_the_run(tmp_path):
    cfg = _cfg(tmp_path, alpha=1.0, max_steps=4, routed_layers=[1, 3, 5])
    train(cfg, model=tiny_mod(), train_ids=_ids(), progress=False, stop_after=2)
    saved = (tmp_path / "run" / "train_config.json").read_text()
    with pytest.raises(ValueError, match="alpha"):
        train(_cfg(tmp_path, alpha=0.5, max_steps=4, routed_layers=[1, 3, 5]), model=tiny_mod(), train_ids=_ids(),
              progress=False)
    assert (tmp_path / "run" / "train_config.json").read_text() == saved


def test_trained_checkpoint_loads_in_reference_model_with_identical_routing(tmp_path):
    import mod_serve  # noqa: F401
    from transformers import AutoModelForCausalLM

    ids = _ids()
    model = tiny_mod(half_skip=False)
    summary = train(_cfg(tmp_path, alpha=1.0, max_steps=4, init="importance", init_fraction=0.5,
                         init_sequences=4, routed_layers=[1, 3, 5]), model=model, train_ids=ids, progress=False)
    trained = summary["model"].eval()
    dst = save_checkpoint(trained, tmp_path / "ckpt", dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    assert isinstance(loaded, MoDLlamaForCausalLM)
    tensors, mod = read_routers(save_routers(trained, tmp_path / "routers.safetensors"))
    assert mod["routed_layers"] == [1, 3, 5] and mod["threshold"] == 0.5
    with torch.no_grad():
        x = ids[:4].to(trained.device)
        a, b = trained(x), loaded.to(trained.device)(x)
    for j in (1, 3, 5):
        assert torch.equal(a.routed_masks[j], b.routed_masks[j])
        assert 0 < a.routed_masks[j].float().mean() < 1  # routing is really sparse
    torch.testing.assert_close(a.logits, b.logits)


def test_topk_trains_and_kv_ratio_formula(tmp_path):
    ids = _ids()
    model = tiny_mod(half_skip=False)
    cfg = _cfg(tmp_path, router="topk", capacity=0.25, max_steps=2, init="importance", init_sequences=4,
               routed_layers=[1, 3, 5])
    from mod_serve.config import MoDLlamaConfig

    model.config.mod = {**model.config.mod, "router": "topk", "capacity": 0.25}
    assert isinstance(model.config, MoDLlamaConfig)
    summary = train(cfg, model=model, train_ids=ids, progress=False)
    with torch.no_grad():
        fractions = summary["model"](ids[:2].to(summary["model"].device)).routed_fraction()
    assert all(f == math.ceil(0.25 * 24) / 24 for f in fractions.values()), fractions
    assert math.isclose(kv_ratio({1: 0.25, 3: 0.25, 5: 0.25}, 6), (3 + 0.75) / 6)


def test_config_rejects_unknown_keys(tmp_path):
    import pytest

    from mod_serve.training.config import load

    p = tmp_path / "c.toml"
    p.write_text('alpha = 0.1\nthreshhold = 0.5\n')
    with pytest.raises(ValueError, match="threshhold"):
        load(p)
    p.write_text('alpha = 0.1\n[data]\nseq_len = 64\n')
    assert load(p, ["data.seq_len=32"]).data.seq_len == 32


def test_precondition_is_a_pure_reparametrization():
    from mod_serve.training.precondition import precondition, remove

    model = tiny_mod(routed_layers=(1, 3))
    ids = _ids(4)
    before = {j: (r.weight.detach().clone(), model(ids).router_probs[j]) for j, r in model.routers().items()}
    precondition(model, ids)
    after = model(ids)
    for j, r in model.routers().items():
        torch.testing.assert_close(r.weight, before[j][0])
        torch.testing.assert_close(after.router_probs[j], before[j][1])
    remove(model)
    for j, r in model.routers().items():
        torch.testing.assert_close(r.weight, before[j][0])
        assert sorted(dict(r.named_parameters())) == ["bias", "weight"]


def test_lora_run_exports_adapter_that_eval_merges(tmp_path):
    from mod_serve.training.evaluate import load_for_eval
    from mod_serve.training.model import load_model

    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    ids = _ids()
    cfg = _cfg(tmp_path, base=str(base), trainable="lora", lr=0.05, alpha=1.0, max_steps=3, init="importance",
               init_sequences=4, routed_layers=[1, 3, 5], export=["routers", "adapter"], adapter_dtype="float32",
               lora_targets=["q_proj", "v_proj", "down_proj"])
    summary = train(cfg, model=load_model(cfg), train_ids=ids, progress=False)
    assert (tmp_path / "run" / "adapter").is_dir()
    trained = summary["model"].eval()
    loaded = load_for_eval(str(tmp_path / "run"))
    with torch.no_grad():
        x = ids[:2].to(trained.device)
        a, b = trained(x), loaded.to(trained.device)(x)
    for j in (1, 3, 5):
        assert torch.equal(a.routed_masks[j], b.routed_masks[j])
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-4)

    # The flat adapter file (what the default model ships), merged by hand-free file surgery into a
    # converted checkpoint, gives the peft-merged model: same routing, same logits.
    import shutil

    from mod_serve.convert import ROUTER_SHARD, convert, merge_adapter, read_adapter

    deltas = read_adapter(tmp_path / "run" / "adapter.safetensors")
    assert len(deltas) == 3 * 6 and all(a.shape[0] == cfg.lora_r for a, _ in deltas.values())
    mod = convert(base, tmp_path / "mod", routed_layers=[1, 3, 5], sink_tokens=cfg.sink_tokens)
    shutil.copy2(tmp_path / "run" / "routers.safetensors", mod / ROUTER_SHARD)
    assert merge_adapter(mod, tmp_path / "run" / "adapter.safetensors") == 18
    from transformers import AutoModelForCausalLM

    served = AutoModelForCausalLM.from_pretrained(mod, dtype=torch.float32).eval()
    with torch.no_grad():
        c = served.to(trained.device)(x)
    for j in (1, 3, 5):
        assert torch.equal(a.routed_masks[j], c.routed_masks[j])
    torch.testing.assert_close(a.logits, c.logits, rtol=1e-4, atol=1e-4)


def test_chat_instructions_are_seeded_distinct_and_exclude_the_eval_questions(monkeypatch):
    from mod_serve.training import chatdata
    from mod_serve.training.chatdata import instructions
    from mod_serve.training.questions import QUESTIONS

    a, b = instructions(500, seed=0), instructions(500, seed=0)
    assert a == b and len(set(a)) == 500 and instructions(500, seed=1) != a
    assert not {q for q, _ in QUESTIONS} & set(instructions(1000))
    # a template that would produce an evaluation question: that instruction is dropped
    monkeypatch.setattr(chatdata, "TOPICS", ["the planets", "Romeo and Juliet"])
    monkeypatch.setattr(chatdata, "TEMPLATES", ["Who wrote {t}?", "Explain {t}."])
    assert set(chatdata.instructions(3)) == {"Who wrote the planets?", "Explain the planets.", "Explain Romeo and Juliet."}
    with pytest.raises(ValueError, match="3 distinct"):
        chatdata.instructions(4)
    with pytest.raises(ValueError, match="--num"):
        instructions(10**6)


@pytest.mark.slow
def test_chat_data_is_written_by_the_dense_model_through_vllm(default_base_dir, tmp_path):
    """A few conversations through the real engine: JSONL that the data loader reads back as chat
    (through the chat template), one per instruction, in order."""
    import json

    from transformers import AutoTokenizer

    from mod_serve.training import data
    from mod_serve.training.chatdata import generate, instructions
    from mod_serve.training.config import Source

    out = generate(default_base_dir, tmp_path / "chat.jsonl", 3, max_tokens=8, kv_cache_bytes=64 << 20)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["messages"][0]["content"] for r in rows] == instructions(3)
    assert all(r["messages"][1]["role"] == "assistant" and r["messages"][1]["content"] for r in rows)
    tok = AutoTokenizer.from_pretrained(default_base_dir)
    docs = list(data.documents(Source(path=str(out), format="jsonl", field="messages"), tok))
    assert len(docs) == 3 and all("<|im_start|>assistant" in d for d in docs)

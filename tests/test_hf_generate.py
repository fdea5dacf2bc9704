"""transformers' generate() and pipeline("text-generation") on the reference model, through the
compact routed cache: greedy output equals ``greedy_generate``, left-padded batches equal their
sequences decoded one by one, sampling is seeded and consistent."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedTokenizerFast, pipeline

from mod_serve.modeling import MoDLlamaForCausalLM, RoutedKVCache, greedy_generate
from tests.conftest import TINY, tiny_mod

PAD = 0
NEW = 12


def _model(**kw) -> MoDLlamaForCausalLM:
    model = tiny_mod(routed_layers=(1, 2, 4, 5), **kw)
    model.generation_config.eos_token_id = None  # greedy_generate below runs without EOS too
    model.generation_config.pad_token_id = PAD
    return model


def _prompts(lengths=(7, 16, 1, 11)):
    return [torch.randint(3, TINY["vocab_size"], (n,), generator=torch.Generator().manual_seed(n)).tolist()
            for n in lengths]


def _left_padded(prompts):
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):], mask[b, width - len(p):] = torch.tensor(p), 1
    return ids, mask


@torch.no_grad()
def test_generate_greedy_equals_greedy_generate_with_compact_cache():
    model = _model()
    model.config.mod = {**model.config.mod, "sink_tokens": 1}
    prompt = _prompts((13,))[0]
    out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True)
    want, routed = greedy_generate(model, prompt, NEW)
    assert out.sequences[0, len(prompt):].tolist() == want
    cache = out.past_key_values
    assert isinstance(cache, RoutedKVCache)  # generate used the compact cache, not a DynamicCache
    fed = len(prompt) + NEW - 1  # the last token is never fed back
    assert cache.get_seq_length() == fed
    for i in range(model.config.num_hidden_layers):
        assert cache.layer_len(i) == routed.get(i, fed), i  # routed layers hold their routed-in tokens only
    assert all(0 < routed[i] < fed for i in routed)  # and routing really is sparse


@torch.no_grad()
def test_left_padded_batch_equals_each_sequence_alone():
    """Padding is not attended, cached or counted: the positions, sink and routing of each sequence
    are those it has alone, so its tokens and its cache entries per layer are greedy_generate's."""
    model = _model()
    model.config.mod = {**model.config.mod, "sink_tokens": 2}
    prompts = _prompts()
    ids, mask = _left_padded(prompts)
    cache = RoutedKVCache(model.config.num_hidden_layers)
    out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=NEW, do_sample=False)
    for b, prompt in enumerate(prompts):
        want, routed = greedy_generate(model, prompt, NEW)
        assert out[b, ids.shape[1]:].tolist() == want, b
        for i in range(model.config.num_hidden_layers):
            assert int(cache.layers[i].lengths[b]) == routed.get(i, len(prompt) + NEW - 1), (b, i)
    # and the same as recomputing the padded batch with the full (uncached) forward at every step
    uncached = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, use_cache=False)
    assert torch.equal(out, uncached)


@torch.no_grad()
def test_chunked_prefill_and_continuing_from_a_returned_cache():
    model = _model()
    ids, mask = _left_padded(_prompts())
    want = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    chunked = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, prefill_chunk_size=4)
    assert torch.equal(chunked, want)
    cache = RoutedKVCache(model.config.num_hidden_layers)
    first = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=5, do_sample=False)
    mask = torch.cat([mask, torch.ones_like(first[:, ids.shape[1]:])], dim=1)
    again = model.generate(first, attention_mask=mask, past_key_values=cache, max_new_tokens=NEW - 5, do_sample=False)
    assert torch.equal(again, want)


@torch.no_grad()
def test_sink_positions_are_true_positions_under_left_padding():
    """Routers that send every token away: only each sequence's first two real tokens (not the
    first two columns of the padded batch) enter the routed layers."""
    model = _model(half_skip=False)
    model.config.mod = {**model.config.mod, "sink_tokens": 2}
    for router in model.routers().values():
        router.bias.fill_(-12.0)
    prompts = _prompts((5, 9, 2))
    ids, mask = _left_padded(prompts)
    cache = RoutedKVCache(model.config.num_hidden_layers)
    out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=6, do_sample=False)
    for i in model.routing.routed_layers:
        assert cache.layers[i].lengths.tolist() == [2, 2, 2]
    for b, prompt in enumerate(prompts):
        assert out[b, ids.shape[1]:].tolist() == greedy_generate(model, prompt, 6)[0]


@torch.no_grad()
def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = _model()
    ids, mask = _left_padded(_prompts((6, 10, 3)))

    def sample(seed, **kw):
        torch.manual_seed(seed)
        return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=True, temperature=1.5, **kw)

    first = sample(0)
    assert torch.equal(first, sample(0))  # reproducible
    assert not torch.equal(first, sample(1))  # and really sampled
    assert torch.equal(first, sample(0, use_cache=False))  # the cache changes nothing
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    torch.manual_seed(2)
    top1 = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=True, top_k=1)
    assert torch.equal(top1, greedy)
    torch.manual_seed(3)
    many = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=True, num_return_sequences=2)
    assert many.shape == (6, ids.shape[1] + NEW)


@torch.no_grad()
def test_beam_search_reorders_the_compact_cache():
    model = _model()
    ids, mask = _left_padded(_prompts((8, 4)))
    kw = dict(attention_mask=mask, max_new_tokens=8, num_beams=3, do_sample=False)
    assert torch.equal(model.generate(ids, **kw), model.generate(ids, use_cache=False, **kw))


def test_other_caches_are_refused():
    model = _model()
    with pytest.raises(ValueError, match="compact cache"):
        model.generate(torch.tensor([[5, 6]]), max_new_tokens=2, cache_implementation="static")
    with pytest.raises(TypeError, match="RoutedKVCache"):
        model.generate(torch.tensor([[5, 6]]), max_new_tokens=2, past_key_values=DynamicCache())


def _char_tokenizer() -> PreTrainedTokenizerFast:
    """One character per token, every id of the tiny vocabulary decodable."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "<s>", "</s>"]
    chars = [chr(c) for c in range(32, 127)]
    chars += [chr(0xC0 + i) for i in range(TINY["vocab_size"] - len(specials) - len(chars))]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token=" "))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="left"
    )


@torch.no_grad()
def test_pipeline_on_a_saved_checkpoint(tmp_path):
    tiny_mod(routed_layers=(1, 2, 4, 5), seed=1).save_pretrained(tmp_path)
    _char_tokenizer().save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(model, MoDLlamaForCausalLM)
    pipe = pipeline("text-generation", model=str(tmp_path))
    texts = ["The capital of France is", "Hi", "Mixture-of-Depths"]
    results = pipe(texts, max_new_tokens=NEW, do_sample=False, batch_size=3, return_full_text=False)
    tok = pipe.tokenizer
    for text, result in zip(texts, results):
        want, _ = greedy_generate(model, tok(text).input_ids, NEW, eos_token_id=tok.eos_token_id)
        assert result[0]["generated_text"] == tok.decode(want, skip_special_tokens=True)


@pytest.mark.slow
@torch.no_grad()
def test_pipeline_chat_on_the_default_model(default_model_dir):
    tok = AutoTokenizer.from_pretrained(default_model_dir, padding_side="left")
    pipe = pipeline("text-generation", model=str(default_model_dir), tokenizer=tok, dtype=torch.float32)
    chats = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "user", "content": "Name a color."}]]
    results = pipe(chats, max_new_tokens=16, do_sample=False, batch_size=2)
    for chat, result in zip(chats, results):
        ids = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
        want, _ = greedy_generate(pipe.model, list(ids), 16, tok.eos_token_id)
        assert result[0]["generated_text"][-1] == {"role": "assistant",
                                                  "content": tok.decode(want, skip_special_tokens=True)}

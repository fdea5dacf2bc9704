"""A small question set with short, checkable answers, for greedy-answer accuracy against dense.

Questions a 135M instruct model answers correctly fairly often (capitals, arithmetic, common
facts), so that a drop caused by routing is visible. An answer is correct when it contains one of
the accepted strings (case-insensitive).
"""

from __future__ import annotations

import torch

from ..modeling import MoDLlamaForCausalLM, greedy_generate

QUESTIONS: list[tuple[str, tuple[str, ...]]] = [
    ("What is the capital of France?", ("paris",)),
    ("What is the capital of Germany?", ("berlin",)),
    ("What is the capital of Italy?", ("rome",)),
    ("What is the capital of Spain?", ("madrid",)),
    ("What is the capital of Japan?", ("tokyo",)),
    ("What is the capital of England?", ("london",)),
    ("What is the capital of Russia?", ("moscow",)),
    ("What is the capital of China?", ("beijing",)),
    ("What is the capital of Egypt?", ("cairo",)),
    ("What is the capital of Canada?", ("ottawa",)),
    ("How many days are in a week?", ("seven", "7")),
    ("How many legs does a spider have?", ("eight", "8")),
    ("How many continents are there on Earth?", ("seven", "7")),
    ("What is 2 + 2?", ("4", "four")),
    ("What is 10 times 10?", ("100", "hundred")),
    ("What color is the sky on a clear day?", ("blue",)),
    ("What color are bananas when they are ripe?", ("yellow",)),
    ("What is the largest planet in our solar system?", ("jupiter",)),
    ("Which planet is known as the Red Planet?", ("mars",)),
    ("What is the chemical symbol for water?", ("h2o", "h₂o")),
    ("What gas do plants absorb from the air?", ("carbon dioxide", "co2")),
    ("Who wrote Romeo and Juliet?", ("shakespeare",)),
    ("What is the freezing point of water in degrees Celsius?", ("0", "zero")),
    ("What is the opposite of hot?", ("cold",)),
    ("What animal is known as the king of the jungle?", ("lion",)),
    ("How many hours are in a day?", ("24", "twenty-four", "twenty four")),
    ("What is the largest ocean on Earth?", ("pacific",)),
    ("What language is mainly spoken in Brazil?", ("portuguese",)),
    ("What do bees make?", ("honey",)),
    ("What is the boiling point of water in degrees Celsius?", ("100", "hundred")),
]


@torch.no_grad()
def greedy_full(model: MoDLlamaForCausalLM, prompt: list[int], max_new: int, eos: int | None, routing=None) -> list[int]:
    """Greedy decoding by recomputing the whole sequence (works for top-k and dense routing)."""
    ids = list(prompt)
    for _ in range(max_new):
        tok = int(model(torch.tensor([ids]), routing=routing).logits[0, -1].argmax())
        ids.append(tok)
        if tok == eos:
            break
    return ids[len(prompt):]


def answer(model, tokenizer, question: str, max_new: int = 24, routing=None) -> str:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    if hasattr(ids, "input_ids") or isinstance(ids, dict):
        ids = ids["input_ids"]
    routing_ = routing or model.routing
    if routing_.router == "threshold":  # causal: the compact-cache decoder (dense = no routed layers)
        saved = model.config.mod
        model.config.mod = routing_.to_dict()
        try:
            out, _ = greedy_generate(model, list(ids), max_new, tokenizer.eos_token_id)
        finally:
            model.config.mod = saved
    else:
        out = greedy_full(model, list(ids), max_new, tokenizer.eos_token_id, routing)
    return tokenizer.decode(out, skip_special_tokens=True)


def accuracy(model, tokenizer, routing=None, questions=QUESTIONS) -> tuple[float, list[dict]]:
    rows = []
    for q, accepted in questions:
        a = answer(model, tokenizer, q, routing=routing)
        rows.append({"question": q, "answer": a, "correct": any(x in a.lower() for x in accepted)})
    return sum(r["correct"] for r in rows) / len(rows), rows

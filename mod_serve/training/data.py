"""Data: a weighted mixture of sources, tokenised, packed to ``seq_len``, with a held-out split.

Each source is a stream of documents (EOS-separated once tokenised). Its packed sequences are split
by position (the tail of each source is held out, so held-out text never appears in training),
then each split draws from every source in proportion to its weight, repeating a small source
rather than letting a big one crowd it out. Chat data (``field: messages``) goes through the
tokenizer's chat template, so the model sees the same format it is served with.
"""

from __future__ import annotations

import glob
import html
import json
import math
import re
from pathlib import Path

import torch

from .config import DataConfig, Source


def _html_to_text(raw: str) -> str:
    raw = re.sub(r"(?is)<(script|style|nav|header|footer)\b.*?</\1>", " ", raw)
    raw = re.sub(r"(?i)<br\s*/?>|</(p|div|h\d|li|pre|tr)>", "\n", raw)
    text = html.unescape(re.sub(r"<[^>]+>", "", raw))
    return re.sub(r"\n\s*\n+", "\n\n", re.sub(r"[ \t]+", " ", text)).strip()


def _render(record, field: str, tokenizer) -> str | None:
    value = record.get(field) if isinstance(record, dict) else record
    if value is None:
        return None
    if field == "messages" or (isinstance(value, list) and value and isinstance(value[0], dict)):
        return tokenizer.apply_chat_template(value, tokenize=False)
    return str(value)


def documents(source: Source, tokenizer):
    """Yield the documents of one source as strings."""
    if source.hf is not None:
        import datasets

        ds = datasets.load_dataset(source.hf, source.hf_name, split=source.hf_split)
        for rec in ds:
            doc = _render(rec, source.field, tokenizer)
            if doc and doc.strip():
                yield doc
        return
    files = sorted(glob.glob(str(Path(source.path).expanduser()), recursive=True))
    if not files:
        raise FileNotFoundError(f"data source {source.path!r} matches no files")
    for f in files:
        if source.format == "jsonl":
            for line in Path(f).read_text(errors="replace").splitlines():
                if line.strip():
                    doc = _render(json.loads(line), source.field, tokenizer)
                    if doc and doc.strip():
                        yield doc
            continue
        text = Path(f).read_text(errors="replace")
        yield _html_to_text(text) if source.format == "html" else text


def pack(source: Source, tokenizer, seq_len: int, max_tokens: int) -> torch.Tensor:
    """Tokenise a source's documents (EOS after each) and cut the stream into [n, seq_len] rows."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for doc in documents(source, tokenizer):
        stream.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
        if len(stream) >= max_tokens:
            break
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"data source {source.path or source.hf!r} has fewer than {seq_len} tokens")
    return torch.tensor(stream[: n * seq_len]).view(n, seq_len)


def _draw(rows: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    reps = math.ceil(n / len(rows))
    order = torch.cat([torch.randperm(len(rows), generator=gen) for _ in range(reps)])[:n]
    return rows[order]


def build(cfg: DataConfig, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (train, heldout) token tensors, each [n, seq_len], drawn from the weighted mixture."""
    if not cfg.sources:
        raise ValueError("the config names no data sources (data.sources)")
    n_train = max(1, cfg.train_tokens // cfg.seq_len)
    n_held = max(1, cfg.heldout_tokens // cfg.seq_len)
    total_w = sum(s.weight for s in cfg.sources)
    gen = torch.Generator().manual_seed(cfg.seed)
    train, held = [], []
    for s in cfg.sources:
        share = s.weight / total_w
        want_train, want_held = max(1, round(share * n_train)), max(1, round(share * n_held))
        rows = pack(s, tokenizer, cfg.seq_len, (want_train + want_held) * cfg.seq_len)
        k = min(want_held, max(1, len(rows) // 10)) if len(rows) > 1 else 0
        held_rows, train_rows = rows[len(rows) - k :], rows[: len(rows) - k]
        if len(train_rows) == 0:
            raise ValueError(f"data source {s.path or s.hf!r} is too small to split")
        train.append(_draw(train_rows, want_train, gen))
        if k:
            held.append(_draw(held_rows, min(want_held, k), gen))
    train_t, held_t = torch.cat(train), torch.cat(held)
    return train_t[torch.randperm(len(train_t), generator=gen)], held_t


def batches(train: torch.Tensor, batch_size: int, seed: int, start: int = 0):
    """Deterministic epoch-wise shuffled batches; ``start`` skips that many batches (for resume)."""
    per_epoch = len(train) // batch_size
    if per_epoch == 0:
        raise ValueError(f"{len(train)} training sequences are fewer than one batch of {batch_size}")
    i = start
    while True:
        epoch, k = divmod(i, per_epoch)
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        yield train[order[k * batch_size : (k + 1) * batch_size]]
        i += 1

"""What a model costs: batch-1 latency, cold and warm, and perplexity on a token-completion file.

Sizes are in MB of 1e6 bytes. `size_mb` (evaluate/run.py) counts fp32 weights whatever dtype the model is held in,
so models compare by parameter count; `artifacts.disk_mb` is what the checkpoint really takes (fp16 or int8 exports
show there).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distil_codegpt.config import UserError
from distil_codegpt.data.formats import FORMATS, corpus_format, decode_document
from distil_codegpt.data.tokenizer import encode_documents
from distil_codegpt.engines.base import TorchEngine
from distil_codegpt.evaluate.completion import StopIds, complete, encode_inputs, engine_complete
from distil_codegpt.model import families


def latency(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    inputs: list[str],
    n: int,
    beam: int = 1,
    max_new_tokens: int = 100,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    line_end: str = "token",
) -> dict[str, float | None]:
    """{"p50", "p95"}: milliseconds to complete one whole line at batch 1 (what an editor waits for).

    The first `n` inputs are timed one by one after one untimed warm-up run (allocator, kernels); None when n is 0.
    """
    sample = inputs[:n]
    if not sample:
        return {"p50": None, "p95": None}
    stops = StopIds.of(tok)
    kw = {"beam": beam, "max_new_tokens": max_new_tokens, "device": device, "autocast_dtype": autocast_dtype}
    kw["line_end"] = line_end
    complete(model, tok, sample[:1], batch_size=1, progress=False, stops=stops, **kw)
    times = []
    for text in sample:
        start = time.perf_counter()
        complete(model, tok, [text], batch_size=1, progress=False, stops=stops, **kw)  # returns str: GPU synced
        times.append((time.perf_counter() - start) * 1000)
    p50, p95 = np.percentile(times, [50, 95])
    return {"p50": float(p50), "p95": float(p95)}


def warm_latency(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    inputs: list[str],
    n: int,
    max_new_tokens: int = 100,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    line_end: str = "token",
) -> dict[str, float | None]:
    """{"p50", "p95", "cached"}: milliseconds to complete one whole line at batch 1 when the prompt but its last
    token is already in the KV cache, as the editor's previous keystroke left it (what `serve` answers with its
    prefix cache); "cached" is the mean share of prompt tokens taken from the cache. Greedy, the same inputs,
    truncation, stops and line-end rule as `latency`; None when n is 0.

    Each timed prompt is preceded by an untimed read of the prompt less its last token (a keystroke can change
    the last token, so it is read again with the new one), after one untimed warm-up run."""
    sample = inputs[:n]
    if not sample:
        return {"p50": None, "p95": None, "cached": None}
    engine, stops = TorchEngine(model, tok, Path("."), str(device), cache_slots=1), StopIds.of(tok)
    amp = torch.autocast(torch.device(device).type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    times, cached = [], []
    with amp:
        engine_complete(engine, tok, sample[:1], max_new_tokens, progress=False, stops=stops, line_end=line_end)
        for text in sample:
            ids = encode_inputs(tok, [text], engine.context - max_new_tokens)[0]
            list(engine.stream(ids[:-1], 0, set()))  # the previous keystroke's prompt, read into the cache
            start = time.perf_counter()
            engine_complete(engine, tok, [text], max_new_tokens, progress=False, stops=stops, line_end=line_end)
            times.append((time.perf_counter() - start) * 1000)
            cached.append(engine.cached_tokens / len(ids))
    p50, p95 = np.percentile(times, [50, 95])
    return {"p50": float(p50), "p95": float(p95), "cached": float(np.mean(cached))}


def read_token_file(path: str | Path) -> tuple[list[str], str]:
    """(documents, format) of a split file: one document per line, normalised tokens or JSON strings (raw).

    The format comes from the corpus.json beside the file when there is one, else from the first line.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"tokens: {path}: no such file; pass a split file such as DATA/test.txt")
    lines = [x for x in path.read_text(encoding="utf-8").split("\n") if x]
    manifest = path.parent / "corpus.json"
    if manifest.is_file():
        fmt = corpus_format(path.parent)
    else:
        fmt = "raw" if lines and lines[0].startswith('"') else "codexglue"
    if fmt not in FORMATS:
        raise UserError(f"tokens: {manifest}: unknown format {fmt!r}; rebuild the corpus")
    try:
        return [decode_document(x, fmt) for x in lines], fmt
    except ValueError as e:
        raise UserError(f"tokens: {path}: a line is not a JSON string as raw corpora hold ({e}); fix the file")


def perplexity(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    token_file: str | Path,
    seq_len: int = 0,
    device: torch.device | str = "cpu",
    max_tokens: int = 200_000,
    batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float | int]:
    """{"perplexity", "loss", "tokens"}: exp(mean next-token loss) over the file's documents.

    Documents are encoded (each from bos to eos, as in training), concatenated and cut into non-overlapping windows
    of `seq_len` (0 = the model's context); the first `max_tokens` tokens bound the work. Each window predicts its
    own tokens 2..T, so a number is comparable between models with the same tokenizer and window only.
    """
    docs, fmt = read_token_file(token_file)
    context = families.context(model)
    seq_len = seq_len or context
    if not 2 <= seq_len <= context:
        raise UserError(f"seq_len: {seq_len} is not allowed; use 2 to the model's context of {context}")
    stream: list[int] = []
    for start in range(0, len(docs), 256):  # encode in chunks: a large split stops early at max_tokens
        for ids in encode_documents(tok, docs[start : start + 256], fmt):
            stream.extend(ids)
        if len(stream) >= max_tokens:
            break
    stream = stream[:max_tokens]
    if len(stream) < 2:
        raise UserError(f"tokens: {token_file} holds fewer than 2 tokens; pass a non-empty split file")
    device = torch.device(device)
    windows = [stream[i : i + seq_len] for i in range(0, len(stream), seq_len)]
    full = [w for w in windows if len(w) == seq_len]
    tail = [w for w in windows if 2 <= len(w) < seq_len]  # the last window, when shorter
    batches = [full[i : i + batch_size] for i in range(0, len(full), batch_size)] + ([tail] if tail else [])
    total, count = 0.0, 0
    amp = autocast_dtype is not None
    with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_dtype, enabled=amp):
        for batch in tqdm(batches, desc="perplexity", unit="batch", disable=len(batches) < 2):
            x = torch.tensor(batch, dtype=torch.long, device=device)  # (B, T)
            logits = model(input_ids=x).logits.float()  # (B, T, V)
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
            )
            total += loss.item()
            count += x[:, 1:].numel()
    mean = total / count
    return {"perplexity": math.exp(mean), "loss": mean, "tokens": count}

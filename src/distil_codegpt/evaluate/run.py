"""The `evaluate` verb: a model and a line-completion file in; predictions.txt, metrics.json and run.json out.

One pass gives every number the study compares: quality (EM, ES as CodeXGLUE computes them), throughput at the
configured batch, batch-1 latency, memory, size, and optionally perplexity. Weights are held in fp32 and decoding
is greedy or beam search, so the same model and file give the same predictions every run.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from distil_codegpt.artifacts import check_vocab, disk_mb, read_json
from distil_codegpt.compress.quantize import count_all_params
from distil_codegpt.config import ConfigError, EvaluateConfig, UserError, to_dict
from distil_codegpt.data.line_completion import read_examples
from distil_codegpt.data.tokenizer import load_tokenizer
from distil_codegpt.engines.load import engine_kind, load_engine, load_for_evaluation, runtime_for
from distil_codegpt.engines.speculative import with_draft
from distil_codegpt.evaluate.completion import StopIds, complete, engine_complete, is_raw
from distil_codegpt.evaluate.metrics import line_metrics
from distil_codegpt.evaluate.perf import latency, perplexity, warm_latency
from distil_codegpt.model import families
from distil_codegpt.model.presets import looks_local, resolve_model
from distil_codegpt.runinfo import atomic_write_text, write_json, write_manifest
from distil_codegpt.runtime import autocast_dtype, pick_device, precision_name


def eval_runtime(cfg: EvaluateConfig) -> tuple[torch.device, torch.dtype | None]:
    """(device, autocast dtype) by the same policy as training."""
    device = pick_device(cfg.device, cfg.threads)
    return device, autocast_dtype(cfg.precision, device)


def model_tokenizer(model: str) -> PreTrainedTokenizerBase:
    """The tokenizer saved with the model: predictions only mean something in the vocabulary it was trained on."""
    if looks_local(model):
        return load_tokenizer(model)
    try:
        return AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as e:
        raise UserError(f"model: {model!r} has no loadable tokenizer on the hub ({type(e).__name__}); pass a dir")


def run_evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Evaluate cfg.model on cfg.test; write OUT/predictions.txt, OUT/metrics.json, OUT/run.json; return metrics."""
    t0 = time.perf_counter()
    llamacpp = runtime_for(cfg.model, cfg.engine) == "llamacpp"  # llama.cpp reads a .gguf file as it is
    if not llamacpp:
        cfg = dataclasses.replace(cfg, model=resolve_model(cfg.model))  # a .gguf file: imported once, cached
    device, amp = eval_runtime(cfg)
    examples = read_examples(cfg.test)
    if cfg.limit:
        examples = examples[: cfg.limit]
    if not examples:
        raise UserError(f"test: {cfg.test} holds no examples; pass a line-completion file with JSON lines")
    kind = "llamacpp" if llamacpp else engine_kind(cfg.model) if looks_local(cfg.model) else "torch"
    if kind not in ("torch", "torch-int8") or cfg.draft:
        return _evaluate_engine(cfg, examples, t0)
    tok = model_tokenizer(cfg.model)
    if kind == "torch-int8" and cfg.precision == "auto":
        amp = None  # int8 kernels take fp32 activations: auto means fp32 here, whatever the CPU
    if kind == "torch-int8" and (device.type != "cpu" or amp is not None):
        raise ConfigError("device: an int8 artifact runs on the CPU in fp32; pass --device cpu --precision fp32")
    model = _load_model(cfg, tok, device)
    torch.manual_seed(cfg.seed)
    inputs = [ex.input for ex in examples]
    stops = StopIds.of(tok)
    kw = {"beam": cfg.beam, "max_new_tokens": cfg.max_new_tokens, "device": device, "autocast_dtype": amp}
    kw["line_end"] = cfg.line_end

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    preds = complete(model, tok, inputs, batch_size=cfg.batch_size, stops=stops, **kw)
    decode_s = time.perf_counter() - start
    gpu_mem = torch.cuda.max_memory_allocated(device) / 1e6 if device.type == "cuda" else None

    lat = latency(model, tok, inputs, cfg.latency_samples, **kw)
    warm = _warm(cfg, model, tok, inputs, device, amp)
    ppl = None
    if cfg.tokens:
        ppl = perplexity(model, tok, cfg.tokens, device=device, max_tokens=cfg.perplexity_tokens, autocast_dtype=amp)
    n_params = count_all_params(model)
    extra = {"gpu_mem_mb": gpu_mem, **warm, "perplexity": ppl["perplexity"] if ppl else None}
    extra["perplexity_tokens"] = ppl["tokens"] if ppl else None
    return _finish(cfg, examples, preds, n_params, decode_s, lat, extra, str(device), amp, t0)


def _load_model(cfg: EvaluateConfig, tok: PreTrainedTokenizerBase, device: torch.device) -> torch.nn.Module:
    model = load_for_evaluation(cfg.model)[0].to(device).eval()
    if cfg.context:  # positions a model never trained on (beyond its training seq_len) only add noise
        families.set_context(model, min(families.context(model), cfg.context))
    check_vocab(model.config.vocab_size, tok, cfg.model)
    return model


def _warm(cfg, model, tok, inputs, device, amp) -> dict[str, float | None]:  # noqa: ANN001
    """metrics.json's warm-latency fields (`perf.warm_latency`; a PyTorch model decoded greedily: else None)."""
    warm = {"p50": None, "p95": None, "cached": None}
    if cfg.beam == 1 and model is not None:
        warm = warm_latency(model, tok, inputs, cfg.latency_samples, cfg.max_new_tokens, device, amp, cfg.line_end)
    return {"warm_latency_ms_p50": warm["p50"], "warm_latency_ms_p95": warm["p95"], "warm_cached": warm["cached"]}


def add_warm_latency(cfg: EvaluateConfig) -> dict[str, Any]:
    """Measure only the warm latency of an evaluation done before `evaluate` measured it, and add it to OUT's
    metrics.json (the same model, examples and settings as the rest of that file; OUT/warm.json records what was
    added): a resumed sweep fills in the column instead of evaluating again."""
    llamacpp = runtime_for(cfg.model, cfg.engine) == "llamacpp"
    cfg = dataclasses.replace(cfg, model=resolve_model(cfg.model))
    path = Path(cfg.out) / "metrics.json"
    metrics = read_json(path, fix="evaluate the model again (distil-codegpt evaluate)")
    device, amp = eval_runtime(cfg)
    kind = "llamacpp" if llamacpp else engine_kind(cfg.model) if looks_local(cfg.model) else "torch"
    amp = None if kind == "torch-int8" else amp  # as `run_evaluate`
    tok = model_tokenizer(cfg.model)
    inputs = [ex.input for ex in read_examples(cfg.test)[: cfg.latency_samples]]
    model = _load_model(cfg, tok, device) if kind in ("torch", "torch-int8") and not cfg.draft else None
    warm = _warm(cfg, model, tok, inputs, device, amp)
    write_json(path, metrics | warm)
    write_json(path.with_name("warm.json"), {**warm, "added_to": str(path), "latency_samples": len(inputs)})
    return metrics | warm


def _evaluate_engine(cfg: EvaluateConfig, examples: list, t0: float) -> dict[str, Any]:
    """An exported engine (CTranslate2), llama.cpp, or a model with a draft: one example at a time through the
    `Engine` interface, greedy only."""
    if cfg.beam != 1:
        raise ConfigError(f"beam: {cfg.beam}; engines and drafts are evaluated greedily here, use --beam 1")
    engine = with_draft(load_engine(cfg.model, engine=cfg.engine), cfg.draft, "cpu", cfg.draft_tokens, cache_slots=0)
    tok = engine.tokenizer
    if cfg.context:  # the same positions as a PyTorch model evaluated with --context: inputs keep their last tokens
        engine.context = min(engine.context, cfg.context)
    inputs = [ex.input for ex in examples]
    start = time.perf_counter()
    stops = StopIds.of(tok)
    preds = engine_complete(engine, tok, inputs, cfg.max_new_tokens, stops=stops, line_end=cfg.line_end)
    decode_s = time.perf_counter() - start
    times = []
    for text in inputs[: cfg.latency_samples]:
        t = time.perf_counter()
        engine_complete(engine, tok, [text], cfg.max_new_tokens, progress=False, stops=stops, line_end=cfg.line_end)
        times.append(1000 * (time.perf_counter() - t))
    lat = {"p50": _percentile(times, 50), "p95": _percentile(times, 95)} if times else {"p50": None, "p95": None}
    run = Path(engine.path) / "run.json"
    meta = read_json(run, fix="export the model again with `distil-codegpt export`") if run.is_file() else {}
    n_params = meta.get("metrics", {}).get("params") or getattr(engine, "n_params", None)
    extra = {"gpu_mem_mb": None, **_warm(cfg, None, tok, inputs, "cpu", None), "perplexity": None}
    extra |= {"perplexity_tokens": None, "engine": engine.name}
    if engine.name == "llamacpp":  # the GGUF file it ran, not the directory its tokenizer came from
        extra |= {"disk_mb": engine.disk_mb(), "gguf": str(engine.gguf_path)}
    extra["batch_size"] = 1  # one example at a time
    if stats := getattr(engine, "stats", None):  # a draft: how much of it the teacher took
        extra["draft"] = {"model": cfg.draft, "acceptance": stats.acceptance, "tokens_per_pass": stats.tokens_per_pass}
    if n_params is None and hasattr(engine, "teacher"):
        n_params = sum(p.numel() for p in engine.teacher.model.parameters())
    return _finish(cfg, examples, preds, n_params, decode_s, lat, extra, "cpu", None, t0)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _finish(cfg, examples, preds, n_params, decode_s, lat, extra, device, amp, t0) -> dict[str, Any]:  # noqa: ANN001
    """metrics.json, predictions.txt and run.json from one evaluation pass."""
    inputs = [ex.input for ex in examples]
    n_raw = sum(is_raw(x) for x in inputs)
    metrics: dict[str, Any] = {
        **line_metrics(preds, [ex.gt for ex in examples]),
        "params": n_params,
        "size_mb": n_params * 4 / 1e6 if n_params else None,
        "disk_mb": disk_mb(cfg.model),
        "samples_per_s": len(inputs) / decode_s,
        "decode_seconds": decode_s,
        "latency_ms_p50": lat["p50"],
        "latency_ms_p95": lat["p95"],
        **extra,
        "model": cfg.model,
        "test": cfg.test,
        "mode": "raw" if n_raw == len(inputs) else "codexglue" if n_raw == 0 else "mixed",
        "beam": cfg.beam,
        "line_end": cfg.line_end,
        "batch_size": extra.pop("batch_size", cfg.batch_size),
        "max_new_tokens": cfg.max_new_tokens,
        "device": device,
        "precision": precision_name(amp),
        "threads": torch.get_num_threads() if device == "cpu" else cfg.threads,
    }
    out = Path(cfg.out)
    atomic_write_text(out / "predictions.txt", "".join(p + "\n" for p in preds))
    write_json(out / "metrics.json", metrics)
    write_manifest(out, "evaluate", to_dict(cfg), metrics, time.perf_counter() - t0, seed=cfg.seed)
    return metrics


def print_evaluation(metrics: dict[str, Any], out: str | Path) -> None:
    """Two lines a person reads after `distil-codegpt evaluate`; every number is in metrics.json in full."""

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    print(
        f"EM {metrics['exact_match']:.2f}  ES {metrics['edit_sim']:.2f}  n {metrics['n']}"
        + (f"  ppl {metrics['perplexity']:.2f}" if metrics.get("perplexity") is not None else "")
        + f"  |  {metrics['samples_per_s']:.1f} samples/s (batch {metrics['batch_size']}, beam {metrics['beam']})"
        + f"  latency p50 {ms(metrics['latency_ms_p50'])} ms, p95 {ms(metrics['latency_ms_p95'])} ms"
        + (f", warm p50 {ms(metrics['warm_latency_ms_p50'])} ms" if metrics.get("warm_latency_ms_p50") else "")
    )
    print(
        f"{metrics['params']:,} params, {metrics['size_mb']:.2f} MB fp32"
        + (f", {metrics['disk_mb']:.2f} MB on disk" if metrics.get("disk_mb") is not None else "")
        + (f", {metrics['gpu_mem_mb']:.0f} MB GPU peak" if metrics.get("gpu_mem_mb") is not None else "")
        + f", {metrics['device']}  ->  {Path(out) / 'predictions.txt'}, metrics.json"
    )

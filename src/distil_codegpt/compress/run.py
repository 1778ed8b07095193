"""The `compress` verb: prune (and heal), then store the weights in fp16/bf16 or quantize them to int8.

Every output is an artifact `evaluate`, `complete` and `serve` load: fp32/fp16/bf16 give a plain Hugging Face
model directory, int8 an engine artifact (see quantize.py). run.json holds what each step took away. With
--trim-vocab the output head keeps only the ids a corpus uses (trim.py), in any of these formats.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from distil_codegpt.artifacts import disk_mb
from distil_codegpt.compress.prune import (
    choose_heads,
    dev_batches,
    head_importance,
    heal,
    magnitude_prune,
    mask_heads,
    parse_prune,
    sparsity,
)
from distil_codegpt.compress.quantize import LIBRARY, quantize_int8, save_int8
from distil_codegpt.compress.trim import trim_from_corpus
from distil_codegpt.config import CompressConfig, UserError, to_dict
from distil_codegpt.data.tokenizer import copy_tokenizer
from distil_codegpt.model import families
from distil_codegpt.model.families import count_params
from distil_codegpt.model.presets import load_model, tokenizer_dir_of
from distil_codegpt.model.shape import HEADS_KEY, apply_pruned_heads, unit_name
from distil_codegpt.model.vocab_trim import save_kept
from distil_codegpt.runinfo import write_manifest

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _prune(model: PreTrainedModel, cfg: CompressConfig, out: Path) -> dict[str, Any]:
    """Prune in place as cfg.prune says, heal when asked; returns what was done."""
    kind, value = parse_prune(cfg.prune)
    tok_dir = tokenizer_dir_of(cfg.model) if cfg.data else None
    teacher = copy.deepcopy(model).eval() if cfg.heal_steps else None  # the unpruned model teaches the pruned one
    if kind == "magnitude":
        masks = magnitude_prune(model, value)
        info: dict[str, Any] = {"method": "magnitude", "fraction": value}
    else:
        batches = dev_batches(cfg.data, tok_dir, min(128, families.context(model))) if tok_dir else None
        masks = mask_heads(model, choose_heads(head_importance(model, batches), int(value), unit_name(model)))
        info = {"method": "heads", "heads": int(value), "importance": "dev contribution" if batches else "weight norm"}
    if teacher is not None and tok_dir is not None:
        with tempfile.TemporaryDirectory(prefix="distil-heal-") as work:
            info["heal"] = heal(model, teacher, masks, cfg.data, tok_dir, cfg.heal_steps, work)
            shutil.copy2(Path(work) / "metrics.jsonl", out / "heal_metrics.jsonl")
    return info


def _nonzero(model: torch.nn.Module) -> int:
    return sum(int(torch.count_nonzero(p)) for p in model.parameters())


def run_compress(cfg: CompressConfig) -> dict[str, Any]:
    """Write the compressed artifact and its run.json to cfg.out; return the summary."""
    t0 = time.perf_counter()
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"out: {out} is not empty; pass a new --out directory (or remove this one)")
    model = load_model(cfg.model, dtype=torch.float32).eval()
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"params_before": count_params(model), "disk_mb_before": disk_mb(cfg.model)}
    if cfg.prune:
        summary["prune"] = _prune(model, cfg, out)
        summary["sparsity"] = sparsity(model)
    summary["pruned_heads"] = getattr(model.config, HEADS_KEY, None) or {}
    summary["head_unit"] = unit_name(
        model
    )  # what pruned_heads lists: "heads", or "KV groups" (grouped-query attention)
    if cfg.trim_vocab:  # after pruning and healing, which run on the full head
        summary["trim"] = trim_from_corpus(model, cfg.trim_vocab, cfg.model, cfg.min_count)
    if cfg.quantize == "int8":
        apply_pruned_heads(model)  # int8 modules cannot be sliced later: cut the heads out first
        summary.update(params_after=count_params(model), nonzero_params=_nonzero(model))
        save_int8(quantize_int8(model), out, source=cfg.model, pruned_heads=summary["pruned_heads"])
        summary.update(format="int8", library=LIBRARY)
    else:
        # A plain HF directory at full shape (pruned heads zeroed, see prune.py), in the requested dtype.
        model.to(DTYPES[cfg.dtype]).save_pretrained(out, safe_serialization=True)
        save_kept(model, out, **{k: v for k, v in summary.get("trim", {}).items() if k not in ("kept", "vocab_size")})
        apply_pruned_heads(model)
        summary.update(params_after=count_params(model), nonzero_params=_nonzero(model))
        summary.update(format=cfg.dtype, library="transformers save_pretrained")
    summary["tokenizer_files"] = copy_tokenizer(cfg.model, out)
    summary.update(disk_mb_after=disk_mb(out), out=str(out))
    write_manifest(out, "compress", to_dict(cfg), summary, time.perf_counter() - t0)
    return summary


def print_compress(summary: dict[str, Any], out: str | Path) -> None:
    """What `distil-codegpt compress` prints; the full summary is in OUT/run.json."""
    prune = summary.get("prune") or {}
    heads = sum(len(v) for v in summary["pruned_heads"].values())
    print(
        f"params {summary['params_before']:,} -> {summary['params_after']:,}"
        f" (nonzero {summary['nonzero_params']:,})"
        + (f", block sparsity {summary['sparsity']:.1%}" if "sparsity" in summary else "")
        + (f", {heads} {summary.get('head_unit', 'heads')} pruned" if heads else "")
        + (f", healed {prune['heal']['steps']} steps" if "heal" in prune else "")
    )
    before = "-" if summary["disk_mb_before"] is None else f"{summary['disk_mb_before']:.2f}"  # None: a hub id
    print(
        f"disk {before} MB -> {summary['disk_mb_after']:.2f} MB ({summary['format']}, {summary['library']})  ->  {out}"
    )
    if "trim" in summary:
        t = summary["trim"]
        held = f", {t['heldout_coverage']:.2%} of the {t['heldout_split']} split's tokens" if t["heldout_split"] else ""
        print(
            f"trimmed head: {t['kept']:,} of {t['vocab_size']:,} ids kept (seen >= {t['min_count']}x in train,"
            f" special tokens){held}; head {t['head_share_before']:.0%} -> {t['head_share_after']:.0%} of a"
            " decoding step's multiply-adds"
        )
    if not summary["tokenizer_files"]:
        print(f"note: the model has no tokenizer files; copy them into {out} before evaluate, complete or serve")

"""A student's starting weights: k of the teacher's layers (default), another pretrained model's, or random.

The student is the teacher's own architecture (any family of families.py) with fewer blocks. Copying follows
nanoGPT's `from_pretrained`: every student tensor is taken from a named tensor of the source model and must have
exactly its shape, or we stop. What was done is written into the student's config.json (attributes `distil_*`,
kept by transformers' configs as extra keys), so the student directory says where it came from and stays loadable
with no code of ours. Which blocks: fixed rules (uniform, first, last, a list) or scores measured on dev windows
(influence, angular: layer_scores.py).
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from distil_codegpt.config import ConfigError, StudentConfig, UserError, to_dict
from distil_codegpt.data.shards import TokenShard, ensure_shards
from distil_codegpt.data.tokenizer import copy_tokenizer
from distil_codegpt.model import families, shape
from distil_codegpt.model.families import count_params, model_size_mb
from distil_codegpt.model.importance import Importance, measure
from distil_codegpt.model.layer_scores import angular_pick, influence_pick
from distil_codegpt.model.presets import load_model, looks_local, resolve_model, save_model
from distil_codegpt.runinfo import write_manifest

DATA_PICKS = ("influence", "angular")  # picks measured on dev windows of the teacher


def pick_layers(n_teacher: int, k: int, pick: str = "uniform", *, source: str = "teacher") -> list[int]:
    """Which of the source's `n_teacher` blocks the k student blocks start from, in ascending order.

    uniform: k layers spread evenly over depth, first and last included: round-half-up of i*(n-1)/(k-1), which
        gives DistilGPT2's [0, 2, 4, 7, 9, 11] for 6 of 12. For k = 1 it is [0]: dropping top layers is what
        hurts least (Sajjad et al. 2020), and block 0 sees the embeddings it was trained on.
    first / last: the bottom / top k blocks.
    "0,2,4": these blocks, each once, ascending (reordering blocks breaks the residual stream's progression).
    influence / angular need the teacher's activations: `data_pick`.
    """
    if k < 1:
        raise ConfigError(f"layers: {k!r} is not allowed; use 1 or more")
    if k > n_teacher:
        raise ConfigError(f"layers: {k} is more than the {n_teacher} layers of the {source}; use {n_teacher} or fewer")
    if pick == "uniform":
        if k == 1:
            return [0]
        # integer form of floor(i * (n-1) / (k-1) + 1/2): no float ties that round the wrong way
        return [(2 * i * (n_teacher - 1) + (k - 1)) // (2 * (k - 1)) for i in range(k)]
    if pick == "first":
        return list(range(k))
    if pick == "last":
        return list(range(n_teacher - k, n_teacher))
    if not re.fullmatch(r"\d+(,\d+)*", pick):
        raise ConfigError(
            f"pick: {pick!r} is not allowed; use uniform, first, last, influence, angular or indices like 0,2,4"
        )
    idx = [int(i) for i in pick.split(",")]
    if len(idx) != k:
        raise ConfigError(f"pick: {pick!r} lists {len(idx)} layers; list exactly --layers {k} indices")
    if max(idx) >= n_teacher:
        raise ConfigError(f"pick: {pick!r} names layer {max(idx)}; the {source} has layers 0..{n_teacher - 1}")
    if any(a >= b for a, b in zip(idx, idx[1:])):
        raise ConfigError(f"pick: {pick!r} is not allowed; list each layer once, in ascending order")
    return idx


def layer_map(model: PreTrainedModel | PretrainedConfig) -> list[int] | None:
    """The teacher layer each student layer was copied from; None when the student did not come from the teacher."""
    config = getattr(model, "config", model)
    found = getattr(config, "distil_layer_map", None)
    return list(found) if found else None


def copy_weights(source: PreTrainedModel, student: PreTrainedModel, cut: shape.Cut | list[int]) -> None:
    """Copy embeddings, final norm, LM head and block cut.picked[i] -> student block i, each cut to the student's
    widths (model/shape.py), checking every shape.

    Works whether or not the LM head is tied: a tied head appears in both state dicts as the same tensor as the
    input embedding, so it is simply written twice with the same values.
    """
    cut = cut if isinstance(cut, shape.Cut) else shape.Cut(picked=list(cut))
    src = source.state_dict()
    block = re.compile(rf"^{re.escape(families.block_prefix(student))}(\d+)\.")
    prefix = families.block_prefix(source)
    embeddings = {families.embedding_key(source)}
    if source.get_output_embeddings() is not None:
        embeddings.add(families.head_key(source))
    scales = cut.norm_scale or {}
    with torch.no_grad():
        for key, tensor in student.state_dict().items():
            found = block.match(key)
            if found:
                layer, rel = int(found[1]), key[found.end() :]
                src_key = f"{prefix}{cut.picked[layer]}.{rel}"
            else:
                src_key = key
            if src_key not in src:
                raise RuntimeError(f"student tensor {key} has no source tensor {src_key}; the models are not alike")
            if found:
                scale = scales.get(src_key.rpartition(".")[0])
                value = shape.slice_block(source.config, rel, src[src_key], layer, cut, scale)
            else:
                value = shape.cut_tensor(source.config, src_key, src[src_key], cut, embeddings)
            if value.shape != tensor.shape:
                shapes = f"{tuple(tensor.shape)} vs {tuple(value.shape)}"
                raise RuntimeError(f"shape mismatch: student {key} vs source {src_key}: {shapes}")
            tensor.copy_(value)


def calibration_batches(cfg: StudentConfig, model: PreTrainedModel, why: str) -> list[torch.Tensor]:
    """--pick-windows dev windows of --data, the calibration set of the data picks and of width importance."""
    if not cfg.data:
        raise ConfigError(f"data: {why} is measured on code; pass --data DIR (a corpus)")
    tok_dir = cfg.tokenizer or (resolve_model(cfg.teacher, role="teacher") if looks_local(cfg.teacher) else "")
    if not tok_dir:
        raise ConfigError(f"tokenizer: missing for {why} with a hub teacher; pass --tokenizer DIR")
    dev = TokenShard(ensure_shards(cfg.data, tok_dir, ("dev",)), "dev")
    seq_len = min(cfg.pick_seq_len, families.context(model), len(dev) - 1)
    if seq_len < 2:
        raise UserError(f"data: {cfg.data}'s dev split has {len(dev)} tokens; too few to measure {why} on")
    rng = np.random.default_rng(cfg.seed)
    return [dev.random_batch(min(4, cfg.pick_windows - i), seq_len, rng)[0] for i in range(0, cfg.pick_windows, 4)]


def data_pick(cfg: StudentConfig, model: PreTrainedModel) -> tuple[list[int], list[float]]:
    """(picked blocks, their scores) for --pick influence|angular, from --pick-windows dev windows of --data."""
    batches = calibration_batches(cfg, model, f"--pick {cfg.pick}")
    fn = influence_pick if cfg.pick == "influence" else angular_pick
    return fn(model, batches, cfg.layers)


def build_student(cfg: StudentConfig) -> dict[str, Any]:
    """Write a student model directory (weights, config, tokenizer, run.json); returns its summary."""
    start = time.perf_counter()
    out = Path(cfg.out).expanduser()
    for field, name in (("teacher", cfg.teacher), ("init_from", cfg.init_from)):
        if name and looks_local(name) and out.resolve() == Path(name).expanduser().resolve():
            raise ConfigError(f"out: {cfg.out!r} is the {field}'s directory; pass a new directory")

    # fp32 whatever the checkpoint stores: transformers 5 would otherwise keep e.g. an fp16 checkpoint in fp16
    teacher = load_model(cfg.teacher, role="teacher", dtype=torch.float32)
    init: Literal["teacher", "pretrained", "random"] = "teacher"
    source = teacher
    if cfg.random:
        init = "random"
    elif cfg.init_from:
        init = "pretrained"
        source = load_model(cfg.init_from, role="init_from", dtype=torch.float32)
        _check_same_width(teacher.config, source.config, cfg.init_from)

    picked, scores = None, None
    if init != "random":
        label = "teacher" if init == "teacher" else "init_from model"
        if cfg.pick in DATA_PICKS:
            pick_layers(families.depth(source), cfg.layers, "first", source=label)  # the depth check and its error
            picked, scores = data_pick(cfg, source)
        else:
            picked = pick_layers(families.depth(source), cfg.layers, cfg.pick, source=label)
    want = shape.resolve(source.config, cfg.layers, cfg.ffn, cfg.heads, cfg.hidden)
    full = shape.shape_of(source.config)
    imp: Importance | None = None
    if (want.ffn, want.heads, want.hidden) != (full.ffn, full.heads, full.hidden) and init != "random":
        imp = measure(source, calibration_batches(cfg, source, "width importance (--ffn/--heads/--hidden)"))
    cut = shape.choose(source.config, picked, want, imp) if picked is not None else shape.Cut(list(range(cfg.layers)))
    config = shape.cut_config(families.with_depth(source.config, cut.picked), want)
    config.distil_init = init
    config.distil_teacher = cfg.teacher
    config.distil_init_from = cfg.init_from or None
    # teacher layer per student layer, for losses that match hidden states; only known when copied from it
    config.distil_layer_map = picked if init == "teacher" else None
    # the layers taken from whichever model the weights came from (the teacher or init_from)
    config.distil_source_layers = picked
    config.distil_pick = cfg.pick if init != "random" else None
    config.distil_pick_scores = scores  # influence: BI per block; angular: distance per start of the dropped run
    # the residual-stream channels kept (a hidden cut): the local stage reads the teacher's states through them
    config.distil_hidden_kept = cut.hidden

    torch.manual_seed(cfg.seed)
    student = AutoModelForCausalLM.from_config(config)
    if picked is not None:
        copy_weights(source, student, cut)

    out.mkdir(parents=True, exist_ok=True)
    save_model(student, out)  # each file whole: a rerun over a damaged student keeps no half-written one
    tokenizer_files = copy_tokenizer(resolve_model(cfg.teacher, role="teacher"), out)
    summary: dict[str, Any] = {
        "init": init,
        "layers": cfg.layers,
        "layer_map": config.distil_layer_map,
        "source_layers": picked,
        "pick": config.distil_pick,
        "pick_scores": scores,
        "params": count_params(student),
        "size_mb": round(model_size_mb(student), 3),
        "teacher_layers": families.depth(teacher),
        "family": families.family(teacher).name,
        "teacher_params": count_params(teacher),
        "tokenizer_files": tokenizer_files,
        "shape": dataclasses.asdict(want),
        "teacher_shape": dataclasses.asdict(shape.shape_of(teacher.config)),
        "macs_per_token": shape.macs_per_token(config),
        "compute_share": shape.macs_per_token(config) / shape.macs_per_token(teacher.config),
        **_cut_record(cut, imp),
    }
    write_manifest(out, "student", to_dict(cfg), summary, time.perf_counter() - start, cfg.seed)
    return summary


def _cut_record(cut: shape.Cut, imp: Importance | None) -> dict[str, Any]:
    """What a width cut kept, and the share of each block's measured importance that it kept."""
    if imp is None:
        return {}

    def share(scores: torch.Tensor, kept: list[int]) -> float:
        total = float(scores.sum())
        return round(float(scores[kept].sum()) / total, 4) if total > 0 else 1.0

    record: dict[str, Any] = {"importance_tokens": imp.tokens, "kept": {}, "kept_importance_share": {}}
    for name, per_block, scores in (("ffn", cut.ffn, imp.ffn), ("units", cut.units, imp.units)):
        if per_block is not None:
            record["kept"][name] = per_block
            record["kept_importance_share"][name] = [share(scores[t], k) for t, k in zip(cut.picked, per_block)]
    record["importance"] = {"units": [[round(float(v), 5) for v in row] for row in imp.units]}
    if cut.hidden is not None:
        record["kept"]["hidden"] = cut.hidden
        record["kept_importance_share"]["hidden"] = share(imp.hidden, cut.hidden)
        record["importance"]["hidden"] = [round(float(v), 5) for v in imp.hidden]
        record["norm_scale"] = {k: round(v, 6) for k, v in (cut.norm_scale or {}).items()}
    return record


def _check_same_width(teacher: PretrainedConfig, other: PretrainedConfig, name: str) -> None:
    """Distillation compares logits token by token and hidden states position by position: both must line up."""
    ours, theirs = (other.vocab_size, families.width(other)), (teacher.vocab_size, families.width(teacher))
    if ours != theirs:
        raise ConfigError(
            f"init_from: {name!r} has vocab {ours[0]} and width {ours[1]}, the teacher has vocab {theirs[0]} and "
            f"width {theirs[1]}; pass a model with the teacher's tokenizer and width"
        )

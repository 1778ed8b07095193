"""One flat training loop for `train` (causal LM) and `distil` (KD with a frozen or in-training teacher).

Batches are global: step s draws batch_size windows from a generator seeded by (seed, s), and each of
the P processes takes its slice, then splits it into micro-batches. So the data, and in fp32 the result,
do not depend on the number of processes, and a resumed run needs no data-loader state but the step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from distil_codegpt.config import ConfigError, DistilConfig, LoopConfig
from distil_codegpt.data.shards import TokenShard
from distil_codegpt.distill.checkpoint import (
    checkpoint_path,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from distil_codegpt.distill.local import LocalStage
from distil_codegpt.distill.losses import (
    LossWeights,
    SparseTargets,
    clm_loss,
    distillation_loss,
    head_loss,
    lean_distillation_loss,
)
from distil_codegpt.model.families import tied_head
from distil_codegpt.model.presets import pad_vocab
from distil_codegpt.model.vocab_trim import kept_mask
from distil_codegpt.runinfo import manifest_stage, open_log, write_json
from distil_codegpt.runtime import autocast_dtype, pick_device

CLM_ONLY = LossWeights(alpha_ce=0.0, alpha_clm=1.0, alpha_cos=0.0, alpha_mse=0.0)
NO_LOGITS = torch.empty(0, dtype=torch.long)  # logits_to_keep: the LM head runs in the loss, chunk by chunk


@dataclass
class Runtime:
    device: torch.device
    rank: int
    world: int
    dtype: torch.dtype | None  # autocast dtype, None = plain fp32

    @property
    def main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def setup_runtime(cfg: LoopConfig) -> Runtime:
    """Device, precision and (under torchrun) the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = pick_device(cfg.device, cfg.threads, int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    return Runtime(device, rank, world, autocast_dtype(cfg.precision, device))


def lr_factor(step: int, cfg: LoopConfig, time_done: float = 0.0) -> float:
    """Linear warmup to 1, then cosine or linear decay to min_lr_ratio at max_steps, or at the end of the time
    budget (`time_done`: the share of --max-minutes spent) when that comes first."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, max((step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps), time_done))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


def make_optimizer(model: torch.nn.Module, lr: float, cfg: LoopConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not biases, norms or embeddings, whatever the family names them)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


def loss_chunk(setting: int, vocab: int, device: torch.device | None = None) -> int:
    """Tokens per chunk of the head loss: `setting`, or for -1 about 16 MB of fp32 logits per [chunk, V] tensor on
    the CPU and 1 GiB on CUDA.

    Measured on 2 CPU cores by benchmarks/head_loss_chunks.py (forward + backward, 2,048 tokens, width 128): at
    V = 50k, chunks of 64-128 tokens took 1.2-1.3 s and chunks of 1,024 took 3.4 s (their tensors no longer stay
    in the CPU cache); at V = 4k, chunks of 64 to 2,048 took 0.08 to 0.13 s. On a GPU every chunk is a round of
    small kernels: on an H200 (benchmarks/gpu_check.sh) the CPU's 83-token chunks at V = 50k ran a KD step at 0.43x
    the plain loss's speed, so CUDA takes chunks some 60 times larger (docs/PERFORMANCE.md).
    """
    if setting >= 0:
        return setting
    if device is not None and device.type == "cuda":
        return max(32, min(1 << 16, (1 << 30) // (4 * vocab)))
    return max(32, min(4096, (16 << 20) // (4 * vocab)))


def pad_multiple(setting: int, device: torch.device, model: torch.nn.Module) -> int:
    """Rows the LM head is padded to a multiple of: `setting`, or for 0 (auto) 64 on CUDA, for the GPU's matmul
    tiles, and 1 (none) on the CPU, where padding measured no faster (docs/PERFORMANCE.md). Auto leaves an untied
    head (Pythia) alone: `pad_vocab` pads only a head tied to the embeddings."""
    return setting or (64 if device.type == "cuda" and tied_head(model) else 1)


def batch_split(cfg: LoopConfig, world: int) -> tuple[int, int]:
    """(windows per process per step, micro-batch size); the global batch must divide evenly."""
    if cfg.batch_size % world:
        raise ConfigError(f"batch_size: {cfg.batch_size} does not divide over {world} processes; use a multiple")
    per_rank = cfg.batch_size // world
    micro = cfg.micro_batch_size or per_rank
    if per_rank % micro:
        raise ConfigError(f"micro_batch_size: {micro} does not divide {per_rank} windows per process; use a divisor")
    return per_rank, micro


class Trainer:
    """Trains `student`; with a `teacher`, distils it (cfg.teacher_mode: frozen, or train = in-training KD);
    with a `teacher_cache` instead, distils from the teacher's cached top-k (no teacher in memory).

    With cfg.loss_chunk != 0 (the default) the models stop at their last hidden states and the LM head runs inside
    the loss, chunk by chunk (`head_loss`): no [B, T, V] logits tensor is ever held. cfg.loss_chunk = 0 is the
    plain path on full logits. When the heads are padded in memory (`pad_vocab`: cfg.pad_vocab > 1, or 0 on CUDA)
    every loss reads only the first n_vocab logit columns.
    """

    def __init__(
        self,
        cfg: LoopConfig,
        rt: Runtime,
        student: torch.nn.Module,
        shard_dir: str | Path,
        teacher: torch.nn.Module | None = None,
        on_save: Callable[[], None] | None = None,
        teacher_cache: Any = None,
        on_snapshot: Callable[[Path], None] | None = None,
    ) -> None:
        if isinstance(cfg, DistilConfig) and not cfg.resolved():  # built directly, not through run_distil
            source = teacher_cache.header.get("teacher", "") if teacher_cache is not None else ""
            source = getattr(getattr(teacher, "config", None), "_name_or_path", "") or source
            cfg = cfg.resolve(pretrained_teacher(source))
        self.cfg, self.rt, self.on_save, self.on_snapshot = cfg, rt, on_save, on_snapshot
        self.seconds_before, self.resumed_at = 0.0, None  # training time of earlier processes; this one's start
        self.eval_seconds = 0.0  # dev evaluation and snapshots in this process: not training, so not in the budget
        self.per_rank, self.micro = batch_split(cfg, rt.world)
        self.train_data = TokenShard(shard_dir, "train")
        self.dev_data = TokenShard(shard_dir, "dev")
        self.kd = isinstance(cfg, DistilConfig)
        self.cache = teacher_cache
        if self.cache is not None and teacher is not None:
            raise ConfigError("teacher_cache: give either a teacher or a teacher cache, not both")
        self.teacher_trains = self.kd and cfg.teacher_mode == "train"
        self.weights = (
            LossWeights(cfg.alpha_ce, cfg.alpha_clm, cfg.alpha_cos, cfg.alpha_mse, cfg.temperature, cfg.divergence)
            if self.kd
            else None
        )
        self.n_vocab = pad_vocab(student, pad_multiple(cfg.pad_vocab, rt.device, student))
        # a trimmed head (compress --trim-vocab) predicts only its kept ids: every loss is taken over them alone
        self.kept = kept_mask(student)
        if self.kept is not None and self.cache is not None:
            raise ConfigError("teacher_cache: a student with a trimmed head distils from the teacher; pass --teacher")
        self.chunk = loss_chunk(cfg.loss_chunk, self._head(student).size(0), rt.device)
        self.local = None
        if self.kd and cfg.stage == "local":
            if teacher is None:
                raise ConfigError("stage: local trains each block on the teacher's hidden states; pass --teacher")
            self.local = LocalStage(student, teacher, cfg.local_loss)
        if teacher is not None:
            pad_vocab(teacher, pad_multiple(cfg.pad_vocab, rt.device, teacher))
        self.student = student.to(rt.device).train()
        self.teacher = teacher.to(rt.device) if teacher is not None else None
        if self.teacher is not None:
            self.teacher.train(self.teacher_trains)
            self.teacher.requires_grad_(self.teacher_trains)
        self.opt = make_optimizer(self.student, cfg.lr, cfg, rt.device)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, cfg, self.time_done()))
        self.t_opt = self.t_sched = None
        if self.teacher_trains:
            assert self.teacher is not None
            self.t_opt = make_optimizer(self.teacher, cfg.teacher_lr or cfg.lr, cfg, rt.device)
            self.t_sched = torch.optim.lr_scheduler.LambdaLR(self.t_opt, lambda s: lr_factor(s, cfg, self.time_done()))
        self.s_model, self.t_model = self._wrap(self.student), self._wrap(self.teacher) if self.teacher_trains else None
        if self.t_model is None:
            self.t_model = self.teacher
        self.step, self.tokens = 0, 0
        # fp16 needs loss scaling (one scaler per optimizer); with fp32/bf16 the scalers pass everything through.
        self.scaler = torch.amp.GradScaler(enabled=rt.dtype == torch.float16)
        self.t_scaler = torch.amp.GradScaler(enabled=rt.dtype == torch.float16)

    @staticmethod
    def _head(model: torch.nn.Module) -> torch.Tensor:
        """The LM-head matrix ``[V', H]``, whatever the family calls it (lm_head, embed_out...)."""
        return model.get_output_embeddings().weight

    def _wrap(self, model: torch.nn.Module | None) -> torch.nn.Module | None:
        if model is None:
            return None
        if self.cfg.compile:
            model = torch.compile(model)
        if self.rt.world > 1:
            ids = [self.rt.device.index] if self.rt.device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        return model

    # ------------------------------------------------------------ one step

    def _run(self, model: torch.nn.Module, x: torch.Tensor, hidden: bool) -> Any:
        """Forward pass: hidden states only on the lean path (the head runs in the loss), else logits too."""
        if self.chunk:
            return model(input_ids=x, output_hidden_states=True, logits_to_keep=NO_LOGITS.to(x.device))
        return model(input_ids=x, output_hidden_states=hidden)

    def _loss_step(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        """(student loss, teacher loss or None, logged parts) for one micro-batch of (B, T) windows."""
        x, y = batch[0], batch[1]
        lean, nv = self.chunk, self.n_vocab
        if not self.kd:
            loss = self._clm(self.student, self._run(self.s_model, x, False), y)
            return loss, None, {"loss": loss.item(), "clm": loss.item()}
        if self.local is not None:
            loss, parts = self.local(self.s_model, self.t_model, x)
            return loss, None, parts
        assert self.weights is not None
        want_hidden = self.weights.alpha_cos > 0
        sparse = SparseTargets(*batch[2:]) if self.cache is not None else None
        t_out = None
        if self.t_model is not None:
            with contextlib.nullcontext() if self.teacher_trains else torch.no_grad():
                t_out = self._run(self.t_model, x, want_hidden)
        s_out = self._run(self.s_model, x, want_hidden)
        s_hidden, t_hidden = self._hidden_pairs(s_out, t_out) if want_hidden else (None, None)
        if lean:
            loss, parts = lean_distillation_loss(
                s_out.hidden_states,
                self._head(self.student),
                y,
                self.weights,
                n_vocab=nv,
                teacher_out=t_out.hidden_states if t_out is not None else None,
                teacher_head=self._head(self.teacher) if self.teacher is not None else None,
                sparse=sparse,
                student_hidden=s_hidden,
                teacher_hidden=t_hidden,
                chunk=lean,
                kept=self.kept,
            )
        else:
            t_logits = t_out.logits[..., :nv].detach()
            s_logits = s_out.logits[..., :nv]
            loss, parts = distillation_loss(s_logits, t_logits, y, self.weights, s_hidden, t_hidden, self.kept)
        t_loss = None
        if self.teacher_trains:
            assert self.teacher is not None
            t_loss = self._clm(self.teacher, t_out, y)
            parts["teacher_clm"] = t_loss.item()
        return loss, t_loss, parts

    def _clm(self, model: torch.nn.Module, out: Any, y: torch.Tensor) -> torch.Tensor:
        """Causal-LM loss of a forward output from `_run` (model: the unwrapped one, for its head)."""
        kept = self.kept if model is self.student else None
        if self.chunk:
            hidden, head = out.hidden_states[-1], self._head(model)
            return head_loss(hidden, head, y, CLM_ONLY, n_vocab=self.n_vocab, chunk=self.chunk, kept=kept)[0]
        return clm_loss(out.logits[..., : self.n_vocab], y, kept)

    def _hidden_pairs(self, s_out: Any, t_out: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Student/teacher hidden states to match: the last (after the final norm), or every student layer's mapped
        one."""
        s_hs, t_hs = s_out.hidden_states, t_out.hidden_states  # each (depth + 1) x (B, T, H)
        if self.cfg.cos_layers == "last":
            return [s_hs[-1]], [t_hs[-1].detach()]
        mapping = getattr(self.student.config, "distil_layer_map", None)
        if not mapping:
            raise ConfigError("cos_layers: 'all' needs a student made by `distil-codegpt student` from this teacher")
        return [s_hs[i + 1] for i in range(len(mapping))], [t_hs[j + 1].detach() for j in mapping]

    def _batch(self, step: int) -> tuple[torch.Tensor, ...]:
        """This process's slice of step `step`'s global batch, on the device: (x, y) or, from a teacher cache,
        (x, y, top-k ids, top-k log-probs, tail)."""
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        if self.cache is not None:  # windows of the cache's grid (the teacher saw exactly these contexts)
            windows = torch.randint(self.cache.n_windows, (self.cfg.batch_size,), generator=gen).numpy()
            b = self.cache.batch(windows, self.train_data)
            tensors: tuple[torch.Tensor, ...] = (b.x, b.y, b.ids, b.logp, b.tail)
        else:
            tensors = self.train_data.random_batch(self.cfg.batch_size, self.cfg.seq_len, gen)  # global (B, T)
        lo = self.rt.rank * self.per_rank
        cuda = self.rt.device.type == "cuda"
        # pinned host memory lets the copy to the GPU overlap with compute
        return tuple(
            (t[lo : lo + self.per_rank].pin_memory() if cuda else t[lo : lo + self.per_rank]).to(
                self.rt.device, non_blocking=True
            )
            for t in tensors
        )

    def train_step(self) -> dict[str, float]:
        batch = self._batch(self.step)
        n_micro = self.per_rank // self.micro
        totals: dict[str, float] = {}
        for m in range(n_micro):
            micro = tuple(t[m * self.micro : (m + 1) * self.micro] for t in batch)
            last = m == n_micro - 1
            with self._no_sync(last), self.rt.autocast():
                loss, t_loss, parts = self._loss_step(micro)
            self.scaler.scale(loss / n_micro).backward()
            if t_loss is not None:
                self.t_scaler.scale(t_loss / n_micro).backward()
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + v / n_micro
        totals["grad_norm"] = self._optimizer_step(self.student, self.opt, self.sched, self.scaler)
        if self.t_opt is not None:
            assert self.teacher is not None
            self._optimizer_step(self.teacher, self.t_opt, self.t_sched, self.t_scaler)
        self.step += 1
        self.tokens += self.cfg.batch_size * self.cfg.seq_len
        return totals

    def _no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Skip DDP's gradient all-reduce on all but the last micro-batch of a step."""
        if last or self.rt.world == 1:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        for m in (self.s_model, self.t_model if self.teacher_trains else None):
            if isinstance(m, torch.nn.parallel.DistributedDataParallel):
                stack.enter_context(m.no_sync())
        return stack

    def _optimizer_step(self, model, opt, sched, scaler) -> float:  # noqa: ANN001
        scaler.unscale_(opt)
        clip = self.cfg.grad_clip or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sched.step()
        return norm

    # ------------------------------------------------------------ evaluation, checkpoints

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Mean next-token loss over the first eval_batches micro-batches of dev windows, and its perplexity."""
        was_training = model.training
        model.eval()
        total, n = 0.0, 0
        for i, (x, y) in enumerate(self.dev_data.sequential_batches(self.micro, self.cfg.seq_len)):
            if i >= self.cfg.eval_batches:
                break
            with self.rt.autocast():
                x, y = x.to(self.rt.device), y.to(self.rt.device)
                total += self._clm(model, self._run(model, x, False), y).item() * y.numel()
            n += y.numel()
        model.train(was_training)
        loss = total / max(n, 1)
        return {"dev_loss": loss, "dev_ppl": math.exp(min(loss, 50.0))}

    def train_seconds(self) -> float:
        """Training time so far, over every process that resumed this run (the --max-minutes budget)."""
        if self.resumed_at is None:
            return self.seconds_before
        return self.seconds_before + time.perf_counter() - self.resumed_at - self.eval_seconds

    def time_done(self) -> float:
        """The share of the --max-minutes budget spent (0 without one)."""
        return self.train_seconds() / (self.cfg.max_minutes * 60) if self.cfg.max_minutes else 0.0

    def state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "train_seconds": self.train_seconds(),
            "student": self.student.state_dict(),
            "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(),
            "t_scaler": self.t_scaler.state_dict(),
            "teacher": self.teacher.state_dict() if self.teacher_trains and self.teacher is not None else None,
            "t_opt": self.t_opt.state_dict() if self.t_opt is not None else None,
            "t_sched": self.t_sched.state_dict() if self.t_sched is not None else None,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.scaler.load_state_dict(state["scaler"])
        self.t_scaler.load_state_dict(state["t_scaler"])
        if state.get("teacher") is not None and self.teacher is not None and self.t_opt is not None:
            self.teacher.load_state_dict(state["teacher"])
            self.t_opt.load_state_dict(state["t_opt"])
            self.t_sched.load_state_dict(state["t_sched"])  # type: ignore[union-attr]
        self.step, self.tokens = state["step"], state["tokens"]
        self.seconds_before = float(state.get("train_seconds", 0.0))
        set_rng_state(state["rng"])

    def save(self) -> None:
        if self.rt.main:
            save_checkpoint(self.cfg.out, self.state())
            if self.on_save is not None:
                self.on_save()
        if self.rt.world > 1:
            dist.barrier()

    def _snapshots(self, out: Path) -> None:
        """The model saved at each 1/N of the run that has passed (N = cfg.snapshots) and is not saved yet, to
        OUT/snapshots/K-of-N with snapshot.json (step, tokens, training seconds): the points of a learning curve.
        The time it takes is not training time."""
        n, cfg = self.cfg.snapshots, self.cfg
        if n < 2 or not self.rt.main or self.on_snapshot is None:
            return
        done = self.train_seconds() / (cfg.max_minutes * 60) if cfg.max_minutes else self.step / cfg.max_steps
        for k in range(1, n):
            path = out / "snapshots" / f"{k}-of-{n}"
            if done < k / n or (path / "snapshot.json").is_file():
                continue
            began = time.perf_counter()
            point = {"fraction": k / n, "step": self.step, "tokens": self.tokens, "train_seconds": self.train_seconds()}
            self.on_snapshot(path)
            write_json(path / "snapshot.json", point)
            self.eval_seconds += time.perf_counter() - began

    # ------------------------------------------------------------ the loop

    def fit(self, stop_at: int | None = None) -> dict[str, Any]:
        """Train until max_steps, max_tokens or max_minutes; `stop_at` simulates an interruption (tests)."""
        cfg, rt = self.cfg, self.rt
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        if cfg.resume:
            self.load_state(load_checkpoint(out))
        elif checkpoint_path(out).exists():
            raise ConfigError(f"out: {str(out)!r} already holds a run; pass --resume to continue it or another --out")
        else:
            seed_everything(cfg.seed)  # dropout draws from the global generators: same seed, same run
        # where the run starts from (a fresh run only: a resumed one has it in its first metrics.jsonl line)
        initial = {f"start_{k}": v for k, v in self._evaluate_all().items()} if not cfg.resume else {}
        log = open_log(out / "metrics.jsonl") if rt.main else None
        if log is not None and initial:
            _log(log, None, {"step": 0, "tokens": 0, **initial})
        writer = _tensorboard(out) if rt.main and cfg.tensorboard else None
        start, last_t, last_tokens = time.perf_counter(), time.perf_counter(), self.tokens
        self.resumed_at = start
        desc = "local" if self.local is not None else "distil" if self.kd else "train"
        # a time budget: the bar counts its seconds, so that its ETA is the budget's end
        timed = bool(cfg.max_minutes)
        total, done = (cfg.max_minutes * 60, self.seconds_before) if timed else (cfg.max_steps, self.step)
        unit = {"unit": "s", "bar_format": "{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}{postfix}]"}
        bar = tqdm(total=total, initial=done, desc=desc, disable=not rt.main, **(unit if timed else {}))
        record: dict[str, Any] = {}
        reason = "max_steps"
        pace = _Pace(cfg.save_every)
        try:
            while self.step < cfg.max_steps:
                if cfg.max_tokens and self.tokens >= cfg.max_tokens:
                    reason = "max_tokens"
                    break
                if timed and self.train_seconds() + pace.next_cost(self.step + 1) > total:
                    reason = "max_minutes"  # the next step (and its save, and the last save) would not fit
                    break
                if stop_at is not None and self.step >= stop_at:
                    reason = "stopped"
                    break
                began = time.perf_counter()
                parts = self.train_step()
                pace.stepped(time.perf_counter() - began)
                bar.update(min(self.train_seconds(), total) - bar.n if timed else 1)
                record = {"step": self.step, "tokens": self.tokens, "lr": self.sched.get_last_lr()[0], **parts}
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    now = time.perf_counter()
                    record["tokens_per_s"] = (self.tokens - last_tokens) / max(now - last_t, 1e-9)
                    last_t, last_tokens = now, self.tokens
                    bar.set_postfix(step=self.step, loss=f"{parts['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps:
                    record.update(self._evaluate_all())
                if log is not None and ("tokens_per_s" in record or "dev_loss" in record):
                    _log(log, writer, record)
                if cfg.save_every and self.step % cfg.save_every == 0:
                    began = time.perf_counter()
                    self.save()
                    pace.saved(time.perf_counter() - began)
                self._snapshots(out)
        except KeyboardInterrupt:
            reason = "interrupted"
            self.save()
            raise
        finally:
            bar.close()
        final = self._evaluate_all()
        if log is not None:
            _log(log, writer, {"step": self.step, "tokens": self.tokens, **final})
            log.close()
        if writer is not None:
            writer.close()
        self.save()
        seconds = time.perf_counter() - start
        in_sync = {"ranks_identical": self._ranks_identical()} if rt.world > 1 else {}
        return {
            **in_sync,
            "steps": self.step,
            "tokens": self.tokens,
            "stop_reason": reason,
            "seconds": round(seconds, 2),
            "train_seconds": round(self.train_seconds(), 2),  # every process of a resumed run
            "train_loss": record.get("loss"),
            **initial,
            **final,
        }

    def _ranks_identical(self) -> bool:
        """Whether every process holds bit-identical student weights (a check on DDP, cheap: one gather)."""
        flat = torch.cat([p.detach().double().flatten() for p in self.student.parameters()]).cpu()
        digest = torch.tensor([flat.sum().item(), (flat * torch.arange(len(flat), dtype=flat.dtype)).sum().item()])
        gathered = [torch.zeros_like(digest) for _ in range(self.rt.world)]
        dist.all_gather(gathered, digest.to(self.rt.device) if self.rt.device.type == "cuda" else digest)
        return all(torch.equal(g.cpu(), digest) for g in gathered)

    def _evaluate_all(self) -> dict[str, float]:
        start = time.perf_counter()
        metrics = self.evaluate(self.student)
        if self.teacher_trains and self.teacher is not None:
            metrics.update({f"teacher_{k}": v for k, v in self.evaluate(self.teacher).items()})
        if self.resumed_at is not None:
            self.eval_seconds += time.perf_counter() - start
        return metrics


class _Pace:
    """What the next step will cost, so that a time budget ends before it runs out rather than one step after: a
    step's seconds (the slower of the last and a running mean) plus a checkpoint save where one falls due, and
    the final save kept in reserve. A save's cost is the last one measured (none yet: nothing reserved)."""

    def __init__(self, save_every: int) -> None:
        self.save_every, self.step_s, self.mean_s, self.save_s = save_every, 0.0, 0.0, 0.0

    def stepped(self, seconds: float) -> None:
        self.mean_s = seconds if not self.mean_s else 0.8 * self.mean_s + 0.2 * seconds
        self.step_s = seconds

    def saved(self, seconds: float) -> None:
        self.save_s = seconds

    def next_cost(self, step: int) -> float:
        due = self.save_every and step % self.save_every == 0
        return max(self.step_s, self.mean_s) + self.save_s * (2 if due else 1)


def _tensorboard(out: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(out / "tensorboard"))


def pretrained_teacher(source: str) -> bool:
    """Whether a teacher is a pretrained model (imported, fetched, a hub id, any HF dir) rather than one this toolkit
    trained from scratch or fine-tuned (`train`, as its run.json says): the two get different default KD recipes."""
    return not source or manifest_stage(source) != "train"


def _log(log: Any, writer: Any, record: dict[str, Any]) -> None:
    log.write(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in record.items()}) + "\n")
    log.flush()
    if writer is not None:
        for k, v in record.items():
            if isinstance(v, (int, float)) and k != "step":
                writer.add_scalar(k, v, record["step"])

"""The short measured search of the students' learning rate, batch and training window, run before the study.

One coordinate at a time, from the config's own values: each `search_lr` at the config's batch and window, then each
`search_batch` at the best learning rate, then each `search_seq_len` at the best of both; the value so far (the
config's own at first) is always one of a stage's candidates, tried after the listed ones if not among them. A trial
distils the `variant_layers` student (the main recipe, the online frozen teacher) for `search_tokens` tokens,
whatever the batch and window, and is scored by the student's mean next-token loss on the first `search_dev_tokens`
tokens of the dev split in windows of the config's `seq_len` (the same windows for every trial). The lowest loss
wins; ties keep the value tried first. The winners become the study's `student_lr`, `batch_size` and `seq_len` (and
`cache_windows` is scaled so that the teacher cache holds as many tokens in the new windows).

Every trial is a step like the sweep's others: skipped once scored, resumed from its checkpoint when cut short.
Once scored, a trial's weights and checkpoints are deleted (its run.json and score.json stay). OUT/search/
search.json holds every trial and the choice, and the report shows them.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from distil_codegpt.data.tokenizer import load_tokenizer
from distil_codegpt.evaluate.perf import perplexity
from distil_codegpt.experiment.stages import Step, read_done, run_distil_from
from distil_codegpt.model.presets import load_model
from distil_codegpt.runinfo import write_json

SCORE_FILE = "score.json"
CRITERION = "mean next-token loss of the student on the dev split"


@dataclass(frozen=True)
class Trial:
    lr: float
    batch_size: int
    seq_len: int

    @property
    def name(self) -> str:
        return f"lr{self.lr:g}-b{self.batch_size}-s{self.seq_len}"

    def record(self) -> dict[str, Any]:
        return {"lr": self.lr, "batch_size": self.batch_size, "seq_len": self.seq_len, "name": self.name}


def searching(cfg: Any) -> bool:
    return bool(cfg.search_lr or cfg.search_batch or cfg.search_seq_len)


class Search:
    def __init__(self, sweep: Any) -> None:  # a sweep.Sweep, which imports this module
        self.sweep, self.cfg = sweep, sweep.cfg
        self.dir = sweep.out / "search"

    def trial_steps(self, t: Trial) -> list[Step]:
        s, c = self.sweep, self.cfg
        out = self.dir / t.name
        steps = max(1, -(-c.search_tokens // (t.batch_size * t.seq_len)))
        init = s.out / "students" / f"init-{c.variant_layers}"
        kw = {"lr": t.lr, "batch_size": t.batch_size, "seq_len": t.seq_len, "teacher_mode": "frozen"}
        values = s._distil(out, init, steps, seed=c.seed, eval_every=0, **kw)
        score = out / SCORE_FILE
        return [
            s._student(f"search: init ({c.variant_layers} layers)", init, c.variant_layers),
            Step(f"search {t.name}: distil", out / "run.json", lambda: run_distil_from(s._resumed(values))),
            Step(f"search {t.name}: score", score, lambda: self.score(t)),
        ]

    def score(self, t: Trial) -> None:
        """The trial's dev loss into score.json, then its weights and checkpoints deleted."""
        out = self.dir / t.name
        run = read_done(out / "run.json")
        model = load_model(str(out), dtype=torch.float32).eval()
        dev = perplexity(
            model,
            load_tokenizer(out),
            self.sweep.data / "dev.txt",
            self.cfg.seq_len,
            max_tokens=self.cfg.search_dev_tokens,
        )
        metrics = run.get("metrics") or {}
        result = {**t.record(), "dev_loss": dev["loss"], "dev_tokens": dev["tokens"]}
        result |= {"kd_tokens": metrics.get("tokens"), "steps": metrics.get("steps"), "seconds": run.get("seconds")}
        write_json(out / SCORE_FILE, result)
        for p in out.iterdir():
            if p.name == "checkpoints":
                shutil.rmtree(p)
            elif p.suffix in (".safetensors", ".bin", ".pt") or p.name.endswith(".safetensors.index.json"):
                p.unlink()

    def _scored(self, t: Trial) -> dict[str, Any]:
        return read_done(self.dir / t.name / SCORE_FILE)

    def run(self, execute: Any) -> Trial:
        """Run the three stages (each trial's steps through `execute`), write search.json, return the winner."""
        c = self.cfg
        best = Trial(c.student_lr, c.batch_size, c.seq_len)
        tried: list[Trial] = []
        for field, values in (("lr", c.search_lr), ("batch_size", c.search_batch), ("seq_len", c.search_seq_len)):
            if not values:
                continue
            incumbent = getattr(best, field)  # the value so far stays a candidate
            stage = [replace(best, **{field: v}) for v in [*values, *([] if incumbent in values else [incumbent])]]
            for t in stage:
                if t not in tried:
                    execute(self.trial_steps(t), "search")
                    tried.append(t)
            best = min(stage, key=lambda t: self._scored(t)["dev_loss"])
            self.write(tried, best)
        return best

    def write(self, tried: list[Trial], best: Trial) -> None:
        c = self.cfg
        write_json(
            self.dir / "search.json",
            {
                "criterion": CRITERION,
                "layers": c.variant_layers,
                "search_tokens": c.search_tokens,
                "dev_tokens": c.search_dev_tokens,
                "dev_window": c.seq_len,
                "trials": [self._scored(t) for t in tried],
                "chosen": best.record(),
            },
        )


def search_table(sweep_dir: str | Path) -> list[str]:
    """The markdown lines of the search's trials and choice (OUT/search/search.json); [] when there was none."""
    info = read_done(Path(sweep_dir) / "search" / "search.json")
    if not info:
        return []
    chosen = info["chosen"]["name"]
    lines = [
        f"Each trial distilled the {info['layers']}-layer student for {info['search_tokens']:,} tokens (online frozen "
        f"teacher); score: {info['criterion']} ({info['dev_tokens']:,} tokens in windows of {info['dev_window']}). "
        "One setting at a time: learning rate, then batch, then window.",
        "",
        "| Trial | lr | Batch | Window | Steps | Dev loss | Wall time (s) | |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for t in info["trials"]:
        mark = "chosen" if t["name"] == chosen else ""
        secs = "-" if t.get("seconds") is None else f"{t['seconds']:.0f}"
        lines.append(
            f"| {t['name']} | {t['lr']:g} | {t['batch_size']} | {t['seq_len']} | {t.get('steps') or '-'} | "
            f"{t['dev_loss']:.4f} | {secs} | {mark} |"
        )
    return lines

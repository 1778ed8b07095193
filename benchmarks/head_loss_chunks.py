"""Time of the memory-lean head loss (forward + backward) against its chunk size, at a given vocabulary.

    python benchmarks/head_loss_chunks.py --vocab 50257 --chunks 32 64 128 256 1024
    python benchmarks/head_loss_chunks.py --vocab 4000 --chunks 64 256 1024 2048

KD (T = 2) + CE terms of `distil_codegpt.distill.losses.head_loss` over --tokens tokens of width --width, the
teacher's head of the same shape; the best of --repeat runs per chunk size. What `--loss-chunk -1` (auto) picks
for that vocabulary is printed too.
"""

from __future__ import annotations

import argparse
import time

import torch

from distil_codegpt.distill.losses import LossWeights, head_loss
from distil_codegpt.distill.trainer import loss_chunk


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--chunks", type=int, nargs="+", default=[32, 64, 128, 256, 1024])
    p.add_argument("--repeat", type=int, default=2)
    a = p.parse_args()
    rows = -(-a.vocab // 64) * 64  # the head as `--pad-vocab 64` leaves it
    g = torch.Generator().manual_seed(0)
    h = torch.randn(a.tokens, 1, a.width, generator=g).requires_grad_()
    w = (0.02 * torch.randn(rows, a.width, generator=g)).requires_grad_()
    h_t, w_t = torch.randn(a.tokens, 1, a.width, generator=g), 0.02 * torch.randn(rows, a.width, generator=g)
    y = torch.randint(0, a.vocab, (a.tokens, 1), generator=g)
    weights = LossWeights(alpha_ce=5.0, alpha_clm=2.0, alpha_cos=0.0)
    threads = torch.get_num_threads()
    print(f"vocab {a.vocab:,} (head {rows:,} rows), width {a.width}, {a.tokens:,} tokens, {threads} threads")
    print(f"auto chunk (--loss-chunk -1): {loss_chunk(-1, rows)} tokens")
    print(f"{'chunk':>6} {'seconds':>8}")
    for chunk in a.chunks:
        best = float("inf")
        for _ in range(a.repeat):
            start = time.perf_counter()
            loss, _ = head_loss(h, w, y, weights, n_vocab=a.vocab, teacher_hidden=h_t, teacher_head=w_t, chunk=chunk)
            loss.backward()
            best = min(best, time.perf_counter() - start)
        print(f"{chunk:>6} {best:>8.3f}")


if __name__ == "__main__":
    main()

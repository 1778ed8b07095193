"""How much of a tempered KD target the tail bucket of a teacher cache takes, at each temperature.

    python benchmarks/cache_tempered_tail.py --cache runs/real/teacher-cache --windows 64 --temperatures 1 2 4

A top-k cache keeps the teacher's k best log-probs per token and the rest as one tail mass. At T = 1 the k + 1
buckets are exact; at T != 1 the sparse KD loss (distill/losses.py) assumes the tail spread evenly over the other
V - k tokens, which is the flattest the tail can be (by concavity it gives the largest tempered tail mass of all
spreads). This prints, over the first --windows cached windows, the teacher's tail mass and the share of the
tempered target the tail bucket gets under that assumption: the mean and the median over tokens.
"""

from __future__ import annotations

import argparse

from distil_codegpt.distill.teacher_cache import TeacherCache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", required=True, help="a teacher cache directory (`distil-codegpt cache-teacher`)")
    ap.add_argument("--windows", type=int, default=64, help="first N cached windows read")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    args = ap.parse_args()
    cache = TeacherCache(args.cache)
    n = min(args.windows, cache.n_windows)
    print(f"{args.cache}: top-{cache.top_k} of a vocabulary of {cache.vocab_size:,}, {n * cache.seq_len:,} tokens")
    for t in args.temperatures:
        tail, mean, median = cache.tempered_tail_share(t, n)
        print(f"T = {t:g}: the tail bucket's share of the tempered target: mean {mean:.3f}, median {median:.3f} "
              f"(the teacher's tail mass at T = 1: mean {tail:.3f})")  # fmt: skip


if __name__ == "__main__":
    main()

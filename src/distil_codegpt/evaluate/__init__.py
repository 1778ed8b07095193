"""Line-level code completion on CodeXGLUE's benchmark: decoding, EM/ES as the official evaluator, size and speed."""

from distil_codegpt.artifacts import disk_mb
from distil_codegpt.evaluate.completion import StopIds, complete
from distil_codegpt.evaluate.metrics import fuzz_ratio, line_metrics, post_process
from distil_codegpt.evaluate.perf import latency, perplexity
from distil_codegpt.evaluate.run import print_evaluation, run_evaluate

__all__ = [
    "StopIds",
    "complete",
    "disk_mb",
    "fuzz_ratio",
    "latency",
    "line_metrics",
    "perplexity",
    "post_process",
    "print_evaluation",
    "run_evaluate",
]

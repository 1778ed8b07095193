"""run.json records the machine a stage ran on: wall-clock figures compare only within one machine."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from distil_codegpt.runinfo import write_manifest


def test_the_manifest_names_the_machine(tmp_path: Path) -> None:
    # torch is loaded (imported above): the manifest reports its threads and ISA
    machine = json.loads(write_manifest(tmp_path, "test", {}, {"x": 1}, 1.0).read_text())["machine"]
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), flags=re.M)
        if names:
            assert machine["cpu"] == names[0].strip()
    assert machine["cores"] == (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    assert machine["torch_threads"] == torch.get_num_threads()
    assert machine["isa"] == torch.backends.cpu.get_cpu_capability()
    assert ("gpu" in machine) == torch.cuda.is_available()

"""The module in CellProfiler's analysis workers (what the GUI's Analyze Images runs), headless."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

import numpy as np
import psutil
import tifffile
from conftest import ROOT, copy_fields, run_cellprofiler


def test_analysis_workers_write_what_a_headless_run_writes_and_share_the_cores(tmp_path):
    """Two worker processes, one image set each: the same stacks as one headless process, and each worker's
    PyTorch uses its share of the physical cores (not one thread per core in every worker); the run leaves no
    temporary measurements file behind (CellProfiler removes one only when it is closed)."""
    fields = ["01_POS002", "01_POS076"]
    out = tmp_path / "workers"
    temp = tmp_path / "temp"
    temp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "analysis_workers.py"), "--workers", "2",
                           "--out", str(out), "--fields", *fields], capture_output=True, text=True, timeout=900,
                          env={**env, "PYTHONPATH": str(ROOT), "TMPDIR": str(temp)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert not list(temp.glob("Cpmeasurements*")), sorted(p.name for p in temp.iterdir())
    threads = re.search(r"PyTorch threads per worker: (\{.*\})", proc.stdout)
    assert threads, proc.stdout
    per_worker = ast.literal_eval(threads.group(1))
    expected = max(1, (psutil.cpu_count(logical=False) or os.cpu_count() or 1) // 2)
    assert per_worker and set(per_worker.values()) == {expected}
    one = tmp_path / "one"
    run_cellprofiler(ROOT / "pipelines" / "ExampleFly_CP2Image.cppipe", copy_fields(tmp_path / "images", fields), one)
    names = ["CP2Image_Nuclei_ImageSet0001.tiff", "CP2Image_Nuclei_ImageSet0002.tiff"]
    assert sorted(p.name for p in out.glob("CP2Image_*.tiff")) == names
    for name in names:
        a, b = tifffile.imread(str(one / name)), tifffile.imread(str(out / name))
        assert a.shape == b.shape and a.shape[0] > 200 and np.allclose(a, b, atol=1e-5), name


def test_threads_are_left_alone_outside_workers_and_under_omp_num_threads(monkeypatch):
    import torch

    from cp2image_core.module_support import share_cpu_with_other_workers

    before = torch.get_num_threads()
    assert share_cpu_with_other_workers() is None  # pytest is not a CellProfiler worker
    monkeypatch.setattr(sys, "argv", ["worker", "--work-announce", "tcp://127.0.0.1:1"])
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert share_cpu_with_other_workers() is None
    assert torch.get_num_threads() == before

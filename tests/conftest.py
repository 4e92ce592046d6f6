"""Shared fixtures: real ExampleFly images, a real headless features run, a model trained on it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
CELLPROFILER = str(VENV_BIN / "cellprofiler")
CHANNELS = ["DNA", "FITC", "Rhodamine"]
SHIPPED = ROOT / "weights" / "cp2image-default.safetensors"


def examplefly_dir() -> Path:
    import cellprofiler

    return Path(cellprofiler.__file__).parent / "data" / "examples" / "ExampleFly" / "images"


def copy_fields(dest: Path, fields: list[str]) -> Path:
    """Copy the three channels of the named ExampleFly fields (e.g. '01_POS002') to a visible folder."""
    dest.mkdir(parents=True, exist_ok=True)
    for field in fields:
        for ch in "DFR":
            shutil.copy(examplefly_dir() / f"{field}_{ch}.TIF", dest)
    return dest


def run_cellprofiler(pipeline: Path, images: Path, out: Path, *extra: str,
                     check: bool = True) -> subprocess.CompletedProcess:
    """Headless CellProfiler with our plugins folder; returns the finished process (output captured)."""
    cmd = [CELLPROFILER, "-c", "-r", "-p", str(pipeline), "--plugins-directory", str(ROOT / "plugins"),
           "-i", str(images), "-o", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if check and proc.returncode != 0:
        raise AssertionError(f"cellprofiler failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def fly_export(tmp_path_factory) -> Path:
    """The features pipeline run headless on two real ExampleFly fields (POS002: 283 nuclei, POS218)."""
    base = tmp_path_factory.mktemp("fly")
    images = copy_fields(base / "images", ["01_POS002", "01_POS218"])
    out = base / "features"
    run_cellprofiler(ROOT / "pipelines" / "ExampleFly_features.cppipe", images, out)
    return out


@pytest.fixture(scope="session")
def tiny_model(fly_export, tmp_path_factory) -> Path:
    """A generator trained briefly on the fly_export cells by the real training entry point."""
    from cp2image_core.train import main

    out = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    rc = main(["--export-dir", str(fly_export), "--feature-objects", "Nuclei", "Cells", "Cytoplasm",
               "--channels", *CHANNELS, "--val-images", "1", "--steps", "40", "--batch-size", "16",
               "--val-every", "20", "--loss", "l1", "--out", str(out)])
    assert rc == 0
    return out

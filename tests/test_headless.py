"""End to end: the demo pipeline headless in CellProfiler with the plugins folder and the shipped model."""
from __future__ import annotations

import re

import numpy as np
import tifffile
from conftest import ROOT, SHIPPED, copy_fields, run_cellprofiler

from cp2image_core.dataset import _numeric, _read_csv
from cp2image_core.modelfile import read_spec


def test_demo_pipeline_on_a_real_field(tmp_path):
    assert SHIPPED.exists(), f"the shipped default model {SHIPPED} is missing"
    spec = read_spec(SHIPPED)
    images = copy_fields(tmp_path / "images", ["01_POS002"])
    out = tmp_path / "out"
    proc = run_cellprofiler(ROOT / "pipelines" / "ExampleFly_CP2Image.cppipe", images, out)
    assert "module CP2Image" in proc.stdout + proc.stderr  # CellProfiler timed our module
    ih, irows = _read_csv(out / "Image.csv")
    count = int(_numeric(out / "Image.csv", ih, irows, "CP2Image_Count_Nuclei")[0])
    n_nuclei = int(_numeric(out / "Image.csv", ih, irows, "Count_Nuclei")[0])
    assert count == n_nuclei > 200
    name = irows[0][ih.index("FileName_CP2Image_Nuclei")]
    assert name == "CP2Image_Nuclei_ImageSet0001.tiff"
    stack = tifffile.imread(str(out / name))
    assert stack.shape == (count, spec.n_channels, spec.crop_size, spec.crop_size)
    assert 0 <= stack.min() and stack.max() <= 1 and stack.std() > 0
    oh, orows = _read_csv(out / "Nuclei.csv")
    idx = _numeric(out / "Nuclei.csv", oh, orows, "CP2Image_StackIndex")
    assert idx.tolist() == list(range(1, count + 1))
    assert np.all(_numeric(out / "Nuclei.csv", oh, orows, "CP2Image_ImputedFeatures") >= 0)


def test_headless_run_stops_before_any_image_set_when_a_feature_is_missing(tmp_path):
    text = (ROOT / "pipelines" / "ExampleFly_CP2Image.cppipe").read_text()
    blocks = text.split("\n\n")
    kept = [b for b in blocks if not b.startswith("MeasureTexture:")]
    bad = tmp_path / "no_texture.cppipe"
    bad.write_text(re.sub(r"ModuleCount:(\d+)", lambda m: f"ModuleCount:{int(m[1]) - 1}", "\n\n".join(kept)))
    images = copy_fields(tmp_path / "images", ["01_POS002"])
    proc = run_cellprofiler(bad, images, tmp_path / "out", check=False)
    log = proc.stdout + proc.stderr
    assert "MeasureTexture on Nuclei" in log and "Texture_" in log
    assert "module IdentifyPrimaryObjects" not in log  # no image set ran
    assert not list((tmp_path / "out").glob("*.tiff")) if (tmp_path / "out").exists() else True


def test_two_processes_on_disjoint_image_set_ranges_write_what_one_process_writes(tmp_path):
    """CellProfiler's scale-out (-f/-l ranges, as on a cluster array): same stacks as one run over all sets."""
    import subprocess

    from conftest import CELLPROFILER

    images = copy_fields(tmp_path / "images", ["01_POS002", "01_POS076"])
    pipeline = ROOT / "pipelines" / "ExampleFly_CP2Image.cppipe"
    one = tmp_path / "one"
    run_cellprofiler(pipeline, images, one)
    shared = tmp_path / "shared"
    # created first, as a cluster job script does: CellProfiler checks `-o` then makes it, so two processes
    # starting at the same instant can both see it missing and one dies on FileExistsError (seen in CI)
    shared.mkdir()
    logs = [tmp_path / f"range{k}.log" for k in (1, 2)]
    with logs[0].open("w") as out1, logs[1].open("w") as out2:
        procs = [subprocess.Popen([CELLPROFILER, "-c", "-r", "-p", str(pipeline), "--plugins-directory",
                                   str(ROOT / "plugins"), "-i", str(images), "-o", str(shared),
                                   "-f", str(k), "-l", str(k)], stdout=out, stderr=subprocess.STDOUT)
                 for k, out in ((1, out1), (2, out2))]
        codes = [p.wait(timeout=900) for p in procs]
    assert codes == [0, 0], "\n".join(f"-f {k} exited {c}:\n{log.read_text()[-3000:]}"
                                      for k, c, log in zip((1, 2), codes, logs) if c)
    # both processes wrote into one folder at the same time (their CSVs clash there: give each its own on a cluster)
    stacks = sorted(p.name for p in shared.glob("*.tiff"))
    assert stacks == ["CP2Image_Nuclei_ImageSet0001.tiff", "CP2Image_Nuclei_ImageSet0002.tiff"]
    for name in stacks:
        a = tifffile.imread(str(one / name))
        b = tifffile.imread(str(shared / name))
        assert a.shape == b.shape and np.array_equal(a, b), name

"""Bad input and faults: clear errors naming file/row/column, nothing half-written, killed training resumes."""
from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CHANNELS, ROOT
from hypothesis import given, settings
from hypothesis import strategies as st

from cp2image_core.dataset import _numeric, _read_csv, build_training_set, split_images
from cp2image_core.errors import CP2ImageError, DataError
from cp2image_core.modelfile import load_model
from cp2image_core.module_support import _atomic_tiff, check_writable


def write(path: Path, text: str, encoding="utf-8") -> Path:
    path.write_text(text, encoding=encoding)
    return path


def test_csv_errors_name_file_row_and_column(tmp_path):
    p = write(tmp_path / "Nuclei.csv", "ImageNumber,ObjectNumber,AreaShape_Area\n1,1,10\n1,2,big\n")
    h, rows = _read_csv(p)
    with pytest.raises(DataError, match=r"Nuclei.csv, row 3, column AreaShape_Area: 'big' is not a number"):
        _numeric(p, h, rows, "AreaShape_Area")
    with pytest.raises(DataError, match=r"Empty.csv is empty"):
        _read_csv(write(tmp_path / "Empty.csv", ""))
    with pytest.raises(DataError, match=r"Ragged.csv, row 3: 2 values for 3 columns"):
        _read_csv(write(tmp_path / "Ragged.csv", "a,b,c\n1,2,3\n1,2\n"))


def test_duplicate_object_numbers_are_named(fly_export, tmp_path):
    import shutil

    d = tmp_path / "export"
    shutil.copytree(fly_export, d)
    lines = (d / "Nuclei.csv").read_text().splitlines()
    (d / "Nuclei.csv").write_text("\n".join([*lines, lines[1]]) + "\n")
    with pytest.raises(DataError, match=r"Nuclei.csv: ImageNumber 1, ObjectNumber 1 appears twice"):
        build_training_set(d, "Nuclei", ["Nuclei"], CHANNELS, 32, val_images=[1])


numbers = st.one_of(st.floats(allow_nan=False, allow_infinity=False, width=32), st.integers(-10**6, 10**6))


@settings(max_examples=60, deadline=None)
@given(table=st.lists(st.lists(numbers, min_size=3, max_size=3), min_size=1, max_size=20),
       delimiter=st.sampled_from([",", "\t"]), bom=st.booleans(), missing=st.sampled_from(["", "nan", "NaN"]))
def test_csv_reader_reads_what_exporttospreadsheet_writes(tmp_path_factory, table, delimiter, bom, missing):
    path = tmp_path_factory.mktemp("csv") / "T.csv"
    buf = io.StringIO()
    w = csv.writer(buf, delimiter=delimiter, lineterminator="\n")
    w.writerow(["ImageNumber", "AreaShape_Area", "Intensity_MeanIntensity_DNA"])
    for i, row in enumerate(table):
        w.writerow([missing if (i == 0 and j == 2) else repr(v) for j, v in enumerate(row)])
    path.write_text(("\ufeff" if bom else "") + buf.getvalue(), encoding="utf-8")
    h, rows = _read_csv(path)
    assert h[0] == "ImageNumber" and len(rows) == len(table)
    got = _numeric(path, h, rows, "AreaShape_Area")
    assert np.allclose(got, [float(r[1]) for r in table])
    assert np.isnan(_numeric(path, h, rows, "Intensity_MeanIntensity_DNA")[0])


@pytest.mark.parametrize("encoding", ["latin-1", "cp1252", "utf-8", "utf-8-sig"])
def test_csv_in_the_encodings_exporttospreadsheet_writes(tmp_path, encoding):
    """CellProfiler on Windows writes the system code page: metadata like 'Größe_µm' must read back intact."""
    path = tmp_path / "Nuclei.csv"
    path.write_text("ImageNumber,ObjectNumber,Metadata_Plate,AreaShape_Area\n1,1,Größe_µm,310\n1,2,Größe_µm,2.5e2\n",
                    encoding=encoding)
    h, rows = _read_csv(path)
    assert h == ["ImageNumber", "ObjectNumber", "Metadata_Plate", "AreaShape_Area"]
    assert [r[2] for r in rows] == ["Größe_µm", "Größe_µm"]
    assert _numeric(path, h, rows, "AreaShape_Area").tolist() == [310.0, 250.0]


def test_single_image_and_constant_features_are_explained(tmp_path):
    with pytest.raises(DataError, match="at least 2 image sets"):
        split_images(np.array([1, 1, 1]), None, 0.2, 0)
    d = tmp_path / "export"
    d.mkdir()
    write(d / "Image.csv", "ImageNumber,FileName_DNA,PathName_DNA\n1,a.tif,/x\n2,b.tif,/x\n")
    write(d / "Nuclei.csv", "ImageNumber,ObjectNumber,Location_Center_X,Location_Center_Y,AreaShape_Area\n"
          "1,1,5,5,10\n2,1,5,5,10\n")
    with pytest.raises(DataError, match=r"No usable features.*constant"):
        build_training_set(d, "Nuclei", ["Nuclei"], ["DNA"], 16, val_images=[1])


def test_unwritable_output_folder_is_named(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(CP2ImageError, match=r"cannot create the output folder .*file.txt/out"):
        check_writable(blocker / "out", ["a.tiff"], overwrite=False)


def test_a_full_disk_leaves_no_half_written_file(tmp_path):
    """A real write failure: the process's file-size limit (RLIMIT_FSIZE) makes the write fail midway."""
    code = f"""
import resource, signal, numpy as np
from pathlib import Path
from cp2image_core.module_support import _atomic_tiff
from cp2image_core.errors import CP2ImageError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
try:
    _atomic_tiff(Path({str(tmp_path)!r}) / "stack.tiff", np.ones((20, 3, 64, 64), np.float32), "TCYX")
except CP2ImageError as e:
    print("ERROR:", e)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert "ERROR: CP2Image could not write" in proc.stdout and "stack.tiff" in proc.stdout, proc.stderr
    assert list(tmp_path.iterdir()) == []  # neither the final name nor the temporary file


def test_existing_file_survives_a_failed_rewrite(tmp_path):
    target = tmp_path / "stack.tiff"
    _atomic_tiff(target, np.zeros((2, 1, 8, 8), np.float32), "TCYX")
    before = target.read_bytes()

    def batches():
        yield 0, np.ones((1, 1, 8, 8), np.float32)
        raise RuntimeError("generator crashed mid-stack")

    with pytest.raises(RuntimeError):
        _atomic_tiff(target, batches(), "TCYX", shape=(2, 1, 8, 8))
    assert target.read_bytes() == before and len(list(tmp_path.iterdir())) == 1


def test_training_killed_mid_run_resumes_to_the_same_result(fly_export, tmp_path):
    args = [sys.executable, "-m", "cp2image_core.train", "--export-dir", str(fly_export), "--feature-objects",
            "Nuclei", "--channels", *CHANNELS, "--val-images", "1", "--crop-size", "32", "--batch-size", "8",
            "--val-every", "3", "--steps", "30", "--loss", "l1"]
    straight = tmp_path / "straight.safetensors"
    subprocess.run([*args, "--out", str(straight)], check=True, capture_output=True, cwd=ROOT)
    killed = tmp_path / "killed.safetensors"
    ckpt = Path(f"{killed}.run") / "checkpoint.pt"
    proc = subprocess.Popen([*args, "--out", str(killed)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (ckpt.exists() and torch.load(ckpt, weights_only=True)["step"] >= 9):
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not killed.exists(), "the run finished before it could be killed; make it longer"
    step = torch.load(ckpt, weights_only=True)["step"]  # the checkpoint is whole, never half-written
    assert 9 <= step < 30
    subprocess.run([*args, "--out", str(killed), "--resume"], check=True, capture_output=True, cwd=ROOT)
    _, a = load_model(straight)
    _, b = load_model(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sixteen_bit_images_are_scaled_as_cellprofiler_scales_them(tmp_path):
    import tifffile

    from cp2image_core.dataset import load_image

    data = np.array([[0, 65535], [32768, 1000]], np.uint16)
    tifffile.imwrite(str(tmp_path / "a.tif"), data)
    assert np.allclose(load_image(tmp_path / "a.tif"), data / 65535.0)
    tifffile.imwrite(str(tmp_path / "b.tif"), data.astype(np.uint8))
    assert np.allclose(load_image(tmp_path / "b.tif"), data.astype(np.uint8) / 255.0)


def test_fewer_training_cells_than_the_batch_size(fly_export, tmp_path, capsys):
    from cp2image_core.train import main

    out = tmp_path / "m.safetensors"
    # field 2 held out: 283 training cells, batches of 300 are drawn with replacement
    assert main(["--export-dir", str(fly_export), "--channels", *CHANNELS, "--val-images", "2", "--crop-size", "32",
                 "--batch-size", "300", "--steps", "2", "--val-every", "2", "--loss", "l1", "--out", str(out)]) == 0
    spec, _ = load_model(out)
    assert spec.training["n_train"] < 300
    # training again into the same file is refused before it starts, naming the file; --overwrite replaces it
    args = ["--export-dir", str(fly_export), "--channels", *CHANNELS, "--val-images", "1", "--crop-size", "32",
            "--batch-size", "8", "--steps", "2", "--val-every", "2", "--loss", "l1", "--out", str(out)]
    before = out.read_bytes()
    assert main(args) == 2
    assert f"{out} exists" in capsys.readouterr().err and out.read_bytes() == before
    assert main([*args, "--overwrite"]) == 0 and out.read_bytes() != before

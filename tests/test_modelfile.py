"""The model file contract: safetensors + JSON spec; clear errors; never unpickle."""
from __future__ import annotations

import json
import pickle
import struct
import subprocess
import sys

import pytest
import torch

from cp2image_core import archs
from cp2image_core.errors import ModelFileError, SpecError
from cp2image_core.modelfile import SPEC_KEY, load_model, read_spec, save_model
from cp2image_core.spec import ModelSpec


def make_spec(**kw) -> ModelSpec:
    d = dict(arch="cp2image-decoder", arch_params={"width": 32, "hidden": 64}, object_name="Nuclei",
             features=[("Nuclei", "AreaShape_Area"), ("Cells", "Intensity_MeanIntensity_DNA")],
             feature_mean=[300.0, 0.1], feature_std=[80.0, 0.05], channels=["DNA", "FITC"], crop_size=32)
    d.update(kw)
    return ModelSpec(**d)


def test_roundtrip_keeps_spec_and_weights(tmp_path):
    spec = make_spec()
    gen = archs.build(spec.arch, spec.n_features, spec.n_channels, spec.crop_size, **spec.arch_params)
    path = save_model(tmp_path / "m.safetensors", gen.state_dict(), spec)
    spec2, tensors = load_model(path)
    assert spec2 == spec
    for k, v in gen.state_dict().items():
        assert torch.equal(tensors[k], v)
    assert not list(tmp_path.glob(".*tmp*")), "temporary file left behind"


def test_read_spec_does_not_import_torch(tmp_path):
    spec = make_spec()
    gen = archs.build(spec.arch, spec.n_features, spec.n_channels, spec.crop_size, **spec.arch_params)
    path = save_model(tmp_path / "m.safetensors", gen.state_dict(), spec)
    code = ("import sys; from cp2image_core.modelfile import read_spec; "
            f"s = read_spec({str(path)!r}); assert s.n_features == 2; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_truncated_file(tmp_path):
    spec = make_spec()
    gen = archs.build(spec.arch, spec.n_features, spec.n_channels, spec.crop_size, **spec.arch_params)
    path = save_model(tmp_path / "m.safetensors", gen.state_dict(), spec)
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated"):
        load_model(cut)
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    with pytest.raises(ModelFileError, match="empty or truncated"):
        read_spec(tmp_path / "tiny.safetensors")


def test_missing_and_not_safetensors(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        read_spec(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(struct.pack("<Q", 5) + b"hello" + b"\0" * 20)
    (tmp_path / "j2.safetensors").write_bytes(struct.pack("<Q", 7) + b"{hello}" + b"\0" * 20)
    with pytest.raises(ModelFileError, match="not a safetensors file"):
        read_spec(tmp_path / "j2.safetensors")
    with pytest.raises(ModelFileError, match="not a safetensors file"):
        read_spec(junk)


class _Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "EXECUTED"
    bad = tmp_path / "evil.safetensors"
    bad.write_bytes(pickle.dumps(_Marker(str(marker))))
    with pytest.raises(ModelFileError, match="pickle"):
        load_model(bad)
    assert not marker.exists()
    torch_file = tmp_path / "torchsave.safetensors"  # torch.save's zip format
    torch.save({"w": torch.zeros(2), "x": _Marker(str(marker))}, torch_file)
    with pytest.raises(ModelFileError, match="pickle"):
        load_model(torch_file)
    assert not marker.exists()


def test_safetensors_without_spec(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, str(p))
    with pytest.raises(ModelFileError, match="not a cp2image model"):
        read_spec(p)


def _with_spec_dict(tmp_path, d: dict):
    from safetensors.torch import save_file

    p = tmp_path / "x.safetensors"
    save_file({"w": torch.zeros(1)}, str(p), metadata={SPEC_KEY: json.dumps(d)})
    return p


def test_newer_version_and_bad_fields_are_named(tmp_path):
    d = json.loads(make_spec().to_json())
    with pytest.raises(SpecError, match="newer cp2image"):
        read_spec(_with_spec_dict(tmp_path, {**d, "format_version": 99}))
    with pytest.raises(SpecError, match=r"feature_std.*Cells.Intensity_MeanIntensity_DNA"):
        read_spec(_with_spec_dict(tmp_path, {**d, "feature_std": [1.0, 0.0]}))
    missing = {k: v for k, v in d.items() if k != "channels"}
    with pytest.raises(SpecError, match="channels"):
        read_spec(_with_spec_dict(tmp_path, missing))
    with pytest.raises(SpecError, match="2 numbers"):
        read_spec(_with_spec_dict(tmp_path, {**d, "feature_mean": [1.0]}))


def test_unknown_architecture_is_named(tmp_path):
    from cp2image_core.synthesize import load_synthesizer_uncached

    p = _with_spec_dict(tmp_path, json.loads(make_spec(arch="unet-9000").to_json()))
    with pytest.raises(SpecError, match="unet-9000"):
        load_synthesizer_uncached(p)


def test_spec_channels_that_do_not_fit_the_weights_are_named(tmp_path):
    """A spec edited to list three channels over two-channel weights: named, before any synthesis."""
    from cp2image_core.synthesize import load_synthesizer_uncached

    spec = make_spec()
    gen = archs.build(spec.arch, spec.n_features, spec.n_channels, spec.crop_size, **spec.arch_params)
    path = save_model(tmp_path / "m.safetensors", gen.state_dict(), make_spec(channels=["DNA", "FITC", "Actin"]))
    with pytest.raises(SpecError, match=r"m.safetensors.*3 channels DNA, FITC, Actin.*size mismatch"):
        load_synthesizer_uncached(path)


def test_describe_lists_channels_and_the_modules_that_measure_the_features(tmp_path):
    spec = make_spec()
    gen = archs.build(spec.arch, spec.n_features, spec.n_channels, spec.crop_size, **spec.arch_params)
    path = save_model(tmp_path / "m.safetensors", gen.state_dict(), spec)
    out = subprocess.run([sys.executable, "-m", "cp2image_core.modelfile", str(path)], capture_output=True,
                         text=True, check=True).stdout
    assert "channels (grayscale images, in order): DNA, FITC" in out
    assert "MeasureObjectSizeShape on Nuclei: 1 (AreaShape_Area)" in out
    assert "MeasureObjectIntensity on Cells: 1 (Intensity_MeanIntensity_DNA)" in out


def _training_script_calls(tmp_path, script: str, **env: str) -> list:
    """Run ``scripts/<script>`` with a stand-in python that records each training command's arguments (the
    training itself takes minutes); the features are marked as measured, so the script goes straight to the stages."""
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    venv, work, log = tmp_path / "venv", tmp_path / "work", tmp_path / "calls.txt"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    (venv / "bin" / "python").chmod(0o755)
    (work / "features").mkdir(parents=True)
    (work / "features" / "Nuclei.csv").touch()  # newer than the features pipeline: not measured again
    subprocess.run(["bash", str(root / "scripts" / script)], env={**os.environ, "VENV": str(venv), "WORK": str(work),
                   **env}, check=True, capture_output=True)
    return log.read_text().splitlines() if log.exists() else []


def _arch_params(call: str) -> list:
    """A recorded training command's ``--arch-param`` values, in order."""
    return call.split("--arch-param ")[1].split(" --")[0].split()


@pytest.mark.parametrize("extra", ["", "width=32 hidden=128"])
def test_train_default_adds_extra_arch_params_to_both_stages(tmp_path, extra):
    """``EXTRA_PARAMS`` reaches both stages' ``--arch-param`` (docs/speed.md, session 29), and without it the stages
    run the shipped recipe."""
    stages = _training_script_calls(tmp_path, "train_default.sh", EXTRA_PARAMS=extra,
                                    OUT=str(tmp_path / "m.safetensors"), STAGE1=str(tmp_path / "m1.safetensors"))
    assert len(stages) == 2
    recipe = "n_up=2 subpixel=2 width=96 smooth=1 low_res_first=1 icnr=1 anchor=1"
    for stage, last in zip(stages, ["", " calibrate=1"]):
        assert _arch_params(stage) == f"{recipe}{last} {extra}".split()


@pytest.mark.parametrize("init_there", [False, True])
def test_train_realistic_first_trains_the_default_it_starts_from(tmp_path, init_there):
    """The shipped realistic model was fine-tuned from the fourth update's default (the x2 decoder, 3,000 + 2,000
    steps, no calibration, no lattice or cell-shape loss), which today's default (a x4 last step) cannot stand in
    for: without INIT's file the script trains that default first, into INIT, then its three stages from it; with
    the file there, only those."""
    init = tmp_path / "init.safetensors"
    if init_there:
        init.touch()
    calls = _training_script_calls(tmp_path, "train_realistic.sh", INIT=str(init), OUT=str(tmp_path / "r.safetensors"),
                                   STAGE1=str(tmp_path / "r1.safetensors"), STAGE2=str(tmp_path / "r2.safetensors"))
    default, realistic = calls[:-3], calls[-3:]
    assert len(default) == (0 if init_there else 2) and len(realistic) == 3
    assert f"--init-from {init} " in realistic[0] + " "
    if not init_there:
        assert "--steps 3000 " in default[0] and f"--out {init} " in default[1]
        assert f"--init-from {init.with_name('init-stage1.safetensors')} " in default[1] + " "
        made, wanted = (dict(p.split("=") for p in _arch_params(call)) for call in (default[1], realistic[0]))
        assert made["calibrate"] == "0"
        # nor the lattice, lattice-share and cell-shape losses of today's default stage 2: the last occurrence wins,
        # as for argparse
        for option in ("--lattice-loss", "--lattice-share-loss", "--cell-shape-loss"):
            assert [t for t in default[1].split() if t.startswith(option)][-1] == f"{option}=0"
        for key, value in (("n_up", None), ("subpixel", None), ("width", "128")):  # the same weights' shapes
            assert made[key] == wanted.get(key, value), key


@pytest.mark.parametrize("model, script", [("cp2image-default", "train_default.sh"),
                                           ("cp2image-realistic", "train_realistic.sh")])
def test_shipped_models_were_made_by_their_training_scripts_recipe(model, script):
    """The recipe in scripts/ (what `make train-default` / `make train-realistic` run) is the one stored in the
    shipped file's spec: the same architecture parameters and the same loss options (the script's last occurrence
    of an option, as for argparse: the realistic recipe's last stage overrides its first two's critic options)."""
    import re
    import shlex
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    text = (root / "scripts" / script).read_text().replace("\\\n", " ")
    spec = read_spec(root / "weights" / f"{model}.safetensors")
    shared = re.search(r'^PARAMS="([^"]+)"', text, re.M)  # train_default.sh: PARAMS, and what its last stage adds
    params = (shared.group(1).split() + re.findall(r'"\$PARAMS ?((?:\w+=\d+ ?)*)"', text)[-1].split() if shared
              else re.search(r"--arch-param ((?:\w+=\d+ ?)+)", text).group(1).split())
    assert dict(p.split("=") for p in params) == {k: str(v) for k, v in spec.arch_params.items()}
    command = shlex.split(spec.training["command"])
    for option in ("--loss", "--texture-loss", "--intensity-loss", "--shape-loss", "--edge-loss", "--pattern-loss",
                   "--lattice-loss", "--lattice-share-loss", "--cell-shape-loss", "--cell-outline-ring",
                   "--cell-mask-image", "--cell-outline-channel", "--level-loss", "--adv-surround", "--surround-weight",
                   "--adv-weight", "--lr-d", "--texture-scale", "--mask-image", "--crop-size"):
        in_script = next(reversed(list(re.finditer(rf"{option} ((?:[^\s-][^\s]* ?)+)", text))), None)
        stored = [i for i, a in enumerate(command) if a == option]
        assert bool(in_script) == bool(stored), f"{option}: in {script} but not in {model}'s spec, or back"
        if stored:
            i = stored[-1] + 1  # argparse keeps the last occurrence
            values = []
            while i < len(command) and not command[i].startswith("--"):
                values.append(command[i])
                i += 1
            assert in_script.group(1).split() == values, option

"""Faults the module must survive: CUDA out-of-memory (mocked: no GPU here), many objects, NaN features."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import tifffile
import torch

from cp2image_core import archs
from cp2image_core.modelfile import read_spec
from cp2image_core.module_support import synthesize_and_write
from cp2image_core.spec import ModelSpec
from cp2image_core.synthesize import Synthesizer, load_synthesizer_uncached


class OOMAbove(torch.nn.Module):
    """Wraps a generator and raises CUDA's out-of-memory error for batches larger than ``limit``.

    This mocks the GPU failure (no GPU here); the retry logic under test is the real one.
    """

    def __init__(self, gen, limit):
        super().__init__()
        self.gen, self.limit, self.calls = gen, limit, []

    def forward(self, z):
        self.calls.append(len(z))
        if len(z) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (mocked)")
        return self.gen(z)


def test_cuda_oom_retries_with_smaller_batches():
    spec = ModelSpec(arch="cp2image-decoder", arch_params={"width": 32, "hidden": 32}, object_name="Nuclei",
                     features=[("Nuclei", "A"), ("Nuclei", "B")], feature_mean=[0.0, 0.0], feature_std=[1.0, 1.0],
                     channels=["DNA"], crop_size=16)
    torch.manual_seed(0)
    gen = archs.build(spec.arch, 2, 1, 16, **spec.arch_params).eval()
    z = np.random.default_rng(0).standard_normal((10, 2)).astype(np.float32)
    expected = Synthesizer(spec, gen, torch.device("cpu")).generate(z, 10)
    flaky = OOMAbove(gen, limit=3)
    got = Synthesizer(spec, flaky, torch.device("cpu")).generate(z, 16)
    assert np.allclose(got, expected, atol=1e-6)
    assert max(flaky.calls[-1:]) <= 3 and flaky.calls[0] == 10


class FakeMeasurements:
    """Just the two calls synthesize_and_write makes; the in-process module tests use the real class."""

    def __init__(self, data):
        self.data = data

    def has_feature(self, obj, feat):
        return (obj, feat) in self.data

    def get_current_measurement(self, obj, feat):
        return self.data.get((obj, feat))


def test_objects_are_split_into_equal_batches():
    """283 objects at batch size 64 run as 5 batches of 57 (not 4 x 64 + 27), with the same images."""
    spec = ModelSpec(arch="cp2image-decoder", arch_params={"width": 32, "hidden": 32}, object_name="Nuclei",
                     features=[("Nuclei", "A"), ("Nuclei", "B")], feature_mean=[0.0, 0.0], feature_std=[1.0, 1.0],
                     channels=["DNA"], crop_size=16)
    torch.manual_seed(0)
    counted = OOMAbove(archs.build(spec.arch, 2, 1, 16, **spec.arch_params).eval(), limit=10**6)
    synth = Synthesizer(spec, counted, torch.device("cpu"))
    z = np.random.default_rng(0).standard_normal((283, 2)).astype(np.float32)
    starts = [start for start, _ in synth.iter_generate(z, 64)]
    assert counted.calls == [57] * 4 + [55] and starts == [0, 57, 114, 171, 228]
    assert np.allclose(synth.generate(z, 64), synth.generate(z, 283), atol=1e-5)
    counted.calls.clear()
    synth.generate(z[:64], 64)
    assert counted.calls == [64]


def test_ten_thousand_objects_stream_in_bounded_memory(tiny_model, tmp_path):
    spec = read_spec(tiny_model)
    synth = load_synthesizer_uncached(tiny_model, "cpu")
    side = 100  # 10,000 objects of 3x3 pixels on a 1000x1000 field
    labels = np.zeros((side * 10, side * 10), np.int32)
    yy, xx = np.mgrid[:side, :side]
    numbers = (yy * side + xx + 1).astype(np.int32)
    for dy in range(3):
        for dx in range(3):
            labels[yy * 10 + 4 + dy, xx * 10 + 4 + dx] = numbers
    n = side * side
    rng = np.random.default_rng(0)
    data = {f: np.asarray(spec.feature_mean[j]) + spec.feature_std[j] * rng.standard_normal(n)
            for j, f in enumerate(spec.features)}
    data[("Nuclei", "Location_Center_X")] = (xx * 10 + 5).ravel().astype(float)
    data[("Nuclei", "Location_Center_Y")] = (yy * 10 + 5).ravel().astype(float)
    data[spec.features[0]][:7] = np.nan
    full_bytes = n * spec.n_channels * spec.crop_size ** 2 * 4
    tracemalloc.start()
    result = synthesize_and_write(synth, FakeMeasurements(data), "Nuclei", labels, batch_size=64,
                                  folder=str(tmp_path), base="many", per_object=False, overwrite=False,
                                  want_field=True)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert result.count == n and result.imputed[:7].tolist() == [1] * 7 and result.imputed[7:].sum() == 0
    assert peak < full_bytes / 2, f"peak {peak / 1e6:.0f} MB vs {full_bytes / 1e6:.0f} MB for all images at once"
    with tifffile.TiffFile(str(tmp_path / "many.tiff")) as tif:
        assert len(tif.pages) == n * spec.n_channels
        assert tif.pages[-1].asarray().std() > 0
    assert np.all(result.field[labels == 0] == 0)


@pytest.mark.parametrize("precision, max_err, mean_err", [("bf16", 0.03, 0.001), ("fp16", 0.02, 0.0002)])
def test_reduced_precision_stays_close_to_fp32(fly_export, precision, max_err, mean_err):
    """Both shipped models under autocast (run here on the CPU; on CUDA the same dtypes are used) against fp32, on
    200 real ExampleFly nuclei's features. The default's calibration takes its object by a threshold, which a
    rounding can move by an edge pixel: max error 0.011 (bf16) / 0.011 (fp16) on these cells, mean 0.0002 /
    0.00003 (the sixth update, 2026-12-07; the fifth: max 0.017 / 0.005, mean 0.0002 / 0.00002; without
    calibration: max 0.005 / 0.0006). On random feature vectors, which are no cell's, the max reaches 0.10 / 0.03
    (the fifth update) while the mean stays as small."""
    from conftest import CHANNELS, SHIPPED

    from cp2image_core.dataset import build_training_set
    from cp2image_core.features import standardize

    ts = build_training_set(fly_export, "Nuclei", ["Nuclei", "Cells", "Cytoplasm"], CHANNELS, 64, val_images=[1],
                            mask_image="NucleiLabels")
    for model in (SHIPPED, SHIPPED.with_name("cp2image-realistic.safetensors")):
        ref_synth = load_synthesizer_uncached(model, "cpu", "fp32")
        index = {f: j for j, f in enumerate(ts.feature_names)}
        z, _ = standardize(ts.features[:200, [index[f] for f in ref_synth.spec.features]], ref_synth.spec, clip=False)
        ref = ref_synth.generate(z, 32)
        out = load_synthesizer_uncached(model, "cpu", precision).generate(z, 32)
        err = np.abs(out - ref)
        assert 0 < err.max() < max_err and err.mean() < mean_err, (model.name, err.max(), err.mean())


class Overflows(torch.nn.Module):
    """A generator whose float16 intermediate overflows (1e5 > 65504), giving NaN; in fp32 it is 0.5 everywhere."""

    def forward(self, z):
        big = torch.nn.functional.linear(z, torch.full((4, z.shape[1]), 1e5, device=z.device))
        return torch.sigmoid(big - big).reshape(len(z), 1, 2, 2)


def test_an_overflowing_reduced_precision_batch_is_recomputed_in_fp32(caplog):
    spec = ModelSpec(arch="cp2image-decoder", arch_params={}, object_name="Nuclei",
                     features=[("Nuclei", "A"), ("Nuclei", "B")], feature_mean=[0.0, 0.0], feature_std=[1.0, 1.0],
                     channels=["DNA"], crop_size=2)
    z = np.ones((5, 2), np.float32)
    with caplog.at_level("WARNING"):
        out = Synthesizer(spec, Overflows(), torch.device("cpu"), "fp16").generate(z, 2)
    assert np.all(out == 0.5)
    assert sum("recomputing this batch in fp32" in r.message for r in caplog.records) == 3  # 3 batches of 2, 2, 1
    with pytest.raises(ValueError, match="Unknown precision 'fp8'"):
        Synthesizer(spec, Overflows(), torch.device("cpu"), "fp8")

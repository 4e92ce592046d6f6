"""The CP2Image module in-process with real cellprofiler_core objects (pipeline, workspace, measurements)."""
from __future__ import annotations

import io
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cp2image_core.crops import compose_field, crop_objects
from cp2image_core.dataset import _numeric, _read_csv
from cp2image_core.features import standardize
from cp2image_core.modelfile import read_spec
from cp2image_core.synthesize import load_synthesizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "plugins"))

import cellprofiler_core.preferences  # noqa: E402

cellprofiler_core.preferences.set_headless()

from cellprofiler_core.image import Image, ImageSetList  # noqa: E402
from cellprofiler_core.measurement import Measurements  # noqa: E402
from cellprofiler_core.object import Objects, ObjectSet  # noqa: E402
from cellprofiler_core.pipeline import Pipeline  # noqa: E402
from cellprofiler_core.preferences import ABSOLUTE_FOLDER_NAME  # noqa: E402
from cellprofiler_core.setting import ValidationError  # noqa: E402
from cellprofiler_core.workspace import Workspace  # noqa: E402
from cp2image import (  # noqa: E402
    BIT_DEPTH_16,
    BIT_DEPTH_FLOAT,
    LAYOUT_OBJECT,
    MODEL_CUSTOM,
    MODEL_REALISTIC,
    PRECISION_AUTO,
    PRECISION_BF16,
    PRECISION_FP32,
    CP2Image,
)


def real_feature_rows(export: Path, spec, rows: list[int]) -> np.ndarray:
    """Raw features of the given rows of the export, in spec order (real CellProfiler measurements)."""
    out = np.zeros((len(rows), spec.n_features))
    tables = {}
    for j, (obj, feat) in enumerate(spec.features):
        if obj not in tables:
            tables[obj] = _read_csv(export / f"{obj}.csv")
        h, body = tables[obj]
        out[:, j] = _numeric(export / f"{obj}.csv", h, body, feat)[rows]
    return out


def make_workspace(model: Path, out: Path, raw: np.ndarray, spec, labels: np.ndarray, centers: np.ndarray,
                   **settings):
    module = CP2Image()
    module.set_module_num(1)
    module.objects_name.value = "Nuclei"
    module.model_choice.value = MODEL_CUSTOM
    module.model_file.value = str(model)
    module.device.value = "CPU"
    module.batch_size.value = 2  # smaller than the object count: several batches
    module.directory.value = f"{ABSOLUTE_FOLDER_NAME}|{out}"
    for k, v in settings.items():
        getattr(module, k).value = v
    pipeline = Pipeline()
    pipeline.add_module(module)
    image_set_list = ImageSetList()
    image_set = image_set_list.get_image_set(0)
    rng = np.random.default_rng(0)
    for ch in spec.channels:
        image_set.add(ch, Image(rng.random(labels.shape).astype(np.float32) * 0.2))
    object_set = ObjectSet()
    objects = Objects()
    objects.segmented = labels
    object_set.add_objects(objects, "Nuclei")
    m = Measurements()
    m.add_measurement("Nuclei", "Location_Center_X", centers[:, 0])
    m.add_measurement("Nuclei", "Location_Center_Y", centers[:, 1])
    for j, (obj, feat) in enumerate(spec.features):
        m.add_measurement(obj, feat, raw[:, j])
    ws = Workspace(pipeline, module, image_set, object_set, m, image_set_list)
    return module, ws


def three_objects():
    labels = np.zeros((120, 150), np.int32)
    yy, xx = np.mgrid[:120, :150]
    centers = np.array([[30.0, 30.0], [100.0, 60.0], [140.0, 110.0]])  # the last touches the border
    for k, (x, y) in enumerate(centers, start=1):
        labels[(xx - x) ** 2 + (yy - y) ** 2 <= 12 ** 2] = k
    return labels, centers


def test_module_writes_stack_measurements_and_field(tiny_model, fly_export, tmp_path):
    spec = read_spec(tiny_model)
    raw = real_feature_rows(fly_export, spec, [0, 1, 2])
    raw[1, 5] = np.nan  # CellProfiler emits NaN for some objects: imputed and counted
    labels, centers = three_objects()
    module, ws = make_workspace(tiny_model, tmp_path, raw, spec, labels, centers, wants_field=True)
    module.show_window = True
    module.run(ws)
    m = ws.measurements
    name = m.get_current_image_measurement("FileName_CP2Image_Nuclei")
    assert name == "CP2Image_Nuclei_ImageSet0001.tiff"
    assert m.get_current_image_measurement("PathName_CP2Image_Nuclei") == str(tmp_path)
    assert m.get_current_image_measurement("CP2Image_Count_Nuclei") == 3
    assert list(m.get_current_measurement("Nuclei", "CP2Image_StackIndex")) == [1, 2, 3]
    assert list(m.get_current_measurement("Nuclei", "CP2Image_ImputedFeatures")) == [0, 1, 0]
    stack = tifffile.imread(str(tmp_path / name))
    assert stack.shape == (3, spec.n_channels, spec.crop_size, spec.crop_size)
    # pages are in object-number order: page k is object k synthesized on its own
    synth = load_synthesizer(tiny_model, "cpu")
    for k in range(3):
        z, _ = standardize(raw[k:k + 1], spec)
        assert np.allclose(stack[k], synth.generate(z)[0], atol=1e-5)
    field = ws.image_set.get_image("SyntheticField").pixel_data
    assert field.shape == (*labels.shape, spec.n_channels)
    assert np.all(field[labels == 0] == 0)
    assert np.allclose(field[30, 30], stack[0][:, spec.crop_size // 2, spec.crop_size // 2])
    # display data for the GUI gallery: real crops of the channel images and their synthesized images
    assert ws.display_data.real.shape == ws.display_data.synthetic.shape == stack.shape
    assert np.allclose(ws.display_data.synthetic, stack, atol=1e-6)
    cols = module.get_measurement_columns(None)
    assert ("Nuclei", "CP2Image_StackIndex", "integer") in cols
    assert module.get_measurements(None, "Nuclei", "CP2Image") == ["StackIndex", "ImputedFeatures"]


@pytest.mark.parametrize("among_neighbours", [False, True])
def test_module_logs_how_its_time_splits(tiny_model, fly_export, tmp_path, caplog, among_neighbours):
    """The debug line benchmarks/module_overhead.py reads: the run by the module's own clock, every step timed,
    together no more than the run."""
    spec = read_spec(tiny_model)
    labels, centers = three_objects()
    module, ws = make_workspace(tiny_model, tmp_path, real_feature_rows(fly_export, spec, [0, 1, 2]), spec, labels,
                                centers, wants_field=True, among_neighbours=among_neighbours)
    caplog.set_level("DEBUG", logger="cp2image")
    began = time.perf_counter()
    module.run(ws)
    wall = time.perf_counter() - began
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("CP2Image: image set 1, 3 Nuclei, ")]
    assert len(lines) == 1, caplog.text
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from module_overhead import run_times, step_times  # the benchmark's own reading of the line

    (seconds,), (run,) = step_times(lines[0]), run_times(lines[0])
    assert list(seconds) == ["load model", "read features", "generate", "compose", "write"]
    assert seconds["generate"] > 0 and seconds["write"] > 0 and min(seconds.values()) >= 0  # load: maybe cached
    assert sum(seconds.values()) <= run + 0.0003 and run <= wall + 0.0001  # each rounded to 0.1 ms


def test_module_per_object_files_and_no_silent_overwrite(tiny_model, fly_export, tmp_path):
    spec = read_spec(tiny_model)
    raw = real_feature_rows(fly_export, spec, [3, 4, 5])
    labels, centers = three_objects()
    module, ws = make_workspace(tiny_model, tmp_path, raw, spec, labels, centers, file_layout=LAYOUT_OBJECT)
    module.run(ws)
    files = sorted(p.name for p in tmp_path.glob("*.tiff"))
    assert files == [f"CP2Image_Nuclei_ImageSet0001_Object000{k}.tiff" for k in (1, 2, 3)]
    before = (tmp_path / files[0]).read_bytes()
    module2, ws2 = make_workspace(tiny_model, tmp_path, raw[::-1].copy(), spec, labels, centers,
                                  file_layout=LAYOUT_OBJECT)
    with pytest.raises(Exception, match="will not overwrite"):
        module2.run(ws2)
    assert (tmp_path / files[0]).read_bytes() == before


def test_channel_images_that_do_not_fit_the_model_stop_before_writing(tiny_model, fly_export, tmp_path):
    spec = read_spec(tiny_model)
    raw = real_feature_rows(fly_export, spec, [0, 1, 2])
    labels, centers = three_objects()
    module, ws = make_workspace(tiny_model, tmp_path, raw, spec, labels, centers)
    ws.image_set.remove_image_provider(spec.channels[1])
    ws.image_set.add(spec.channels[1], Image(np.zeros((*labels.shape, 3), np.float32)))  # loaded as color
    with pytest.raises(Exception, match=rf"image '{spec.channels[1]}' has 3 channels.*ColorToGray"):
        module.run(ws)
    module, ws = make_workspace(tiny_model, tmp_path, raw, spec, labels, centers)
    ws.image_set.remove_image_provider(spec.channels[0])
    ws.image_set.add(spec.channels[0], Image(np.zeros((60, 70), np.float32)))  # another size than the objects'
    with pytest.raises(Exception, match=rf"image '{spec.channels[0]}' is 70x60 pixels.*150x120"):
        module.run(ws)
    assert not list(tmp_path.iterdir())


def test_missing_channel_images_and_short_feature_arrays(tiny_model, fly_export, tmp_path, caplog):
    """Only features are needed: absent channel images give a synthetic-only gallery; short arrays are imputed."""
    spec = read_spec(tiny_model)
    raw = real_feature_rows(fly_export, spec, [0, 1])  # 2 rows of features for 3 objects
    labels, centers = three_objects()
    module, ws = make_workspace(tiny_model, tmp_path, raw, spec, labels, centers)
    ws.image_set.remove_image_provider(spec.channels[-1])
    module.show_window = True
    module.run(ws)
    assert list(ws.measurements.get_current_measurement("Nuclei", "CP2Image_ImputedFeatures")) == [
        0, 0, spec.n_features]
    assert ws.display_data.real is None and len(ws.display_data.synthetic) == 3
    assert f"channels {spec.channels[-1]} are not images" in caplog.text
    assert "has 2 values for 3 objects; the missing ones are imputed" in caplog.text


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the behaviour without a GPU")
def test_gpu_only_stops_clearly_without_a_gpu_and_gpu_falls_back(tiny_model, fly_export, tmp_path, caplog):
    spec = read_spec(tiny_model)
    labels, centers = three_objects()
    raw = real_feature_rows(fly_export, spec, [0, 1, 2])
    module, ws = make_workspace(tiny_model, tmp_path / "a", raw, spec, labels, centers,
                                device="GPU only (stop if none)")
    with pytest.raises(Exception, match="GPU only was chosen but PyTorch sees no CUDA device"):
        module.run(ws)
    assert not (tmp_path / "a").exists() or not list((tmp_path / "a").glob("*.tiff"))
    module, ws = make_workspace(tiny_model, tmp_path / "b", raw, spec, labels, centers, device="GPU")
    module.run(ws)
    assert "no CUDA device is available; using the CPU" in caplog.text
    assert ws.measurements.get_current_image_measurement("CP2Image_Count_Nuclei") == 3


def test_one_pixel_objects_with_nan_features(tiny_model, fly_export, tmp_path):
    spec = read_spec(tiny_model)
    labels = np.zeros((60, 60), np.int32)
    labels[10, 10], labels[30, 45], labels[59, 0] = 1, 2, 3  # one pixel each, one in the image corner
    centers = np.array([[10.0, 10.0], [45.0, 30.0], [0.0, 59.0]])
    raw = real_feature_rows(fly_export, spec, [0, 1, 2])
    raw[0, :] = np.nan  # CellProfiler gives NaN shape/texture features for one-pixel objects
    module, ws = make_workspace(tiny_model, tmp_path, raw, spec, labels, centers, wants_field=True)
    module.run(ws)
    imputed = ws.measurements.get_current_measurement("Nuclei", "CP2Image_ImputedFeatures")
    assert list(imputed) == [spec.n_features, 0, 0]
    stack = tifffile.imread(str(tmp_path / "CP2Image_Nuclei_ImageSet0001.tiff"))
    field = ws.image_set.get_image("SyntheticField").pixel_data
    c = spec.crop_size // 2
    for k, (x, y) in enumerate(centers.astype(int)):
        assert np.allclose(field[y, x], stack[k][:, c, c])
    assert np.count_nonzero(field.sum(-1)) <= 3


def test_module_zero_objects(tiny_model, tmp_path):
    spec = read_spec(tiny_model)
    labels = np.zeros((50, 50), np.int32)
    module, ws = make_workspace(tiny_model, tmp_path, np.zeros((0, spec.n_features)), spec, labels,
                                np.zeros((0, 2)), wants_field=True)
    module.run(ws)
    assert ws.measurements.get_current_image_measurement("CP2Image_Count_Nuclei") == 0
    assert ws.measurements.get_current_image_measurement("FileName_CP2Image_Nuclei") == ""
    assert not list(tmp_path.glob("*.tiff"))
    assert np.all(ws.image_set.get_image("SyntheticField").pixel_data == 0)


def test_validation_names_missing_features_and_their_module(tiny_model, tmp_path):
    pipeline = Pipeline()
    pipeline.load(str(ROOT / "pipelines" / "ExampleFly_features.cppipe"))
    texture = next(m for m in pipeline.modules() if m.module_name == "MeasureTexture")
    pipeline.remove_module(texture.module_num)
    module = CP2Image()
    module.model_choice.value = MODEL_CUSTOM
    module.model_file.value = str(tiny_model)
    module.set_module_num(len(pipeline.modules()) + 1)
    pipeline.add_module(module)
    with pytest.raises(ValidationError, match=r"MeasureTexture on Nuclei: Texture_\w+_DNA"):
        module.test_valid(pipeline)


def test_both_shipped_models_validate_in_the_examplefly_features_pipeline():
    """Each shipped model's features are all measured by the ExampleFly features pipeline; the choice picks the file."""
    pipeline = Pipeline()
    pipeline.load(str(ROOT / "pipelines" / "ExampleFly_features.cppipe"))
    module = CP2Image()
    module.set_module_num(len(pipeline.modules()) + 1)
    pipeline.add_module(module)
    paths = set()
    for choice in module.model_choice.choices:
        if choice != MODEL_CUSTOM:
            module.model_choice.value = choice
            module.test_valid(pipeline)
            paths.add(module.model_path())
    assert len(paths) == 2 and all(Path(p).is_file() for p in paths)
    module.model_choice.value = MODEL_REALISTIC
    assert module.model_path().endswith("weights/cp2image-realistic.safetensors")


def test_validation_of_a_bad_model_file(tmp_path, tiny_model):
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(tiny_model.read_bytes()[:1000])
    module = CP2Image()
    module.model_choice.value = MODEL_CUSTOM
    module.model_file.value = str(bad)
    pipeline = Pipeline()
    module.set_module_num(1)
    pipeline.add_module(module)
    with pytest.raises(ValidationError, match="truncated") as e:
        module.validate_module(pipeline)
    assert e.value.get_setting() is module.model_file


def test_settings_visibility_and_revision():
    module = CP2Image()
    assert module.model_file not in module.visible_settings()
    module.model_choice.value = MODEL_CUSTOM
    assert module.model_file in module.visible_settings()
    assert module.field_name not in module.visible_settings()
    module.wants_field.value = True
    assert module.field_name in module.visible_settings()
    assert module.bit_depth in module.visible_settings() and module.bit_depth.value == BIT_DEPTH_FLOAT
    assert module.match_shape in module.visible_settings() and not module.match_shape.value
    assert module.fill_field in module.visible_settings() and not module.fill_field.value
    assert module.among_neighbours in module.visible_settings() and not module.among_neighbours.value
    values = [s.value_text for s in module.settings()]
    assert values[-3:] == ["No", "No", "No"]
    assert module.upgrade_settings(values, 6, "CP2Image") == (values, 6)
    assert module.upgrade_settings(values[:-1], 5, "CP2Image") == (values, 6)
    assert module.upgrade_settings(values[:-2], 4, "CP2Image") == (values, 6)
    assert module.upgrade_settings(values[:-3], 3, "CP2Image") == (values, 6)
    assert module.upgrade_settings(values[:-4], 2, "CP2Image") == ([*values[:-4], BIT_DEPTH_FLOAT, "No", "No", "No"], 6)


def test_a_revision_1_pipeline_loads_with_automatic_precision():
    """Pipelines saved before the Precision setting (revision 1) load with it at Automatic, the rest unchanged."""
    text = (ROOT / "pipelines" / "ExampleFly_CP2Image.cppipe").read_text()
    old = re.sub(r"(CP2Image:\[module_num:11\|svn_version:'Unknown'\|variable_revision_number:)\d+", r"\g<1>1", text)
    old = re.sub(r"    (Image bit depth|Match each object's stated shape\?):.*\n", "", old)  # saved at revision 3+
    old = old.replace(f"    Precision:{PRECISION_AUTO}\n", "").replace("    Batch size:64", "    Batch size:48")
    assert old.count("variable_revision_number:1|") == 1 and "Precision:" not in old
    from cellprofiler_core.utilities.core.modules import add_module_for_tst, fill_modules, get_module_names

    if "MeasureTexture" not in get_module_names():
        fill_modules()
    add_module_for_tst(CP2Image)  # CellProfiler's hook for a module not found through the plugins folder
    pipeline = Pipeline()
    pipeline.loadtxt(io.StringIO(old), raise_on_error=True)
    (module,) = [m for m in pipeline.modules() if m.module_name == "CP2Image"]
    assert module.precision.value == PRECISION_AUTO and module.bit_depth.value == BIT_DEPTH_FLOAT
    assert not module.match_shape.value and not module.among_neighbours.value
    assert module.batch_size.value == 48 and module.directory.dir_choice == "Default Output Folder"
    assert module.file_prefix.value == "CP2Image"
    pipeline = Pipeline()  # the demo pipeline as shipped (revision 2: no Image bit depth yet)
    pipeline.loadtxt(io.StringIO(text), raise_on_error=True)
    (module,) = [m for m in pipeline.modules() if m.module_name == "CP2Image"]
    assert module.bit_depth.value == BIT_DEPTH_FLOAT and module.batch_size.value == 64
    assert module.wants_field.value and module.field_name.value == "SyntheticField" and not module.fill_field.value


def test_filled_field_is_composed_from_the_written_stack(tiny_model, fly_export, tmp_path):
    """*Fill the field between objects?* gives the field that compose_field makes of the stack just written (radii
    from the objects' areas): the cells at their centres, drawn background between them, not zero."""
    spec = read_spec(tiny_model)
    raw = real_feature_rows(fly_export, spec, [0, 1, 2])
    labels, centers = three_objects()
    module, ws = make_workspace(tiny_model, tmp_path, raw, spec, labels, centers, wants_field=True, fill_field=True)
    module.run(ws)
    stack = tifffile.imread(str(tmp_path / "CP2Image_Nuclei_ImageSet0001.tiff"))
    field = ws.image_set.get_image("SyntheticField").pixel_data
    radii = np.sqrt(np.bincount(labels.ravel())[1:] / np.pi)
    assert np.allclose(field, compose_field(stack, labels.shape, centers, radii), atol=1e-6)
    c = spec.crop_size // 2
    assert np.allclose(field[30, 30], stack[0][:, c, c], atol=1e-3)
    assert np.all(field[labels == 0].max(-1) > 0)


def test_among_neighbours_cuts_each_object_from_the_composed_field(tiny_model, fly_export, tmp_path):
    """*Draw each object among its synthesized neighbours?* writes, in both layouts, each object's crop cut from the
    field compose_field makes of the objects' own crops (the filled field image is that same field); an object
    without a centre keeps its own crop."""
    spec = read_spec(tiny_model)
    raw = real_feature_rows(fly_export, spec, [0, 1, 2])
    labels, centers = three_objects()
    centers[1] = [50.0, 45.0]  # close to object 1: each object's crop holds part of the other
    labels[labels == 2] = 0
    yy, xx = np.mgrid[:120, :150]
    labels[(xx - 50) ** 2 + (yy - 45) ** 2 <= 8 ** 2] = 2
    centers[2] = np.nan  # no centre (e.g. a missing Location measurement): not placed in the field
    runs = {}
    for name, settings in (("own", {}), ("stack", {"among_neighbours": True, "wants_field": True, "fill_field": True}),
                           ("files", {"among_neighbours": True, "file_layout": LAYOUT_OBJECT})):
        out = tmp_path / name
        out.mkdir()
        module, ws = make_workspace(tiny_model, out, raw, spec, labels, centers, **settings)
        module.run(ws)
        files = sorted(out.glob("*.tiff"))
        runs[name] = np.stack([tifffile.imread(str(f)) for f in files]).reshape(3, spec.n_channels, spec.crop_size, -1)
        if name == "stack":
            field = ws.image_set.get_image("SyntheticField").pixel_data
    own = runs["own"]
    radii = np.sqrt(np.bincount(labels.ravel())[1:] / np.pi)
    composed = compose_field(own[:2], labels.shape, centers[:2], radii[:2])
    assert np.allclose(field, composed, atol=1e-6)
    cut = crop_objects(composed, centers[:2], spec.crop_size)
    assert np.allclose(runs["stack"][:2], cut, atol=1e-6) and np.array_equal(runs["files"], runs["stack"])
    assert np.array_equal(runs["stack"][2], own[2])
    assert np.abs(runs["stack"][:2] - own[:2]).max() > 0.05  # the neighbour, and the drawn background, changed them


def test_16_bit_stacks_hold_the_float_pixels_times_65535(tiny_model, fly_export, tmp_path):
    """*16-bit integer* writes uint16 pages equal to the float32 ones x 65535, rounded, in both layouts."""
    spec = read_spec(tiny_model)
    raw = real_feature_rows(fly_export, spec, [0, 1, 2])
    labels, centers = three_objects()
    pages = {}
    for depth, layout in ((BIT_DEPTH_FLOAT, None), (BIT_DEPTH_16, None), (BIT_DEPTH_16, LAYOUT_OBJECT)):
        out = tmp_path / f"{depth.split('-')[0]}{layout is not None}"
        out.mkdir()
        extra = {"file_layout": layout} if layout else {}
        module, ws = make_workspace(tiny_model, out, raw, spec, labels, centers, bit_depth=depth, **extra)
        module.run(ws)
        files = sorted(out.glob("*.tiff"))
        pages[(depth, layout)] = np.stack([tifffile.imread(str(f)) for f in files]).reshape(3, spec.n_channels,
                                                                                            spec.crop_size, -1)
    floats, ints = pages[(BIT_DEPTH_FLOAT, None)], pages[(BIT_DEPTH_16, None)]
    assert floats.dtype == np.float32 and ints.dtype == np.uint16
    assert np.abs(ints / 65535.0 - floats).max() <= 0.5 / 65535 + 1e-7
    assert np.array_equal(pages[(BIT_DEPTH_16, LAYOUT_OBJECT)], ints)


def test_precision_setting_reaches_the_generator(tiny_model, fly_export, tmp_path):
    """bfloat16 writes images within 0.02 of fp32's, and not the same ones: the setting is used."""
    spec = read_spec(tiny_model)
    raw = real_feature_rows(fly_export, spec, [0, 1, 2])
    labels, centers = three_objects()
    stacks = {}
    for precision in (PRECISION_FP32, PRECISION_BF16):
        out = tmp_path / precision.split()[0]
        out.mkdir()
        module, ws = make_workspace(tiny_model, out, raw, spec, labels, centers, precision=precision)
        module.run(ws)
        stacks[precision] = tifffile.imread(str(out / "CP2Image_Nuclei_ImageSet0001.tiff"))
    diff = np.abs(stacks[PRECISION_FP32] - stacks[PRECISION_BF16])
    assert 0 < diff.max() < 0.02


def test_match_shape_setting_reaches_the_generator_and_is_refused_for_a_model_that_cannot(tiny_model, fly_export,
                                                                                         tmp_path):
    """*Match each object's stated shape?* changes the images (each object rotated and stretched to its stated
    ellipse), keeping them in 0..1; a model without the AreaShape features it reads is refused in validation,
    naming the features and the setting."""
    import dataclasses

    from cp2image_core.modelfile import load_model, save_model

    spec = read_spec(tiny_model)
    raw = real_feature_rows(fly_export, spec, [0, 1, 2])
    labels, centers = three_objects()
    stacks = {}
    for match in (False, True):
        out = tmp_path / f"match{match}"
        out.mkdir()
        module, ws = make_workspace(tiny_model, out, raw, spec, labels, centers, match_shape=match)
        module.run(ws)
        stacks[match] = tifffile.imread(str(out / "CP2Image_Nuclei_ImageSet0001.tiff"))
    assert np.abs(stacks[True] - stacks[False]).max() > 0.01
    assert stacks[True].min() >= 0 and stacks[True].max() <= 1
    _, tensors = load_model(tiny_model)
    keep = [j for j, (o, f) in enumerate(spec.features) if f != "AreaShape_Orientation"]
    blind_spec = dataclasses.replace(spec, features=[spec.features[j] for j in keep],
                                     feature_mean=[spec.feature_mean[j] for j in keep],
                                     feature_std=[spec.feature_std[j] for j in keep])
    blind = save_model(tmp_path / "blind.safetensors", tensors, blind_spec)
    module, ws = make_workspace(blind, tmp_path, raw[:, keep], blind_spec, labels, centers, match_shape=True)
    with pytest.raises(ValidationError, match=r"Nuclei features AreaShape_Orientation") as e:
        module.validate_module(ws.pipeline)
    assert e.value.get_setting() is module.match_shape


def test_module_loads_without_torch_and_says_what_to_install():
    """CellProfiler drops plugins whose import fails: ours must import, then explain in validation."""
    import subprocess

    code = f"""
import io
import re
import sys
import time
sys.modules['torch'] = None  # as if PyTorch were not installed
sys.path.insert(0, {str(ROOT / 'plugins')!r})
import cellprofiler_core.preferences as p; p.set_headless()
from cellprofiler_core.pipeline import Pipeline
from cellprofiler_core.setting import ValidationError
import cp2image
m = cp2image.CP2Image(); m.set_module_num(1)
pl = Pipeline(); pl.add_module(m)
try:
    m.validate_module(pl)
except ValidationError as e:
    print('VALIDATION:', e.message)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "VALIDATION: CP2Image needs the cp2image_core package and PyTorch" in proc.stdout, proc.stderr[-2000:]


def test_feature_reads_follow_cellprofiler_measurements():
    """The kept-open datasets give what get_current_measurement gives, in every image set, and never a stale
    value after CellProfiler deletes and re-adds a feature (as test mode does when a module runs again)."""
    from cp2image_core.module_support import current_values

    m = Measurements()
    rng = np.random.default_rng(0)
    values = {}
    for isn, n in ((1, 5), (2, 3), (3, 0), (4, 4)):
        if isn > 1:
            m.next_image_set(isn)
        for feat in ("AreaShape_Area", "Intensity_MeanIntensity_DNA"):
            values[isn, feat] = rng.random(n)
            m.add_measurement("Nuclei", feat, values[isn, feat])
    for isn in (2, 1, 4, 3, 2):  # out of order, and each twice
        m.image_set_number = isn
        for feat in ("AreaShape_Area", "Intensity_MeanIntensity_DNA"):
            got = np.asarray(current_values(m, "Nuclei", feat))
            assert np.array_equal(got, np.asarray(m.get_current_measurement("Nuclei", feat)))
            assert np.array_equal(got, values[isn, feat])
    m.image_set_number = 4
    m.remove_measurement("Nuclei", "AreaShape_Area", 4)  # gone in image set 4 only
    gone = current_values(m, "Nuclei", "AreaShape_Area")
    assert gone is None or len(gone) == 0
    m.remove_measurement("Nuclei", "AreaShape_Area")  # the whole feature, then measured again
    m.add_measurement("Nuclei", "AreaShape_Area", np.array([7.0, 8.0]))
    assert np.array_equal(current_values(m, "Nuclei", "AreaShape_Area"), [7.0, 8.0])

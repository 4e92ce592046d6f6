"""Regenerate the pipelines from CellProfiler's bundled ExampleFly.cppipe (CellProfiler writes the text).

- pipelines/ExampleFly_features.cppipe: the tutorial without its Crop/GrayToColor/SaveImages modules, measuring
  intensity and texture (objects only) on all three channels, saving the Nuclei label image (for masks in
  training and evaluation) and exporting Image.csv, Nuclei.csv, Cells.csv, Cytoplasm.csv;
- pipelines/ExampleFly_CP2Image.cppipe: the same with CP2Image before the export (no label image).

Run after changing the module's settings: .venv/bin/python scripts/make_pipelines.py
"""
from __future__ import annotations

import os
from pathlib import Path

import cellprofiler
from cellprofiler_core.pipeline import Pipeline
from cellprofiler_core.preferences import set_headless, set_plugin_directory
from cellprofiler_core.utilities.core.modules import fill_modules, instantiate_module

ROOT = Path(__file__).resolve().parent.parent
TUTORIAL = Path(cellprofiler.__file__).parent / "data/examples/ExampleFly/ExampleFly.cppipe"
RENAME = {"OrigBlue": "DNA", "OrigGreen": "FITC", "OrigRed": "Rhodamine", "CropBlue": "DNA",
          "CropGreen": "FITC", "CropRed": "Rhodamine"}


def load_tutorial() -> Pipeline:
    text = TUTORIAL.read_text()
    for old, new in RENAME.items():
        text = text.replace(old, new)
    tmp = ROOT / "build" / "tutorial.cppipe"
    tmp.parent.mkdir(exist_ok=True)
    tmp.write_text(text)
    p = Pipeline()
    p.load(str(tmp))
    return p


def insert(pipeline: Pipeline, module, before: str) -> None:
    target = next(m for m in pipeline.modules() if m.module_name == before)
    module.set_module_num(target.module_num)
    pipeline.add_module(module)


def save(pipeline: Pipeline, name: str) -> None:
    for m in pipeline.modules():
        m.show_window = False
    with open(ROOT / "pipelines" / name, "w") as fd:
        pipeline.dump(fd)


def main() -> None:
    set_headless()
    set_plugin_directory(str(ROOT / "plugins"), globally=False)
    fill_modules()
    p = load_tutorial()
    for m in list(p.modules())[::-1]:
        if m.module_name in ("Crop", "GrayToColor", "SaveImages"):
            p.remove_module(m.module_num)
    for m in p.modules():
        if m.module_name in ("MeasureObjectIntensity", "MeasureTexture"):
            m.images_list.value = "DNA, FITC, Rhodamine"
            m.notes = ["Measure all three channels (DNA, FITC, rhodamine) of the nuclei, cells and cytoplasm."]
        if m.module_name == "MeasureTexture":
            m.images_or_objects.value = "Objects"
    convert = instantiate_module("ConvertObjectsToImage")
    convert.object_name.value = "Nuclei"
    convert.image_name.value = "NucleiLabels"
    convert.image_mode.value = "uint16"
    convert.notes = ["The nuclei as a label image, saved for masks in cp2image training and evaluation."]
    insert(p, convert, "ExportToSpreadsheet")
    saver = instantiate_module("SaveImages")
    saver.image_name.value = "NucleiLabels"
    saver.file_name_method.value = "From image filename"
    saver.file_image_name.value = "DNA"
    saver.wants_file_name_suffix.value = True
    saver.file_name_suffix.value = "_NucleiLabels"
    saver.file_format.value = "tiff"
    saver.bit_depth.value = "16-bit integer"
    saver.overwrite.value = True
    saver.update_file_names.value = True  # FileName_NucleiLabels / PathName_NucleiLabels in Image.csv
    insert(p, saver, "ExportToSpreadsheet")
    save(p, "ExampleFly_features.cppipe")

    for m in list(p.modules())[::-1]:
        if m.module_name in ("ConvertObjectsToImage", "SaveImages"):
            p.remove_module(m.module_num)
    module = instantiate_module("CP2Image")
    module.objects_name.value = "Nuclei"
    module.overwrite.value = True  # the demo writes into its own output folder
    module.wants_field.value = True
    module.notes = ["Synthesize each nucleus's cell from its Nuclei, Cells and Cytoplasm features with the "
                    "shipped default model; one TIFF stack per image set."]
    insert(p, module, "ExportToSpreadsheet")
    save(p, "ExampleFly_CP2Image.cppipe")


if __name__ == "__main__":
    os.chdir(ROOT)
    main()

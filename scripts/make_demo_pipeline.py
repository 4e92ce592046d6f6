"""Write pipelines/ExampleFly_CP2Image.cppipe: the features pipeline + CP2Image before the export.

Re-run after changing the module's settings (CellProfiler itself writes the module's text):
    .venv/bin/python scripts/make_demo_pipeline.py
"""
from pathlib import Path

from cellprofiler_core.pipeline import Pipeline
from cellprofiler_core.preferences import set_headless, set_plugin_directory
from cellprofiler_core.utilities.core.modules import fill_modules, instantiate_module

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    set_headless()
    set_plugin_directory(str(ROOT / "plugins"), globally=False)
    fill_modules()
    pipeline = Pipeline()
    pipeline.load(str(ROOT / "pipelines" / "ExampleFly_features.cppipe"))
    export = next(m for m in pipeline.modules() if m.module_name == "ExportToSpreadsheet")
    module = instantiate_module("CP2Image")
    module.set_module_num(export.module_num)
    module.objects_name.value = "Nuclei"
    module.overwrite.value = True  # the demo writes into its own output folder
    module.wants_field.value = True
    module.notes = ["Synthesize each nucleus's cell from its Nuclei, Cells and Cytoplasm features "
                    "with the shipped default model; one TIFF stack per image set."]
    pipeline.add_module(module)
    with open(ROOT / "pipelines" / "ExampleFly_CP2Image.cppipe", "w") as fd:
        pipeline.dump(fd)


if __name__ == "__main__":
    main()

"""CP2Image: a CellProfiler module that synthesizes an image of each object from its measured features.

Thin glue: settings, validation and measurements live here; everything else is in ``cp2image_core``,
imported lazily so that this file always loads and can explain what is missing.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import numpy as np
from cellprofiler_core.constants.measurement import (
    COLTYPE_FLOAT,
    COLTYPE_INTEGER,
    COLTYPE_VARCHAR_FILE_NAME,
    COLTYPE_VARCHAR_PATH_NAME,
    IMAGE,
)
from cellprofiler_core.image import Image
from cellprofiler_core.module import Module
from cellprofiler_core.preferences import (
    ABSOLUTE_FOLDER_NAME,
    DEFAULT_INPUT_FOLDER_NAME,
    DEFAULT_INPUT_SUBFOLDER_NAME,
    DEFAULT_OUTPUT_FOLDER_NAME,
    DEFAULT_OUTPUT_SUBFOLDER_NAME,
)
from cellprofiler_core.setting import Binary, ValidationError
from cellprofiler_core.setting.choice import Choice
from cellprofiler_core.setting.subscriber import LabelSubscriber
from cellprofiler_core.setting.text import Directory, ImageName, Integer, Pathname, Text

__doc__ = """\
CP2Image
========

**CP2Image** synthesizes an image of each object (e.g. each nucleus and its cell) from the
features CellProfiler measured for it — size and shape, intensity, texture — using a generator
trained on real cells (after Ji et al., *CP2Image*, MIDL 2023). It shows what a profile "looks like",
lets you see what a feature means, and gives downstream modules synthetic cells to measure.

For each image set it reads every feature the model lists from the measurements made by earlier
modules (features of related objects, e.g. *Cells* and *Cytoplasm* for *Nuclei*, are joined by
object number), runs the generator in batches, and writes the synthesized cells as a
multi-channel TIFF stack (one page per object, in object-number order) or one TIFF per object.
Intensities are in CellProfiler's units (0–1), channels in the model's order.

|

============ ============ ===============
Supports 2D? Supports 3D? Respects masks?
============ ============ ===============
YES          NO           NO
============ ============ ===============

What the model needs from the pipeline
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
Every feature the model was trained on, measured by modules *before* CP2Image, under the same
object and image names. The shipped default model (trained on CellProfiler's ExampleFly images)
needs *Nuclei*, *Cells* and *Cytoplasm* measured by **MeasureObjectSizeShape**,
**MeasureObjectIntensity** and **MeasureTexture** on images named *DNA*, *FITC* and *Rhodamine*,
as in ``pipelines/ExampleFly_features.cppipe`` (so does the shipped *realistic-looking* model).
Missing features are reported before the run starts, with the module that measures them.
Features that are NaN or infinite for an object are replaced by the training mean and counted.
For another model, ``python -m cp2image_core.modelfile MODEL.safetensors`` lists its objects,
channel images and features by module.
The generator reads only features; images named like the model's channels must be grayscale and
the size of the objects' image (they are shown next to the synthesized cells).

Speed
^^^^^
A CUDA GPU is used when present (*Compute device*), in float16 (*Precision*); on the CPU,
*bfloat16* is faster on processors with bfloat16 instructions. In *Analyze Images* each worker
process gives PyTorch its share of the CPU cores (cores ÷ *Maximum number of workers*), so that
workers do not slow each other down; an ``OMP_NUM_THREADS`` you set is left alone.

Measurements made by this module
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
**Per image:**

-  *FileName_CP2Image_<objects>*, *PathName_CP2Image_<objects>*: the TIFF stack written (or, with
   one file per object, the file-name pattern), following CellProfiler's FileName/PathName
   convention.
-  *CP2Image_Count_<objects>*: how many objects were synthesized.

**Per object:**

-  *CP2Image_StackIndex*: the page of the stack holding this object (1 = first page), or the
   number in its per-object file name.
-  *CP2Image_ImputedFeatures*: how many of this object's features were missing (NaN/inf) and
   replaced by the training mean.

References
^^^^^^^^^^
-  Ji Y, Cutiongco M, Jensen BS, Yuan K (2023) "CP2Image: Generating high-quality single-cell
   images using CellProfiler representations." *Medical Imaging with Deep Learning (MIDL)*,
   https://openreview.net/forum?id=4LqtcKZoKeB
-  Stirling DR et al. (2021) "CellProfiler 4: improvements in speed, utility and usability."
   *BMC Bioinformatics* 22, 433.
"""

LOGGER = logging.getLogger(__name__)

MODEL_DEFAULT = "Default model (shipped)"
MODEL_REALISTIC = "Realistic-looking model (shipped)"
MODEL_CUSTOM = "Model file"
DEVICE_AUTO, DEVICE_CPU, DEVICE_GPU, DEVICE_GPU_ONLY = "Automatic", "CPU", "GPU", "GPU only (stop if none)"
# setting -> cp2image_core device name
DEVICES = {DEVICE_AUTO: "auto", DEVICE_CPU: "cpu", DEVICE_GPU: "cuda", DEVICE_GPU_ONLY: "cuda-only"}
PRECISION_AUTO, PRECISION_FP32 = "Automatic (fp16 on a GPU, fp32 on the CPU)", "fp32 (full)"
PRECISION_BF16, PRECISION_FP16 = "bfloat16 (faster on recent CPUs)", "float16"
# setting -> cp2image_core precision name
PRECISIONS = {PRECISION_AUTO: "auto", PRECISION_FP32: "fp32", PRECISION_BF16: "bf16", PRECISION_FP16: "fp16"}
LAYOUT_STACK = "One TIFF stack per image set"
LAYOUT_OBJECT = "One TIFF per object"
BIT_DEPTH_FLOAT, BIT_DEPTH_16 = "32-bit floating point", "16-bit integer"  # SaveImages' names
BIT_DEPTHS = {BIT_DEPTH_FLOAT: 32, BIT_DEPTH_16: 16}
CATEGORY = "CP2Image"
F_STACK_INDEX = "StackIndex"
F_IMPUTED = "ImputedFeatures"
GALLERY_SIZE = 6


def _core():
    """Import cp2image_core, also from the repository this file sits in; ImportError says what to do."""
    try:
        import cp2image_core  # noqa: F401
    except ImportError:
        repo = Path(__file__).resolve().parent.parent
        if (repo / "cp2image_core").is_dir() and str(repo) not in sys.path:
            sys.path.append(str(repo))
    try:
        import cp2image_core.module_support as support
    except ImportError as e:
        raise ImportError(
            f"CP2Image needs the cp2image_core package and PyTorch in CellProfiler's Python ({e}). "
            "Install them into the same environment: pip install -e <cp2image repository> torch"
        ) from None
    return support


class CP2Image(Module):
    module_name = "CP2Image"
    category = "Object Processing"
    variable_revision_number = 6
    doi = {  # noqa: RUF012  (CellProfiler reads this class attribute)
        "Please cite the following when using CP2Image:": "https://openreview.net/forum?id=4LqtcKZoKeB",
        "CellProfiler 4:": "https://doi.org/10.1186/s12859-021-04344-9",
    }

    def create_settings(self):
        self.objects_name = LabelSubscriber(
            "Select the input objects",
            "Nuclei",
            doc="The objects to synthesize, one image each, e.g. *Nuclei*. Must be the objects the "
            "model was trained on (its crops are centred on them).",
        )
        self.model_choice = Choice(
            "Model",
            [MODEL_DEFAULT, MODEL_REALISTIC, MODEL_CUSTOM],
            doc=f"*{MODEL_DEFAULT}*: the generator shipped in cp2image's ``weights/`` folder, trained on "
            f"CellProfiler's ExampleFly cells; its cells re-measure closest to the input features. "
            f"*{MODEL_REALISTIC}*: the same model fine-tuned so that its cells are harder to tell "
            "from real crops (no dotted texture, neighbour-like surroundings), at a small cost in re-measured "
            f"texture and shape (see ``weights/README.md``). *{MODEL_CUSTOM}*: a ``.safetensors`` model you trained "
            "with ``python -m cp2image_core.train`` on your own screen.",
        )
        self.model_file = Pathname(
            "Model file",
            "",
            wildcard="cp2image models (*.safetensors)|*.safetensors",
            doc="Path of a cp2image model file (``.safetensors``). Only the weights and a JSON spec are "
            "read; no code in the file is ever run.",
        )
        self.match_shape = Binary(
            "Match each object's stated shape?",
            False,
            doc="*No* (default): each object is drawn as the model draws it. *Yes*: each drawn object is then "
            "rotated and stretched about its centre so that its ellipse — *MajorAxisLength*, *MinorAxisLength*, "
            "*Orientation* — is the one its AreaShape features state (the surroundings stay put). On ExampleFly's "
            "held-out field, re-measured by CellProfiler: Eccentricity r 0.52 → 0.94 and Orientation 0.60 → 0.73 with "
            "the default model (0.55 → 0.97 and 0.70 → 0.86 with the realistic one; real crops: 0.88, 0.83), "
            "FormFactor 0.53 → 0.62, every feature family's median as good or better; a few directional texture "
            "features and the DNA edge intensities lose about 0.1. About half as many cells per second on a CPU; "
            "under bfloat16 or float16 an edge can move by a pixel. Needs a *cp2image-decoder* model trained on those "
            "features (both shipped models are).",
        )
        self.among_neighbours = Binary(
            "Draw each object among its synthesized neighbours?",
            False,
            doc="*No* (default): each object's image is synthesized from its own features alone; the model "
            "guesses at its surroundings, where it draws the neighbours as dim averages. *Yes*: every object of "
            "the image set is synthesized first and composed into one field (as *Fill the field between objects* "
            "draws it), and each object's image is cut from that field around its centre, so its neighbours are the "
            "image set's other objects, each drawn from its own features in its real place. Choose it when the "
            "images will be segmented again: on ExampleFly's held-out field, re-segmented and re-measured as the "
            "features pipeline does, the default model's *Cells* shape follows the input features at median r "
            "0.74 instead of 0.61 and *Cytoplasm* shape at 0.75 instead of 0.59 (nearest neighbour: 0.74, 0.73), "
            "the nucleus's features as well; a small classifier tells its crops from real ones at 0.76 "
            "instead of 0.90. An object's image then depends on the other objects of the image set, and nothing is "
            "written until all are synthesized; composing the field costs speed (on 2 CPU cores, 0.6-0.8x the cells "
            "per second).",
        )
        self.device = Choice(
            "Compute device",
            [DEVICE_AUTO, DEVICE_CPU, DEVICE_GPU, DEVICE_GPU_ONLY],
            doc=f"*{DEVICE_AUTO}* (default): a CUDA GPU when PyTorch sees one, else the CPU. *{DEVICE_GPU}* "
            f"falls back to the CPU with one warning when no GPU is present; *{DEVICE_GPU_ONLY}* stops the run "
            "with an error instead. Each CellProfiler worker process loads its own copy of the model.",
        )
        self.batch_size = Integer(
            "Batch size",
            64,
            minval=1,
            maxval=65536,
            doc="Objects synthesized together (default 64). On a GPU use 1024: an NVIDIA "
            "H200 synthesized and wrote 1.6x as many cells per second as at 64. Lower it if memory runs out "
            "(on a GPU, out-of-memory batches are retried at half the size automatically).",
        )
        self.precision = Choice(
            "Precision",
            list(PRECISIONS),
            doc=f"Arithmetic the generator runs in. *{PRECISION_AUTO}* (default): float16 on a GPU (pixels within "
            f"0.0015 of fp32, on 0–1 intensities, with the previous default model) and fp32 on the CPU. "
            f"*{PRECISION_FP32}*: full precision everywhere. *{PRECISION_BF16}*: 1.2–1.5× faster than fp32 on CPUs "
            "with bfloat16 instructions, pixels within 0.011 of fp32 on ExampleFly's cells (3 grey levels of an "
            "8-bit image; mean 0.0002). A batch whose reduced-precision result overflows is recomputed in fp32, "
            "with a warning.",
        )
        self.directory = Directory(
            "Output folder",
            dir_choices=[
                DEFAULT_OUTPUT_FOLDER_NAME,
                DEFAULT_OUTPUT_SUBFOLDER_NAME,
                DEFAULT_INPUT_FOLDER_NAME,
                DEFAULT_INPUT_SUBFOLDER_NAME,
                ABSOLUTE_FOLDER_NAME,
            ],
            doc="Where the synthesized images are written (default: the Default Output Folder). "
            "Sub-folder names may use metadata tags, e.g. ``\\g<Plate>``.",
        )
        self.file_layout = Choice(
            "File layout",
            [LAYOUT_STACK, LAYOUT_OBJECT],
            doc=f"*{LAYOUT_STACK}* (default): ``<prefix>_<objects>_ImageSet<NNNN>.tiff``, one page per object "
            "in object-number order, each page holding the model's channels (ImageJ hyperstack; pixel type: "
            f"*Image bit depth*). *{LAYOUT_OBJECT}*: ``<prefix>_<objects>_ImageSet<NNNN>_Object<NNNN>.tiff``.",
        )
        self.bit_depth = Choice(
            "Image bit depth",
            [BIT_DEPTH_FLOAT, BIT_DEPTH_16],
            doc=f"*{BIT_DEPTH_FLOAT}* (default): pixels as synthesized, in CellProfiler's 0–1 intensity scale. "
            f"*{BIT_DEPTH_16}*: each value × 65535, rounded — the scale CellProfiler divides 16-bit images by "
            "when it loads them (intensity range from the image metadata, NamesAndTypes' default), so the intensities "
            "come back within 1/131070; half the disk space.",
        )
        self.file_prefix = Text(
            "File name prefix",
            "CP2Image",
            doc="Start of every file name written by this module (default *CP2Image*).",
        )
        self.overwrite = Binary(
            "Overwrite existing files?",
            False,
            doc="*No* (default): stop with an error rather than replace a file already in the output "
            "folder. *Yes*: replace it. Files are written under a temporary name and renamed, so an "
            "interrupted run never leaves a half-written file under the final name.",
        )
        self.wants_field = Binary(
            "Add a synthetic field image?",
            False,
            doc="*Yes*: add an image to the image set in which each synthesized cell is pasted at its "
            "object's position, inside the object's outline (zero elsewhere), so that downstream "
            "modules can measure synthetic cells with the real objects. It has the model's channels; "
            "use **ColorToGray** (*Split*) to measure them one by one.",
        )
        self.field_name = ImageName(
            "Name the synthetic field image",
            "SyntheticField",
            doc="Name of the synthetic field image for downstream modules (default *SyntheticField*).",
        )
        self.fill_field = Binary(
            "Fill the field between objects?",
            False,
            doc="*No* (default): each synthesized cell inside its object's outline, zero elsewhere. *Yes*: the "
            "whole field drawn from the synthesized cells, each at its object's centre: a pixel takes the cell "
            "whose object it lies in or next to (within its equivalent radius + 8 pixels, larger objects "
            "reaching farther), and elsewhere the darkest background of the cells around it. It looks like "
            "a field rather than cut-outs, but the pixels outside the outlines are drawn, not measured.",
        )

    def settings(self):
        return [
            self.objects_name, self.model_choice, self.model_file, self.device, self.batch_size,
            self.precision, self.directory, self.file_layout, self.file_prefix, self.overwrite, self.wants_field,
            self.field_name, self.bit_depth, self.match_shape, self.fill_field, self.among_neighbours,
        ]

    def visible_settings(self):
        result = [self.objects_name, self.model_choice]
        if self.model_choice == MODEL_CUSTOM:
            result.append(self.model_file)
        result += [self.match_shape, self.among_neighbours, self.device, self.batch_size, self.precision,
                   self.directory, self.file_layout, self.bit_depth, self.file_prefix, self.overwrite, self.wants_field]
        if self.wants_field:
            result += [self.field_name, self.fill_field]
        return result

    def upgrade_settings(self, setting_values, variable_revision_number, module_name):
        if variable_revision_number == 1:  # revision 2 added Precision after Batch size
            setting_values = [*setting_values[:5], PRECISION_AUTO, *setting_values[5:]]
            variable_revision_number = 2
        if variable_revision_number == 2:  # revision 3 added Image bit depth, last
            setting_values = [*setting_values, BIT_DEPTH_FLOAT]
            variable_revision_number = 3
        if variable_revision_number == 3:  # revision 4 added Match each object's stated shape, last
            setting_values = [*setting_values, "No"]
            variable_revision_number = 4
        if variable_revision_number == 4:  # revision 5 added Fill the field between objects, last
            setting_values = [*setting_values, "No"]
            variable_revision_number = 5
        if variable_revision_number == 5:  # revision 6 added Draw each object among its synthesized neighbours, last
            setting_values = [*setting_values, "No"]
            variable_revision_number = 6
        return setting_values, variable_revision_number

    # ---- helpers ---------------------------------------------------------------------------
    def model_path(self) -> str:
        if self.model_choice == MODEL_DEFAULT:
            return str(_core().default_model_path())
        if self.model_choice == MODEL_REALISTIC:
            return str(_core().realistic_model_path())
        return self.model_file.value

    def stack_name(self) -> str:
        return f"{CATEGORY}_{self.objects_name.value}"

    # ---- validation --------------------------------------------------------------------------
    def validate_module(self, pipeline):
        try:
            support = _core()
        except ImportError as e:
            raise ValidationError(str(e), self.model_choice) from None
        setting = self.model_file if self.model_choice == MODEL_CUSTOM else self.model_choice
        try:
            spec = support.read_spec(self.model_path())
        except support.CP2ImageError as e:
            raise ValidationError(str(e), setting) from None
        if spec.object_name != self.objects_name.value:
            LOGGER.info("CP2Image: model trained on %s, applied to %s", spec.object_name, self.objects_name.value)
        if self.match_shape.value:
            try:
                support.with_shape_matching(spec)
            except support.CP2ImageError as e:
                raise ValidationError(str(e), self.match_shape) from None
        available = {(c[0], c[1]) for c in pipeline.get_measurement_columns(self)}
        message = support.missing_features_message(spec, available, self.objects_name.value)
        if message:
            raise ValidationError(message, self.objects_name)

    def prepare_run(self, workspace):
        """Stop before the first image set (headless too) when the model cannot run in this pipeline."""
        try:
            self.test_valid(workspace.pipeline)
        except ValidationError as e:
            LOGGER.error("CP2Image: %s", e.message)
            workspace.pipeline.report_prepare_run_error(self, f"CP2Image: {e.message}")
            return False
        return True

    # ---- running -----------------------------------------------------------------------------
    def run(self, workspace):
        support = _core()
        objects_name = self.objects_name.value
        measurements = workspace.measurements
        support.share_cpu_with_other_workers()
        began = time.perf_counter()
        synth = support.load_synthesizer(self.model_path(), DEVICES[self.device.value],
                                         PRECISIONS[self.precision.value], self.match_shape.value)
        load_seconds = time.perf_counter() - began  # the first image set's: later ones find it loaded
        folder = self.directory.get_absolute_path(measurements)
        image_number = measurements.image_set_number
        labels = workspace.object_set.get_objects(objects_name).segmented
        missing = support.check_channel_images(workspace.image_set, synth.spec, labels.shape)
        if 0 < len(missing) < synth.spec.n_channels and not getattr(self, "_warned_channels", False):
            self._warned_channels = True
            LOGGER.warning("CP2Image: the model's channels %s are not images in this pipeline; the display "
                           "shows synthetic cells only", ", ".join(missing))
        result = support.synthesize_and_write(
            synth,
            measurements,
            objects_name,
            labels,
            batch_size=self.batch_size.value,
            folder=folder,
            base=f"{self.file_prefix.value}_{objects_name}_ImageSet{image_number:04d}",
            per_object=self.file_layout == LAYOUT_OBJECT,
            overwrite=self.overwrite.value,
            want_field=self.wants_field.value,
            fill_field=self.fill_field.value,
            keep=GALLERY_SIZE if self.show_window else 0,
            bit_depth=BIT_DEPTHS[self.bit_depth.value],
            among_neighbours=self.among_neighbours.value,
        )
        n = result.count
        measurements.add_image_measurement(f"FileName_{self.stack_name()}", result.file_name)
        measurements.add_image_measurement(f"PathName_{self.stack_name()}", folder)
        measurements.add_image_measurement(f"{CATEGORY}_Count_{objects_name}", n)
        measurements.add_measurement(objects_name, f"{CATEGORY}_{F_STACK_INDEX}", np.arange(1, n + 1))
        measurements.add_measurement(objects_name, f"{CATEGORY}_{F_IMPUTED}", result.imputed)
        if result.imputed.any():
            LOGGER.warning(
                "CP2Image: image set %d: %d feature values of %d %s were NaN/inf and imputed "
                "with the training mean", image_number, int(result.imputed.sum()),
                int((result.imputed > 0).sum()), objects_name,
            )
        if result.field is not None:
            parent = support.first_image(workspace.image_set, synth.spec.channels)
            pixels = result.field[:, :, 0] if result.field.shape[2] == 1 else result.field
            workspace.image_set.add(self.field_name.value, Image(pixels, parent_image=parent))
        # the run's own clock (CellProfiler prints its per-module times to 10 ms) and how it splits
        LOGGER.debug("CP2Image: image set %d, %d %s, run %.4f s: %s", image_number, n, objects_name,
                     time.perf_counter() - began, ", ".join(
                         f"{step} {t:.4f} s" for step, t in {"load model": load_seconds, **result.seconds}.items()))
        if self.show_window:
            shown = len(result.gallery)
            workspace.display_data.real = support.real_crops(workspace.image_set, synth.spec, result.centers[:shown])
            workspace.display_data.synthetic = result.gallery
            workspace.display_data.count = n

    def display(self, workspace, figure):
        synthetic = workspace.display_data.synthetic
        real = workspace.display_data.real
        n = len(synthetic)
        if n == 0:
            figure.set_subplots((1, 1))
            figure.subplot_table(0, 0, [["No objects in this image set"]])
            return
        to_rgb = _core().to_rgb
        figure.set_subplots((n, 2))
        for i in range(n):
            ref = real[i] if real is not None else None
            if ref is not None:
                figure.subplot_imshow_color(i, 0, to_rgb(ref), title=f"Real #{i + 1}")
            figure.subplot_imshow_color(i, 1, to_rgb(synthetic[i], ref=ref), title=f"Synthetic #{i + 1}")

    # ---- measurements declared to CellProfiler ----------------------------------------------
    def get_measurement_columns(self, pipeline):
        obj = self.objects_name.value
        return [
            (IMAGE, f"FileName_{self.stack_name()}", COLTYPE_VARCHAR_FILE_NAME),
            (IMAGE, f"PathName_{self.stack_name()}", COLTYPE_VARCHAR_PATH_NAME),
            (IMAGE, f"{CATEGORY}_Count_{obj}", COLTYPE_INTEGER),
            (obj, f"{CATEGORY}_{F_STACK_INDEX}", COLTYPE_INTEGER),
            (obj, f"{CATEGORY}_{F_IMPUTED}", COLTYPE_FLOAT),
        ]

    def get_categories(self, pipeline, object_name):
        if object_name == IMAGE:
            return ["FileName", "PathName", CATEGORY]
        if object_name == self.objects_name.value:
            return [CATEGORY]
        return []

    def get_measurements(self, pipeline, object_name, category):
        if object_name == IMAGE and category in ("FileName", "PathName"):
            return [self.stack_name()]
        if object_name == IMAGE and category == CATEGORY:
            return [f"Count_{self.objects_name.value}"]
        if object_name == self.objects_name.value and category == CATEGORY:
            return [F_STACK_INDEX, F_IMPUTED]
        return []

    def volumetric(self):
        return False


"""The model spec: everything needed to use a generator without its training run.

It travels as JSON inside the safetensors header (key ``cp2image_spec``) of the model file.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from . import __version__
from .errors import SpecError

FORMAT = "cp2image-model"
FORMAT_VERSION = 1  # bump only on incompatible changes; readers refuse newer versions


@dataclass
class ModelSpec:
    """What a generator expects as input and produces as output."""

    arch: str
    arch_params: dict[str, Any]
    object_name: str  # objects the crops are centred on, e.g. "Nuclei"
    features: list[tuple[str, str]]  # ordered (object name, CellProfiler feature name)
    feature_mean: list[float]
    feature_std: list[float]
    channels: list[str]  # CellProfiler image names, in the generator's channel order
    crop_size: int  # pixels, square
    channel_scaling: str = "cellprofiler"  # intensities as CellProfiler loads them: 0..1 by bit depth
    impute: str = "mean"  # NaN/inf features are replaced by the training mean (0 after standardizing)
    clip: float = 5.0  # standardized features are clipped to +-clip
    pixel_size_um: float | None = None
    training: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    code_version: str = __version__
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def n_channels(self) -> int:
        return len(self.channels)

    def object_names(self) -> list[str]:
        """Object sets whose features the model reads, in first-seen order."""
        return list(dict.fromkeys(o for o, _ in self.features))

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["features"] = [list(f) for f in self.features]
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "model spec") -> ModelSpec:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError(f"{source}: the spec is not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise SpecError(f"{source}: the spec must be a JSON object")
        return cls.from_dict(d, source)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "model spec") -> ModelSpec:
        if d.get("format") != FORMAT:
            raise SpecError(f"{source}: not a cp2image model spec (format={d.get('format')!r})")
        version = d.get("format_version")
        if not isinstance(version, int):
            raise SpecError(f"{source}: format_version missing or not an integer")
        if version > FORMAT_VERSION:
            raise SpecError(
                f"{source}: written by a newer cp2image (model format {version}, this code reads "
                f"up to {FORMAT_VERSION}; made by cp2image {d.get('code_version', '?')}). "
                "Upgrade cp2image to use it."
            )
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(n for n, f in cls.__dataclass_fields__.items()
                         if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                         and n not in d)
        if missing:
            raise SpecError(f"{source}: the spec lacks required field(s): {', '.join(missing)}")
        kwargs = {k: v for k, v in d.items() if k in names}
        feats = kwargs.get("features")
        if not isinstance(feats, list) or not all(
            isinstance(f, (list, tuple)) and len(f) == 2 and all(isinstance(s, str) for s in f) for f in feats
        ):
            raise SpecError(f"{source}: 'features' must be a list of [object name, feature name] pairs")
        kwargs["features"] = [tuple(f) for f in feats]
        spec = cls(**kwargs)
        spec.validate(source)
        return spec

    def validate(self, source: str = "model spec") -> None:
        """Raise SpecError naming the first inconsistent field."""
        n = len(self.features)
        if n == 0:
            raise SpecError(f"{source}: the spec lists no features")
        if len(set(self.features)) != n:
            dup = next(f for f in self.features if self.features.count(f) > 1)
            raise SpecError(f"{source}: feature {dup[0]}.{dup[1]} is listed twice")
        for name in ("feature_mean", "feature_std"):
            values = getattr(self, name)
            if not isinstance(values, list) or len(values) != n:
                raise SpecError(f"{source}: '{name}' must hold {n} numbers, one per feature")
            bad = [i for i, v in enumerate(values) if not isinstance(v, (int, float)) or not math.isfinite(v)]
            if bad:
                o, f = self.features[bad[0]]
                raise SpecError(f"{source}: '{name}' of feature {o}.{f} is not a finite number")
        zero = [i for i, v in enumerate(self.feature_std) if v <= 0]
        if zero:
            o, f = self.features[zero[0]]
            raise SpecError(f"{source}: 'feature_std' of feature {o}.{f} must be > 0")
        if not self.channels or not all(isinstance(c, str) and c for c in self.channels):
            raise SpecError(f"{source}: 'channels' must list at least one image name")
        if not isinstance(self.crop_size, int) or self.crop_size < 8:
            raise SpecError(f"{source}: 'crop_size' must be an integer >= 8 (got {self.crop_size!r})")
        if not isinstance(self.arch, str) or not isinstance(self.arch_params, dict):
            raise SpecError(f"{source}: 'arch' must be a name and 'arch_params' an object")
        if self.impute != "mean":
            raise SpecError(f"{source}: unknown imputation {self.impute!r} (this code knows 'mean')")

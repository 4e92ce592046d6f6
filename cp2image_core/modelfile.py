"""One model file: safetensors tensors + the JSON spec in the header metadata. Never pickle.

The header is parsed here with the standard library before safetensors touches the file, so a
truncated, foreign or pickled file gets a message that says what it is.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ModelFileError
from .spec import ModelSpec

if TYPE_CHECKING:
    import torch

SPEC_KEY = "cp2image_spec"
_MAX_HEADER = 100 * 1024 * 1024


def read_header(path: str | os.PathLike) -> dict:
    """The safetensors JSON header of ``path``; ModelFileError if it is not a whole safetensors file."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"Model file not found: {path}")
    if path.is_dir():
        raise ModelFileError(f"Model file {path} is a folder; choose a .safetensors file")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(9)
        if len(head) < 9:
            raise ModelFileError(f"Model file {path} is empty or truncated ({size} bytes)")
        (n,) = struct.unpack("<Q", head[:8])
        if head[8:9] != b"{":  # a safetensors header is JSON right after its 8-byte length
            if (head[:1] == b"\x80" and 2 <= head[1] <= 5) or head[:4] == b"PK\x03\x04":
                raise ModelFileError(
                    f"Model file {path} is a pickle/torch.save file, not safetensors. cp2image never "
                    "unpickles files (they can run code); convert it with safetensors.torch.save_file."
                )
            raise ModelFileError(f"Model file {path} is not a safetensors file")
        if n > _MAX_HEADER or 8 + n > size:
            raise ModelFileError(f"Model file {path} is truncated or not a safetensors file "
                                 f"(header claims {n} bytes, file has {size})")
        fh.seek(8)
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelFileError(f"Model file {path} is not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"Model file {path} is not a safetensors file (header is not an object)")
    end = max((int(v["data_offsets"][1]) for k, v in header.items()
               if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v), default=0)
    if 8 + n + end > size:
        raise ModelFileError(f"Model file {path} is truncated: its tensors need {8 + n + end} bytes, "
                             f"the file has {size}")
    return header


def read_spec(path: str | os.PathLike) -> ModelSpec:
    """The spec of a model file, without loading its weights or importing torch."""
    meta = read_header(path).get("__metadata__") or {}
    if SPEC_KEY not in meta:
        raise ModelFileError(f"Model file {path} is a safetensors file but not a cp2image model "
                             f"(no '{SPEC_KEY}' in its metadata)")
    return ModelSpec.from_json(meta[SPEC_KEY], source=f"Model file {path}")


def save_model(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], spec: ModelSpec) -> Path:
    """Write weights + spec atomically (temporary name, then rename)."""
    from safetensors.torch import save_file

    spec.validate()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(tmp), metadata={SPEC_KEY: spec.to_json()})
    os.replace(tmp, path)
    return path


def load_model(path: str | os.PathLike) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    """Spec and weights of a model file (CPU tensors). Raises ModelFileError with the reason."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    spec = read_spec(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFileError(f"Model file {path} could not be read: {e}") from None
    return spec, tensors


def describe(spec: ModelSpec) -> str:
    """What a CellProfiler user needs to know to run a model: objects, channels, features by module."""
    from .features import producer_of

    groups: dict[str, list[str]] = {}
    for obj, feat in spec.features:
        groups.setdefault(f"{producer_of(feat)} on {obj}", []).append(feat)
    lines = [f"architecture {spec.arch}, {spec.crop_size}x{spec.crop_size}-pixel crops of {spec.object_name}",
             f"channels (grayscale images, in order): {', '.join(spec.channels)}",
             f"{spec.n_features} features, measured by:"]
    lines += [f"  {where}: {len(feats)} ({', '.join(feats[:3])}{', …' if len(feats) > 3 else ''})"
              for where, feats in groups.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m cp2image_core.modelfile MODEL.safetensors")
    try:
        print(describe(read_spec(sys.argv[1])))
    except ModelFileError as e:
        sys.exit(str(e))

"""Batched, device-agnostic inference shared by the CellProfiler module and the command-line tools."""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import numpy as np
import torch

from . import archs
from .errors import CP2ImageError, ModelFileError, SpecError
from .modelfile import load_model
from .spec import ModelSpec

log = logging.getLogger(__name__)


def resolve_device(choice: str = "auto", fallback: bool = True) -> torch.device:
    """'auto' -> CUDA when present, else CPU; 'cuda' without a GPU falls back (one warning) unless
    ``fallback`` is False or the choice is 'cuda-only', which raise."""
    choice = choice.lower()
    if choice == "cuda-only":
        choice, fallback = "cuda", False
    if choice in ("cuda", "gpu"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if not fallback:
            raise CP2ImageError("CP2Image: GPU only was chosen but PyTorch sees no CUDA device here; choose "
                                "Automatic or CPU, or run on a GPU node with a CUDA build of PyTorch")
        log.warning("CP2Image: GPU chosen but no CUDA device is available; using the CPU")
        return torch.device("cpu")
    if choice in ("auto", "automatic"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cpu":
        return torch.device("cpu")
    raise ValueError(f"Unknown device {choice!r}: use auto, cpu or cuda")


def build_generator(spec: ModelSpec) -> torch.nn.Module:
    return archs.build(spec.arch, spec.n_features, spec.n_channels, spec.crop_size, **spec.arch_params)


class Synthesizer:
    """A loaded generator: standardized features (N, F) -> images (N, C, S, S) in CellProfiler units."""

    def __init__(self, spec: ModelSpec, generator: torch.nn.Module, device: torch.device) -> None:
        self.spec = spec
        self.device = device
        self.generator = generator.to(device).eval()
        if device.type == "cpu":
            self.generator = self.generator.to(memory_format=torch.channels_last)

    def iter_generate(self, z: np.ndarray, batch_size: int = 64):
        """Yield (first index, images) batch by batch; a CUDA out-of-memory batch is retried at half size.

        ``batch_size`` is an upper bound: the objects are split into as many batches as it asks for, of equal
        size (283 cells at 64 run as 4 x 57 + 55, not 4 x 64 + 27: ~9% faster on CPU, where a small last batch wastes
        the vectorized loops' width).
        """
        z = np.asarray(z, dtype=np.float32).reshape(-1, self.spec.n_features)
        bs = max(1, int(batch_size))
        if len(z):
            n_batches = -(-len(z) // bs)  # ceiling divisions
            bs = -(-len(z) // n_batches)
        start = 0
        while start < len(z):
            try:
                with torch.inference_mode():
                    batch = torch.from_numpy(z[start:start + bs]).to(self.device)
                    images = self.generator(batch).float().cpu().numpy()
            except torch.cuda.OutOfMemoryError:
                if bs == 1:
                    raise
                bs = max(1, bs // 2)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                log.warning("CP2Image: CUDA out of memory; retrying with batch size %d", bs)
                continue
            yield start, images
            start += len(images)

    def generate(self, z: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Images (N, C, S, S) for standardized features ``z`` (N, F), computed in batches."""
        z = np.asarray(z, dtype=np.float32).reshape(-1, self.spec.n_features)
        s, c = self.spec.crop_size, self.spec.n_channels
        out = np.empty((len(z), c, s, s), dtype=np.float32)
        for start, images in self.iter_generate(z, batch_size):
            out[start:start + len(images)] = images
        return out


def load_synthesizer_uncached(path: str | os.PathLike, device: str = "auto") -> Synthesizer:
    spec, tensors = load_model(path)
    gen = build_generator(spec)
    try:
        gen.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])
        raise SpecError(
            f"Model file {path}: its weights do not fit what its spec says (architecture {spec.arch!r}, "
            f"{spec.n_features} features, {spec.n_channels} channels {', '.join(spec.channels)}, "
            f"{spec.crop_size}-pixel crops); was the spec edited? {detail}") from None
    return Synthesizer(spec, gen, resolve_device(device))


_CACHE: dict[tuple, Synthesizer] = {}
_LOCK = threading.Lock()


def load_synthesizer(path: str | os.PathLike, device: str = "auto") -> Synthesizer:
    """The model at ``path``, loaded once per process (CellProfiler workers each keep their own)."""
    p = Path(path).resolve()
    try:
        st = p.stat()
    except OSError:
        raise ModelFileError(f"Model file not found: {path}") from None
    key = (str(p), st.st_mtime_ns, st.st_size, device)
    with _LOCK:
        if key not in _CACHE:
            _CACHE.clear()  # one model per process: free the previous one
            _CACHE[key] = load_synthesizer_uncached(p, device)
        return _CACHE[key]

"""Batched, device-agnostic inference shared by the CellProfiler module and the command-line tools."""
from __future__ import annotations

import dataclasses
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
    """The spec's architecture, bound to the spec's features where it reads some of them directly."""
    gen = archs.build(spec.arch, spec.n_features, spec.n_channels, spec.crop_size, **spec.arch_params)
    if hasattr(gen, "bind_spec"):
        gen.bind_spec(spec)
    return gen


def with_shape_matching(spec: ModelSpec) -> ModelSpec:
    """The spec with the decoder's ``warp`` on: each drawn object rotated and stretched to the ellipse its
    AreaShape features state (``archs.decoder.match_object_shape``), its object found on the calibration's channel
    (else the first). Same weights; a clear error for a model that cannot do it."""
    from .archs.decoder import WARP_FEATURES

    if spec.arch != "cp2image-decoder":
        raise SpecError(f"Matching each object's stated shape needs a cp2image-decoder model; this model is "
                        f"{spec.arch}: choose another model or turn shape matching off")
    have = set(spec.features)
    missing = [f for f in WARP_FEATURES if (spec.object_name, f) not in have]
    if missing:
        raise SpecError(f"Matching each object's stated shape needs the model's {spec.object_name} features "
                        f"{', '.join(missing)} (MeasureObjectSizeShape), which it was not trained on: turn shape "
                        "matching off or train with them")
    channel = spec.arch_params.get("warp") or spec.arch_params.get("calibrate") or 1
    return dataclasses.replace(spec, arch_params={**spec.arch_params, "warp": int(channel)})


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The reduced precision the generator runs in, or None for fp32.

    'auto' is fp16 on CUDA (11-bit mantissa: within 0.0015 of fp32 on the shipped models) and fp32 on the CPU,
    where PyTorch's fp16 kernels are slow; 'bf16' is 1.2-1.5x faster than fp32 on CPUs with bf16 instructions,
    within 0.01 (2.5 grey levels of an 8-bit image) of fp32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class Synthesizer:
    """A loaded generator: standardized features (N, F) -> images (N, C, S, S) in CellProfiler units."""

    def __init__(self, spec: ModelSpec, generator: torch.nn.Module, device: torch.device,
                 precision: str = "auto") -> None:
        self.spec = spec
        self.device = device
        self.amp = autocast_dtype(device, precision)
        self.generator = generator.to(device).eval()
        # channels-last on both devices: on CUDA, PyTorch's NCHW bilinear up-sampling kernel loops over batch x
        # channels in each thread (87% of the default model's GPU time at batch 1024); its NHWC kernel does not
        self.generator = self.generator.to(memory_format=torch.channels_last)

    def _launch(self, z: torch.Tensor, amp: bool = True) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                torch.cuda.Event | None]:
        """Start one batch: (images, whether all are finite, event). On CUDA the copies to (pinned) host memory
        are queued, not waited for, and the finiteness check of a reduced-precision batch runs on the GPU."""
        dtype = self.amp if amp else None
        with torch.inference_mode():
            with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                out = self.generator(z).float()
            finite = torch.isfinite(out).all().view(1) if dtype is not None else None
            if self.device.type != "cuda":
                return out, finite, None
            host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            host.copy_(out, non_blocking=True)
            if finite is not None:
                finite = torch.empty(1, dtype=torch.bool, pin_memory=True).copy_(finite, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            return host, finite, done

    def _ready(self, z: torch.Tensor, images: torch.Tensor, finite: torch.Tensor | None,
               done: torch.cuda.Event | None) -> np.ndarray:
        """Wait for a launched batch; a reduced-precision batch that overflowed is recomputed in fp32."""
        if done is not None:
            done.synchronize()
        if finite is not None and not bool(finite[0]):
            log.warning("CP2Image: non-finite values in %s; recomputing this batch in fp32", self.amp)
            return self._ready(z, *self._launch(z, amp=False))
        return images.numpy()

    def iter_generate(self, z: np.ndarray, batch_size: int = 64):
        """Yield (first index, images) batch by batch; a CUDA out-of-memory batch is retried at half size.

        ``batch_size`` is an upper bound: the objects are split into as many batches as it asks for, of equal
        size (283 cells at 64 run as 4 x 57 + 55, not 4 x 64 + 27: ~9% faster on CPU, where a small last batch wastes
        the vectorized loops' width). Each batch is yielded after the next one is launched, so on a GPU the
        caller's work on one batch (writing, pasting) overlaps the generator's on the next.
        """
        z = np.asarray(z, dtype=np.float32).reshape(-1, self.spec.n_features)
        bs = max(1, int(batch_size))
        if len(z):
            n_batches = -(-len(z) // bs)  # ceiling divisions
            bs = -(-len(z) // n_batches)
        start, pending = 0, None
        zt = torch.from_numpy(z).to(self.device)  # one copy to the device, not one per batch
        while start < len(z):
            try:
                launched = self._launch(zt[start:start + bs])
            except torch.cuda.OutOfMemoryError:
                if bs == 1:
                    raise
                bs = max(1, bs // 2)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                log.warning("CP2Image: CUDA out of memory; retrying with batch size %d", bs)
                continue
            if pending is not None:
                yield pending[0], self._ready(*pending[1:])
            pending = (start, zt[start:start + bs], *launched)
            start += len(launched[0])
        if pending is not None:
            yield pending[0], self._ready(*pending[1:])

    def generate(self, z: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Images (N, C, S, S) for standardized features ``z`` (N, F), computed in batches."""
        z = np.asarray(z, dtype=np.float32).reshape(-1, self.spec.n_features)
        s, c = self.spec.crop_size, self.spec.n_channels
        out = np.empty((len(z), c, s, s), dtype=np.float32)
        for start, images in self.iter_generate(z, batch_size):
            out[start:start + len(images)] = images
        return out


def load_synthesizer_uncached(path: str | os.PathLike, device: str = "auto", precision: str = "auto",
                              match_shape: bool = False) -> Synthesizer:
    """The model at ``path`` ready to synthesize; ``match_shape`` turns on ``with_shape_matching``."""
    spec, tensors = load_model(path)
    if match_shape:
        try:
            spec = with_shape_matching(spec)
        except SpecError as e:
            raise SpecError(f"Model file {path}: {e}") from None
    gen = build_generator(spec)
    try:
        gen.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])
        raise SpecError(
            f"Model file {path}: its weights do not fit what its spec says (architecture {spec.arch!r}, "
            f"{spec.n_features} features, {spec.n_channels} channels {', '.join(spec.channels)}, "
            f"{spec.crop_size}-pixel crops); was the spec edited? {detail}") from None
    return Synthesizer(spec, gen, resolve_device(device), precision)


_CACHE: dict[tuple, Synthesizer] = {}
_LOCK = threading.Lock()


def load_synthesizer(path: str | os.PathLike, device: str = "auto", precision: str = "auto",
                      match_shape: bool = False) -> Synthesizer:
    """The model at ``path``, loaded once per process (CellProfiler workers each keep their own)."""
    p = Path(path).resolve()
    try:
        st = p.stat()
    except OSError:
        raise ModelFileError(f"Model file not found: {path}") from None
    key = (str(p), st.st_mtime_ns, st.st_size, device, precision, match_shape)
    with _LOCK:
        if key not in _CACHE:
            _CACHE.clear()  # one model per process: free the previous one
            _CACHE[key] = load_synthesizer_uncached(p, device, precision, match_shape)
        return _CACHE[key]

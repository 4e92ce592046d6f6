"""Generator architectures, one per file, registered by name (the name is stored in the model spec)."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from ..errors import SpecError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
DEFAULT_ARCH = "cp2image-decoder"


def register(name: str):
    """Class decorator: make an architecture buildable by ``name``."""
    def deco(cls):
        _REGISTRY[name] = cls
        return cls
    return deco


def available() -> list[str]:
    return sorted(_REGISTRY)


def build(name: str, n_features: int, n_channels: int, crop_size: int, **params) -> nn.Module:
    """The generator ``name`` mapping (N, n_features) to (N, n_channels, crop_size, crop_size)."""
    if name not in _REGISTRY:
        raise SpecError(f"Unknown architecture {name!r}; this cp2image knows: {', '.join(available())}")
    try:
        return _REGISTRY[name](n_features=n_features, n_channels=n_channels, crop_size=crop_size, **params)
    except (TypeError, ValueError) as e:  # an unknown parameter, or one the crop size does not allow
        raise SpecError(f"Architecture {name!r} at {crop_size}-pixel crops: bad parameters ({e})") from None


from . import decoder, paper  # noqa: E402,F401  (registers the architectures)

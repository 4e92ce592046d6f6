"""Inference-time operations the architectures share."""
from __future__ import annotations

import weakref
from typing import Callable

import torch

# pre-packed weights by (id of the weight tensor, activation, scalars): (the weight, its version when packed, the packed
# copy or None where oneDNN failed); outside the modules, so that nothing oneDNN-specific is copied, pickled or saved
# with them; an entry goes with its weight
_PACKED: dict[tuple, tuple[weakref.ref, int, torch.Tensor | None]] = {}


def phase_shuffle(y: torch.Tensor, r: int = 2) -> torch.Tensor:
    """``pixel_shuffle(y, r)`` for channels in (row phase, column phase, channel) order instead of PyTorch's
    (channel, row phase, column phase): (N, r²C, H, W) -> (N, C, rH, rW), channels-last. In channels-last memory
    this is one copy of runs of rC values; PyTorch's pixel_shuffle copies single values (on a CPU 1.0 of 2.4 ms of
    the default model's last layer at batch 64, and the paper generator 1.14-1.27x slower in all)."""
    n, cr2, h, w = y.shape
    rows = y.permute(0, 2, 3, 1).reshape(n, h, w, r, cr2 // r).transpose(2, 3)  # (N, H, i, W, j * C)
    return rows.reshape(n, r * h, r * w, cr2 // (r * r)).permute(0, 3, 1, 2)


def packed_linear(weight: torch.Tensor, bias: torch.Tensor | None, activation: str = "none",
                  scalars: tuple = ()) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``activation(x @ weight.T + bias)`` as oneDNN's fused linear with ``weight`` (out, in) packed once into its
    blocked layout, or None where that path does not apply (not an fp32 CPU tensor, autocast on, autograd on, or a
    PyTorch whose oneDNN lacks or fails these ops: tried once per weight). ``activation``: oneDNN's name ("swish" is
    SiLU, "leaky_relu" takes its slope in ``scalars``). On a 2-core Zen 5 the default model's two-layer MLP ran
    2.2-2.9x faster than through ``nn.Linear`` at 57-256 cells (1.3x for one): that runs MKL's GEMM, at half oneDNN's
    rate there, and adds the activation as a second pass. The packed copy is remade when the weight changes in place
    (its version; an inference tensor has none, so pass those only when made anew for each change) and dropped with
    the weight."""
    if (weight.device.type != "cpu" or weight.dtype != torch.float32 or torch.is_grad_enabled()
            or torch.is_autocast_enabled("cpu") or not torch.backends.mkldnn.is_available()):
        return None
    key, version = (id(weight), activation, tuple(scalars)), -1 if weight.is_inference() else weight._version
    cached = _PACKED.get(key)
    if cached is None or cached[0]() is not weight or cached[1] != version:
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
            torch.ops.mkldnn._linear_pointwise(weight.new_zeros(1, weight.shape[1]), packed, bias, activation,
                                               list(scalars), "")  # fails here, not in the caller's batch
        except (AttributeError, RuntimeError):  # an op this build lacks or cannot run
            packed = None
        if cached is None or cached[0]() is not weight:
            weakref.finalize(weight, _PACKED.pop, key, None)
        cached = _PACKED[key] = (weakref.ref(weight), version, packed)
    packed = cached[2]
    if packed is None:
        return None
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, activation, list(scalars), "")

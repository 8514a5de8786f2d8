"""Layer configurations and comparison helpers shared by the method tests.

A ``LayerCase`` is plain data (so it prints as a readable test id) that builds a seeded layer and a
matching input in any dtype; ``relative_error`` is the one error measure every exactness check uses.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = ["LayerCase", "relative_error", "factorize", "measure_in_subprocess", "near_subspace"]

# The team's exactness standard at full rank (relative, see STYLE/preamble).
FLOAT64_TOLERANCE = 1e-10
FLOAT32_TOLERANCE = 1e-5


@dataclass(frozen=True)
class LayerCase:
    """One Conv1d/Conv2d/Linear configuration. ``kernel``/``stride``/``dilation`` are per axis."""

    kind: str
    c_in: int
    c_out: int
    kernel: tuple[int, ...] = (1,)
    stride: tuple[int, ...] | None = None  # None: 1 on every axis
    padding: tuple[int, ...] | str | None = None  # None: 0 on every axis
    dilation: tuple[int, ...] | None = None  # None: 1 on every axis
    groups: int = 1
    bias: bool = True
    padding_mode: str = "zeros"

    def __post_init__(self) -> None:
        dims = len(self.kernel)
        for name, default in (("stride", 1), ("padding", 0), ("dilation", 1)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, (default,) * dims)

    @property
    def is_conv(self) -> bool:
        return self.kind in ("Conv1d", "Conv2d")

    @property
    def is_depthwise(self) -> bool:
        return self.is_conv and self.groups == self.c_in > 1

    @property
    def kernel_volume(self) -> int:
        return math.prod(self.kernel)

    def build(self, dtype: torch.dtype = torch.float64) -> nn.Module:
        """The layer with weights seeded from the case's id (same weights in every dtype)."""
        generator = torch.Generator().manual_seed(zlib.crc32(str(self).encode()))
        if self.kind == "Linear":
            layer = nn.Linear(self.c_in, self.c_out, bias=self.bias, dtype=torch.float64)
        else:
            cls = nn.Conv1d if self.kind == "Conv1d" else nn.Conv2d
            layer = cls(self.c_in, self.c_out, self.kernel, stride=self.stride, padding=self.padding,
                        dilation=self.dilation, groups=self.groups, bias=self.bias,
                        padding_mode=self.padding_mode, dtype=torch.float64)
        with torch.no_grad():
            # Unit-scale weights and bias: a dropped bias or a wrong border is a large relative error.
            layer.weight.normal_(generator=generator)
            if layer.bias is not None:
                layer.bias.normal_(generator=generator)
        return layer.to(dtype)

    def input(self, dtype: torch.dtype = torch.float64, batch: int = 2) -> torch.Tensor:
        """A seeded input: (batch, 3, C_in) for Linear, (batch, C_in, 9) or (batch, C_in, 7, 8) for convs."""
        generator = torch.Generator().manual_seed(1234)
        if self.kind == "Linear":
            shape = (batch, 3, self.c_in)
        elif self.kind == "Conv1d":
            shape = (batch, self.c_in, 9)
        else:
            shape = (batch, self.c_in, 7, 8)
        return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)

    def __str__(self) -> str:
        parts = [self.kind, f"{self.c_in}to{self.c_out}", "k" + "x".join(map(str, self.kernel))]
        if any(s != 1 for s in self.stride):
            parts.append("s" + "x".join(map(str, self.stride)))
        if self.padding == "same" or self.padding == "valid":
            parts.append(self.padding)
        elif any(self.padding):
            parts.append("p" + "x".join(map(str, self.padding)))
        if any(d != 1 for d in self.dilation):
            parts.append("d" + "x".join(map(str, self.dilation)))
        if self.groups != 1:
            parts.append(f"g{self.groups}")
        if not self.bias:
            parts.append("nobias")
        if self.padding_mode != "zeros":
            parts.append(self.padding_mode)
        return "-".join(parts)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (0 when both are zero)."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().to(torch.float64), expected.detach().to(torch.float64)
    denominator = e.norm().item()
    difference = (a - e).norm().item()
    return difference if denominator == 0 else difference / denominator


def factorize(method, layer: nn.Module, rank=1.0, energy=None):
    """``method.decompose`` at a resolved rank spec (the path a policy takes)."""
    return method.decompose(layer, method.resolve_rank(layer, rank=None if energy is not None else rank,
                                                       energy=energy))


def measure_in_subprocess(code: str, *args: str, timeout: float = 300) -> dict:
    """Run ``code`` in a fresh Python with this repository first on its path (so its peak memory is its own);
    its last line of output, parsed as JSON."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          timeout=timeout, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def near_subspace(mix: torch.Tensor, count: int, size: int, seed: int, noise: float) -> torch.Tensor:
    """Images whose channels are ``mix`` (latent, C) of a few latent channels, plus ``noise``: correlated inputs
    on which data-aware fits must beat weight-only ones."""
    g = torch.Generator().manual_seed(seed)
    latent, channels = mix.shape
    z = torch.randn(count, latent, size, size, generator=g, dtype=torch.float64)
    return torch.einsum("nlhw,lc->nchw", z, mix) + noise * torch.randn(count, channels, size, size, generator=g,
                                                                        dtype=torch.float64)

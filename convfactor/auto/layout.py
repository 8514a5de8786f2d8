"""The memory layout a resolution runs the network in: channels-last (NHWC) where that is measured faster.

Every phase of an automatic resolution runs the network over calibration data: statistics, output
references, sensitivity probes, the sequential refit, the search's checks. A 2-D convolution whose weight
is channels-last produces channels-last outputs, which the following ops keep, and oneDNN's CPU kernels
run many networks faster that way (CRAFT, a VGG16-BN U-Net, 1.29x at 1 thread; ResNet-18 1.30x), others
slower (torchcrepe's (k, 1) kernels over 1-wide inputs 0.68x; ``benchmarks/layout_speed.py``): so the
layout is measured on one calibration sample, both ways interleaved, and channels-last kept when at least
``MARGIN`` faster. A network whose code assumes contiguous memory (``x.view`` after a conv) raises in
that layout, and keeps the contiguous one. Networks under ``MIN_MACS`` per sample are not timed (their
passes are short; and their resolutions stay the same run to run, where a timing could flip the
layout and with it the last bits of every output). ``AutoOptions.layout`` can pin either layout.

The layout changes float rounding only (values agree to about 1e-7 relative in float32). When the
resolution ends the weights are in their original strides again, with the same values, in the same
``Parameter`` objects; the modules it builds are contiguous.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import PolicyError

__all__ = ["LAYOUTS", "MIN_MACS", "MARGIN", "Layout", "choose_layout", "conv_layout"]

LAYOUTS = ("auto", "channels_last", "contiguous")
MIN_MACS = 1e9  # per sample: smaller networks are not timed (stay contiguous under "auto")
MARGIN = 0.9  # channels-last is kept when its time is at most this fraction of the contiguous one
_ROUNDS = 3  # interleaved runs of each layout; the first warms up


@dataclass(frozen=True)
class Layout:
    channels_last: bool
    note: str | None = None


def _convs(root: nn.Module) -> list[nn.Conv2d]:
    return [m for m in root.modules() if isinstance(m, nn.Conv2d) and m.weight.dim() == 4]


@contextmanager
def conv_layout(root: nn.Module, channels_last: bool) -> Iterator[None]:
    """``root``'s 2-D conv weights in channels-last memory inside the block (nothing changes when False);
    after it, each weight is copied back into its original strides (the originals are not kept alongside:
    the weights are held once, as a plain run holds them)."""
    strides = {m: m.weight.stride() for m in _convs(root)} if channels_last else {}
    try:
        for module in strides:
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)
        yield
    finally:
        for module, stride in strides.items():
            weight = module.weight.data
            module.weight.data = weight.new_empty_strided(weight.size(), stride).copy_(weight)


@torch.no_grad()
def _seconds(root: nn.Module, sample: Sequence[torch.Tensor]) -> float:
    start = time.perf_counter()
    root(*sample)
    return time.perf_counter() - start


def choose_layout(root: nn.Module, sample: Sequence[torch.Tensor] | None, macs: float | None, choice: str,
                  torch_timing: bool) -> Layout:
    """The layout of the resolution's passes.

    Args:
        sample: one input tuple of one sample (None: no data, nothing is run: contiguous).
        macs: the network's MACs per sample (None: unknown).
        choice: ``AutoOptions.layout``: "auto" (measured), "channels_last" or "contiguous".
        torch_timing: layers are timed in PyTorch (``latency={"runtime": "torch"}``): "auto" stays contiguous,
            so that original layers and replacements are timed in one layout.
    Raises:
        PolicyError: ``choice`` is "channels_last" and the network cannot run in it.
    """
    if choice == "contiguous" or sample is None or not _convs(root):
        return Layout(False)
    if choice == "auto" and (torch_timing or macs is None or macs < MIN_MACS):
        return Layout(False)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(_ROUNDS if choice == "auto" else 1):
        for layout in (True, False) if choice == "auto" else (True,):
            try:
                with conv_layout(root, layout):
                    times[layout].append(_seconds(root, sample))
            except RuntimeError as error:  # e.g. a .view() of a channels-last tensor
                if not layout:  # the network's own failure, not the layout's
                    raise
                if choice == "channels_last":
                    raise PolicyError(f"auto_options layout='channels_last': the network does not run in "
                                      f"channels-last memory ({str(error).splitlines()[0]})") from None
                return Layout(False, "layout: contiguous (the network does not run in channels-last memory: "
                              f"{str(error).splitlines()[0]})")
    if choice == "channels_last":
        return Layout(True, "layout: channels-last (auto_options)")
    last, contiguous = min(times[True][1:]), min(times[False][1:])
    chosen = last <= MARGIN * contiguous
    return Layout(chosen, f"layout: {'channels-last' if chosen else 'contiguous'} (one sample "
                          f"{last * 1e3:.0f} ms channels-last, {contiguous * 1e3:.0f} ms contiguous)")

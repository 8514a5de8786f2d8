"""The data-aware spatial SVD's one decomposition per layer: an SVD against the eigendecomposition of the Gram.

``_SpatialSVDFactorizer`` needs the singular values and right singular vectors of the whitened
(C_out*k_w, C_in*k_h) reshape of each layer (1536 x 1536 for a 512-channel 3x3 conv, the largest in
VGG-style detectors such as CRAFT). ``torch.linalg.svd`` and ``convfactor.auto.fits.data_aware._right_singular``
(eigh of A^T A) are timed on the same matrices, interleaved, at the same thread count, the median of
``--repeats``; the accuracy columns compare the two: the largest relative difference of the leading half of
the singular values, the largest principal-angle sine between the leading-half subspaces, and the relative
error of the full-rank reconstruction U S V^T = A from the Gram route's V and S (U = A V S^-1).
Matrices: Gaussian with singular values decaying over ``--decades`` decades (trained layers' spectra decay).

    python benchmarks/spatial_svd_setup.py                      # ~1 min
    python benchmarks/spatial_svd_setup.py --sizes 768 1536 --threads 2 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from convfactor.auto.fits.data_aware import _right_singular


def _matrix(n: int, decades: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q1, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return ((q1 * torch.logspace(0, -decades, n, dtype=torch.float64)) @ q2.T)[None]


def _seconds(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[384, 768, 1536])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--decades", type=float, default=6.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{args.threads} thread(s), singular values over {args.decades:g} decades, median of {args.repeats}")
    print(f"{'n':>5} {'svd s':>7} {'eigh s':>7} {'ratio':>6} {'lead S rel diff':>16} {'lead subspace sin':>18} "
          f"{'full-rank rec err':>18}")
    for n in args.sizes:
        a = _matrix(n, args.decades, n)
        times = {"svd": [], "eigh": []}
        for _ in range(args.repeats):
            times["svd"].append(_seconds(lambda a=a: torch.linalg.svd(a, full_matrices=False)))
            times["eigh"].append(_seconds(lambda a=a: _right_singular(a)))
        _, s, vh = torch.linalg.svd(a, full_matrices=False)
        s2, vh2 = _right_singular(a)
        half = n // 2
        lead = float(((s2[0, :half] - s[0, :half]).abs() / s[0, :half]).max())
        # sin of the largest principal angle between the two leading-half right subspaces
        overlap = torch.linalg.svdvals(vh[0, :half] @ vh2[0, :half].T)
        sine = float((1 - overlap.min().clamp(max=1) ** 2).clamp_min(0).sqrt())
        u2 = (a[0] @ vh2[0].T) / s2[0]
        rebuilt = float(((u2 * s2[0]) @ vh2[0] - a[0]).norm() / a[0].norm())
        t_svd, t_eigh = statistics.median(times["svd"]), statistics.median(times["eigh"])
        print(f"{n:>5} {t_svd:7.3f} {t_eigh:7.3f} {t_svd / t_eigh:6.2f} {lead:16.1e} {sine:18.1e} {rebuilt:18.1e}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

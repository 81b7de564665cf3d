"""Write the *illustrative* table `illustrative_gr`: made-up numbers, not measurements.

It exists so the simulator runs without torch before any device was calibrated. Times are
a crude roofline of the transformer GR formulas in DESIGN.md (8 layers, d=512, 40% of an
H100's BF16 peak, 120 launches of 5 us) with a lognormal spread of CV 0.1. Use a measured
table for any real answer. Run: python -m simrec.calibration.make_illustrative
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from .table import TABLES_DIR, write_table

LAYERS, D, PEAK_FLOPS, EFF, LAUNCH_MS = 8, 512, 989e12, 0.4, 120 * 0.005
QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
GRID_L = (256, 512, 1024, 2048, 4096, 8192, 16384)
GRID_M = (32, 64, 128, 256, 512, 1024)


def full_forward_flops(n: int, m: int) -> float:
    return LAYERS * (12 * (n + m) * D**2 + 2 * n**2 * D + 4 * m * n * D)


def rows() -> pd.DataFrame:
    sigma = np.sqrt(np.log1p(0.1**2))
    out = []
    for L, M in itertools.product(GRID_L, GRID_M):
        median = full_forward_flops(L, M) / (PEAK_FLOPS * EFF) * 1e3 + LAUNCH_MS
        for q in QUANTILES:
            out.append(("full_forward", "isolated", L, M, q,
                        median * float(np.exp(sigma * stats.norm.ppf(q))), 1))
    return pd.DataFrame(out, columns=["phase", "condition", "history_len", "candidates",
                                      "quantile", "time_ms", "n_samples"])


def main(folder: Path = TABLES_DIR / "illustrative_gr") -> None:
    write_table(rows(), folder, {
        "format_version": 1, "name": "illustrative_gr", "label": "illustrative",
        "device": {"name": "none (made-up roofline numbers)", "kind": "none"},
        "date": "2026-11-23",
        "model": {"arch": "transformer", "layers": LAYERS, "d_model": D},
        "grid": {"history_len": list(GRID_L), "candidates": list(GRID_M)},
        "method": {"notes": __doc__.strip().splitlines()[0]},
    })


if __name__ == "__main__":
    main()

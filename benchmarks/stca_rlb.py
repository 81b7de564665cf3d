"""S8's per-request work: FLOPs and bytes moved by STCA with request-level batching (RLB:
the user side once per request) against per-target encoding, from the roofline's formulas
for the shipped H200 STCA model (simrec.roofline, the same counts the bench's models were
checked against), beside the measured per-request times of the table.

    python benchmarks/stca_rlb.py [--table h200_stca] [--candidates 256]

Paper (arXiv 2511.06077): RLB cuts bandwidth by 77% rising to 84% as L grows.
"""

from __future__ import annotations

import argparse

from simrec.calibration.table import load_table
from simrec.roofline import ModelShape


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", default="h200_stca")
    ap.add_argument("--candidates", type=int, default=256)
    args = ap.parse_args()
    table = load_table(args.table)
    shape = ModelShape.from_manifest(table.manifest.model, args.table)
    M = args.candidates
    print(f"| L | FLOPs RLB | FLOPs per-target | bytes RLB | bytes per-target | bytes saved "
          f"| measured RLB ms | measured per-target ms |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for L in (512, 2048, 8192, 32768):
        f_rlb = shape.flops("stca_history_encode", L, 0) + shape.flops("stca_target_attend", L, M)
        b_rlb = shape.bytes("stca_history_encode", L, 0) + shape.bytes("stca_target_attend", L, M)
        f_per, b_per = shape.flops("stca_per_target", L, M), shape.bytes("stca_per_target", L, M)
        t_rlb = sum(table.curve(p).median_ms(L, M) for p in ("stca_history_encode", "stca_target_attend"))
        t_per = table.curve("stca_per_target").median_ms(L, M)
        print(f"| {L} | {f_rlb:.3g} | {f_per:.3g} | {b_rlb:.3g} | {b_per:.3g} | "
              f"{1 - b_rlb / b_per:.1%} | {t_rlb:.2f} | {t_per:.1f} |")


if __name__ == "__main__":
    main()

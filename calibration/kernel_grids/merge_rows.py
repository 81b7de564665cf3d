"""Replace the rows of some kernel kinds in a kernel grid by those of another grid.

A dense sweep of one kind (run_attn_dense.sh: causal attention every 512 tokens) replaces
that kind's rows in the wide grid entirely, so every row of a kind comes from one session
(a session's host speed is in its isolated and host rows). The manifest records it.

    python calibration/kernel_grids/merge_rows.py calibration/kernel_grids/h200_kernel_grid \\
        calibration/kernel_grids/h200_attn_dense --kinds attn_causal
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import pandas as pd


def merge(base: Path, extra: Path, kinds: list[str]) -> int:
    frame = pd.read_parquet(base / "kernels.parquet")
    add = pd.read_parquet(extra / "kernels.parquet")
    add = add[add["kernel"].isin(kinds)]
    if add.empty:
        raise SystemExit(f"{extra}: no rows of {', '.join(kinds)}")
    merged = pd.concat([frame[~frame["kernel"].isin(kinds)], add], ignore_index=True)
    merged.to_parquet(base / "kernels.parquet", index=False)
    manifest = json.loads((base / "manifest.json").read_text())
    other = json.loads((extra / "manifest.json").read_text())
    manifest["method"]["kernels_sha256"] = hashlib.sha256((base / "kernels.parquet").read_bytes()).hexdigest()
    manifest["method"].setdefault("replaced_kinds", []).append(
        {"kinds": kinds, "from": other["name"], "date": other["date"],
         "history_len": other["grid"]["history_len"], "rows": int(len(add)),
         "command": other["method"]["command"]})
    (base / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return len(merged)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base", type=Path)
    p.add_argument("extra", type=Path)
    p.add_argument("--kinds", required=True, help="comma-separated kernel kinds to take from EXTRA")
    a = p.parse_args(argv)
    n = merge(a.base, a.extra, [k for k in a.kinds.split(",") if k])
    print(f"{a.base / 'kernels.parquet'}: {n} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

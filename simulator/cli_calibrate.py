"""`simrec calibrate`: measure a cost table on this machine's device, then the cost models' errors.

Registered by cli.py. Torch is imported only when measuring, so `--errors-only` and
`simrec --help` work without it.
"""

from __future__ import annotations

import os
import sys
from contextlib import redirect_stdout
from pathlib import Path
from typing import Optional

import typer

from .errors import InputError

NO_TORCH = "simrec calibrate needs torch: pip install 'simrec[calibrate]'"


def _grid(text: str, what: str) -> str:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        vals = []
    if not vals or min(vals) <= 0:
        raise InputError(f"need comma-separated positive integers (got {text!r})", what)
    return ",".join(str(v) for v in sorted(set(vals)))


def _errors(ref: str, launches_per_layer: int, copy_to: Path | None = None) -> None:
    """Compute and print a table's errors and store them in its manifest. A built-in table
    is never written (it lives in the package): with `copy_to` its folder is copied there
    and the copy gets them, else they are only printed."""
    from simrec.calibration.model_errors import compute_errors, format_errors, is_builtin, write_errors
    if is_builtin(ref) and copy_to is not None:
        ref = _copy_table(ref, copy_to)
    errors = compute_errors(ref, launches_per_layer)
    if is_builtin(ref):
        print(format_errors(errors))
        print(f"{ref} is a built-in table (read-only): errors printed, not stored; give --out DIR "
              f"to store them in a copy", file=sys.stderr)
        return
    path = write_errors(ref, errors)
    print(format_errors(errors))
    print(f"errors written to {path}")


TABLE_FILES = frozenset({"table.parquet", "kernels.parquet", "manifest.json", "partial_table.parquet"})


def _is_table_folder(path: Path) -> bool:
    """What --out may overwrite: an empty folder or an earlier cost table (bench.py's files
    only); a file or a folder of the user's is refused before anything is measured."""
    try:
        return set(os.listdir(path)) <= TABLE_FILES
    except OSError:
        return False


def _copy_table(ref: str, dest: Path) -> str:
    import shutil

    from simrec.calibration.table import resolve
    if os.path.lexists(dest):
        raise InputError("exists: refusing to overwrite it; choose a new folder for the copy", str(dest))
    try:
        shutil.copytree(resolve(ref).parent, dest)
    except OSError as e:
        raise InputError(f"cannot copy the table here ({e.strerror})", str(dest)) from None
    return str(dest)


def calibrate(
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output folder: table.parquet, "
                                       "kernels.parquet, manifest.json"),
    errors_only: Optional[str] = typer.Option(None, "--errors-only", metavar="TABLE",
                                              help="measure nothing: compute the cost-model errors of "
                                                   "an existing table (folder or built-in name) and "
                                                   "store them in its manifest (a built-in table is "
                                                   "read-only: printed only, or stored in a copy at "
                                                   "--out)"),
    device: Optional[str] = typer.Option(None, help="torch device: cuda, cuda:1, cpu, ... "
                                                    "(default: cuda if present, else cpu)"),
    arch: str = typer.Option("transformer", help="transformer or hstu"),
    layers: int = typer.Option(8, min=1),
    d_model: int = typer.Option(512, min=1),
    heads: int = typer.Option(8, min=1),
    ffn: int = typer.Option(2048, min=1, help="feed-forward width (ignored by hstu)"),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 or float16 "
                                                   "(default: bfloat16 on cuda, float32 on cpu)"),
    short_term: int = typer.Option(32, min=0, help="short-term tokens ranked with the candidates"),
    history_lens: str = typer.Option("256,512,1024,2048,4096,8192,16384", help="grid of L"),
    candidates: str = typer.Option("32,64,128,256,512,1024", help="grid of M"),
    name: Optional[str] = typer.Option(None, help="table name (default: the output folder's name)"),
    conditions: str = typer.Option("isolated,idle_gap,busy,cache_pressure",
                                   help="isolated always runs; busy needs cuda"),
    warmup: Optional[int] = typer.Option(None, min=1, help="warm-up calls per point (default 10 cuda, 3 cpu)"),
    target_s: float = typer.Option(0.5, min=0, help="timed seconds per grid point"),
    min_samples: int = typer.Option(30, min=1, help="fewest timed calls per point"),
    max_samples: int = typer.Option(300, min=1, help="most timed calls per point"),
    kernels: bool = typer.Option(True, "--kernels/--no-kernels", help="also time the kernels"),
    kernel_target_s: float = typer.Option(0.1, min=0),
    kernel_max_samples: int = typer.Option(200, min=1),
    soft_deadline_s: float = typer.Option(420.0, min=0, help="after this, every point gets min-samples"),
    emb_rows: Optional[int] = typer.Option(None, min=1, help="embedding table rows (default 1M cuda, 200k cpu)"),
    corpus: Optional[int] = typer.Option(None, min=1, help="retrieval corpus items (default 1M cuda, 100k cpu)"),
    pressure_max_gib: Optional[float] = typer.Option(None, min=0, help="cap of the cache_pressure pool"),
    threads: Optional[int] = typer.Option(None, min=1, help="torch CPU threads"),
    seed: int = typer.Option(0),
    launches_per_layer: int = typer.Option(12, min=1, help="roofline launches per layer (for the fit)"),
    model: Optional[str] = typer.Option(None, "--model", metavar="package.module:factory",
                                        help="benchmark your own torch model instead of the built-in "
                                             "one: the factory returns a module with spec, "
                                             "encode_prefix, rank_cached and full_forward (see "
                                             "calibration/examples/tiny_gr.py; its spec sets the "
                                             "model options). Imports and runs that code"),
):
    """Run the torch microbenchmarks on this machine's device and write a cost table; then print
    and store the cost models' own errors (leave-one-out interpolation, fitted roofline).

    Needs torch (the calibrate extra of simrec) unless --errors-only.

    Example: simrec calibrate --device cpu --layers 2 --d-model 128 --heads 4 --ffn 512 --history-lens 64,256,1024 --candidates 16,64 --out tables/cpu_small

    Your own model: simrec calibrate --model simrec.calibration.examples.tiny_gr:build --device cpu --history-lens 32,64 --candidates 4,8 --conditions isolated --out tables/tiny_user
    """
    try:
        if errors_only is not None:
            _errors(errors_only, launches_per_layer, out)
            return
        if out is None:
            raise InputError("give an output folder (or --errors-only TABLE)", "--out")
        from .folders import check_target
        check_target(out, _is_table_folder)      # the bench writes in place, after minutes of measuring
        argv = ["--out", str(out), "--arch", arch, "--layers", str(layers), "--d-model", str(d_model),
                "--heads", str(heads), "--ffn", str(ffn), "--short-term", str(short_term),
                "--history-lens", _grid(history_lens, "--history-lens"),
                "--candidates", _grid(candidates, "--candidates"), "--conditions", conditions,
                "--target-s", str(target_s), "--min-samples", str(min_samples),
                "--max-samples", str(max_samples), "--kernel-target-s", str(kernel_target_s),
                "--kernel-max-samples", str(kernel_max_samples),
                "--soft-deadline-s", str(soft_deadline_s), "--seed", str(seed)]
        for flag, value in (("--device", device), ("--dtype", dtype), ("--name", name),
                            ("--warmup", warmup), ("--emb-rows", emb_rows), ("--corpus", corpus),
                            ("--pressure-max-gib", pressure_max_gib), ("--threads", threads)):
            if value is not None:
                argv += [flag, str(value)]
        if not kernels:
            argv.append("--no-kernels")
        try:
            import torch  # noqa: F401
            from simrec.calibration import bench, user_model
        except ImportError:
            raise InputError(NO_TORCH) from None
        try:
            with redirect_stdout(sys.stderr):        # the bench's progress lines
                user_model.main(model, argv) if model is not None else bench.main(argv)
        except SystemExit as e:                      # argparse or the bench's own checks
            raise InputError(e.code if isinstance(e.code, str) else "invalid calibration options") from None
        except (ValueError, RuntimeError) as e:      # model spec, device, out of memory, self-check
            raise InputError(f"calibration failed: {str(e).splitlines()[0]}") from None
        _errors(str(out), launches_per_layer)
    except InputError as e:
        print(str(e), file=sys.stderr)
        raise typer.Exit(1)

"""`simrec calibrate --model package.module:factory`: benchmark a user's own torch model.

The model implements the phase protocol of the built-in models (documented with an example
in calibration/examples/tiny_gr.py): a ``spec`` (`GRSpec`) and ``encode_prefix``,
``rank_cached``, ``full_forward``. The benchmark is calibration/bench.py's, unchanged: the
same grid, conditions, timer and table format, with the user's module in place of the
built-in one. Kernels are not timed (the built-in kernel list describes the built-in
models, not this one), nor is cache_pressure (its pool holds the built-in K/V layout).

Importing the factory runs the user's code: that is the point of the flag, and only the
flag does it. Nothing in a scenario ever loads code.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from pathlib import Path

from simrec.errors import InputError

PROTOCOL = ("encode_prefix", "rank_cached", "full_forward")


def load_model(ref: str):
    """Import ``package.module:factory``, call the factory, check the phase protocol."""
    from torch import nn

    from .gr_models import GRSpec
    mod_name, sep, attr = ref.partition(":")
    if not sep or not mod_name or not attr:
        raise InputError(f"expected package.module:factory (got {ref!r})", "--model")
    if os.getcwd() not in sys.path:         # the user's own package, from where they run simrec
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(mod_name)
    except (Exception, SystemExit) as e:   # the user's module may raise anything on import, exit too
        raise InputError(f"cannot import {mod_name}: {type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0]}", "--model") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise InputError(f"{mod_name} has no callable {attr!r}", "--model")
    try:
        model = factory()
    except (Exception, SystemExit) as e:
        raise InputError(f"{ref}() failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}",
                         "--model") from None
    if not isinstance(model, nn.Module):
        raise InputError(f"{ref}() returned a {type(model).__name__}, not a torch.nn.Module", "--model")
    for name in PROTOCOL:
        if not callable(getattr(model, name, None)):
            raise InputError(f"{type(model).__name__} has no {name}() (the phase protocol: "
                             f"{', '.join(PROTOCOL)}; see calibration/examples/tiny_gr.py)", "--model")
    spec = getattr(model, "spec", None)
    if not isinstance(spec, GRSpec):
        raise InputError(f"{type(model).__name__} has no spec (a simrec.calibration.gr_models.GRSpec: "
                         "d_model, short_term_tokens, dtype, layers, heads)", "--model")
    if not callable(getattr(model, "new_kv", None)):
        model.new_kv = _derived_new_kv(model)
    return model


def _derived_new_kv(model):
    """new_kv from encode_prefix's output shape at that length (shape only: device 'meta'
    gives the shape, any other an empty tensor there)."""
    import torch

    def new_kv(batch: int, length: int, device):
        p = next(model.parameters(), None)
        dev = p.device if p is not None else "cpu"
        with torch.inference_mode():
            kv = model.encode_prefix(torch.zeros(batch, length, model.spec.d_model, device=dev,
                                                 dtype=model.spec.torch_dtype))
        return torch.empty(kv.shape, dtype=kv.dtype, device=device)
    return new_kv


def main(ref: str, argv: list[str]) -> int:
    """bench.main for a user's model: bench's options (argv), the model from `ref`."""
    from . import bench
    from .gr_models import Phases
    args = bench.parse_args(argv)
    started = time.monotonic()
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    model = load_model(ref)
    cfg = bench.config_from_args(args)
    if "cache_pressure" in cfg.conditions:
        print("note: condition cache_pressure is not measured for a --model", flush=True)
        cfg.conditions.remove("cache_pressure")
    cfg.spec, cfg.kernels, cfg.budget.t0 = model.spec, False, started
    model = model.to(device=cfg.device, dtype=model.spec.torch_dtype).eval()
    name = args.name or args.out.resolve().name
    print(f"simrec calibration bench: {name}, user model {ref} ({type(model).__name__}), "
          f"spec {model.spec.to_dict()}", flush=True)
    b = bench.Bench(cfg)
    b.model, b.phases = model, Phases(model, cfg.graphs)
    b.run()
    manifest = bench.write_outputs(b, args.out, name, started)
    manifest["model"]["user_model"] = ref
    manifest["model"]["user_model_class"] = f"{type(model).__module__}.{type(model).__qualname__}"
    (Path(args.out) / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {args.out} ({len(b.rows)} rows) in {time.monotonic() - started:.1f}s", flush=True)
    print(bench.summarize(__import__("pandas").read_parquet(Path(args.out) / "table.parquet"), manifest),
          flush=True)
    return 0


if __name__ == "__main__":       # python -m calibration.user_model package.module:factory --out DIR ...
    sys.exit(main(sys.argv[1], sys.argv[2:]))

"""Calibration: cost tables (format, loading, interpolation) and the torch microbenchmarks
that measure them. Only the benchmark modules import torch."""

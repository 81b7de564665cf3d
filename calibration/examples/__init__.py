"""Example models for `simrec calibrate --model package.module:factory` (see tiny_gr.py)."""

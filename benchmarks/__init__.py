"""Calibration benchmark suite for Laplace-LoRA (offline models, data and fine-tuning).

Run scripts from the repository root as ``python -m benchmarks.<module>``.
Large assets (dequantized models, BIG-bench task files, fine-tuning runs) are cached
under ``benchmarks/cache/`` (git-ignored).
"""

"""Benchmarks, profiles, checks and GPU runbooks: beside the product, not part of it (docs/BENCHMARKS.md
holds their results). Run the scripts from the repository root, e.g. ``python bench/bench_chat.py --help``."""

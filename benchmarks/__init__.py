"""Benchmark harness: each workload runs ours and the genlm anchor side by side.

One command per workload, e.g. ``python -m benchmarks.w3_trie --quick``; results are
appended to ``BENCHMARKS.md`` and saved as JSON under ``benchmarks/results/``.
"""

"""Benchmarks: `python -m bench.platform` measures the serving platform against floors it starts itself."""

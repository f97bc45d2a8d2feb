"""Benchmarks: each module measures ours against a peer in one run and writes bench/results/NAME.json."""

"""Benchmarks: measured in one run, printed as ratios; apart from the tests."""

"""Builders of tiny models for the tests and the benchmarks (never imported by production code)."""

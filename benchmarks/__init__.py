"""Benchmarks and the fuzz runner; each prints numbers (see the README, "Measured")."""

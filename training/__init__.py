"""Offline half of the product: commands that make and use bundles (import, init, predict, benchmarks)."""

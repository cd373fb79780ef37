"""Decode-latency benchmarking: a lean decode loop, variants, and the bandwidth floor."""

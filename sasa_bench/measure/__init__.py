"""Measurements of a built model: FLOPs/params, latency, memory."""

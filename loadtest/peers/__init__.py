"""Peers: the programs tracewatch is measured against in `make bench` (same input topic)."""

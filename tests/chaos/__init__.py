"""Chaos tests: faults injected into node workers and tokens under load (bounded in time, loopback)."""

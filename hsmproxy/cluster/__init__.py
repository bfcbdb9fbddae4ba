"""Cluster: routing across nodes."""

"""Conformance: case corpus and differential runner."""

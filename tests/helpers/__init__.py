"""Helpers shared by the tests: running exporters, the driven clock, outside tools."""

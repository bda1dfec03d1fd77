"""Prometheus exporter for Prime Intellect image builds."""

__version__ = "0.1.0"

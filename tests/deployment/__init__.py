"""Tests with outside tools: Prometheus, promtool, Alertmanager, hadolint, Helm's engine,
Chromium. Every test here carries the ``tooling`` marker (see conftest.py)."""

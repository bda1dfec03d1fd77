"""Tests over loopback: the exporter, its CLI and the simulator as real processes and sockets."""

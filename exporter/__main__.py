"""``python -m exporter``: the same as the ``primeintellect-build-exporter`` command."""

from exporter.cli import main

main()

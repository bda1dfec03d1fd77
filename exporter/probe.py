"""``python -m exporter.probe URL``: a Kubernetes exec probe of the exporter's own endpoint.

An httpGet probe can send no credentials but from the pod spec, where anyone who may read the
pod sees them; with basic auth on, the Helm chart runs this instead, and the password comes
from a file of a mounted Secret. Standard library only, so it starts in a few tens of
milliseconds. The exit status is the answer: 0 for a 2xx, else 1 with the reason on stderr,
which the kubelet shows in the pod's events.

With https the server's certificate is not verified: the probe connects to the pod's own
loopback address, which only the pod's containers can listen on, as the kubelet's httpGet
probes do.
"""

from __future__ import annotations

import argparse
import base64
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    """The probe's command line."""
    parser = argparse.ArgumentParser(
        prog="python -m exporter.probe", description="GET an exporter endpoint; exit 0 on 2xx"
    )
    parser.add_argument("url", help="such as http://127.0.0.1:9862/-/healthy")
    parser.add_argument("--user", default="", help="basic-auth user name")
    parser.add_argument("--password-file", default="", help="file holding the user's password")
    parser.add_argument("--timeout", type=float, default=4.0, help="seconds (default 4)")
    return parser


def probe(url: str, user: str, password_file: str, timeout: float) -> str | None:
    """GET ``url``; None for a 2xx answer, else what went wrong."""
    if not url.startswith(("http://", "https://")):
        return f"{url}: not an http or https URL"
    headers = {}
    if user:
        try:
            password = Path(password_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            return f"cannot read the password file: {error}"
        login = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        headers["Authorization"] = f"Basic {login}"
    loopback = ssl.create_default_context()
    loopback.check_hostname = False
    loopback.verify_mode = ssl.CERT_NONE
    # No proxy: one set for the API must not catch a request to the pod itself.
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=loopback)
    )
    try:
        # The scheme is checked above: http or https only, never file:.
        request = urllib.request.Request(url, headers=headers)  # noqa: S310
        with opener.open(request, timeout=timeout):
            return None
    except urllib.error.HTTPError as error:
        return f"{url}: HTTP {error.code} {error.reason}"
    except (OSError, ValueError) as error:
        return f"{url}: {error}"


def main(argv: Sequence[str] | None = None) -> None:
    """Probe once and exit with the answer."""
    arguments = build_parser().parse_args(argv)
    if bool(arguments.user) != bool(arguments.password_file):
        sys.exit("--user and --password-file go together")
    problem = probe(arguments.url, arguments.user, arguments.password_file, arguments.timeout)
    sys.exit(None if problem is None else f"probe failed: {problem}")


if __name__ == "__main__":
    main()

"""``--web.config.file``: TLS, client certificates, basic auth and reloading, over real HTTPS."""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import bcrypt
import httpx
import pytest
from cryptography import x509

from exporter.demo.simulator import Simulator
from exporter.logs import LogfmtFormatter
from exporter.web.auth import AUTH_REALM
from exporter.web.connections import ServerLimits
from exporter.web.webconfig import WebConfigWatcher
from tests.conftest import StartExporter
from tests.helpers.pki import (
    CLIENT_DNS_NAME,
    CLIENT_IP,
    SERVER_NAMES,
    Pki,
    client_context,
    replace_file,
    tls_section,
)
from tests.helpers.support import RunningExporter, make_config, wait_until

PASSWORD = "correct horse battery staple"
# Low cost keeps the suite fast; the server matches the cost of what is configured.
BCRYPT_ROUNDS = 5


@pytest.fixture
def web_config(tmp_path: Path) -> Callable[[str], Path]:
    """Write the web config file (again) and return its path."""
    path = tmp_path / "web.yml"

    def write(text: str) -> Path:
        replace_file(path, text.encode())
        return path

    return write


@pytest.fixture
def start_with(
    simulator: Simulator, start_exporter: StartExporter
) -> Callable[[Path], RunningExporter]:
    def start(web_config_file: Path) -> RunningExporter:
        return start_exporter(make_config(simulator.base_url, []), web_config_file=web_config_file)

    return start


def users_section(**users: str) -> str:
    lines = ["basic_auth_users:"]
    lines += [f"  {user}: '{hashed}'" for user, hashed in users.items()]
    return "\n".join(lines) + "\n"


def bcrypt_hash(password: str, rounds: int = BCRYPT_ROUNDS) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=rounds)).decode()


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def scrape(
    url: str,
    context: ssl.SSLContext | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
) -> httpx.Response:
    return httpx.get(
        url + "/metrics", verify=context or True, headers=headers or {}, timeout=timeout
    )


def served_serial(url: str, context: ssl.SSLContext) -> int:
    """The serial number of the certificate the server presents now."""
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    with (
        socket.create_connection((parts.hostname, parts.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=parts.hostname) as connection,
    ):
        der = connection.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def is_closed_by_server(connection: socket.socket) -> bool:
    try:
        return connection.recv(1, socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


def logged(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(LogfmtFormatter().format(record) for record in caplog.records)


@pytest.fixture
def raw_connections() -> Iterator[list[socket.socket]]:
    """Plain TCP connections the test opens and never speaks TLS on; closed afterwards."""
    opened: list[socket.socket] = []
    yield opened
    for connection in opened:
        connection.close()


# --- TLS ---------------------------------------------------------------------------------


def test_https_scrape_works_with_the_servers_ca(
    pki: Pki, web_config: Callable[[str], Path], start_with: Callable[[Path], RunningExporter]
) -> None:
    running = start_with(web_config(tls_section(pki)))
    assert running.url.startswith("https://127.0.0.1:")
    response = scrape(running.url, client_context(pki))
    assert response.status_code == 200
    assert "primeintellect_exporter_build_info" in response.text


def test_plain_http_to_the_tls_port_is_told_to_use_https(
    pki: Pki, web_config: Callable[[str], Path], start_with: Callable[[Path], RunningExporter]
) -> None:
    running = start_with(web_config(tls_section(pki)))
    response = httpx.get(running.url.replace("https://", "http://") + "/metrics", timeout=5)
    assert response.status_code == 400
    assert "HTTP request to an HTTPS server" in response.text


def test_required_client_certificate_must_be_signed_by_the_client_ca(
    pki: Pki, web_config: Callable[[str], Path], start_with: Callable[[Path], RunningExporter]
) -> None:
    running = start_with(
        web_config(
            tls_section(
                pki, client_auth_type="RequireAndVerifyClientCert", client_ca_file=str(pki.ca)
            )
        )
    )
    assert scrape(running.url, client_context(pki, pki.client)).status_code == 200
    with pytest.raises(httpx.TransportError):
        scrape(running.url, client_context(pki))
    with pytest.raises(httpx.TransportError):
        scrape(running.url, client_context(pki, pki.stranger))
    # The refusals did not disturb the server.
    assert scrape(running.url, client_context(pki, pki.client)).status_code == 200


def test_optional_client_certificate_is_verified_only_when_given(
    pki: Pki, web_config: Callable[[str], Path], start_with: Callable[[Path], RunningExporter]
) -> None:
    running = start_with(
        web_config(
            tls_section(pki, client_auth_type="VerifyClientCertIfGiven", client_ca_file=str(pki.ca))
        )
    )
    assert scrape(running.url, client_context(pki)).status_code == 200
    assert scrape(running.url, client_context(pki, pki.client)).status_code == 200
    with pytest.raises(httpx.TransportError):
        scrape(running.url, client_context(pki, pki.stranger))


@pytest.mark.parametrize("allowed", [CLIENT_DNS_NAME, CLIENT_IP])
def test_client_allowed_sans_admit_only_certificates_naming_them(
    pki: Pki,
    web_config: Callable[[str], Path],
    start_with: Callable[[Path], RunningExporter],
    allowed: str,
) -> None:
    running = start_with(
        web_config(
            tls_section(
                pki,
                client_auth_type="RequireAndVerifyClientCert",
                client_ca_file=str(pki.ca),
                client_allowed_sans=f"['{allowed}']",
            )
        )
    )
    assert scrape(running.url, client_context(pki, pki.client)).status_code == 200
    with pytest.raises(httpx.TransportError):
        scrape(running.url, client_context(pki, pki.intruder))


def test_min_version_tls13_refuses_a_tls12_only_client(
    pki: Pki, web_config: Callable[[str], Path], start_with: Callable[[Path], RunningExporter]
) -> None:
    running = start_with(web_config(tls_section(pki, min_version="TLS13")))
    with pytest.raises(httpx.TransportError):
        scrape(running.url, client_context(pki, maximum_version=ssl.TLSVersion.TLSv1_2))
    assert scrape(running.url, client_context(pki)).status_code == 200


def test_max_version_tls12_is_what_a_tls13_client_gets(
    pki: Pki, web_config: Callable[[str], Path], start_with: Callable[[Path], RunningExporter]
) -> None:
    running = start_with(web_config(tls_section(pki, max_version="TLS12")))
    parts = urlsplit(running.url)
    assert parts.port is not None
    with (
        socket.create_connection(("127.0.0.1", parts.port), timeout=5) as raw,
        client_context(pki).wrap_socket(raw, server_hostname="127.0.0.1") as connection,
    ):
        assert connection.version() == "TLSv1.2"


def test_cipher_suites_in_go_names_restrict_what_tls12_clients_may_use(
    pki: Pki, web_config: Callable[[str], Path], start_with: Callable[[Path], RunningExporter]
) -> None:
    running = start_with(
        web_config(
            tls_section(
                pki,
                max_version="TLS12",
                cipher_suites="[TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384]",
            )
        )
    )
    allowed = client_context(pki)
    allowed.set_ciphers("ECDHE-ECDSA-AES256-GCM-SHA384")
    assert scrape(running.url, allowed).status_code == 200
    other = client_context(pki)
    other.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")
    with pytest.raises(httpx.TransportError):
        scrape(running.url, other)


def test_idle_tls_handshake_does_not_block_other_scrapes(
    pki: Pki,
    web_config: Callable[[str], Path],
    start_with: Callable[[Path], RunningExporter],
    raw_connections: list[socket.socket],
) -> None:
    running = start_with(web_config(tls_section(pki)))
    parts = urlsplit(running.url)
    assert parts.port is not None
    idle = socket.create_connection(("127.0.0.1", parts.port))
    raw_connections.append(idle)
    # Sends no ClientHello. A server that shakes hands while accepting would make this scrape
    # wait for the idle client's handshake timeout, longer than the scrape's own.
    response = scrape(
        running.url, client_context(pki), timeout=ServerLimits().tls_handshake_timeout / 2
    )
    assert response.status_code == 200
    assert not is_closed_by_server(idle)


def test_rotated_server_certificate_is_served_without_restart(
    pki: Pki,
    tmp_path: Path,
    web_config: Callable[[str], Path],
    start_with: Callable[[Path], RunningExporter],
) -> None:
    first = pki.authority.issue(tmp_path, "rotating", SERVER_NAMES, server=True)
    running = start_with(
        web_config(f"tls_server_config:\n  cert_file: {first.cert}\n  key_file: {first.key}\n")
    )
    context = client_context(pki)
    assert served_serial(running.url, context) == first.certificate.serial_number
    second = pki.authority.issue(tmp_path, "rotating", SERVER_NAMES, server=True)
    wait_until(
        lambda: served_serial(running.url, context) == second.certificate.serial_number,
        message="the rotated certificate to be served",
    )
    assert scrape(running.url, context).status_code == 200


# --- basic auth --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        (basic("alice", PASSWORD), 200),
        (basic("alice", "wrong"), 401),
        (basic("mallory", PASSWORD), 401),
        (basic("alice", PASSWORD + "x"), 401),
        ({}, 401),
        ({"Authorization": f"Bearer {PASSWORD}"}, 401),
        ({"Authorization": "Basic not-base64!"}, 401),
        ({"Authorization": "Basic " + base64.b64encode(b"alice").decode()}, 401),
    ],
    ids=[
        "right",
        "wrong_password",
        "unknown_user",
        "longer_password",
        "no_header",
        "other_scheme",
        "not_base64",
        "no_colon",
    ],
)
def test_basic_auth_admits_only_the_right_password(
    web_config: Callable[[str], Path],
    start_with: Callable[[Path], RunningExporter],
    headers: dict[str, str],
    status: int,
) -> None:
    running = start_with(web_config(users_section(alice=bcrypt_hash(PASSWORD))))
    response = scrape(running.url, headers=headers)
    assert response.status_code == status
    if status == 401:
        assert response.headers["WWW-Authenticate"] == f'Basic realm="{AUTH_REALM}"'
        assert "primeintellect" not in response.text


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/"), ("GET", "/-/healthy"), ("HEAD", "/-/ready"), ("GET", "/nope"), ("POST", "/")],
)
def test_basic_auth_guards_every_path_and_method(
    web_config: Callable[[str], Path],
    start_with: Callable[[Path], RunningExporter],
    method: str,
    path: str,
) -> None:
    running = start_with(web_config(users_section(alice=bcrypt_hash(PASSWORD))))
    assert httpx.request(method, running.url + path).status_code == 401
    authorized = httpx.request(method, running.url + path, headers=basic("alice", PASSWORD))
    assert authorized.status_code != 401


def test_basic_auth_and_tls_together(
    pki: Pki, web_config: Callable[[str], Path], start_with: Callable[[Path], RunningExporter]
) -> None:
    running = start_with(web_config(tls_section(pki) + users_section(alice=bcrypt_hash(PASSWORD))))
    context = client_context(pki)
    assert scrape(running.url, context).status_code == 401
    assert scrape(running.url, context, basic("alice", "wrong")).status_code == 401
    with httpx.Client(verify=context, timeout=5) as client:
        for _ in range(3):  # over one kept-alive connection
            response = client.get(running.url + "/metrics", headers=basic("alice", PASSWORD))
            assert response.status_code == 200


def test_successful_logins_are_cached_and_unknown_users_cost_a_bcrypt_check(
    web_config: Callable[[str], Path],
    start_with: Callable[[Path], RunningExporter],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    checked: list[bytes] = []
    checkpw = bcrypt.checkpw

    def counting_checkpw(password: bytes, hashed: bytes) -> bool:
        checked.append(hashed)
        return checkpw(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counting_checkpw)
    stored = bcrypt_hash(PASSWORD)
    running = start_with(web_config(users_section(alice=stored)))

    for _ in range(3):
        assert scrape(running.url, headers=basic("alice", PASSWORD)).status_code == 200
    assert checked == [stored.encode()]

    for _ in range(2):
        assert scrape(running.url, headers=basic("alice", "wrong")).status_code == 401
    assert len(checked) == 3

    # An unknown user is checked against a hash of the configured cost, like a wrong password.
    assert scrape(running.url, headers=basic("mallory", PASSWORD)).status_code == 401
    assert len(checked) == 4
    assert checked[-1] != stored.encode()
    assert checked[-1][4:6] == stored.encode()[4:6]


def test_changed_users_are_picked_up_without_restart(
    web_config: Callable[[str], Path], start_with: Callable[[Path], RunningExporter]
) -> None:
    path = web_config(users_section(alice=bcrypt_hash(PASSWORD)))
    running = start_with(path)
    assert scrape(running.url, headers=basic("alice", PASSWORD)).status_code == 200
    web_config(users_section(bob=bcrypt_hash("bobs password")))
    wait_until(
        lambda: scrape(running.url, headers=basic("bob", "bobs password")).status_code == 200,
        message="the new user to be accepted",
    )
    assert scrape(running.url, headers=basic("alice", PASSWORD)).status_code == 401


def test_no_password_or_hash_is_ever_logged(
    web_config: Callable[[str], Path],
    start_with: Callable[[Path], RunningExporter],
    caplog: pytest.LogCaptureFixture,
) -> None:
    stored = bcrypt_hash(PASSWORD)
    running = start_with(web_config(users_section(alice=stored)))
    scrape(running.url, headers=basic("alice", PASSWORD))
    scrape(running.url, headers=basic("alice", "another secret"))
    scrape(running.url, headers=basic("mallory", PASSWORD))
    web_config(users_section(alice=stored) + "  bob: plain-text-secret\n")

    def noticed() -> bool:
        scrape(running.url)  # requests drive the check for changes
        return "web config not reloaded" in caplog.text

    wait_until(noticed, message="the invalid rewrite to be noticed")
    text = logged(caplog)
    token = basic("alice", PASSWORD)["Authorization"].split()[1]
    for secret in (PASSWORD, "another secret", stored, stored[7:], "plain-text-secret", token):
        assert secret not in text


# --- other toolkit settings --------------------------------------------------------------


def test_configured_headers_are_sent_on_every_response(
    web_config: Callable[[str], Path], start_with: Callable[[Path], RunningExporter]
) -> None:
    running = start_with(
        web_config(
            "http_server_config:\n"
            "  http2: false\n"
            "  headers:\n"
            "    X-Frame-Options: deny\n"
            "    X-Content-Type-Options: nosniff\n"
            "    Strict-Transport-Security: max-age=31536000\n"
            + users_section(alice=bcrypt_hash(PASSWORD))
        )
    )
    for response in (
        scrape(running.url, headers=basic("alice", PASSWORD)),
        scrape(running.url),
    ):
        assert response.headers["X-Frame-Options"] == "deny"
        assert response.headers["Strict-Transport-Security"] == "max-age=31536000"
        assert response.headers.get_list("X-Content-Type-Options") == ["nosniff"]


def test_rate_limit_answers_429_beyond_the_burst(
    web_config: Callable[[str], Path], start_with: Callable[[Path], RunningExporter]
) -> None:
    running = start_with(web_config("rate_limit:\n  interval: 1h\n  burst: 2\n"))
    statuses = [scrape(running.url).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]


def test_empty_file_serves_plain_http_without_auth(
    web_config: Callable[[str], Path], start_with: Callable[[Path], RunningExporter]
) -> None:
    running = start_with(web_config("# nothing configured yet\ntls_server_config:\n"))
    assert running.url.startswith("http://")
    assert scrape(running.url).status_code == 200


# --- reloading ---------------------------------------------------------------------------


def test_invalid_rewrite_keeps_the_last_good_config_serving(
    pki: Pki,
    web_config: Callable[[str], Path],
    start_with: Callable[[Path], RunningExporter],
    caplog: pytest.LogCaptureFixture,
) -> None:
    running = start_with(web_config(tls_section(pki) + users_section(alice=bcrypt_hash(PASSWORD))))
    context = client_context(pki)
    web_config(tls_section(pki, client_auth_type="Sometimes"))

    def noticed() -> bool:
        scrape(running.url, context, basic("alice", PASSWORD))  # requests drive the check
        return "web config not reloaded" in caplog.text

    wait_until(noticed, message="the invalid rewrite to be noticed")
    assert scrape(running.url, context, basic("alice", PASSWORD)).status_code == 200
    assert scrape(running.url, context).status_code == 401
    errors = [record for record in caplog.records if record.name == "exporter.web.webconfig"]
    assert len(errors) == 1
    assert "client_auth_type" in errors[0].__dict__["error"]


def test_unchanged_broken_file_is_reported_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "web.yml"
    path.write_text(users_section(alice=bcrypt_hash(PASSWORD)))
    watcher = WebConfigWatcher(path)
    good = watcher.current()
    path.write_text("basic_auth_user: {}\n")
    for _ in range(3):
        assert not watcher.check()
        assert watcher.current() is good
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failures) == 1
    assert "basic_auth_user: unknown key" in failures[0].__dict__["error"]
    path.write_text(users_section(bob=bcrypt_hash(PASSWORD)))
    assert watcher.check()
    reloaded = watcher.current()
    assert reloaded is not good
    assert reloaded.basic_auth is not None
    assert asyncio.run(reloaded.basic_auth.authorized(basic("bob", PASSWORD)["Authorization"]))


def test_certificate_created_after_the_config_naming_it_is_picked_up(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "web.yml"
    path.write_text(tls_section(pki))
    watcher = WebConfigWatcher(path)
    first = watcher.current()
    path.write_text("tls_server_config:\n  cert_file: new.crt\n  key_file: new.key\n")
    assert not watcher.check()
    assert watcher.current() is first
    assert "tls_server_config.cert_file: cannot read" in logged(caplog)
    pki.authority.issue(tmp_path, "new", SERVER_NAMES, server=True)
    assert watcher.check()
    reloaded = watcher.current()
    assert reloaded.tls is not None
    assert reloaded.tls.cert_file == tmp_path / "new.crt"


def test_switching_between_http_and_https_needs_a_restart(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "web.yml"
    path.write_text(users_section(alice=bcrypt_hash(PASSWORD)))
    watcher = WebConfigWatcher(path)
    path.write_text(tls_section(pki))
    assert not watcher.check()
    assert watcher.current().tls is None
    assert "switching between HTTP and HTTPS needs a restart" in logged(caplog)


def test_invalid_web_config_stops_the_start(
    pki: Pki, web_config: Callable[[str], Path], start_with: Callable[[Path], RunningExporter]
) -> None:
    with pytest.raises(RuntimeError, match="client_auth_type"):
        start_with(web_config(tls_section(pki, client_auth_type="Sometimes")))

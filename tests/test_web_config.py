"""``--web.config.file``: TLS, client certificates, basic auth and reloading, over real HTTPS."""

from __future__ import annotations

import base64
import ipaddress
import logging
import socket
import ssl
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import bcrypt
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from exporter.logs import LogfmtFormatter
from exporter.server import MAX_CONNECTIONS, TLS_HANDSHAKE_TIMEOUT
from exporter.simulator import Simulator
from exporter.webconfig import (
    AUTH_REALM,
    WebConfigError,
    WebConfigWatcher,
    load_web_config,
)
from tests.conftest import StartExporter
from tests.support import RunningExporter, make_config, wait_until

PASSWORD = "correct horse battery staple"
# Low cost keeps the suite fast; the server matches the cost of what is configured.
BCRYPT_ROUNDS = 5
CLIENT_DNS_NAME = "prometheus.monitoring.example"
CLIENT_IP = "2001:db8::7"


class Authority:
    """A certificate authority that issues server and client certificates into a directory."""

    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        public_key = self.key.public_key()
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    def write(self, path: Path) -> Path:
        path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))
        return path

    def issue(
        self,
        directory: Path,
        stem: str,
        names: Sequence[x509.GeneralName],
        *,
        server: bool,
    ) -> Issued:
        """Write ``stem.crt`` and ``stem.key``; a server certificate, or a client one."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, stem)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        issued = Issued(directory / f"{stem}.crt", directory / f"{stem}.key", certificate)
        _replace(
            issued.key,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        _replace(issued.cert, certificate.public_bytes(serialization.Encoding.PEM))
        return issued


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path
    certificate: x509.Certificate

    @property
    def pair(self) -> tuple[str, str]:
        return str(self.cert), str(self.key)


@dataclass(frozen=True)
class Pki:
    authority: Authority
    ca: Path
    server: Issued
    client: Issued
    intruder: Issued
    stranger: Issued


def _replace(path: Path, content: bytes) -> None:
    # Atomically, as certificate tools do: the exporter never reads a half-written file.
    partial = path.with_name(path.name + ".tmp")
    partial.write_bytes(content)
    partial.replace(path)


SERVER_NAMES: list[x509.GeneralName] = [
    x509.DNSName("localhost"),
    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA with a server and two client certificates, and a client of another CA."""
    directory = tmp_path_factory.mktemp("pki")
    authority = Authority("test CA")
    other = Authority("some other CA")
    return Pki(
        authority=authority,
        ca=authority.write(directory / "ca.crt"),
        server=authority.issue(directory, "server", SERVER_NAMES, server=True),
        client=authority.issue(
            directory,
            "client",
            [x509.DNSName(CLIENT_DNS_NAME), x509.IPAddress(ipaddress.ip_address(CLIENT_IP))],
            server=False,
        ),
        intruder=authority.issue(
            directory, "intruder", [x509.DNSName("intruder.example")], server=False
        ),
        stranger=other.issue(directory, "stranger", [x509.DNSName(CLIENT_DNS_NAME)], server=False),
    )


@pytest.fixture
def web_config(tmp_path: Path) -> Callable[[str], Path]:
    """Write the web config file (again) and return its path."""
    path = tmp_path / "web.yml"

    def write(text: str) -> Path:
        _replace(path, text.encode())
        return path

    return write


@pytest.fixture
def start_with(
    simulator: Simulator, start_exporter: StartExporter
) -> Callable[[Path], RunningExporter]:
    def start(web_config_file: Path) -> RunningExporter:
        return start_exporter(make_config(simulator.base_url, []), web_config_file=web_config_file)

    return start


def tls_section(pki: Pki, **extra: str) -> str:
    lines = [
        "tls_server_config:",
        f"  cert_file: {pki.server.cert}",
        f"  key_file: {pki.server.key}",
    ]
    lines += [f"  {key}: {value}" for key, value in extra.items()]
    return "\n".join(lines) + "\n"


def users_section(**users: str) -> str:
    lines = ["basic_auth_users:"]
    lines += [f"  {user}: '{hashed}'" for user, hashed in users.items()]
    return "\n".join(lines) + "\n"


def bcrypt_hash(password: str, rounds: int = BCRYPT_ROUNDS) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=rounds)).decode()


def client_context(
    pki: Pki,
    identity: Issued | None = None,
    *,
    maximum_version: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki.ca)
    if identity is not None:
        context.load_cert_chain(*identity.pair)
    if maximum_version is not None:
        context.maximum_version = maximum_version
    return context


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
    response = scrape(running.url, client_context(pki), timeout=TLS_HANDSHAKE_TIMEOUT / 2)
    assert response.status_code == 200
    assert not is_closed_by_server(idle)


def test_connection_flood_beyond_the_bound_does_not_stop_later_scrapes(
    pki: Pki,
    web_config: Callable[[str], Path],
    start_with: Callable[[Path], RunningExporter],
    raw_connections: list[socket.socket],
) -> None:
    running = start_with(web_config(tls_section(pki)))
    parts = urlsplit(running.url)
    assert parts.port is not None
    extra = 16
    raw_connections.extend(
        socket.create_connection(("127.0.0.1", parts.port)) for _ in range(MAX_CONNECTIONS + extra)
    )
    # Connections beyond the bound are closed at once, long before any handshake times out.
    wait_until(
        lambda: sum(map(is_closed_by_server, raw_connections)) >= extra,
        timeout=TLS_HANDSHAKE_TIMEOUT / 2,
        message="the connections beyond the bound to be closed",
    )

    def scrape_succeeds() -> bool:
        try:
            return scrape(running.url, client_context(pki), timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(scrape_succeeds, timeout=TLS_HANDSHAKE_TIMEOUT + 10, message="a scrape")


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


def test_every_toolkit_key_this_exporter_honours_loads(pki: Pki, tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    for source in (pki.server.cert, pki.server.key, pki.ca):
        (tmp_path / "certs" / source.name).write_bytes(source.read_bytes())
    path = tmp_path / "web.yml"
    path.write_text(
        "tls_server_config:\n"
        "  cert_file: certs/server.crt\n"  # relative to the web config file
        "  key_file: certs/server.key\n"
        "  client_auth_type: RequireAndVerifyClientCert\n"
        "  client_ca_file: certs/ca.crt\n"
        "  client_allowed_sans: [prometheus.monitoring.example]\n"
        "  min_version: TLS12\n"
        "  max_version: TLS13\n"
        "  prefer_server_cipher_suites: false\n"
        "  cipher_suites: []\n"
        "  curve_preferences: []\n"
        "http_server_config:\n"
        "  http2: true\n"
        "  headers:\n"
        "    Content-Security-Policy: default-src 'self'\n"
        "rate_limit:\n"
        "  interval: 100ms\n"
        "  burst: 10\n" + users_section(alice=bcrypt_hash(PASSWORD))
    )
    config = load_web_config(path)
    assert config.tls is not None
    assert config.tls.cert_file == tmp_path / "certs" / "server.crt"
    assert config.tls.client_ca_file == tmp_path / "certs" / "ca.crt"
    assert config.tls.client_auth_type == "RequireAndVerifyClientCert"
    assert config.tls.min_version is ssl.TLSVersion.TLSv1_2
    assert config.tls.context.verify_mode is ssl.CERT_REQUIRED
    assert not config.tls.context.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    assert config.headers == (("Content-Security-Policy", "default-src 'self'"),)
    assert config.rate_limiter is not None
    assert config.rate_limiter.burst == 10
    assert config.basic_auth is not None
    assert config.basic_auth.authorized(basic("alice", PASSWORD)["Authorization"])


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
    errors = [record for record in caplog.records if record.name == "exporter.webconfig"]
    assert len(errors) == 1
    assert "client_auth_type" in errors[0].__dict__["error"]


def test_unchanged_broken_file_is_reported_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "web.yml"
    path.write_text(users_section(alice=bcrypt_hash(PASSWORD)))
    watcher = WebConfigWatcher(path, check_interval=0)
    good = watcher.current()
    path.write_text("basic_auth_user: {}\n")
    for _ in range(3):
        assert watcher.current() is good
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failures) == 1
    assert "basic_auth_user: unknown key" in failures[0].__dict__["error"]
    path.write_text(users_section(bob=bcrypt_hash(PASSWORD)))
    reloaded = watcher.current()
    assert reloaded is not good
    assert reloaded.basic_auth is not None
    assert reloaded.basic_auth.authorized(basic("bob", PASSWORD)["Authorization"])


def test_certificate_created_after_the_config_naming_it_is_picked_up(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "web.yml"
    path.write_text(tls_section(pki))
    watcher = WebConfigWatcher(path, check_interval=0)
    first = watcher.current()
    path.write_text("tls_server_config:\n  cert_file: new.crt\n  key_file: new.key\n")
    assert watcher.current() is first
    assert "tls_server_config.cert_file: cannot read" in logged(caplog)
    pki.authority.issue(tmp_path, "new", SERVER_NAMES, server=True)
    reloaded = watcher.current()
    assert reloaded.tls is not None
    assert reloaded.tls.cert_file == tmp_path / "new.crt"


def test_switching_between_http_and_https_needs_a_restart(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "web.yml"
    path.write_text(users_section(alice=bcrypt_hash(PASSWORD)))
    watcher = WebConfigWatcher(path, check_interval=0)
    path.write_text(tls_section(pki))
    assert watcher.current().tls is None
    assert "switching between HTTP and HTTPS needs a restart" in logged(caplog)


def test_invalid_web_config_stops_the_start(
    pki: Pki, web_config: Callable[[str], Path], start_with: Callable[[Path], RunningExporter]
) -> None:
    with pytest.raises(RuntimeError, match="client_auth_type"):
        start_with(web_config(tls_section(pki, client_auth_type="Sometimes")))


# --- invalid files -----------------------------------------------------------------------

TLS = "tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
ALICE = "basic_auth_users:\n  alice: {hash}\n"

INVALID_WEB_CONFIGS = {
    "unknown_top_level_key": (
        "tls_server_confg:\n  cert_file: {cert}\n",
        "tls_server_confg: unknown key; did you mean tls_server_config?",
    ),
    "unknown_nested_key": (
        TLS + "  cert_fil: {cert}\n",
        "tls_server_config.cert_fil: unknown key; did you mean cert_file?",
    ),
    "unknown_http_key": ("http_server_config:\n  http3: true\n", "http_server_config.http3: "),
    "plain_text_password": (
        "basic_auth_users:\n  alice: hunter2-plain\n",
        "basic_auth_users.alice: not a bcrypt hash",
    ),
    "unsupported_bcrypt_variant": (
        "basic_auth_users:\n  alice: '$2x$05$" + "a" * 53 + "'\n",
        "basic_auth_users.alice: not a bcrypt hash",
    ),
    "user_name_with_colon": (
        "basic_auth_users:\n  'al:ice': '{hash}'\n",
        "basic_auth_users.al:ice: a user name cannot contain ':'",
    ),
    "missing_key_file": (
        "tls_server_config:\n  cert_file: {cert}\n",
        "tls_server_config.key_file: required when tls_server_config is set",
    ),
    "cert_file_not_found": (
        "tls_server_config:\n  cert_file: {missing}\n  key_file: {key}\n",
        "tls_server_config.cert_file: cannot read",
    ),
    "cert_file_holds_a_key": (
        "tls_server_config:\n  cert_file: {key}\n  key_file: {key}\n",
        "tls_server_config.cert_file: ",
    ),
    "cert_key_mismatch": (
        "tls_server_config:\n  cert_file: {cert}\n  key_file: {client_key}\n",
        "tls_server_config.key_file: the key in",
    ),
    "bad_client_auth_type": (
        TLS + "  client_auth_type: Sometimes\n  client_ca_file: {ca}\n",
        "tls_server_config.client_auth_type: 'Sometimes' is not one of NoClientCert, "
        "VerifyClientCertIfGiven, RequireAndVerifyClientCert",
    ),
    "request_client_cert": (
        TLS + "  client_auth_type: RequestClientCert\n  client_ca_file: {ca}\n",
        "tls_server_config.client_auth_type: RequestClientCert is not supported by this exporter",
    ),
    "require_any_client_cert": (
        TLS + "  client_auth_type: RequireAnyClientCert\n",
        "tls_server_config.client_auth_type: RequireAnyClientCert is not supported by this "
        "exporter",
    ),
    "verification_without_client_ca": (
        TLS + "  client_auth_type: RequireAndVerifyClientCert\n",
        "tls_server_config.client_ca_file: required when client_auth_type is "
        "RequireAndVerifyClientCert",
    ),
    "client_ca_without_verification": (
        TLS + "  client_ca_file: {ca}\n",
        "tls_server_config.client_auth_type: is NoClientCert",
    ),
    "client_ca_file_holds_no_certificate": (
        TLS + "  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: {key}\n",
        "tls_server_config.client_ca_file: ",
    ),
    "bad_min_version": (
        TLS + "  min_version: TLS14\n",
        "tls_server_config.min_version: 'TLS14' is not one of TLS10, TLS11, TLS12, TLS13",
    ),
    "tls10": (
        TLS + "  min_version: TLS10\n",
        "tls_server_config.min_version: TLS10 is not supported by this exporter",
    ),
    "max_below_min": (
        TLS + "  min_version: TLS13\n  max_version: TLS12\n",
        "tls_server_config.max_version: TLS12 is lower than min_version TLS13",
    ),
    "cipher_suites": (
        TLS + "  cipher_suites: [TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256]\n",
        "tls_server_config.cipher_suites: not supported by this exporter",
    ),
    "curve_preferences": (
        TLS + "  curve_preferences: [X25519]\n",
        "tls_server_config.curve_preferences: not supported by this exporter",
    ),
    "inline_key": (
        "tls_server_config:\n  cert_file: {cert}\n  key: inline-key-material\n",
        "tls_server_config.key: inline certificates and keys are not supported",
    ),
    "allowed_sans_without_required_certificate": (
        TLS + "  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: {ca}\n"
        "  client_allowed_sans: [a.example]\n",
        "tls_server_config.client_allowed_sans: needs client_auth_type RequireAndVerifyClientCert",
    ),
    "header_not_configurable": (
        "http_server_config:\n  headers:\n    Server: nginx\n",
        "http_server_config.headers.Server: this header cannot be configured",
    ),
    "header_value_not_allowed": (
        "http_server_config:\n  headers:\n    X-Frame-Options: allow\n",
        "http_server_config.headers.X-Frame-Options: 'allow' is not one of deny, sameorigin",
    ),
    "http2_not_boolean": (
        "http_server_config:\n  http2: maybe\n",
        "http_server_config.http2: must be true or false",
    ),
    "rate_limit_without_burst": (
        "rate_limit:\n  interval: 1s\n",
        "rate_limit.burst: must be a whole number of at least 1",
    ),
    "duplicate_yaml_key": (
        ALICE + "basic_auth_users:\n  bob: {hash}\n",
        "duplicate key 'basic_auth_users'",
    ),
    "not_a_mapping": ("- tls_server_config\n", "must be a YAML mapping"),
}


@pytest.mark.parametrize(
    ("template", "expected"), INVALID_WEB_CONFIGS.values(), ids=INVALID_WEB_CONFIGS.keys()
)
def test_invalid_web_config_is_rejected_naming_the_key(
    pki: Pki, tmp_path: Path, template: str, expected: str
) -> None:
    path = tmp_path / "web.yml"
    path.write_text(
        template.format(
            cert=pki.server.cert,
            key=pki.server.key,
            client_key=pki.client.key,
            ca=pki.ca,
            missing=tmp_path / "missing.crt",
            hash=bcrypt_hash(PASSWORD, rounds=4),
        )
    )
    with pytest.raises(WebConfigError) as raised:
        load_web_config(path)
    message = str(raised.value)
    assert message.startswith(f"{path}:")
    assert expected in message
    for secret in ("hunter2-plain", "inline-key-material"):
        assert secret not in message


def test_missing_web_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(WebConfigError, match="cannot read the web config file"):
        load_web_config(tmp_path / "absent.yml")


def test_encrypted_key_is_an_error_not_a_prompt(pki: Pki, tmp_path: Path) -> None:
    key = serialization.load_pem_private_key(pki.server.key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    path = tmp_path / "web.yml"
    path.write_text(
        f"tls_server_config:\n  cert_file: {pki.server.cert}\n  key_file: {encrypted}\n"
    )
    with pytest.raises(WebConfigError, match=r"tls_server_config\.key_file: .* is encrypted"):
        load_web_config(path)

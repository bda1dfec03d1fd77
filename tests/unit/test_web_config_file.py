"""Loading ``--web.config.file``: what each key does, and the one-line error of each mistake."""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest

from exporter.web.webconfig import (
    GO_CIPHER_SUITES,
    WebConfigError,
    WebConfigWatcher,
    load_web_config,
)
from tests.helpers.pki import PASSWORD, CertificateFiles, bcrypt_hash, write_certificate_files


def basic(user: str, password: str = PASSWORD) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> ssl.SSLObject:
    """Shake hands in memory and return the client's side; a refusal raises ssl.SSLError."""
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    client_side = client.wrap_bio(client_in, client_out, server_hostname="localhost")
    server_side = server.wrap_bio(server_in, server_out, server_side=True)
    for _ in range(10):
        finished = True
        for side, outgoing, peer_incoming in (
            (client_side, client_out, server_in),
            (server_side, server_out, client_in),
        ):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                finished = False
            peer_incoming.write(outgoing.read())
        if finished:
            return client_side
    raise AssertionError("the handshake did not finish")


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> CertificateFiles:
    return write_certificate_files(tmp_path_factory.mktemp("certificates"))


@pytest.fixture
def write(tmp_path: Path) -> Callable[[str], Path]:
    """Write the web config file and return its path."""
    path = tmp_path / "web.yml"

    def write_text(text: str) -> Path:
        path.write_text(text)
        return path

    return write_text


def tls(certificates: CertificateFiles, *extra: str) -> str:
    lines = [
        "tls_server_config:",
        f"  cert_file: {certificates.cert}",
        f"  key_file: {certificates.key}",
    ]
    return "\n".join([*lines, *(f"  {line}" for line in extra)]) + "\n"


def client_context(certificates: CertificateFiles) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=certificates.ca)


# --- what each key does ------------------------------------------------------------------


def test_every_toolkit_key_this_exporter_honours_loads(
    certificates: CertificateFiles, tmp_path: Path
) -> None:
    (tmp_path / "certs").mkdir()
    for source in (certificates.cert, certificates.key, certificates.ca):
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
        "  cipher_suites: [TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, TLS_AES_128_GCM_SHA256]\n"
        "  curve_preferences: [X25519]\n"
        "http_server_config:\n"
        "  http2: true\n"
        "  headers:\n"
        "    Content-Security-Policy: default-src 'self'\n"
        "rate_limit:\n"
        "  interval: 100ms\n"
        "  burst: 10\n"
        f"basic_auth_users:\n  alice: '{bcrypt_hash()}'\n"
    )
    config = load_web_config(path)
    assert config.tls is not None
    assert config.tls.cert_file == tmp_path / "certs" / "server.crt"
    assert config.tls.client_ca_file == tmp_path / "certs" / "ca.crt"
    assert config.tls.client_auth_type == "RequireAndVerifyClientCert"
    assert config.tls.client_allowed_sans == {"prometheus.monitoring.example"}
    assert config.tls.min_version is ssl.TLSVersion.TLSv1_2
    assert config.tls.context.verify_mode is ssl.CERT_REQUIRED
    assert not config.tls.context.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    assert config.headers == (("Content-Security-Policy", "default-src 'self'"),)
    assert config.http2
    assert config.rate_limiter is not None
    assert config.rate_limiter.burst == 10
    assert config.rate_limiter.interval == pytest.approx(0.1)
    assert config.basic_auth is not None
    assert asyncio.run(config.basic_auth.authorized(basic("alice")))
    assert config.notes == ()


def test_empty_file_and_empty_sections_mean_plain_http_without_auth(
    write: Callable[[str], Path],
) -> None:
    for text in ("", "# nothing yet\n", "tls_server_config:\nbasic_auth_users: {}\nrate_limit:\n"):
        config = load_web_config(write(text))
        assert config.tls is None
        assert config.basic_auth is None
        assert config.rate_limiter is None
        assert config.headers == ()


def test_keys_left_empty_take_their_defaults(
    certificates: CertificateFiles, write: Callable[[str], Path]
) -> None:
    config = load_web_config(
        write(tls(certificates, "min_version:", "max_version:", "client_auth_type: ''"))
    )
    assert config.tls is not None
    assert config.tls.min_version is ssl.TLSVersion.TLSv1_2
    assert config.tls.max_version is ssl.TLSVersion.TLSv1_3
    assert config.tls.client_auth_type == "NoClientCert"
    assert config.tls.context.options & ssl.OP_CIPHER_SERVER_PREFERENCE


@pytest.mark.parametrize(("go_name", "openssl_name"), GO_CIPHER_SUITES.items())
def test_go_cipher_suite_names_become_the_openssl_suites(
    certificates: CertificateFiles, write: Callable[[str], Path], go_name: str, openssl_name: str
) -> None:
    config = load_web_config(write(tls(certificates, f"cipher_suites: [{go_name}]")))
    assert config.tls is not None
    offered = [
        suite["name"]
        for suite in config.tls.context.get_ciphers()
        if suite["protocol"] != "TLSv1.3"
    ]
    assert offered == [openssl_name]


def test_cipher_suites_decide_the_tls12_suite_and_leave_tls13_alone(
    certificates: CertificateFiles, write: Callable[[str], Path]
) -> None:
    config = load_web_config(
        write(
            tls(
                certificates,
                "cipher_suites:",
                "  - TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
                "  - TLS_AES_128_GCM_SHA256",  # a TLS 1.3 suite: accepted, restricts nothing
            )
        )
    )
    assert config.tls is not None
    tls12_client = client_context(certificates)
    tls12_client.maximum_version = ssl.TLSVersion.TLSv1_2
    assert handshake(config.tls.context, tls12_client).cipher() == (
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "TLSv1.2",
        256,
    )
    tls13_client = client_context(certificates)
    tls13_client.minimum_version = ssl.TLSVersion.TLSv1_3
    tls13_client.set_ciphers("ECDHE-ECDSA-AES256-GCM-SHA384")  # has no effect on TLS 1.3
    assert handshake(config.tls.context, tls13_client).version() == "TLSv1.3"


def test_only_tls13_cipher_suites_serve_only_tls13_as_go_does(
    certificates: CertificateFiles, write: Callable[[str], Path]
) -> None:
    config = load_web_config(write(tls(certificates, "cipher_suites: [TLS_AES_256_GCM_SHA384]")))
    assert config.tls is not None
    assert config.tls.min_version is ssl.TLSVersion.TLSv1_3
    assert len(config.notes) == 1
    assert config.notes[0].startswith("tls_server_config.cipher_suites: lists only TLS 1.3")
    tls12_client = client_context(certificates)
    tls12_client.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError):
        handshake(config.tls.context, tls12_client)
    assert handshake(config.tls.context, client_context(certificates)).version() == "TLSv1.3"


def test_one_curve_is_the_only_one_offered(
    certificates: CertificateFiles, write: Callable[[str], Path]
) -> None:
    config = load_web_config(write(tls(certificates, "curve_preferences: [CurveP384]")))
    assert config.tls is not None
    assert config.notes == ()
    for client_curve, works in (("secp384r1", True), ("prime256v1", False)):
        client = client_context(certificates)
        client.set_ecdh_curve(client_curve)
        if works:
            handshake(config.tls.context, client)
        else:
            with pytest.raises(ssl.SSLError):
                handshake(config.tls.context, client)


def test_several_curves_leave_openssls_defaults_and_say_so_once(
    certificates: CertificateFiles, write: Callable[[str], Path], caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tls(certificates, "curve_preferences: [CurveP256, CurveP384, CurveP521, X25519]"))
    config = load_web_config(path)
    assert config.tls is not None
    assert len(config.notes) == 1
    assert "curve_preferences: Python's ssl module sets one curve, not 4" in config.notes[0]
    for client_curve in ("prime256v1", "secp384r1", "secp521r1", "X25519"):
        client = client_context(certificates)
        client.set_ecdh_curve(client_curve)
        handshake(config.tls.context, client)

    watcher = WebConfigWatcher(path)
    assert not watcher.check()
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "curve_preferences" in warnings[0].__dict__["note"]


def test_http2_is_accepted_but_alpn_offers_http11_only(
    certificates: CertificateFiles, write: Callable[[str], Path]
) -> None:
    config = load_web_config(write(tls(certificates) + "http_server_config:\n  http2: true\n"))
    assert config.tls is not None
    client = client_context(certificates)
    client.set_alpn_protocols(["h2", "http/1.1"])
    assert handshake(config.tls.context, client).selected_alpn_protocol() == "http/1.1"


@pytest.mark.parametrize(("written", "expected"), [("y", True), ("off", False), ("n", False)])
def test_yaml_11_booleans_are_read_as_go_reads_them(
    write: Callable[[str], Path], written: str, expected: bool
) -> None:
    config = load_web_config(write(f"http_server_config:\n  http2: {written}\n"))
    assert config.http2 is expected


def test_user_names_are_read_as_written_as_go_does(write: Callable[[str], Path]) -> None:
    hashed = bcrypt_hash()
    config = load_web_config(
        write(f"basic_auth_users:\n  123: '{hashed}'\n  0123: '{hashed}'\n  yes: '{hashed}'\n")
    )
    assert config.basic_auth is not None
    assert config.basic_auth.users == {"123", "0123", "yes"}
    assert asyncio.run(config.basic_auth.authorized(basic("0123")))
    assert not asyncio.run(config.basic_auth.authorized(basic("83")))  # 0123 read as octal


def test_header_values_are_read_as_written_as_go_does(write: Callable[[str], Path]) -> None:
    config = load_web_config(
        write(
            "http_server_config:\n  headers:\n"
            "    X-XSS-Protection: 0\n    Strict-Transport-Security: max-age=31536000\n"
        )
    )
    assert config.headers == (
        ("X-XSS-Protection", "0"),
        ("Strict-Transport-Security", "max-age=31536000"),
    )


def test_rate_limit_interval_zero_is_off(write: Callable[[str], Path]) -> None:
    assert load_web_config(write("rate_limit:\n  interval: 0s\n  burst: 0\n")).rate_limiter is None


def test_numeric_and_quoted_spellings_of_one_user_are_one_key(
    write: Callable[[str], Path],
) -> None:
    hashed = bcrypt_hash()
    path = write(f"basic_auth_users:\n  123: '{hashed}'\n  '123': '{hashed}'\n")
    with pytest.raises(WebConfigError, match=f"^{path}:3:3: duplicate key '123'$"):
        load_web_config(path)


# --- invalid files -----------------------------------------------------------------------

TLS = "tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
ALICE = "basic_auth_users:\n  alice: '{hash}'\n"

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
    "section_not_a_mapping": (
        "tls_server_config: yes\n",
        "tls_server_config: must be a mapping of keys to values",
    ),
    "plain_text_password": (
        "basic_auth_users:\n  alice: hunter2-plain\n",
        "basic_auth_users.alice: not a bcrypt hash",
    ),
    "unsupported_bcrypt_variant": (
        "basic_auth_users:\n  alice: '$2x$05$" + "a" * 53 + "'\n",
        "basic_auth_users.alice: not a bcrypt hash",
    ),
    "hash_of_numeric_user": (
        "basic_auth_users:\n  123: hunter2-plain\n",
        "basic_auth_users.123: not a bcrypt hash",
    ),
    "user_name_with_colon": (
        "basic_auth_users:\n  'al:ice': '{hash}'\n",
        "basic_auth_users.al:ice: a user name cannot contain ':'",
    ),
    "empty_user_name": (
        "basic_auth_users:\n  '': '{hash}'\n",
        "basic_auth_users: a user name must be a non-empty string",
    ),
    "users_not_a_mapping": (
        "basic_auth_users: [alice]\n",
        "basic_auth_users: must be a mapping of user names to bcrypt hashes",
    ),
    "missing_key_file": (
        "tls_server_config:\n  cert_file: {cert}\n",
        "tls_server_config.key_file: required when tls_server_config is set",
    ),
    "tls_settings_without_certificate": (
        "tls_server_config:\n  min_version: TLS13\n",
        "tls_server_config.cert_file: required when tls_server_config is set",
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
        "tls_server_config:\n  cert_file: {cert}\n  key_file: {other_key}\n",
        "tls_server_config.key_file: the key in",
    ),
    "bad_client_auth_type": (
        TLS + "  client_auth_type: Sometimes\n  client_ca_file: {ca}\n",
        "tls_server_config.client_auth_type: 'Sometimes' is not one of NoClientCert, "
        "VerifyClientCertIfGiven, RequireAndVerifyClientCert",
    ),
    "request_client_cert": (
        TLS + "  client_auth_type: RequestClientCert\n  client_ca_file: {ca}\n",
        "tls_server_config.client_auth_type: RequestClientCert is not supported by this exporter: "
        "it asks for a client certificate without verifying it, which Python's ssl module "
        "cannot do",
    ),
    "require_any_client_cert": (
        TLS + "  client_auth_type: RequireAnyClientCert\n",
        "tls_server_config.client_auth_type: RequireAnyClientCert is not supported by this "
        "exporter",
    ),
    "require_client_cert_old_spelling": (
        TLS + "  client_auth_type: RequireClientCert\n",
        "tls_server_config.client_auth_type: RequireClientCert is not supported by this exporter",
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
    "client_ca_file_and_client_ca": (
        TLS + "  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: {ca}\n"
        "  client_ca: not a certificate\n",
        "tls_server_config.client_ca: set client_ca_file or client_ca, not both",
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
        "tls_server_config.min_version: TLS10 is not supported by this exporter: its OpenSSL "
        "refuses TLS 1.0 and 1.1 at the default security level",
    ),
    "tls11_max": (
        TLS + "  max_version: TLS11\n",
        "tls_server_config.max_version: TLS11 is not supported by this exporter",
    ),
    "max_below_min": (
        TLS + "  min_version: TLS13\n  max_version: TLS12\n",
        "tls_server_config.max_version: TLS12 is lower than min_version TLS13",
    ),
    "unknown_cipher_suite": (
        TLS + "  cipher_suites: [TLS_AES_128_GCM_SHA256, TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305]\n",
        "tls_server_config.cipher_suites[1]: 'TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305' is not a "
        "cipher suite exporter-toolkit knows; did you mean "
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256?",
    ),
    "insecure_cipher_suite": (
        TLS + "  cipher_suites: [TLS_RSA_WITH_3DES_EDE_CBC_SHA]\n",
        "tls_server_config.cipher_suites[0]: TLS_RSA_WITH_3DES_EDE_CBC_SHA is one of Go's "
        "insecure cipher suites, which exporter-toolkit refuses",
    ),
    "cipher_suites_not_a_list": (
        TLS + "  cipher_suites: TLS_AES_128_GCM_SHA256\n",
        "tls_server_config.cipher_suites: must be a list",
    ),
    "only_tls13_suites_with_max_tls12": (
        TLS + "  max_version: TLS12\n  cipher_suites: [TLS_AES_128_GCM_SHA256]\n",
        "tls_server_config.cipher_suites: lists only TLS 1.3 suites, and max_version is TLS12",
    ),
    "unknown_curve": (
        TLS + "  curve_preferences: [X25519, P256]\n",
        "tls_server_config.curve_preferences[1]: 'P256' is not one of CurveP256, CurveP384, "
        "CurveP521, X25519",
    ),
    "prefer_server_cipher_suites_not_boolean": (
        TLS + "  prefer_server_cipher_suites: 'yes'\n",
        "tls_server_config.prefer_server_cipher_suites: must be true or false",
    ),
    "inline_key": (
        "tls_server_config:\n  cert_file: {cert}\n  key: inline-key-material\n",
        "tls_server_config.key: inline certificates and keys are not supported",
    ),
    "inline_cert": (
        "tls_server_config:\n  cert: inline-key-material\n  key_file: {key}\n",
        "tls_server_config.cert: inline certificates and keys are not supported by this "
        "exporter: write it to a file and set cert_file",
    ),
    "allowed_sans_without_required_certificate": (
        TLS + "  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: {ca}\n"
        "  client_allowed_sans: [a.example]\n",
        "tls_server_config.client_allowed_sans: needs client_auth_type RequireAndVerifyClientCert",
    ),
    "empty_allowed_sans": (
        TLS + "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {ca}\n"
        "  client_allowed_sans: []\n",
        "tls_server_config.client_allowed_sans: is empty, which would refuse every client",
    ),
    "header_not_configurable": (
        "http_server_config:\n  headers:\n    Server: nginx\n",
        "http_server_config.headers.Server: this header cannot be configured",
    ),
    "header_value_not_allowed": (
        "http_server_config:\n  headers:\n    X-Frame-Options: allow\n",
        "http_server_config.headers.X-Frame-Options: 'allow' is not one of deny, sameorigin",
    ),
    "header_value_empty": (
        "http_server_config:\n  headers:\n    X-XSS-Protection:\n",
        "http_server_config.headers.X-XSS-Protection: must be a non-empty string",
    ),
    "http2_not_boolean": (
        "http_server_config:\n  http2: maybe\n",
        "http_server_config.http2: must be true or false",
    ),
    "rate_limit_without_burst": (
        "rate_limit:\n  interval: 1s\n",
        "rate_limit.burst: must be a whole number of at least 1",
    ),
    "rate_limit_burst_without_interval": (
        "rate_limit:\n  burst: 5\n",
        "rate_limit.burst: has no effect without rate_limit.interval",
    ),
    "rate_limit_burst_not_a_number": (
        "rate_limit:\n  interval: 1s\n  burst: lots\n",
        "rate_limit.burst: must be a whole number",
    ),
    "rate_limit_bad_interval": (
        "rate_limit:\n  interval: soon\n  burst: 1\n",
        "rate_limit.interval: 'soon' is not a duration",
    ),
    "duplicate_yaml_key": (
        ALICE + "basic_auth_users:\n  bob: '{hash}'\n",
        "duplicate key 'basic_auth_users'",
    ),
    "yaml_syntax_error": ("http_server_config: [\n", "web.yml:2:1: "),
    "not_a_mapping": ("- tls_server_config\n", "must be a YAML mapping"),
}


@pytest.mark.parametrize(
    ("template", "expected"), INVALID_WEB_CONFIGS.values(), ids=INVALID_WEB_CONFIGS.keys()
)
def test_invalid_web_config_is_rejected_naming_the_key(
    certificates: CertificateFiles, tmp_path: Path, template: str, expected: str
) -> None:
    path = tmp_path / "web.yml"
    path.write_text(
        template.format(
            cert=certificates.cert,
            key=certificates.key,
            other_key=certificates.other_key,
            ca=certificates.ca,
            missing=tmp_path / "missing.crt",
            hash=bcrypt_hash(),
        )
    )
    with pytest.raises(WebConfigError) as raised:
        load_web_config(path)
    message = str(raised.value)
    assert message.startswith(f"{path}:")
    assert expected in message
    assert "\n" not in message
    for secret in ("hunter2-plain", "inline-key-material"):
        assert secret not in message


def test_missing_web_config_file_is_an_error_naming_the_flag(tmp_path: Path) -> None:
    with pytest.raises(WebConfigError) as raised:
        load_web_config(tmp_path / "absent.yml")
    assert str(raised.value) == (
        f"{tmp_path / 'absent.yml'}: the web config file does not exist: point "
        "--web.config.file at yours"
    )


def test_a_web_config_file_that_is_a_directory_is_said_in_words(tmp_path: Path) -> None:
    with pytest.raises(WebConfigError) as raised:
        load_web_config(tmp_path)
    assert str(raised.value) == (
        f"{tmp_path}: cannot read the web config file: it is a directory: name a file"
    )


def test_encrypted_key_is_an_error_not_a_prompt(
    certificates: CertificateFiles, tmp_path: Path
) -> None:
    path = tmp_path / "web.yml"
    path.write_text(
        f"tls_server_config:\n  cert_file: {certificates.cert}\n"
        f"  key_file: {certificates.encrypted_key}\n"
    )
    with pytest.raises(WebConfigError, match=r"tls_server_config\.key_file: .* is encrypted"):
        load_web_config(path)


def test_the_summary_says_what_the_file_turns_on(
    certificates: CertificateFiles, write: Callable[[str], Path]
) -> None:
    tls = f"tls_server_config:\n  cert_file: {certificates.cert}\n  key_file: {certificates.key}\n"
    users = f"basic_auth_users:\n  alice: '{bcrypt_hash()}'\n  bob: '{bcrypt_hash()}'\n"
    summaries = [
        load_web_config(write(text)).summary
        for text in ("", tls, users, tls + "basic_auth_users:\n  alice: " + f"'{bcrypt_hash()}'\n")
    ]
    assert summaries == [
        "TLS off, basic auth off",
        "TLS on, basic auth off",
        "TLS off, basic auth for 2 users",
        "TLS on, basic auth for 1 user",
    ]

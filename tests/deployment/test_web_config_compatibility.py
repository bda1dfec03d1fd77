"""One web config file for Go exporters and this one: ``promtool check web-config`` agrees.

Every file of the table goes through promtool (exporter-toolkit's own validation) and through
``load_web_config``; both must accept it or both refuse it. The exceptions are listed with
their reasons: files this exporter refuses on purpose, and keys newer than the toolkit that
Debian's promtool 2.42 carries (exporter-toolkit 0.8/0.9).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from exporter.web.webconfig import (
    GO_CIPHER_SUITES,
    GO_TLS13_CIPHER_SUITES,
    WebConfigError,
    load_web_config,
)
from tests.helpers.pki import bcrypt_hash, write_certificate_files
from tests.helpers.support import find_binary

pytestmark = pytest.mark.xdist_group("web-config-compatibility")


@dataclass(frozen=True)
class Case:
    """A web config file, and the key a refusal must name (None: the YAML itself is wrong)."""

    text: str
    key: str | None = None


TLS = "tls_server_config:\n  cert_file: '{cert}'\n  key_file: '{key}'\n"
WITH_CA = "  client_ca_file: '{ca}'\n"
ALICE = "basic_auth_users:\n  alice: '{hash}'\n"

CASES: dict[str, Case] = {
    # --- the file and its sections
    "empty_file": Case(""),
    "comment_only": Case("# nothing configured yet\n"),
    "empty_sections": Case("tls_server_config:\nhttp_server_config:\nbasic_auth_users:\n"),
    "empty_mappings": Case("tls_server_config: {}\nhttp_server_config: {}\nbasic_auth_users: {}\n"),
    "not_a_mapping": Case("- tls_server_config\n"),
    "scalar_document": Case("hello\n"),
    "yaml_syntax_error": Case("http_server_config: [\n"),
    "duplicate_section": Case(ALICE + "basic_auth_users:\n  bob: '{hash}'\n"),
    "unknown_top_level_key": Case("tls_server_confg:\n  cert_file: '{cert}'\n", "tls_server_confg"),
    "section_not_a_mapping": Case("tls_server_config: yes\n", "tls_server_config"),
    # --- tls_server_config
    "tls_minimal": Case(TLS),
    "tls_every_key_go_knows": Case(
        TLS + WITH_CA + "  client_auth_type: RequireAndVerifyClientCert\n"
        "  min_version: TLS12\n  max_version: TLS13\n"
        "  cipher_suites: [TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, TLS_AES_128_GCM_SHA256]\n"
        "  curve_preferences: [X25519]\n  prefer_server_cipher_suites: false\n"
    ),
    "unknown_tls_key": Case(TLS + "  cert_fil: '{cert}'\n", "tls_server_config.cert_fil"),
    "missing_cert_file": Case(
        "tls_server_config:\n  key_file: '{key}'\n", "tls_server_config.cert_file"
    ),
    "missing_key_file": Case(
        "tls_server_config:\n  cert_file: '{cert}'\n", "tls_server_config.key_file"
    ),
    "empty_cert_file": Case(
        "tls_server_config:\n  cert_file: ''\n  key_file: '{key}'\n", "tls_server_config.cert_file"
    ),
    "cert_file_not_found": Case(
        "tls_server_config:\n  cert_file: '{missing}'\n  key_file: '{key}'\n",
        "tls_server_config.cert_file",
    ),
    "cert_file_holds_a_key": Case(
        "tls_server_config:\n  cert_file: '{key}'\n  key_file: '{key}'\n",
        "tls_server_config.cert_file",
    ),
    "key_does_not_match": Case(
        "tls_server_config:\n  cert_file: '{cert}'\n  key_file: '{other_key}'\n",
        "tls_server_config.key_file",
    ),
    "encrypted_key": Case(
        "tls_server_config:\n  cert_file: '{cert}'\n  key_file: '{encrypted_key}'\n",
        "tls_server_config.key_file",
    ),
    "inline_cert": Case(
        "tls_server_config:\n  cert: inline-material\n  key_file: '{key}'\n",
        "tls_server_config.cert",
    ),
    "inline_key": Case(
        "tls_server_config:\n  cert_file: '{cert}'\n  key: inline-material\n",
        "tls_server_config.key",
    ),
    # each TLS version
    "min_version_tls10": Case(TLS + "  min_version: TLS10\n", "tls_server_config.min_version"),
    "min_version_tls11": Case(TLS + "  min_version: TLS11\n", "tls_server_config.min_version"),
    "min_version_tls12": Case(TLS + "  min_version: TLS12\n"),
    "min_version_tls13": Case(TLS + "  min_version: TLS13\n"),
    "max_version_tls12": Case(TLS + "  max_version: TLS12\n"),
    "only_tls13": Case(TLS + "  min_version: TLS13\n  max_version: TLS13\n"),
    "min_version_unknown": Case(TLS + "  min_version: TLS14\n", "tls_server_config.min_version"),
    "min_version_lower_case": Case(TLS + "  min_version: tls12\n", "tls_server_config.min_version"),
    "min_version_number": Case(TLS + "  min_version: 12\n", "tls_server_config.min_version"),
    "max_version_below_min_version": Case(
        TLS + "  min_version: TLS13\n  max_version: TLS12\n", "tls_server_config.max_version"
    ),
    "version_settings_without_certificate": Case(
        "tls_server_config:\n  min_version: TLS13\n", "tls_server_config.cert_file"
    ),
    # each client_auth_type
    "no_client_cert": Case(TLS + "  client_auth_type: NoClientCert\n"),
    "client_auth_type_empty": Case(TLS + "  client_auth_type: ''\n"),
    "verify_client_cert_if_given": Case(
        TLS + WITH_CA + "  client_auth_type: VerifyClientCertIfGiven\n"
    ),
    "require_and_verify_client_cert": Case(
        TLS + WITH_CA + "  client_auth_type: RequireAndVerifyClientCert\n"
    ),
    "request_client_cert": Case(
        TLS + "  client_auth_type: RequestClientCert\n", "tls_server_config.client_auth_type"
    ),
    "require_any_client_cert": Case(
        TLS + "  client_auth_type: RequireAnyClientCert\n", "tls_server_config.client_auth_type"
    ),
    "require_client_cert_old_spelling": Case(
        TLS + "  client_auth_type: RequireClientCert\n", "tls_server_config.client_auth_type"
    ),
    "client_auth_type_unknown": Case(
        TLS + WITH_CA + "  client_auth_type: Sometimes\n", "tls_server_config.client_auth_type"
    ),
    "client_ca_without_client_auth": Case(TLS + WITH_CA, "tls_server_config.client_auth_type"),
    "client_ca_file_not_found": Case(
        TLS + "  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: '{missing}'\n",
        "tls_server_config.client_ca_file",
    ),
    "client_ca_file_holds_no_certificate": Case(
        TLS + "  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: '{key}'\n",
        "tls_server_config.client_ca_file",
    ),
    "verification_without_client_ca": Case(
        TLS + "  client_auth_type: RequireAndVerifyClientCert\n",
        "tls_server_config.client_ca_file",
    ),
    # cipher suites: Go's names, good and bad, and TLS 1.3's
    "cipher_suites_every_go_name": Case(
        TLS + f"  cipher_suites: [{', '.join([*GO_CIPHER_SUITES, *GO_TLS13_CIPHER_SUITES])}]\n"
    ),
    "cipher_suites_ecdhe_gcm": Case(
        TLS + "  cipher_suites:\n"
        "    - TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256\n"
        "    - TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384\n"
    ),
    "cipher_suites_chacha20": Case(
        TLS + "  cipher_suites: [TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256]\n"
    ),
    "cipher_suites_rsa_key_exchange": Case(
        TLS + "  cipher_suites: [TLS_RSA_WITH_AES_128_GCM_SHA256, TLS_RSA_WITH_AES_128_CBC_SHA]\n"
    ),
    "cipher_suites_cbc_sha": Case(
        TLS + "  cipher_suites: [TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA, "
        "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA]\n"
    ),
    "cipher_suites_only_tls13": Case(
        TLS + "  cipher_suites: [TLS_AES_256_GCM_SHA384, TLS_CHACHA20_POLY1305_SHA256]\n"
    ),
    "cipher_suites_only_tls13_with_max_tls12": Case(
        TLS + "  max_version: TLS12\n  cipher_suites: [TLS_AES_128_GCM_SHA256]\n",
        "tls_server_config.cipher_suites",
    ),
    "cipher_suites_empty": Case(TLS + "  cipher_suites: []\n"),
    "cipher_suite_old_chacha20_name": Case(
        TLS + "  cipher_suites: [TLS_AES_128_GCM_SHA256, TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305]\n",
        "tls_server_config.cipher_suites[1]",
    ),
    "cipher_suite_insecure_3des": Case(
        TLS + "  cipher_suites: [TLS_RSA_WITH_3DES_EDE_CBC_SHA]\n",
        "tls_server_config.cipher_suites[0]",
    ),
    "cipher_suite_insecure_cbc_sha256": Case(
        TLS + "  cipher_suites: [TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256]\n",
        "tls_server_config.cipher_suites[0]",
    ),
    "cipher_suite_openssl_name": Case(
        TLS + "  cipher_suites: [ECDHE-RSA-AES128-GCM-SHA256]\n",
        "tls_server_config.cipher_suites[0]",
    ),
    "cipher_suites_not_a_list": Case(
        TLS + "  cipher_suites: TLS_AES_128_GCM_SHA256\n", "tls_server_config.cipher_suites"
    ),
    # curves
    "curve_one": Case(TLS + "  curve_preferences: [CurveP384]\n"),
    "curves_every_go_name": Case(
        TLS + "  curve_preferences: [CurveP256, CurveP384, CurveP521, X25519]\n"
    ),
    "curves_empty": Case(TLS + "  curve_preferences: []\n"),
    "curve_unknown": Case(
        TLS + "  curve_preferences: [X25519, P256]\n", "tls_server_config.curve_preferences[1]"
    ),
    "curve_openssl_name": Case(
        TLS + "  curve_preferences: [prime256v1]\n", "tls_server_config.curve_preferences[0]"
    ),
    "prefer_server_cipher_suites_false": Case(TLS + "  prefer_server_cipher_suites: false\n"),
    "prefer_server_cipher_suites_quoted": Case(
        TLS + "  prefer_server_cipher_suites: 'yes'\n",
        "tls_server_config.prefer_server_cipher_suites",
    ),
    # keys newer than promtool 2.42, which refuses them all as unknown (NEWER_THAN_PROMTOOL);
    # where this exporter refuses one too, they agree for that reason alone
    "client_allowed_sans": Case(
        TLS + WITH_CA + "  client_auth_type: RequireAndVerifyClientCert\n"
        "  client_allowed_sans: [prometheus.example]\n"
    ),
    "client_allowed_sans_empty": Case(
        TLS + WITH_CA + "  client_auth_type: RequireAndVerifyClientCert\n"
        "  client_allowed_sans: []\n",
        "tls_server_config.client_allowed_sans",
    ),
    "client_ca_inline": Case(
        TLS + "  client_auth_type: VerifyClientCertIfGiven\n  client_ca: |\n{ca_text}"
    ),
    # --- http_server_config
    "http2_true": Case("http_server_config:\n  http2: true\n"),
    "http2_false": Case("http_server_config:\n  http2: false\n"),
    "http2_yaml_11_y": Case("http_server_config:\n  http2: y\n"),
    "http2_not_boolean": Case("http_server_config:\n  http2: maybe\n", "http_server_config.http2"),
    "http2_quoted": Case("http_server_config:\n  http2: 'true'\n", "http_server_config.http2"),
    "http2_number": Case("http_server_config:\n  http2: 1\n", "http_server_config.http2"),
    "unknown_http_key": Case("http_server_config:\n  http3: true\n", "http_server_config.http3"),
    "headers_every_allowed_one": Case(
        "http_server_config:\n  headers:\n"
        "    Strict-Transport-Security: max-age=31536000; includeSubDomains\n"
        "    X-Content-Type-Options: nosniff\n"
        "    X-Frame-Options: sameorigin\n"
        "    X-XSS-Protection: 1; mode=block\n"
        "    Content-Security-Policy: default-src 'self'\n"
    ),
    "header_value_number": Case("http_server_config:\n  headers:\n    X-XSS-Protection: 0\n"),
    "header_value_decimal": Case("http_server_config:\n  headers:\n    X-XSS-Protection: 1.0\n"),
    "header_value_boolean": Case(
        "http_server_config:\n  headers:\n    Strict-Transport-Security: yes\n"
    ),
    "header_value_empty": Case(
        "http_server_config:\n  headers:\n    X-XSS-Protection: ''\n",
        "http_server_config.headers.X-XSS-Protection",
    ),
    "header_not_configurable": Case(
        "http_server_config:\n  headers:\n    Server: nginx\n", "http_server_config.headers.Server"
    ),
    "header_value_not_allowed": Case(
        "http_server_config:\n  headers:\n    X-Frame-Options: allow\n",
        "http_server_config.headers.X-Frame-Options",
    ),
    "header_value_wrong_case": Case(
        "http_server_config:\n  headers:\n    X-Frame-Options: DENY\n",
        "http_server_config.headers.X-Frame-Options",
    ),
    "headers_not_a_mapping": Case(
        "http_server_config:\n  headers: [X-Frame-Options]\n", "http_server_config.headers"
    ),
    # --- rate_limit: newer than promtool 2.42, like client_allowed_sans above
    "rate_limit": Case("rate_limit:\n  interval: 1s\n  burst: 10\n"),
    "rate_limit_off": Case("rate_limit:\n  interval: 0s\n  burst: 0\n"),
    "rate_limit_without_burst": Case("rate_limit:\n  interval: 1s\n", "rate_limit.burst"),
    "rate_limit_bad_interval": Case("rate_limit:\n  interval: soon\n", "rate_limit.interval"),
    # --- basic_auth_users
    "users_every_bcrypt_prefix": Case(
        "basic_auth_users:\n  alice: '{hash}'\n  bob: '{hash_2a}'\n  carol: '{hash_2y}'\n"
    ),
    "user_name_numeric": Case("basic_auth_users:\n  123: '{hash}'\n"),
    "user_name_numeric_quoted": Case("basic_auth_users:\n  '123': '{hash}'\n"),
    "user_name_octal_looking": Case("basic_auth_users:\n  0123: '{hash}'\n"),
    "user_name_boolean_looking": Case("basic_auth_users:\n  yes: '{hash}'\n"),
    "user_name_numeric_twice": Case("basic_auth_users:\n  123: '{hash}'\n  '123': '{hash}'\n"),
    "user_name_with_colon": Case(
        "basic_auth_users:\n  'al:ice': '{hash}'\n", "basic_auth_users.al:ice"
    ),
    "user_name_empty": Case("basic_auth_users:\n  '': '{hash}'\n", "basic_auth_users"),
    "plain_text_password": Case(
        "basic_auth_users:\n  alice: hunter2-plain\n", "basic_auth_users.alice"
    ),
    "hash_too_short": Case(
        "basic_auth_users:\n  alice: '{hash_short}'\n", "basic_auth_users.alice"
    ),
    "hash_cost_below_4": Case(
        "basic_auth_users:\n  alice: '{hash_cost_3}'\n", "basic_auth_users.alice"
    ),
    "hash_unsupported_bcrypt_variant": Case(
        "basic_auth_users:\n  alice: '{hash_2x}'\n", "basic_auth_users.alice"
    ),
    "hash_with_characters_bcrypt_never_writes": Case(
        "basic_auth_users:\n  alice: '$2b$04$" + "!" * 53 + "'\n", "basic_auth_users.alice"
    ),
    "hash_empty": Case("basic_auth_users:\n  alice:\n", "basic_auth_users.alice"),
    "users_not_a_mapping": Case("basic_auth_users: [alice]\n", "basic_auth_users"),
    # --- all together
    "everything_go_knows": Case(
        TLS + WITH_CA + "  client_auth_type: VerifyClientCertIfGiven\n"
        "  cipher_suites: [TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256]\n"
        "http_server_config:\n  http2: false\n  headers:\n    X-Frame-Options: deny\n" + ALICE
    ),
}

# Files promtool accepts and this exporter refuses, naming the key, on purpose.
STRICTER_ON_PURPOSE: dict[str, str] = {
    "min_version_tls10": "OpenSSL refuses TLS 1.0 at its default security level",
    "min_version_tls11": "OpenSSL refuses TLS 1.1 at its default security level",
    "request_client_cert": "Python's ssl cannot ask for a client certificate without verifying it",
    "require_any_client_cert": "Python's ssl cannot accept a client certificate unverified",
    "require_client_cert_old_spelling": "the toolkit's old name of RequireAnyClientCert",
    "verification_without_client_ca": (
        "Go would verify clients against the system's CAs, admitting any publicly issued "
        "certificate; this exporter asks for client_ca_file"
    ),
    "client_ca_file_holds_no_certificate": (
        "Go skips what is not a certificate and then trusts no client at all"
    ),
    "max_version_below_min_version": "Go accepts it, then fails every handshake",
    "cipher_suites_only_tls13_with_max_tls12": (
        "Go accepts it, then fails every handshake: TLS 1.2 is left without a suite"
    ),
    "version_settings_without_certificate": (
        "Go ignores the TLS settings and serves plain HTTP; refusing says that TLS is off"
    ),
    "header_value_empty": "an empty header value is a mistake, not a setting",
    "user_name_with_colon": "basic auth splits at the first colon, so this user never matches",
    "user_name_empty": "an empty user name is a YAML slip (a '' or ~ key), not a user",
    "hash_unsupported_bcrypt_variant": (
        "Go's bcrypt.Cost takes any $2?$ prefix; Python's bcrypt checks $2a$, $2b$, $2y$ only"
    ),
    "hash_with_characters_bcrypt_never_writes": (
        "Go's bcrypt.Cost checks only the prefix, cost and length; no password matches this"
    ),
}

# Keys exporter-toolkit added after the version promtool 2.42 carries: promtool does not know
# them, this exporter honours them.
NEWER_THAN_PROMTOOL: dict[str, str] = {
    "client_allowed_sans": "client_allowed_sans: exporter-toolkit 0.10",
    "client_ca_inline": "client_ca: exporter-toolkit 0.11",
    "rate_limit": "rate_limit: exporter-toolkit 0.15",
    "rate_limit_off": "rate_limit: exporter-toolkit 0.15",
}


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    says: str


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every case's file, with real certificates, keys and hashes filled in."""
    directory = tmp_path_factory.mktemp("web-configs")
    certificates = write_certificate_files(directory)
    hashed = bcrypt_hash()
    placeholders = {
        "cert": str(certificates.cert),
        "key": str(certificates.key),
        "ca": str(certificates.ca),
        "ca_text": "".join(f"    {line}\n" for line in certificates.ca.read_text().splitlines()),
        "other_key": str(certificates.other_key),
        "encrypted_key": str(certificates.encrypted_key),
        "missing": str(directory / "missing.crt"),
        "hash": hashed,
        "hash_2a": hashed.replace("$2b$", "$2a$", 1),
        "hash_2y": hashed.replace("$2b$", "$2y$", 1),
        "hash_2x": hashed.replace("$2b$", "$2x$", 1),
        "hash_short": hashed[:40],
        "hash_cost_3": hashed.replace("$04$", "$03$", 1),
    }
    paths = {}
    for name, case in CASES.items():
        text = case.text
        # Not str.format: the YAML has braces of its own.
        for placeholder, value in placeholders.items():
            text = text.replace(f"{{{placeholder}}}", value)
        paths[name] = directory / f"{name}.yml"
        paths[name].write_text(text)
    return paths


@pytest.fixture(scope="module")
def promtool_verdicts(written: dict[str, Path]) -> dict[str, Verdict]:
    """What ``promtool check web-config`` says of each file: one run for all, to be quick."""
    promtool = find_binary("promtool")
    result = subprocess.run(
        [promtool, "check", "web-config", *map(str, written.values())],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # One "FILE SUCCESS" or "FILE FAILED: error" per file; an error may go on for more lines.
    names = {f"{path} ": name for name, path in written.items()}
    said: dict[str, list[str]] = {}
    current: list[str] = []
    for line in (result.stdout + result.stderr).splitlines():
        name = next((name for prefix, name in names.items() if line.startswith(prefix)), None)
        if name is not None:
            current = said[name] = [line]
        else:
            current.append(line)
    assert set(said) == set(written), result.stderr
    return {
        name: Verdict(lines[0].endswith(" SUCCESS"), " ".join(lines))
        for name, lines in said.items()
    }


def our_verdict(path: Path) -> Verdict:
    try:
        load_web_config(path)
    except WebConfigError as error:
        return Verdict(accepted=False, says=str(error))
    return Verdict(accepted=True, says="")


def test_the_exceptions_are_cases_of_the_table() -> None:
    assert len(CASES) >= 40
    assert set(STRICTER_ON_PURPOSE) <= set(CASES)
    assert set(NEWER_THAN_PROMTOOL) <= set(CASES)
    assert not set(STRICTER_ON_PURPOSE) & set(NEWER_THAN_PROMTOOL)
    for name in STRICTER_ON_PURPOSE:
        assert CASES[name].key is not None, name


@pytest.mark.parametrize("name", CASES)
def test_promtool_and_this_exporter_agree(
    written: dict[str, Path], promtool_verdicts: dict[str, Verdict], name: str
) -> None:
    case = CASES[name]
    path = written[name]
    promtool = promtool_verdicts[name]
    ours = our_verdict(path)

    if name in STRICTER_ON_PURPOSE:
        assert promtool.accepted, f"promtool now refuses it too: {promtool.says}"
        assert not ours.accepted, "this exporter accepts it"
    elif name in NEWER_THAN_PROMTOOL:
        assert not promtool.accepted
        assert "not found in type" in promtool.says
        assert ours.accepted, ours.says
    else:
        assert ours.accepted == promtool.accepted, f"promtool: {promtool.says}; we: {ours.says}"

    if not ours.accepted:
        assert "\n" not in ours.says
        assert "inline-material" not in ours.says
        assert "hunter2" not in ours.says
        if case.key is None:
            assert ours.says.startswith(f"{path}:")
        else:
            assert ours.says.startswith(f"{path}: {case.key}: "), ours.says

"""x509.py: the DER encoder, primes, RSA, the certificate, and that ssl and openssl accept them."""

from __future__ import annotations

import calendar
import hashlib
import math
import random
import re
import shutil
import socket
import ssl
import subprocess
import threading
from typing import Dict, List, Optional, Tuple

import pytest

from tnet import x509
from tnet.x509 import IdentityError

NOW = 1_700_000_000  # 2023-11-14, epoch seconds
OPENSSL = shutil.which("openssl")
IO_TIMEOUT_S = 30.0  # a handshake on a loaded machine; only a failure ever waits this long
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")


def seeded(seed: int) -> x509.RandBytes:
    """A repeatable random source (random.Random.randbytes is 3.9+)."""
    rng = random.Random(seed)
    return lambda n: rng.getrandbits(8 * n).to_bytes(n, "big")


@pytest.fixture(scope="module")
def identity() -> x509.Identity:
    return x509.make_identity("tnet test", NOW, seeded(1))


@pytest.fixture(scope="module")
def other() -> x509.Identity:
    return x509.make_identity("tnet other", NOW, seeded(2))


def key_of(ident: x509.Identity) -> Tuple[int, ...]:
    """(version, n, e, d, p, q, dp, dq, qinv) read back from the PEM key."""
    _, body, _ = read_tlv(x509.pem_to_der(ident.key_pem, "RSA PRIVATE KEY"))
    return tuple(int.from_bytes(content, "big", signed=True) for _, content, _ in children(body))


# --- A minimal DER reader, independent of the encoder ---------------------------------------


def read_tlv(data: bytes, at: int = 0) -> Tuple[int, bytes, int]:
    """(tag, content, offset after) of the TLV at ``at``."""
    tag, first = data[at], data[at + 1]
    at += 2
    if first < 0x80:
        length = first
    else:
        length = int.from_bytes(data[at : at + (first & 0x7F)], "big")
        at += first & 0x7F
    return tag, data[at : at + length], at + length


def children(content: bytes) -> List[Tuple[int, bytes, int]]:
    found, at = [], 0
    while at < len(content):
        tag, body, end = read_tlv(content, at)
        found.append((tag, body, end))
        at = end
    return found


def cert_parts(cert_der: bytes) -> Dict[str, bytes]:
    tag, body, end = read_tlv(cert_der)
    assert tag == 0x30 and end == len(cert_der)
    _, tbs_content, tbs_end = read_tlv(body)
    (_, algorithm, _), (sig_tag, signature, _) = children(body[tbs_end:])
    assert sig_tag == 0x03 and signature[0] == 0
    fields = [content for _, content, _ in children(tbs_content)]
    return {"tbs": body[:tbs_end], "algorithm": algorithm, "signature": signature[1:], "version": fields[0],
            "serial": fields[1], "issuer": fields[3], "validity": fields[4], "subject": fields[5],
            "spki": fields[6], "extensions": fields[7]}


# --- DER --------------------------------------------------------------------------------------


@pytest.mark.parametrize("length, header", [
    (0, "00"), (127, "7f"), (128, "8180"), (255, "81ff"), (256, "820100"), (65535, "82ffff"), (65536, "83010000"),
])
def test_lengths_switch_to_long_form_at_128(length, header):
    assert x509.der_length(length).hex() == header
    assert x509.der_octet_string(b"x" * length) == b"\x04" + bytes.fromhex(header) + b"x" * length


@pytest.mark.parametrize("value, encoding", [
    (0, "020100"), (1, "020101"), (127, "02017f"), (128, "02020080"), (255, "020200ff"), (256, "02020100"),
    (0x8000, "0203008000"), (-1, "0201ff"), (-128, "020180"), (-129, "0202ff7f"),
])
def test_integers_are_minimal_twos_complement(value, encoding):
    assert x509.der_integer(value).hex() == encoding


def test_a_large_integer_with_its_top_bit_set_gets_a_leading_zero():
    encoded = x509.der_integer(2**2047 + 1)  # a 2048-bit modulus
    assert encoded[:4].hex() == "02820101" and encoded[4] == 0 and encoded[5] == 0x80


@pytest.mark.parametrize("dotted, encoding", [
    ("1.2.840.113549.1.1.11", "06092a864886f70d01010b"),  # sha256WithRSAEncryption
    ("1.2.840.113549.1.1.1", "06092a864886f70d010101"),
    ("2.5.4.3", "0603550403"),
    ("2.16.840.1.101.3.4.2.1", "0609608648016503040201"),
])
def test_object_identifiers(dotted, encoding):
    assert x509.der_oid(dotted).hex() == encoding


def test_the_other_types():
    assert x509.der_null().hex() == "0500"
    assert x509.der_bit_string(b"\x01\x02").hex() == "0303000102"
    assert x509.der_utf8_string("Café").hex() == "0c05" + "Café".encode().hex()
    assert x509.der_sequence(x509.der_null(), x509.der_null()).hex() == "300405000500"
    assert x509.der_set(b"\x02\x01\x05", b"\x02\x01\x03").hex() == "3106020103020105"  # SET OF sorted
    assert x509.der_explicit(0, x509.der_integer(2)).hex() == "a003020102"
    assert x509.der_explicit(3, b"").hex() == "a300"


@pytest.mark.parametrize("when, encoding", [
    ((2023, 11, 14, 22, 13, 20), b"\x17\x0d231114221320Z"),
    ((2049, 12, 31, 23, 59, 59), b"\x17\x0d491231235959Z"),  # UTCTime's last second
    ((2050, 1, 1, 0, 0, 0), b"\x18\x0f20500101000000Z"),
])
def test_times_are_utc_time_until_2050(when, encoding):
    assert x509.der_time(calendar.timegm(when + (0, 0, 0))) == encoding


# --- Primes -----------------------------------------------------------------------------------

MERSENNE_PRIMES = [2**61 - 1, 2**89 - 1, 2**127 - 1, 2**521 - 1, 2**1279 - 1]
CARMICHAEL = [561, 1105, 1729, 2465, 2821, 6601, 8911, 41041, 825265, 321197185, 5394826801]
STRONG_PSEUDOPRIMES_BASE_2 = [2047, 3277, 4033, 3215031751]  # 3215031751 fools bases 2, 3, 5 and 7


def chernick_carmichael(above: int) -> int:
    """(6k+1)(12k+1)(18k+1) with all three factors prime and above ``above``: a Carmichael number."""
    k = above // 6
    while not all(x509.miller_rabin(f, 20, seeded(0)) for f in (6 * k + 1, 12 * k + 1, 18 * k + 1)):
        k += 1
    return (6 * k + 1) * (12 * k + 1) * (18 * k + 1)


def test_the_small_primes_are_the_primes_below_the_limit():
    assert x509.SMALL_PRIMES[:10] == (2, 3, 5, 7, 11, 13, 17, 19, 23, 29)
    assert x509.SMALL_PRIMES[-1] == 1999 and len(x509.SMALL_PRIMES) == 303


@pytest.mark.parametrize("n", MERSENNE_PRIMES)
def test_miller_rabin_passes_primes(n):
    assert x509.miller_rabin(n, x509.MILLER_RABIN_ROUNDS, seeded(n))


@pytest.mark.parametrize("n", CARMICHAEL + STRONG_PSEUDOPRIMES_BASE_2 + [(2**61 - 1) * (2**89 - 1)])
def test_miller_rabin_rejects_carmichael_numbers_and_pseudoprimes(n):
    assert x509.miller_rabin(n, x509.MILLER_RABIN_ROUNDS, seeded(n)) is False


def test_miller_rabin_rejects_a_carmichael_number_without_small_factors():
    n = chernick_carmichael(above=10**6)
    assert all(pow(a, n - 1, n) == 1 for a in (2, 3, 5, 7, 11))  # Fermat is fooled
    assert x509.miller_rabin(n, x509.MILLER_RABIN_ROUNDS, seeded(1)) is False
    assert x509.is_probable_prime(n, seeded(1)) is False


@pytest.mark.parametrize("n, prime", [
    (0, False), (1, False), (2, True), (3, True), (4, False), (1999, True), (2001, False), (2003, True),
    (1999 * 2003, False), (3_999_971, True), (4_000_037, True), (2**127 - 1, True), (2**128 + 1, False),
])
def test_is_probable_prime(n, prime):
    assert x509.is_probable_prime(n, seeded(7)) is prime


def test_generated_primes_have_the_size_and_form_asked_for():
    rng = seeded(3)
    for bits in (256, 512, 1021):
        p = x509.generate_prime(bits, rng)
        assert p.bit_length() == bits and p >> (bits - 2) == 0b11
        assert p % x509.PUBLIC_EXPONENT != 1
        assert x509.miller_rabin(p, 32, seeded(99))


def test_random_below_stays_below_and_covers_the_range():
    rng = seeded(4)
    seen = {x509.random_below(5, rng) for _ in range(200)}
    assert seen == {0, 1, 2, 3, 4}


# --- RSA --------------------------------------------------------------------------------------


def test_the_key_is_consistent(identity):
    version, n, e, d, p, q, dp, dq, qinv = key_of(identity)
    assert version == 0 and e == 65537 and n == p * q and n.bit_length() == 2048 and p > q
    assert d * e % ((p - 1) * (q - 1) // math.gcd(p - 1, q - 1)) == 1
    assert (dp, dq, qinv) == (d % (p - 1), d % (q - 1), pow(q, -1, p))
    message = 0x1234567890ABCDEF
    assert pow(pow(message, e, n), d, n) == message


def test_small_and_odd_key_sizes_are_refused():
    for bits in (1024, 2047, 2049):
        with pytest.raises(IdentityError) as caught:
            x509.generate_rsa_key(bits, seeded(0))
        assert caught.value.code == "bad-key-size"


def test_emsa_pkcs1_v15_has_the_rfc_8017_digest_info():
    encoded = x509.emsa_pkcs1_v15_sha256(b"abc", 256)
    digest_info = bytes.fromhex("3031300d060960864801650304020105000420") + hashlib.sha256(b"abc").digest()
    assert len(encoded) == 256 and encoded.startswith(b"\x00\x01\xff\xff")
    assert encoded == b"\x00\x01" + b"\xff" * (256 - 3 - len(digest_info)) + b"\x00" + digest_info


def test_the_crt_signature_is_the_textbook_one(identity):
    _, n, e, d, p, q, dp, dq, qinv = key_of(identity)
    key = x509.RsaKey(n=n, e=e, d=d, p=p, q=q, dp=dp, dq=dq, qinv=qinv)
    signature = x509.sign_sha256(key, b"message")
    m = int.from_bytes(x509.emsa_pkcs1_v15_sha256(b"message", 256), "big")
    assert int.from_bytes(signature, "big") == pow(m, d, n)
    assert "d=" not in repr(key) and str(p) not in repr(key)


def test_a_faulty_crt_half_is_caught_before_the_signature_leaves(identity):
    _, n, e, d, p, q, dp, dq, qinv = key_of(identity)
    broken = x509.RsaKey(n=n, e=e, d=d, p=p, q=q, dp=dp ^ 2, dq=dq, qinv=qinv)
    with pytest.raises(IdentityError) as caught:
        x509.sign_sha256(broken, b"message")
    assert caught.value.code == "signature-fault"


# --- The certificate --------------------------------------------------------------------------


def test_the_certificate_signature_verifies_with_the_public_key(identity):
    parts = cert_parts(identity.cert_der)
    _, n, e, *_ = key_of(identity)
    expected = x509.emsa_pkcs1_v15_sha256(parts["tbs"], 256)
    assert pow(int.from_bytes(parts["signature"], "big"), e, n).to_bytes(256, "big") == expected
    assert parts["algorithm"] == x509.der_oid(x509.OID_SHA256_WITH_RSA) + x509.der_null()


def test_the_certificate_fields(identity):
    parts = cert_parts(identity.cert_der)
    assert parts["version"] == x509.der_integer(2)  # v3
    serial = parts["serial"]
    assert len(serial) == x509.SERIAL_BYTES and 0 < serial[0] < 0x80
    common_name = x509.der_sequence(x509.der_oid("2.5.4.3"), x509.der_utf8_string("tnet test"))
    assert parts["issuer"] == parts["subject"] == x509.der_set(common_name)
    (_, not_before, _), (_, not_after, _) = children(parts["validity"])
    assert not_before == b"231113221320Z" and not_after == b"331111221320Z"  # a day early; 3650 days on
    _, extensions, _ = read_tlv(parts["extensions"])
    assert extensions == x509.der_sequence(x509.der_oid("2.5.29.19"), x509.der_octet_string(b"\x30\x00"))  # cA FALSE
    public_key = x509.der_sequence(x509.der_integer(key_of(identity)[1]), x509.der_integer(65537))
    assert parts["spki"].endswith(x509.der_bit_string(public_key))


def test_the_same_seed_makes_the_same_identity_and_another_seed_another(identity, other):
    assert x509.make_identity("tnet test", NOW, seeded(1)) == identity
    assert other.fingerprint != identity.fingerprint and other.cert_der != identity.cert_der


def test_a_unicode_common_name_is_kept_as_utf8(identity):
    _, n, e, d, p, q, dp, dq, qinv = key_of(identity)
    key = x509.RsaKey(n=n, e=e, d=d, p=p, q=q, dp=dp, dq=dq, qinv=qinv)
    cert = x509.self_signed_certificate(key, "Café ☕", NOW, seeded(5))
    assert x509.der_utf8_string("Café ☕") in cert_parts(cert)["subject"]


@pytest.mark.parametrize("name", ["", "x" * (x509.MAX_COMMON_NAME_CHARS + 1), "bad \udc80 surrogate"])
def test_bad_common_names_are_refused_before_any_key_is_made(name):
    def no_randomness(n: int) -> bytes:
        raise AssertionError("a key was being made")
    with pytest.raises(IdentityError) as caught:
        x509.make_identity(name, NOW, no_randomness)
    assert caught.value.code == "bad-common-name"


def test_the_longest_common_name_is_taken(identity):
    _, n, e, d, p, q, dp, dq, qinv = key_of(identity)
    key = x509.RsaKey(n=n, e=e, d=d, p=p, q=q, dp=dp, dq=dq, qinv=qinv)
    name = "é" * x509.MAX_COMMON_NAME_CHARS
    assert x509.der_utf8_string(name) in x509.self_signed_certificate(key, name, NOW, seeded(6))


# --- PEM and the fingerprint ----------------------------------------------------------------


def test_fingerprint_is_uppercase_hex_sha256_of_the_der(identity):
    assert x509.fingerprint(b"") == "E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855"
    assert identity.fingerprint == hashlib.sha256(identity.cert_der).hexdigest().upper()
    assert re.fullmatch("[0-9A-F]{64}", identity.fingerprint)


def test_pem_round_trips_and_finds_its_block(identity):
    assert all(len(line) <= 64 for line in identity.cert_pem.splitlines())
    assert x509.pem_to_der(identity.cert_pem) == identity.cert_der
    bundle = (identity.key_pem + identity.cert_pem).replace("\n", "\r\n").encode("ascii")
    assert x509.pem_to_der(bundle) == identity.cert_der
    assert x509.fingerprint(x509.pem_to_der(bundle)) == identity.fingerprint
    assert x509.pem_to_der(bundle, "RSA PRIVATE KEY") == x509.pem_to_der(identity.key_pem, "RSA PRIVATE KEY")


@pytest.mark.parametrize("pem", [
    "", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE", "-----BEGIN KEY-----\nAAAA\n-----END KEY-----\n",
    "-----BEGIN CERTIFICATE-----\nAA!A\n-----END CERTIFICATE-----\n",
    "-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n",
])
def test_bad_pem_is_refused(pem):
    with pytest.raises(IdentityError) as caught:
        x509.pem_to_der(pem)
    assert caught.value.code == "bad-pem"


def test_the_key_stays_out_of_the_repr(identity):
    assert "PRIVATE" not in repr(identity) and identity.fingerprint in repr(identity)


# --- Python's ssl takes it --------------------------------------------------------------------


def write_pair(ident: x509.Identity, folder) -> Tuple[str, str]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    cert.write_text(ident.cert_pem)
    key.write_text(ident.key_pem)
    return str(cert), str(key)


def server_context(ident: x509.Identity, folder, client_ca: Optional[bytes] = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*write_pair(ident, folder))
    if client_ca is not None:
        context.verify_mode = ssl.CERT_OPTIONAL
        context.load_verify_locations(cadata=client_ca)
    return context


def client_context(trusted: bytes, strict: bool, ident: Optional[x509.Identity] = None, folder=None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # LocalSend peers are found by address, their certificates name an alias
    context.load_verify_locations(cadata=trusted)
    if strict:
        context.verify_flags |= ssl.VERIFY_X509_STRICT
    if ident is not None:
        context.load_cert_chain(*write_pair(ident, folder))
    return context


def tls_exchange(server: ssl.SSLContext, client: ssl.SSLContext) -> Tuple[bytes, Optional[bytes]]:
    """Handshake over a socket pair; (the server's certificate as the client saw it, the client's as the server did)."""
    server_end, client_end = socket.socketpair()
    server_end.settimeout(IO_TIMEOUT_S)
    client_end.settimeout(IO_TIMEOUT_S)
    seen: Dict[str, Optional[bytes]] = {}

    def serve() -> None:
        try:
            with server.wrap_socket(server_end, server_side=True) as tls:
                seen["client"] = tls.getpeercert(binary_form=True)
                tls.sendall(b"hello")
        except (ssl.SSLError, OSError):
            pass  # the client's side reports the failure

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with client.wrap_socket(client_end) as tls:
            server_cert = tls.getpeercert(binary_form=True)
            received = b""
            while len(received) < 5:
                chunk = tls.recv(5 - len(received))
                if not chunk:
                    break
                received += chunk
    finally:
        server_end.close()
        thread.join(IO_TIMEOUT_S)
    assert received == b"hello" and server_cert is not None
    return server_cert, seen.get("client")


def test_ssl_loads_the_pair(identity, tmp_path):
    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(*write_pair(identity, tmp_path))


def test_ssl_refuses_a_key_of_another_identity(identity, other, tmp_path):
    cert, _ = write_pair(identity, tmp_path)
    (tmp_path / "other.pem").write_text(other.key_pem)
    with pytest.raises(ssl.SSLError):
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, str(tmp_path / "other.pem"))


@pytest.mark.parametrize("strict", [False, True])
def test_a_handshake_shows_the_client_the_server_certificate(identity, tmp_path, strict):
    server_cert, client_cert = tls_exchange(server_context(identity, tmp_path),
                                            client_context(identity.cert_der, strict))
    assert server_cert == identity.cert_der and x509.fingerprint(server_cert) == identity.fingerprint
    assert hashlib.sha256(server_cert).hexdigest().upper() == identity.fingerprint
    assert client_cert is None


def test_a_client_trusting_another_certificate_fails_the_handshake(identity, other, tmp_path):
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_exchange(server_context(identity, tmp_path), client_context(other.cert_der, strict=False))


@pytest.mark.parametrize("strict", [False, True])
def test_mutual_tls_shows_the_server_the_client_certificate(identity, other, tmp_path, strict):
    (tmp_path / "server").mkdir()
    (tmp_path / "client").mkdir()
    server = server_context(identity, tmp_path / "server", client_ca=other.cert_der)
    if strict:
        server.verify_flags |= ssl.VERIFY_X509_STRICT
    client = client_context(identity.cert_der, strict, other, tmp_path / "client")
    server_cert, client_cert = tls_exchange(server, client)
    assert server_cert == identity.cert_der
    assert client_cert == other.cert_der and x509.fingerprint(client_cert) == other.fingerprint


# --- openssl takes it ---------------------------------------------------------------------------


def openssl(*args: str) -> subprocess.CompletedProcess:
    assert OPENSSL is not None
    return subprocess.run([OPENSSL, *args], capture_output=True, text=True, timeout=IO_TIMEOUT_S)


@needs_openssl
def test_openssl_parses_the_certificate(identity, tmp_path):
    cert, _ = write_pair(identity, tmp_path)
    shown = openssl("x509", "-noout", "-text", "-in", cert)
    assert shown.returncode == 0, shown.stderr
    for expected in ("Version: 3 (0x2)", "Signature Algorithm: sha256WithRSAEncryption", "Issuer: CN = tnet test",
                     "Subject: CN = tnet test", "Public-Key: (2048 bit)", "Exponent: 65537", "CA:FALSE",
                     "Not Before: Nov 13 22:13:20 2023 GMT", "Not After : Nov 11 22:13:20 2033 GMT"):
        assert expected in shown.stdout
    printed = openssl("x509", "-noout", "-fingerprint", "-sha256", "-in", cert)
    assert printed.stdout.strip().split("=", 1)[1].replace(":", "") == identity.fingerprint


@needs_openssl
def test_openssl_checks_the_key(identity, tmp_path):
    _, key = write_pair(identity, tmp_path)
    checked = openssl("rsa", "-check", "-noout", "-in", key)
    assert checked.returncode == 0 and "RSA key ok" in checked.stdout, checked.stderr


@needs_openssl
def test_openssl_verifies_the_self_signature(identity, tmp_path):
    cert, _ = write_pair(identity, tmp_path)
    verified = openssl("verify", "-x509_strict", "-check_ss_sig", "-CAfile", cert, cert)
    assert verified.returncode == 0 and verified.stdout.strip().endswith("OK"), verified.stderr


@needs_openssl
def test_openssl_rejects_a_tampered_signature(identity, tmp_path):
    tampered = identity.cert_der[:-1] + bytes([identity.cert_der[-1] ^ 1])
    bad = tmp_path / "bad.pem"
    bad.write_text(x509.pem_encode("CERTIFICATE", tampered))
    assert openssl("verify", "-check_ss_sig", "-CAfile", str(bad), str(bad)).returncode != 0

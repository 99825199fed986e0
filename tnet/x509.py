"""A self-signed TLS identity built by hand: RSA key, DER, X.509, PEM.

Python's ``ssl`` can load a certificate but cannot make one, and tnet takes no
dependencies, so this module holds the few pieces needed to mint one:

* a small ASN.1 DER encoder (``der_*``), just the types a certificate uses;
* RSA key generation (trial division by small primes, then Miller-Rabin) from
  a caller-supplied random source, with the CRT parameters;
* PKCS#1 ``RSAPrivateKey``, ``SubjectPublicKeyInfo`` and an X.509 v3
  certificate signed sha256WithRSAEncryption (PKCS#1 v1.5), PEM wrapping;
* ``fingerprint``: what LocalSend calls a device's fingerprint in HTTPS mode,
  the SHA-256 of the DER certificate as 64 UPPERCASE hex digits, no
  separators (LocalSend's ``calculateHashOfCertificate`` and its unit test,
  app/lib/util/security_helper.dart; the protocol README, §2 Fingerprint);
* ``make_identity``, the one call the daemon makes.

It must not read clocks, files or the network: the caller passes ``now`` and
``randbytes`` and writes the PEM files itself (mode 0600). It signs only its
own certificates and verifies nothing a peer sends; it is no general
cryptography library.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable, Union

from .protocol import CodedError

RandBytes = Callable[[int], bytes]

# --- Limits -----------------------------------------------------------------------

DEFAULT_KEY_BITS = 2048  # what LocalSend generates; TLS peers all accept it
MIN_KEY_BITS = 2048  # OpenSSL's default security level refuses smaller keys
PUBLIC_EXPONENT = 65537  # the universal choice (F4)
# 4^-64 = 2^-128 worst-case chance that a composite passes, whatever picked it.
MILLER_RABIN_ROUNDS = 64
SMALL_PRIME_LIMIT = 2000  # trial division up to here rejects ~85% of odd candidates cheaply
VALIDITY_S = 3650 * 86400  # LocalSend's own certificates last 365 * 10 days
CLOCK_SKEW_S = 86400  # notBefore one day early: a peer whose clock runs behind still accepts it
MAX_COMMON_NAME_CHARS = 64  # ub-common-name, RFC 5280 appendix A
SERIAL_BYTES = 16  # 126 random bits; RFC 5280 allows up to 20 octets
UTC_TIME_LAST_YEAR = 2049  # RFC 5280 4.1.2.5: UTCTime through 2049, GeneralizedTime after

# --- Errors -----------------------------------------------------------------------


class IdentityError(CodedError):
    """A certificate or key that cannot be made or read."""


# --- DER (X.690) --------------------------------------------------------------------


def der_length(n: int) -> bytes:
    """Short form below 128, else 0x80 | count followed by the big-endian length."""
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def der_tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + der_length(len(content)) + content


def der_integer(value: int) -> bytes:
    # Two's complement in the fewest octets: a positive value whose top bit is set gains a 0x00.
    magnitude = value if value >= 0 else ~value
    return der_tlv(0x02, value.to_bytes(magnitude.bit_length() // 8 + 1, "big", signed=True))


def der_sequence(*items: bytes) -> bytes:
    return der_tlv(0x30, b"".join(items))


def der_set(*items: bytes) -> bytes:
    return der_tlv(0x31, b"".join(sorted(items)))  # DER orders a SET OF by encoding


def der_oid(dotted: str) -> bytes:
    arcs = [int(arc) for arc in dotted.split(".")]
    body = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body += bytes(reversed(chunk))
    return der_tlv(0x06, bytes(body))


def der_null() -> bytes:
    return b"\x05\x00"


def der_bit_string(data: bytes) -> bytes:
    return der_tlv(0x03, b"\x00" + data)  # whole octets only: zero unused bits


def der_octet_string(data: bytes) -> bytes:
    return der_tlv(0x04, data)


def der_utf8_string(text: str) -> bytes:
    return der_tlv(0x0C, text.encode("utf-8"))


def der_time(epoch_s: int) -> bytes:
    """UTCTime through 2049, GeneralizedTime after, always in seconds and 'Z'."""
    moment = time.gmtime(epoch_s)
    tag, form = (0x17, "%y%m%d%H%M%SZ") if moment.tm_year <= UTC_TIME_LAST_YEAR else (0x18, "%Y%m%d%H%M%SZ")
    return der_tlv(tag, time.strftime(form, moment).encode("ascii"))


def der_explicit(number: int, inner: bytes) -> bytes:
    return der_tlv(0xA0 | number, inner)  # context-specific, constructed


OID_RSA_ENCRYPTION = "1.2.840.113549.1.1.1"
OID_SHA256_WITH_RSA = "1.2.840.113549.1.1.11"
OID_COMMON_NAME = "2.5.4.3"
OID_BASIC_CONSTRAINTS = "2.5.29.19"
OID_SHA256 = "2.16.840.1.101.3.4.2.1"

# --- Primes ---------------------------------------------------------------------------


SMALL_PRIMES = tuple(n for n in range(2, SMALL_PRIME_LIMIT) if all(n % f for f in range(2, math.isqrt(n) + 1)))


def random_below(limit: int, randbytes: RandBytes) -> int:
    """A uniform integer in [0, limit), by rejection so that no value is favoured."""
    bits = limit.bit_length()
    while True:
        value = int.from_bytes(randbytes((bits + 7) // 8), "big") >> (-bits % 8)
        if value < limit:
            return value


def miller_rabin(n: int, rounds: int, randbytes: RandBytes) -> bool:
    """False if ``n`` (odd, > 3) is surely composite; True if it passed ``rounds`` random bases."""
    s = ((n - 1) & (1 - n)).bit_length() - 1  # n - 1 = d * 2^s with d odd
    d = (n - 1) >> s
    for _ in range(rounds):
        x = pow(2 + random_below(n - 3, randbytes), d, n)  # a base in [2, n - 2]
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def is_probable_prime(n: int, randbytes: RandBytes, rounds: int = MILLER_RABIN_ROUNDS) -> bool:
    for p in SMALL_PRIMES:
        if n % p == 0:
            return n == p
    if n < SMALL_PRIME_LIMIT**2:
        return n > 1  # no factor up to its square root
    return miller_rabin(n, rounds, randbytes)


def generate_prime(bits: int, randbytes: RandBytes) -> int:
    """A random prime of exactly ``bits`` bits, its top two bits set, with p - 1 coprime to e."""
    while True:
        candidate = int.from_bytes(randbytes((bits + 7) // 8), "big") >> (-bits % 8)
        candidate |= 0b11 << (bits - 2) | 1  # two top bits: the product of two has 2 * bits bits
        if candidate % PUBLIC_EXPONENT != 1 and is_probable_prime(candidate, randbytes):
            return candidate


# --- RSA ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RsaKey:
    """An RSA private key with its CRT parameters (RFC 8017 3.2)."""

    n: int
    e: int
    d: int = field(repr=False)
    p: int = field(repr=False)
    q: int = field(repr=False)
    dp: int = field(repr=False)
    dq: int = field(repr=False)
    qinv: int = field(repr=False)


def generate_rsa_key(bits: int = DEFAULT_KEY_BITS, randbytes: RandBytes = secrets.token_bytes) -> RsaKey:
    if bits < MIN_KEY_BITS or bits % 2:
        raise IdentityError("bad-key-size", f"an RSA key needs an even number of bits, at least {MIN_KEY_BITS}")
    e = PUBLIC_EXPONENT
    while True:
        p, q = generate_prime(bits // 2, randbytes), generate_prime(bits // 2, randbytes)
        if abs(p - q) >> (bits // 2 - 100):  # FIPS 186-5 A.1.3: close primes make n easy to factor
            break
    p, q = max(p, q), min(p, q)
    lam = (p - 1) * (q - 1) // math.gcd(p - 1, q - 1)
    d = pow(e, -1, lam)
    return RsaKey(n=p * q, e=e, d=d, p=p, q=q, dp=d % (p - 1), dq=d % (q - 1), qinv=pow(q, -1, p))


def rsa_public_key_der(key: RsaKey) -> bytes:
    return der_sequence(der_integer(key.n), der_integer(key.e))  # PKCS#1 RSAPublicKey


def subject_public_key_info_der(key: RsaKey) -> bytes:
    algorithm = der_sequence(der_oid(OID_RSA_ENCRYPTION), der_null())
    return der_sequence(algorithm, der_bit_string(rsa_public_key_der(key)))


def rsa_private_key_der(key: RsaKey) -> bytes:
    """PKCS#1 RSAPrivateKey, version 0 (two primes), as LocalSend stores its own."""
    values = (0, key.n, key.e, key.d, key.p, key.q, key.dp, key.dq, key.qinv)
    return der_sequence(*(der_integer(value) for value in values))


def emsa_pkcs1_v15_sha256(message: bytes, length: int) -> bytes:
    """EMSA-PKCS1-v1_5 (RFC 8017 9.2): 00 01 FF..FF 00 DigestInfo, ``length`` octets."""
    digest = hashlib.sha256(message).digest()
    digest_info = der_sequence(der_sequence(der_oid(OID_SHA256), der_null()), der_octet_string(digest))
    return b"\x00\x01" + b"\xff" * (length - len(digest_info) - 3) + b"\x00" + digest_info


def sign_sha256(key: RsaKey, message: bytes) -> bytes:
    """RSASSA-PKCS1-v1_5 with SHA-256, the private operation by the CRT."""
    length = (key.n.bit_length() + 7) // 8
    m = int.from_bytes(emsa_pkcs1_v15_sha256(message, length), "big")
    s1, s2 = pow(m, key.dp, key.p), pow(m, key.dq, key.q)
    s = s2 + key.q * (key.qinv * (s1 - s2) % key.p)
    if pow(s, key.e, key.n) != m:  # a faulty CRT half would give away a factor of n (Boneh-DeMillo-Lipton)
        raise IdentityError("signature-fault", "the signature does not verify")
    return s.to_bytes(length, "big")


# --- X.509 (RFC 5280) -------------------------------------------------------------


def _name(common_name: str) -> bytes:
    return der_sequence(der_set(der_sequence(der_oid(OID_COMMON_NAME), der_utf8_string(common_name))))


def _extensions() -> bytes:
    # Only basicConstraints, cA FALSE (the default, so DER leaves its SEQUENCE empty): an end entity,
    # which verifiers that refuse a CA certificate as a leaf (webpki) accept. LocalSend's own
    # certificates carry no extensions; peers pin the fingerprint rather than check a chain.
    basic_constraints = der_sequence(der_oid(OID_BASIC_CONSTRAINTS), der_octet_string(der_sequence()))
    return der_explicit(3, der_sequence(basic_constraints))


def _check_common_name(common_name: str) -> None:
    if not 0 < len(common_name) <= MAX_COMMON_NAME_CHARS:
        raise IdentityError("bad-common-name", f"a common name has 1 to {MAX_COMMON_NAME_CHARS} characters")
    try:
        common_name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise IdentityError("bad-common-name", "a common name must be valid Unicode") from exc


def self_signed_certificate(key: RsaKey, common_name: str, now: float,
                            randbytes: RandBytes = secrets.token_bytes) -> bytes:
    """An X.509 v3 certificate (DER), issuer = subject = CN=``common_name``, valid from ``now``."""
    _check_common_name(common_name)
    serial = int.from_bytes(randbytes(SERIAL_BYTES), "big") >> 1 | 1 << (8 * SERIAL_BYTES - 2)  # positive
    algorithm = der_sequence(der_oid(OID_SHA256_WITH_RSA), der_null())
    name = _name(common_name)
    validity = der_sequence(der_time(int(now) - CLOCK_SKEW_S), der_time(int(now) + VALIDITY_S))
    tbs = der_sequence(
        der_explicit(0, der_integer(2)),  # version v3
        der_integer(serial), algorithm, name, validity, name, subject_public_key_info_der(key), _extensions(),
    )
    return der_sequence(tbs, algorithm, der_bit_string(sign_sha256(key, tbs)))


# --- PEM (RFC 7468) and fingerprint -----------------------------------------------

PEM_LINE_CHARS = 64  # RFC 7468's strict form
_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.DOTALL)


def pem_encode(label: str, der: bytes) -> str:
    body = base64.b64encode(der).decode("ascii")
    lines = [body[i : i + PEM_LINE_CHARS] for i in range(0, len(body), PEM_LINE_CHARS)]
    return "\n".join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----", ""])


def pem_to_der(pem: Union[str, bytes], label: str = "CERTIFICATE") -> bytes:
    """The DER of the first ``label`` block in ``pem``."""
    text = pem.decode("ascii", "replace") if isinstance(pem, bytes) else pem
    for match in _PEM_BLOCK.finditer(text):
        if match.group(1) == label:
            try:
                return base64.b64decode("".join(match.group(2).split()), validate=True)
            except binascii.Error as exc:
                raise IdentityError("bad-pem", f"the {label} block is not base64") from exc
    raise IdentityError("bad-pem", f"no {label} block")


def fingerprint(cert_der: bytes) -> str:
    """LocalSend's fingerprint of a certificate: SHA-256 of its DER, 64 uppercase hex digits."""
    return hashlib.sha256(cert_der).hexdigest().upper()


# --- The identity ---------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """A key and its self-signed certificate, as PEM for ``ssl`` and DER for hashing."""

    cert_pem: str
    key_pem: str = field(repr=False)
    cert_der: bytes = field(repr=False)
    fingerprint: str


def make_identity(common_name: str, now: float, randbytes: RandBytes = secrets.token_bytes,
                  bits: int = DEFAULT_KEY_BITS) -> Identity:
    """A fresh RSA key and a certificate for it, named ``common_name``, valid from ``now`` (epoch seconds).

    Raises ``IdentityError`` ("bad-common-name", "bad-key-size").
    """
    _check_common_name(common_name)
    key = generate_rsa_key(bits, randbytes)
    cert_der = self_signed_certificate(key, common_name, now, randbytes)
    key_pem = pem_encode("RSA PRIVATE KEY", rsa_private_key_der(key))
    return Identity(pem_encode("CERTIFICATE", cert_der), key_pem, cert_der, fingerprint(cert_der))

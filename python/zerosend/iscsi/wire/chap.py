"""CHAP authentication (RFC 1994, per RFC 7143 section 12.1.3), one-way and mutual, with
SHA-256 and SHA3-256 (CHAP_A 7 and 8, RFC 7143bis and the IANA PPP registry, as LIO and
open-iscsi offer them) chosen over MD5 (5) whenever the initiator offers one of them."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

CHAP_MD5, CHAP_SHA256, CHAP_SHA3_256 = 5, 7, 8
#: CHAP_A value -> hash. A challenge is as long as the hash's digest.
DIGESTS: dict[int, Callable[[bytes], hashlib._Hash]] = {
    CHAP_MD5: hashlib.md5,
    CHAP_SHA256: hashlib.sha256,
    CHAP_SHA3_256: hashlib.sha3_256,
}
STRONG = (CHAP_SHA256, CHAP_SHA3_256)
# RFC 7143 12.1.3: a secret of fewer than 96 random bits is open to an off-line dictionary
# attack on a plain TCP connection (and then needs IPsec, which this target does not do).
MIN_SECRET_BYTES = 12


class AuthError(Exception):
    """Authentication failed; the message says why (logged, never sent to the peer)."""


@dataclass(frozen=True, slots=True)
class Credentials:
    user: str
    secret: str = field(repr=False)  # never in a log line or a traceback

    def __post_init__(self) -> None:
        if not self.user:
            raise ValueError("the CHAP user name is empty: give the name initiators log in with")
        size = len(self.secret.encode())
        if size < MIN_SECRET_BYTES:
            raise ValueError(
                f"the CHAP secret of user {self.user!r} is {size} bytes; RFC 7143 12.1.3 needs "
                f"at least {MIN_SECRET_BYTES} (96 bits): use a longer random secret"
            )

    @classmethod
    def parse(cls, spec: str) -> Credentials:
        user, sep, secret = spec.partition(":")
        if not sep or not user or not secret:
            raise ValueError(f"CHAP credentials must be USER:SECRET, got {spec!r}")
        return cls(user, secret)


def check_mutual(initiator: Credentials | None, target: Credentials | None) -> None:
    """Mutual CHAP needs its own secret: RFC 7143 12.1.3 forbids configuring a secret used to
    authenticate initiators for authenticating the target too (the peer could reflect it)."""
    if target is None:
        return
    if initiator is None:
        raise ValueError("mutual CHAP needs CHAP for initiators as well: add --chap")
    if initiator.secret == target.secret:
        raise ValueError(
            "the mutual CHAP secret is the initiators' CHAP secret; RFC 7143 12.1.3 forbids "
            "using one secret in both directions: give the target a secret of its own"
        )


def decode_binary(value: str) -> bytes:
    """CHAP binary values are 0x-hex or 0b-base64 (RFC 7143 section 6.1)."""
    try:
        if value[:2] in ("0x", "0X"):
            return bytes.fromhex(value[2:])
        if value[:2] in ("0b", "0B"):
            return base64.b64decode(value[2:], validate=True)
    except ValueError as e:
        raise AuthError(f"bad CHAP binary value: {e}") from e
    raise AuthError(f"CHAP binary value without 0x/0b prefix: {value[:20]!r}")


def response(ident: int, secret: bytes, challenge: bytes, algorithm: int = CHAP_MD5) -> bytes:
    return DIGESTS[algorithm](bytes((ident,)) + secret + challenge).digest()


def choose_algorithm(offered: str) -> int:
    """The first of SHA-256 and SHA3-256 in the initiator's order, else MD5; AuthError if the
    initiator offers none of them."""
    numbers = []
    for item in offered.split(","):
        try:
            numbers.append(int(item))
        except ValueError:
            continue  # an unknown token among known ones is not an error (RFC 7143 6.2)
    for number in numbers:
        if number in STRONG:
            return number
    if CHAP_MD5 in numbers:
        return CHAP_MD5
    raise AuthError(
        f"initiator offers CHAP_A={offered}; supported: 7 (SHA-256), 8 (SHA3-256), 5 (MD5)"
    )


class ChapServer:
    """One CHAP exchange for one login: offers a challenge, checks the answer, answers back."""

    def __init__(self, initiator: Credentials, target: Credentials | None) -> None:
        self.initiator = initiator
        self.target = target
        self.ident = secrets.randbelow(256)
        self.algorithm = CHAP_MD5
        self.challenge = b""

    def challenge_keys(self, algorithms: str) -> list[tuple[str, str]]:
        self.algorithm = choose_algorithm(algorithms)
        self.challenge = secrets.token_bytes(DIGESTS[self.algorithm](b"").digest_size)
        return [
            ("CHAP_A", str(self.algorithm)),
            ("CHAP_I", str(self.ident)),
            ("CHAP_C", "0x" + self.challenge.hex()),
        ]

    def verify(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        """Check CHAP_N/CHAP_R; for mutual CHAP return our CHAP_N/CHAP_R."""
        name = keys.get("CHAP_N")
        answer = keys.get("CHAP_R")
        if name is None or answer is None:
            raise AuthError("CHAP_N or CHAP_R missing")
        if name != self.initiator.user:
            raise AuthError(f"unknown CHAP user {name!r}")
        want = response(self.ident, self.initiator.secret.encode(), self.challenge, self.algorithm)
        if not hmac.compare_digest(want, decode_binary(answer)):
            raise AuthError(f"wrong CHAP response for user {name!r}")
        if "CHAP_I" not in keys and "CHAP_C" not in keys:
            return []
        if self.target is None:
            raise AuthError("initiator asks for mutual CHAP but no target credentials are set")
        try:
            ident = int(keys.get("CHAP_I", ""), 0)
        except ValueError as e:
            raise AuthError("bad CHAP_I from initiator") from e
        challenge = decode_binary(keys.get("CHAP_C", ""))
        if not 0 <= ident <= 255 or not challenge:
            raise AuthError("bad mutual CHAP identifier or empty challenge")
        if challenge == self.challenge:
            raise AuthError("initiator reflected our own CHAP challenge")
        ours = response(ident, self.target.secret.encode(), challenge, self.algorithm)
        return [("CHAP_N", self.target.user), ("CHAP_R", "0x" + ours.hex())]

"""CHAP authentication (RFC 1994 MD5, per RFC 7143 section 12.1.3), one-way and mutual."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

CHAP_MD5 = 5


class AuthError(Exception):
    """Authentication failed; the message says why (logged, never sent to the peer)."""


@dataclass(frozen=True, slots=True)
class Credentials:
    user: str
    secret: str

    @classmethod
    def parse(cls, spec: str) -> Credentials:
        user, sep, secret = spec.partition(":")
        if not sep or not user or not secret:
            raise ValueError(f"CHAP credentials must be USER:SECRET, got {spec!r}")
        return cls(user, secret)


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


def response(ident: int, secret: bytes, challenge: bytes) -> bytes:
    return hashlib.md5(bytes((ident,)) + secret + challenge).digest()


class ChapServer:
    """One CHAP exchange for one login: offers a challenge, checks the answer, answers back."""

    def __init__(self, initiator: Credentials, target: Credentials | None) -> None:
        self.initiator = initiator
        self.target = target
        self.ident = secrets.randbelow(256)
        self.challenge = secrets.token_bytes(16)

    def challenge_keys(self, algorithms: str) -> list[tuple[str, str]]:
        if str(CHAP_MD5) not in algorithms.split(","):
            raise AuthError(f"initiator offers CHAP_A={algorithms}, only MD5 (5) is supported")
        return [
            ("CHAP_A", str(CHAP_MD5)),
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
        want = response(self.ident, self.initiator.secret.encode(), self.challenge)
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
        ours = response(ident, self.target.secret.encode(), challenge)
        return [("CHAP_N", self.target.user), ("CHAP_R", "0x" + ours.hex())]

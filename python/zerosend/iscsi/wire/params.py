"""Operational text keys and their negotiation rules (RFC 7143 sections 6 and 13)."""

from __future__ import annotations

from dataclasses import dataclass, fields

# What this target offers. MaxRecvDataSegmentLength is what we accept per PDU; 256 KiB keeps
# a whole 128 KiB..256 KiB burst in one Data-Out.
TARGET_MAX_RECV_DSL = 262144
MAX_BURST = 1048576
FIRST_BURST = 262144

_BOOL = ("Yes", "No")


@dataclass(slots=True)
class SessionParams:
    """Negotiated values; defaults are the RFC's."""

    header_digest: bool = False
    data_digest: bool = False
    max_connections: int = 1
    initial_r2t: bool = True
    immediate_data: bool = True
    # What the initiator accepts per PDU (bounds our Data-In segments); 8192 until declared.
    initiator_max_recv_dsl: int = 8192
    # What we accept per PDU (bounds incoming segments).
    target_max_recv_dsl: int = 8192
    max_burst: int = 262144
    first_burst: int = 65536
    default_time2wait: int = 2
    default_time2retain: int = 20
    max_outstanding_r2t: int = 1
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    error_recovery_level: int = 0

    def update_from(self, other: SessionParams) -> None:
        """Take every value of ``other`` (the object others hold stays the same)."""
        for f in fields(self):
            setattr(self, f.name, getattr(other, f.name))


class NegotiationError(Exception):
    """A key value the RFC does not allow; answered with a login failure."""


def _num(value: str, key: str, lo: int, hi: int) -> int:
    try:
        n = int(value, 0)
    except ValueError as e:
        raise NegotiationError(f"{key}={value!r} is not a number") from e
    if not lo <= n <= hi:
        raise NegotiationError(f"{key}={n} outside {lo}..{hi}")
    return n


def _yes_no(value: str, key: str) -> bool:
    if value not in _BOOL:
        raise NegotiationError(f"{key}={value!r} is not Yes or No")
    return value == "Yes"


def _digest(value: str, key: str) -> tuple[bool, str]:
    # List negotiation: the first offered value we support wins.
    for choice in value.split(","):
        if choice in ("CRC32C", "None"):
            return choice == "CRC32C", choice
    return False, "Reject"


# Keys that are answered "Irrelevant" in a discovery session.
_SESSION_ONLY = {
    "MaxBurstLength",
    "FirstBurstLength",
    "InitialR2T",
    "ImmediateData",
    "MaxOutstandingR2T",
    "DataPDUInOrder",
    "DataSequenceInOrder",
}
# Declarative or informational keys that are not answered.
_NOT_ANSWERED = {
    "InitiatorName",
    "InitiatorAlias",
    "TargetName",
    "SessionType",
    "AuthMethod",
    "TargetAlias",
    "TargetAddress",
    "TargetPortalGroupTag",
}


def negotiate(
    params: SessionParams, pairs: list[tuple[str, str]], discovery: bool
) -> list[tuple[str, str]]:
    """Apply the initiator's offers to ``params`` and return our answers, in offer order."""
    out: list[tuple[str, str]] = []
    for key, value in pairs:
        if key in _NOT_ANSWERED or key.startswith("CHAP_"):
            continue
        if discovery and key in _SESSION_ONLY:
            out.append((key, "Irrelevant"))
            continue
        if key == "HeaderDigest":
            params.header_digest, answer = _digest(value, key)
        elif key == "DataDigest":
            params.data_digest, answer = _digest(value, key)
        elif key == "MaxConnections":
            params.max_connections = min(_num(value, key, 1, 65535), 1)
            answer = str(params.max_connections)
        elif key == "InitialR2T":  # OR: we do not require R2T
            params.initial_r2t = _yes_no(value, key)
            answer = value
        elif key == "ImmediateData":  # AND
            params.immediate_data = _yes_no(value, key)
            answer = value
        elif key == "MaxRecvDataSegmentLength":  # declarative, the initiator's own limit
            params.initiator_max_recv_dsl = _num(value, key, 512, 16777215)
            continue
        elif key == "MaxBurstLength":  # min
            params.max_burst = min(_num(value, key, 512, 16777215), MAX_BURST)
            answer = str(params.max_burst)
        elif key == "FirstBurstLength":  # min
            params.first_burst = min(_num(value, key, 512, 16777215), FIRST_BURST)
            answer = str(params.first_burst)
        elif key == "DefaultTime2Wait":  # max
            params.default_time2wait = max(_num(value, key, 0, 3600), 0)
            answer = str(params.default_time2wait)
        elif key == "DefaultTime2Retain":  # min: no session retention at ERL0
            _num(value, key, 0, 3600)
            params.default_time2retain = 0
            answer = "0"
        elif key == "MaxOutstandingR2T":  # min
            params.max_outstanding_r2t = min(_num(value, key, 1, 65535), 1)
            answer = str(params.max_outstanding_r2t)
        elif key == "DataPDUInOrder":  # OR; we answer Yes
            _yes_no(value, key)
            params.data_pdu_in_order = True
            answer = "Yes"
        elif key == "DataSequenceInOrder":  # OR; we answer Yes
            _yes_no(value, key)
            params.data_sequence_in_order = True
            answer = "Yes"
        elif key == "ErrorRecoveryLevel":  # min; we only do level 0
            _num(value, key, 0, 2)
            params.error_recovery_level = 0
            answer = "0"
        elif key in ("IFMarker", "OFMarker"):  # RFC 3720 markers: never used
            answer = "No"
        elif key in ("IFMarkInt", "OFMarkInt"):
            answer = "Irrelevant"
        elif key == "iSCSIProtocolLevel":
            answer = "1"
        elif key == "TaskReporting":
            answer = "RFC3720"
        elif key.startswith(("X-", "X#", "Y-", "Z-")):
            answer = "NotUnderstood"
        else:
            answer = "NotUnderstood"
        out.append((key, answer))
    # FirstBurstLength never exceeds MaxBurstLength (RFC 7143 13.14): clamped, then answered
    params.first_burst = min(params.first_burst, params.max_burst)
    return [(k, str(params.first_burst)) if k == "FirstBurstLength" and v.isdigit() else (k, v)
            for k, v in out]  # fmt: skip


def declare_target(params: SessionParams) -> list[tuple[str, str]]:
    """Our declarative keys, sent once in the operational stage."""
    params.target_max_recv_dsl = TARGET_MAX_RECV_DSL
    return [("MaxRecvDataSegmentLength", str(TARGET_MAX_RECV_DSL))]

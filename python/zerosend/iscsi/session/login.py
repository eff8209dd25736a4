"""The login phase (RFC 7143 sections 6.3 and 11.12-11.13): security stage with CHAP, operational
negotiation, and the move to full feature phase."""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..scsi.acl import Acl
from ..wire import pdu as P
from ..wire.chap import AuthError, ChapServer, Credentials
from ..wire.params import NegotiationError, SessionParams, declare_target, negotiate

log = logging.getLogger("zerosend.iscsi")

SECURITY, OPERATIONAL, FULL_FEATURE = 0, 1, 3

# Login status (class, detail) pairs, 11.13.5
SUCCESS = (0x00, 0x00)
INITIATOR_ERROR = (0x02, 0x00)
AUTH_FAILED = (0x02, 0x01)
FORBIDDEN = (0x02, 0x02)
NOT_FOUND = (0x02, 0x03)
UNSUPPORTED_VERSION = (0x02, 0x05)
TOO_MANY_CONNECTIONS = (0x02, 0x06)
MISSING_PARAMETER = (0x02, 0x07)
SESSION_NOT_FOUND = (0x02, 0x0A)
TARGET_ERROR = (0x03, 0x00)

MAX_LOGIN_TEXT = 65536


class LoginPolicy(Protocol):
    """What the login needs to know about the target."""

    iqn: str
    chap: Credentials | None
    mutual_chap: Credentials | None
    allow: frozenset[str]
    acls: list[Acl]  # none: every initiator (on the allow-list) sees every LUN
    discovery_chap: Credentials | None  # none: discovery logins authenticate as others do


def admits(policy: LoginPolicy, initiator: str, address: str) -> bool:
    """``policy``'s allow-list and ACLs let ``initiator`` log in from ``address`` (CHAP
    aside): discovery lists only the targets that do."""
    if policy.allow and initiator not in policy.allow:
        return False
    if policy.acls:
        acl = next((a for a in policy.acls if a.initiator == initiator), None)
        return acl is not None and acl.admits(address)
    return True


class LoginFailed(Exception):
    def __init__(self, status: tuple[int, int], why: str) -> None:
        super().__init__(why)
        self.status = status


@dataclass
class LoginState:
    initiator: str = ""
    isid: bytes = b"\0" * 6
    tsih: int = 0
    cid: int = 0
    discovery: bool = False
    params: SessionParams = field(default_factory=SessionParams)
    authenticated: bool = False
    first_cmdsn: int = 0


class LoginMachine:
    """Answers Login Requests one at a time; ``done`` once full feature phase is reached.
    ``policies``: the daemon's targets; a normal login picks one by its TargetName, and then
    ``policy`` is that target's."""

    def __init__(self, policies: LoginPolicy | Sequence[LoginPolicy], address: str = "") -> None:
        self.policies = list(policies) if isinstance(policies, Sequence) else [policies]
        self.policy = self.policies[0]
        self.address = address  # the initiator's IP, for the ACLs' address filters
        self.acl: Acl | None = None  # the initiator's ACL, once known
        self.state = LoginState()
        self.done = False
        self._first = True
        self._stage = SECURITY
        self._chap: ChapServer | None = None
        self._chap_step = 0
        self._declared = False
        self._pending_text = b""
        self._auth_method: str | None = None
        self.auth_user: str | None = None

    def step(self, req: P.Pdu) -> tuple[bytearray, bytes]:
        """The Login Response (header, data) to one request. Raises LoginFailed."""
        bhs = req.bhs
        flags = bhs[1]
        transit, cont = bool(flags & 0x80), bool(flags & 0x40)
        csg, nsg = (flags >> 2) & 3, flags & 3
        if bhs[3] > 0:  # Version-min above 0 (RFC 7143 defines only 0)
            raise LoginFailed(UNSUPPORTED_VERSION, f"unsupported iSCSI version-min {bhs[3]}")
        if transit and cont:
            raise LoginFailed(INITIATOR_ERROR, "login request with both T and C set")
        isid = bytes(bhs[8:14])
        (tsih,) = struct.unpack_from(">H", bhs, 14)
        if self._first:
            self.state.isid = isid
            self.state.tsih = tsih
            self.state.cid = struct.unpack_from(">H", bhs, 20)[0]
            self.state.first_cmdsn = req.u32(24)
        elif isid != self.state.isid:
            raise LoginFailed(INITIATOR_ERROR, "ISID changed during login")
        # CSG is the stage being negotiated: security or operational (RFC 7143 11.12.3);
        # full feature phase is only ever a next stage.
        if csg not in (SECURITY, OPERATIONAL) or (transit and (nsg == 2 or nsg < csg)):
            raise LoginFailed(INITIATOR_ERROR, f"invalid login stage CSG={csg} NSG={nsg}")
        if csg < self._stage:
            raise LoginFailed(INITIATOR_ERROR, f"login went back from stage {self._stage} to {csg}")
        self._stage = csg

        text = self._pending_text + bytes(req.data)
        if len(text) > MAX_LOGIN_TEXT:
            raise LoginFailed(INITIATOR_ERROR, "login text too long")
        if cont:  # more text follows: acknowledge with an empty response
            self._pending_text = text
            return self._response(req, False, csg, csg, []), b""
        self._pending_text = b""
        try:
            pairs = P.parse_text(text)
        except P.PduError as e:
            raise LoginFailed(INITIATOR_ERROR, str(e)) from e
        keys = dict(pairs)
        log.debug(
            "login request CSG=%d NSG=%d T=%d %s",
            csg,
            nsg,
            transit,
            [(k, v) for k, v in pairs if not k.startswith("CHAP_")],
        )

        answers: list[tuple[str, str]] = []
        if self._first:
            answers += self._first_request(keys)
        self._first = False

        if csg == SECURITY:
            answers += self._security(keys)
            ready = self.state.authenticated
        else:
            if self._needs_auth() and not self.state.authenticated:
                raise LoginFailed(AUTH_FAILED, "operational stage without authentication")
            ready = True
        try:
            ops = [(k, v) for k, v in pairs if k != "AuthMethod" and not k.startswith("CHAP_")]
            answers += negotiate(self.state.params, ops, self.state.discovery)
        except NegotiationError as e:
            raise LoginFailed(INITIATOR_ERROR, str(e)) from e
        go = transit and ready
        if not self._declared and (csg == OPERATIONAL or (go and nsg == FULL_FEATURE)):
            answers += declare_target(self.state.params)
            self._declared = True
        if go and nsg == FULL_FEATURE:
            self.done = True
        next_stage = nsg if go else csg
        return self._response(req, go, csg, next_stage, answers), P.build_text(answers)

    def _credentials(self) -> tuple[Credentials | None, Credentials | None]:
        """The CHAP credentials this login must present, and the target's for mutual CHAP:
        a discovery login's ``discovery_chap`` if set; an initiator's own in its ACL; else the
        target-wide ``chap``."""
        p = self.policy
        if self.state.discovery and p.discovery_chap is not None:
            return p.discovery_chap, None
        if not self.state.discovery and self.acl is not None and self.acl.chap is not None:
            return self.acl.chap, self.acl.mutual_chap
        return p.chap, p.mutual_chap

    def _needs_auth(self) -> bool:
        return self._credentials()[0] is not None

    def _first_request(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        st = self.state
        st.initiator = keys.get("InitiatorName", "")
        if not st.initiator:
            raise LoginFailed(MISSING_PARAMETER, "first login request has no InitiatorName")
        session_type = keys.get("SessionType", "Normal")
        if session_type not in ("Normal", "Discovery"):
            raise LoginFailed(INITIATOR_ERROR, f"bad SessionType {session_type!r}")
        st.discovery = session_type == "Discovery"
        name = keys.get("TargetName")
        if not st.discovery:
            if not name:
                raise LoginFailed(MISSING_PARAMETER, "normal session without TargetName")
            chosen = next((p for p in self.policies if p.iqn == name), None)
            if chosen is None:
                raise LoginFailed(NOT_FOUND, f"unknown target {name!r}")
            self.policy = chosen
        else:
            # A discovery login authenticates (without discovery_chap) as a login to the first
            # target that lets the initiator in would; it then lists the targets that do.
            admitting = [p for p in self.policies if admits(p, st.initiator, self.address)]
            self.policy = admitting[0] if admitting else self.policies[0]
        if self.policy.allow and st.initiator not in self.policy.allow:
            raise LoginFailed(FORBIDDEN, f"initiator {st.initiator} is not on the allow-list")
        if self.policy.acls:
            self.acl = next((a for a in self.policy.acls if a.initiator == st.initiator), None)
            if self.acl is None:
                raise LoginFailed(FORBIDDEN, f"initiator {st.initiator} has no ACL")
            if not self.acl.admits(self.address):
                raise LoginFailed(
                    FORBIDDEN, f"initiator {st.initiator} may not log in from {self.address}"
                )
        out: list[tuple[str, str]] = []
        if not st.discovery:
            out.append(("TargetPortalGroupTag", "1"))
            alias = getattr(self.policy, "alias", "")
            if alias:
                out.append(("TargetAlias", alias))
        if st.tsih:
            # Adding a connection to an existing session: MaxConnections is 1.
            raise LoginFailed(TOO_MANY_CONNECTIONS, f"login to existing session TSIH {st.tsih}")
        return out

    def _security(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        if "AuthMethod" in keys:
            offered = keys["AuthMethod"].split(",")
            if self._needs_auth():
                if "CHAP" not in offered:
                    raise LoginFailed(
                        AUTH_FAILED, f"CHAP required, initiator offers {keys['AuthMethod']}"
                    )
                self._auth_method = "CHAP"
                initiator, target = self._credentials()
                assert initiator is not None  # (_needs_auth)
                self._chap = ChapServer(initiator, target)
            else:
                if "None" not in offered:
                    # CHAP without configured credentials could never succeed
                    raise LoginFailed(AUTH_FAILED, f"no usable AuthMethod in {keys['AuthMethod']}")
                self._auth_method = "None"
                self.state.authenticated = True
            out.append(("AuthMethod", self._auth_method))
        elif self._auth_method is None and not self._needs_auth():
            self.state.authenticated = True  # no AuthMethod offered: None is the default
        try:
            if self._chap is not None:
                if "CHAP_A" in keys and self._chap_step == 0:
                    out += self._chap.challenge_keys(keys["CHAP_A"])
                    self._chap_step = 1
                elif "CHAP_R" in keys or "CHAP_N" in keys:
                    if self._chap_step != 1:
                        raise AuthError("CHAP response before challenge")
                    out += self._chap.verify(keys)
                    self._chap_step = 2
                    self.auth_user = keys.get("CHAP_N")
                    self.state.authenticated = True
        except AuthError as e:
            raise LoginFailed(AUTH_FAILED, f"CHAP: {e}") from e
        if self._needs_auth() and self._auth_method is None:
            raise LoginFailed(AUTH_FAILED, "CHAP required but no AuthMethod offered")
        return out

    def _response(
        self, req: P.Pdu, transit: bool, csg: int, nsg: int, answers: list[tuple[str, str]]
    ) -> bytearray:
        flags = (0x80 if transit else 0) | (csg << 2) | (nsg if transit else 0)
        return P.login_response(
            flags, self.state.isid, self.state.tsih, req.itt, 0, 0, len(P.build_text(answers))
        )


def failure_response(req: P.Pdu, status: tuple[int, int]) -> bytearray:
    isid = bytes(req.bhs[8:14])
    (tsih,) = struct.unpack_from(">H", req.bhs, 14)
    return P.login_response(0, isid, tsih, req.itt, status[0], status[1], 0)

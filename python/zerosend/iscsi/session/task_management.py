"""Task management functions (RFC 7143 11.5, 11.6) at ErrorRecoveryLevel 0."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from ..storage import diskio
from ..storage.store import Store
from ..wire import pdu as P
from ..wire.window import sn_lt

log = logging.getLogger("zerosend.iscsi")

ABORT_TASK, ABORT_TASK_SET, CLEAR_ACA, CLEAR_TASK_SET = 1, 2, 3, 4
LOGICAL_UNIT_RESET, TARGET_WARM_RESET, TARGET_COLD_RESET, TASK_REASSIGN = 5, 6, 7, 8
NAMES = {
    ABORT_TASK: "ABORT TASK",
    ABORT_TASK_SET: "ABORT TASK SET",
    CLEAR_ACA: "CLEAR ACA",
    CLEAR_TASK_SET: "CLEAR TASK SET",
    LOGICAL_UNIT_RESET: "LOGICAL UNIT RESET",
    TARGET_WARM_RESET: "TARGET WARM RESET",
    TARGET_COLD_RESET: "TARGET COLD RESET",
    TASK_REASSIGN: "TASK REASSIGN",
}
# Responses (11.6.1)
COMPLETE, NO_TASK, NO_LUN, REASSIGNMENT_NOT_SUPPORTED, NOT_SUPPORTED = 0, 1, 2, 4, 5
AUTHORIZATION_FAILED, REJECTED = 6, 255
# Functions whose scope is every session, not only the requester's tasks
RESETS = frozenset((LOGICAL_UNIT_RESET, TARGET_WARM_RESET, TARGET_COLD_RESET))
# Those refused from one session while another is logged in, unless the target allows them:
# SAM-5 gives every I_T nexus LOGICAL UNIT RESET (initiators' error handlers escalate to it,
# clusters clear a dead node's RESERVE with it), so only the target resets are held back.
TARGET_RESETS = frozenset((TARGET_WARM_RESET, TARGET_COLD_RESET))


class Requester(Protocol):
    """The session whose request task management carries out, and the target behind it: what
    task management needs of them, no more."""

    @property
    def name(self) -> str: ...
    @property
    def closing(self) -> bool: ...
    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...
    @property
    def expcmdsn(self) -> int: ...
    @property
    def cross_session_resets(self) -> bool:
        """The target lets one session reset it under others."""

    def sees(self, lun: int) -> bool:
        """The LUN is one the session's initiator sees (as its ACL shows)."""

    def cancel(self, itt: int) -> bool:
        """Abort the session's task ``itt``; False if there is none."""

    def others_logged_in(self) -> bool:
        """Another normal session is logged in: a target reset would reach it."""

    def abort_tasks(self, lun: int | None, everywhere: bool) -> None:
        """Abort the tasks of ``lun`` (None: all) in this session, or in every one."""

    def reset_logical_units(self, lun: int | None) -> None: ...
    def reset_target(self) -> None:
        """Drop every connection, once this function's response had its turn."""

    def stores(self, lun: int | None) -> list[Store]:
        """The stores behind ``lun`` (None: behind every LUN of the target)."""

    def count_reset(self) -> None: ...
    def send_pdu(self, pdu: bytearray) -> None: ...


def task_management(session: Requester, req: P.Pdu) -> None:
    """Carry out one Task Management Function Request and queue its response."""
    function = req.flags & 0x7F
    lun = P.decode_lun(req.lun_field)
    if function == ABORT_TASK:
        ref = req.u32(20)
        refcmdsn = req.u32(32)
        if session.cancel(ref):
            response = COMPLETE
        elif not sn_lt(refcmdsn, session.expcmdsn) and sn_lt(refcmdsn, req.u32(24)):
            # RFC 7143 11.5.1: a command in the window that never arrived counts as received
            response = COMPLETE
        else:
            response = NO_TASK  # completed already, or never existed
    elif function == LOGICAL_UNIT_RESET and not session.sees(lun):  # (as its ACL shows)
        response = NO_LUN
    elif (
        function in TARGET_RESETS
        and not session.cross_session_resets
        and session.others_logged_in()
    ):
        # One initiator must not reset the whole target under another unless the target is set
        # up to allow it (RFC 7143 11.5.1: the target may refuse a function the requester is
        # not authorized for).
        response = AUTHORIZATION_FAILED
    elif function in (ABORT_TASK_SET, CLEAR_TASK_SET, LOGICAL_UNIT_RESET):
        if function == LOGICAL_UNIT_RESET:
            session.count_reset()
        session.abort_tasks(lun, everywhere=function == LOGICAL_UNIT_RESET)
        if function == LOGICAL_UNIT_RESET:
            session.reset_logical_units(lun)
        response = COMPLETE
    elif function == TARGET_WARM_RESET:
        session.count_reset()
        session.abort_tasks(None, everywhere=True)
        session.reset_logical_units(None)
        response = COMPLETE
    elif function == TARGET_COLD_RESET:
        session.count_reset()
        response = COMPLETE
        session.abort_tasks(None, everywhere=True)
        session.reset_logical_units(None)
        session.reset_target()
    elif function == CLEAR_ACA:
        response = NOT_SUPPORTED  # ACA is never established (NACA is not supported)
    elif function == TASK_REASSIGN:
        response = REASSIGNMENT_NOT_SUPPORTED  # allegiance reassignment needs ErrorRecoveryLevel 2
    else:
        response = REJECTED
    name = NAMES.get(function, f"function {function}")
    log.info("%s: task management %s lun=%d -> response %d", session.name, name, lun, response)
    answer = P.tmf_response(req.itt, response)
    # An aborted command's writes already in a disk thread cannot be stopped: the abort is
    # answered once they landed, so none lands over what the initiator writes next (SAM-5 7.3).
    landing = diskio.changes(session.stores(lun if function not in TARGET_RESETS else None))
    if response == COMPLETE and landing:
        waiting = session.loop.create_task(_answer_when_landed(session, landing, answer))
        _answering.add(waiting)  # the loop keeps only a weak reference
        waiting.add_done_callback(_answering.discard)
    else:
        session.send_pdu(answer)


_answering: set[asyncio.Task[None]] = set()


async def _answer_when_landed(
    session: Requester, landing: list[asyncio.Future[Any]], answer: bytearray
) -> None:
    await asyncio.wait(landing)
    if not session.closing:
        session.send_pdu(answer)

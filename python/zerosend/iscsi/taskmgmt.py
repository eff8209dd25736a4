"""Task management functions (RFC 7143 11.5, 11.6) at ErrorRecoveryLevel 0."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from .storage import diskio
from .wire import pdu as P
from .wire.window import sn_lt

if TYPE_CHECKING:
    from .session import Session

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


def task_management(session: Session, req: P.Pdu) -> None:
    """Carry out one Task Management Function Request and queue its response."""
    function = req.flags & 0x7F
    lun = P.decode_lun(req.lun_field)
    host = session.host
    if function == ABORT_TASK:
        ref = req.u32(20)
        refcmdsn = req.u32(32)
        if session.writes.cancel(ref) or session.reads.cancel(ref):
            response = COMPLETE
        elif not sn_lt(refcmdsn, session.window.expcmdsn) and sn_lt(refcmdsn, req.u32(24)):
            # RFC 7143 11.5.1: a command in the window that never arrived counts as received
            response = COMPLETE
        else:
            response = NO_TASK  # completed already, or never existed
    elif function == LOGICAL_UNIT_RESET and lun not in session.luns:  # (as its ACL shows)
        response = NO_LUN
    elif (
        function in TARGET_RESETS
        and not host.config.cross_session_resets
        and host.others_logged_in(session)
    ):
        # One initiator must not reset the whole target under another unless the target is set
        # up to allow it (RFC 7143 11.5.1: the target may refuse a function the requester is
        # not authorized for).
        response = AUTHORIZATION_FAILED
    elif function in (ABORT_TASK_SET, CLEAR_TASK_SET, LOGICAL_UNIT_RESET):
        if function == LOGICAL_UNIT_RESET:
            session.stats["resets"] = session.stats.get("resets", 0) + 1
        host.abort_tasks(lun, session if function != LOGICAL_UNIT_RESET else None)
        if function == LOGICAL_UNIT_RESET:
            host.reset_logical_units(lun)
        response = COMPLETE
    elif function == TARGET_WARM_RESET:
        session.stats["resets"] = session.stats.get("resets", 0) + 1
        host.abort_tasks(None, None)
        host.reset_logical_units(None)
        response = COMPLETE
    elif function == TARGET_COLD_RESET:
        session.stats["resets"] = session.stats.get("resets", 0) + 1
        response = COMPLETE
        host.abort_tasks(None, None)
        host.reset_logical_units(None)
        session.loop.call_soon(host.reset)
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
    scope = [lun] if function not in (TARGET_WARM_RESET, TARGET_COLD_RESET) else list(host.luns)
    landing = diskio.changes([host.luns[n].store for n in scope if n in host.luns])
    if response == COMPLETE and landing:
        waiting = session.loop.create_task(_answer_when_landed(session, landing, answer))
        _answering.add(waiting)  # the loop keeps only a weak reference
        waiting.add_done_callback(_answering.discard)
    else:
        session.responder.send_pdu(answer)


_answering: set[asyncio.Task[None]] = set()


async def _answer_when_landed(
    session: Session, landing: list[asyncio.Future[Any]], answer: bytearray
) -> None:
    await asyncio.wait(landing)
    if not session.closing:
        session.responder.send_pdu(answer)

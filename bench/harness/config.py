"""The benchmark's vocabulary: the contenders, their labels, the topologies and send sizes,
and the ``Config`` of one run with the ``State`` it fills in."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.senders.sender import CONTENDERS as PYTHON_CONTENDERS

ROOT = Path(__file__).resolve().parents[2]
#: The anchors: the Rust core driven directly, and C over liburing (bench/senders/c_sender.c).
RUST = "rust-io_uring"
RUST_POOL = "rust-io_uring-pool"
C_SEND_ZC = "c-send_zc"
C_SEND_ZC_FIXED = "c-send_zc_fixed"
C_SEND = "c-send"
C_CONTENDERS = (C_SEND_ZC, C_SEND_ZC_FIXED, C_SEND)
RUST_CONTENDERS = (RUST, RUST_POOL)
CONTENDERS = (*PYTHON_CONTENDERS, *RUST_CONTENDERS, *C_CONTENDERS)
#: Run only when named (``--contenders``): variants for side-by-side studies.
OPT_IN = ("zerosend-io_uring-defer",)
#: What a run measures by default.
DEFAULT_CONTENDERS = tuple(c for c in CONTENDERS if c not in OPT_IN)
ZEROSEND = "zerosend-io_uring"  # the contender the targets speak of: zerosend's io_uring backend
POOL = "zerosend-io_uring-pool"
AUTO = "zerosend-auto"  # what wrap() picks by default
COPY = "zerosend-copy"
MSG_ZEROCOPY = "zerosend-msg_zerocopy"
#: zerosend's three backends, the choices ``auto`` picks from (plain buffers).
BACKENDS = {"copy": COPY, "msg_zerocopy": MSG_ZEROCOPY, "io_uring": ZEROSEND}
#: The baseline the targets are read against: the loop a user writes for one stream.
BASELINE = "asyncio-sock_sendall-1conn"
#: N connections with one ``sock_sendall`` each, for N in flight.
BASELINE_N = "asyncio-sock_sendall"
KiB = 1 << 10
MiB = 1 << 20
FULL_SIZES = (4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB, 8 * MiB)
FULL_INFLIGHT = (1, 8, 32)
IFB = "ifb"
#: Datagram sizes on the ifb topology (a datagram holds at most 65,507 bytes).
IFB_SIZES = (4 * KiB, 16 * KiB, 32 * KiB, 60_000)
MAX_DATAGRAM = 65_507
#: The senders that can send datagrams: zerosend's backends, the copying one included.
IFB_CONTENDERS = (AUTO, ZEROSEND, POOL, MSG_ZEROCOPY, COPY)

LABELS = {
    "zerosend-auto": "zerosend auto",
    "zerosend-io_uring": "zerosend io_uring",
    "zerosend-io_uring-pool": "zerosend io_uring + pool",
    "zerosend-io_uring-defer": "zerosend io_uring, DEFER_TASKRUN",
    "zerosend-msg_zerocopy": "zerosend MSG_ZEROCOPY",
    "zerosend-copy": "zerosend copy",
    "asyncio-sock_sendall-1conn": "asyncio sock_sendall, 1 connection",
    "asyncio-sock_sendall": "asyncio sock_sendall, N connections",
    "asyncio-streams": "asyncio streams",
    "uvloop-sock_sendall": "uvloop sock_sendall",
    "uvloop-streams": "uvloop streams",
    RUST: "pure Rust (io_uring)",
    RUST_POOL: "pure Rust (io_uring, registered)",
    C_SEND_ZC: "C SEND_ZC",
    C_SEND_ZC_FIXED: "C SEND_ZC, registered",
    C_SEND: "C send (copy)",
}


@dataclass
class Config:
    sizes: Sequence[int]
    inflight: Sequence[int]
    topologies: Sequence[str]
    contenders: Sequence[str]
    rounds: int
    seconds: float
    max_bytes: int
    out: Path
    markdown: Path
    plots: bool
    quick: bool
    from_json: Path | None = None
    ifb_sizes: Sequence[int] = ()
    #: Count system calls per send with strace in the target's cell (rig, 1 MiB, 8 in flight).
    syscalls: bool = False


@dataclass
class State:
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    retries: list[str] = field(default_factory=list)
    #: Traced runs: system calls per send by contender (bench/senders/syscalls.py).
    syscalls: list[dict[str, Any]] = field(default_factory=list)


def topology_sizes(config: Config, topology: str) -> list[int]:
    """The send sizes measured on ``topology`` (datagrams are bounded on ifb)."""
    return list(config.ifb_sizes if topology == IFB else config.sizes)


def topology_contenders(contenders: Sequence[str], topology: str) -> list[str]:
    return [c for c in contenders if topology != IFB or c in IFB_CONTENDERS]


def size_label(size: int) -> str:
    if size >= MiB and size % MiB == 0:
        return f"{size // MiB} MiB"
    if size >= KiB and size % KiB == 0:
        return f"{size // KiB} KiB"
    return f"{size} B"


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    for suffix, factor in (("K", KiB), ("M", MiB), ("G", 1 << 30)):
        if text.endswith(suffix):
            return int(float(text[:-1]) * factor)
    return int(text)

"""READ DEFECT DATA (10/12), SBC-3 5.11/5.12: a virtual medium has no defective blocks, so both
the primary and the grown defect list are valid and empty."""

from __future__ import annotations

import struct

from .commands import CommandSet, Family, Handler, ParameterCommand
from .unit import LogicalUnit

READ_DEFECT_DATA10, READ_DEFECT_DATA12 = 0x37, 0xB7


def read_defect_data(commands: CommandSet, lu: LogicalUnit, cdb: bytes) -> bytes:
    if cdb[0] == READ_DEFECT_DATA10:
        request, alloc = cdb[2], int.from_bytes(cdb[7:9], "big")
        header = struct.pack(">xBH", request & 0x1F, 0)  # PLISTV, GLISTV, format; length 0
    else:
        request, alloc = cdb[1], int.from_bytes(cdb[6:10], "big")
        header = struct.pack(">xBxxI", request & 0x1F, 0)
    return header[:alloc]


COMMANDS: dict[int, Handler] = {
    READ_DEFECT_DATA10: read_defect_data,
    READ_DEFECT_DATA12: read_defect_data,
}
PARAMETER_COMMANDS: dict[int, ParameterCommand] = {}
#: What this family adds to the command table (``families``).
FAMILY = Family(commands=COMMANDS, parameters=PARAMETER_COMMANDS)

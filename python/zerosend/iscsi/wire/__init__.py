"""iSCSI on the wire: PDUs, reading and sending them, the CmdSN window, negotiation, CHAP."""

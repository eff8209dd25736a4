"""The configuration reference page (docs/iscsi-config.md), made from ``config.SETTINGS``.

``python -m zerosend.iscsi.service.configdoc > docs/iscsi-config.md`` writes it; a test fails
when the page in the repository differs from what this renders, so the page cannot go stale.
"""

from __future__ import annotations

import sys
from typing import Any

from .config import DEFAULTS, SETTINGS, Setting
from .reload import RELOADABLE

HEAD = """\
# zerosend-iscsi configuration reference

<!-- Generated from python/zerosend/iscsi/service/config.py by
     `python -m zerosend.iscsi.service.configdoc > docs/iscsi-config.md`; do not edit by hand. -->

Every setting is both a command-line option and a key of the TOML file given with
`--config FILE`; the command line wins. Unknown keys, unknown keys inside tables and values of
the wrong type are refused, with the key named (`config key luns[1].read_only: unknown key`).
`zerosend-iscsi --check --config FILE` checks a file (and opens every LUN's image) without
serving it; `systemctl reload` (SIGHUP) applies the settings marked *reload* and keeps the
others until the next start, saying so in the log.

"""


def _kind(s: Setting) -> str:
    default = getattr(DEFAULTS, s.key)
    if s.repeated:
        return "array"
    if isinstance(default, bool):
        return "boolean (`on`/`off` on the command line)"
    if isinstance(default, float):
        return "number (seconds)"
    if isinstance(default, int):
        return "integer (sizes: `64K`, `1M`)" if s.key.endswith(("_size", "_bytes")) else "integer"
    if s.key in ("chap", "mutual_chap"):
        return "table or string"
    return "string"


def _default(value: Any) -> str:
    if value is None or value == "" or value == [] or value == frozenset():
        return "(none)"
    if isinstance(value, bool):
        return "`on`" if value else "`off`"
    return f"`{value}`"


def _reload(s: Setting) -> str:
    if s.key in RELOADABLE:
        return "applied; sessions the change touches end"
    return "next start"


def render() -> str:
    out = [HEAD]
    for s in SETTINGS:
        out.append(f"## `{s.key}`\n\n")
        metavar = f" {s.metavar}" if s.metavar else f" {s.key.upper()}"
        out.append(f"- option: `{s.flag}{metavar}`{' (repeat it)' if s.repeated else ''}\n")
        out.append(f"- type: {_kind(s)}\n")
        out.append(f"- default: {_default(getattr(DEFAULTS, s.key))}\n")
        out.append(f"- on reload: {_reload(s)}\n\n")
        out.append(s.help[0].upper() + s.help[1:] + ".\n\n")
    return "".join(out).rstrip("\n") + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())

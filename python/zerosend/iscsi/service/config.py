"""The target's settings: each is defined once here, and becomes both a command-line option
(``--max-connections``) and a TOML key of ``--config FILE`` (``max_connections``).

One concept: the table of settings and the parsing of each value (whose errors name the key)
belong together, so that a setting is declared in one place.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from zerosend import BackendName

from ..scsi.acl import Acl, Network
from ..storage.opening import parse_size
from ..wire.chap import Credentials, check_mutual
from .secretfiles import read_credential, read_secret_file

DEFAULT_IQN = "iqn.2024-01.org.zerosend:target"
DEFAULT_LISTEN = "127.0.0.1:3260"
_LUN_OPTIONS = {"ro", "rw", "mmap"}
BACKENDS: tuple[BackendName, ...] = get_args(BackendName)
ReadLoopName = Literal["native", "python"]
READ_LOOPS: tuple[ReadLoopName, ...] = get_args(ReadLoopName)


MAX_LUN = 16383  # the largest a flat-space LUN field holds (SAM-5 4.7.7)
MAX_SERIAL = 40


@dataclass
class LunSpec:
    path: str
    readonly: bool = False
    mapped: bool = False
    lun: int | None = None  # None: numbered by position
    serial: str = ""  # "": derived from the target name, number and path
    wwn: str = ""  # NAA designator, hex; "": derived as the serial is

    @classmethod
    def parse(cls, text: str) -> LunSpec:
        """``PATH`` with optional ``:ro``, ``:rw``, ``:mmap`` or ``:ro,mmap``; also ``mem:SIZE``
        and ``null:SIZE``."""
        head, sep, tail = text.rpartition(":")
        opts = set(tail.split(","))
        if sep and head and opts <= _LUN_OPTIONS:
            return cls(head, "ro" in opts, "mmap" in opts)
        return cls(text)


@dataclass
class TargetSpec:
    """One target (IQN) of the daemon: its LUNs and who may reach them. The single-target form
    (``iqn``, ``luns``, ``acls`` ... at the top level) is one of these; ``[[target]]`` tables
    give several."""

    iqn: str
    luns: list[LunSpec] = field(default_factory=list)
    alias: str = ""
    chap: Credentials | None = None
    mutual_chap: Credentials | None = None
    allow: frozenset[str] = frozenset()
    acls: list[Acl] = field(default_factory=list)
    discovery_chap: Credentials | None = None  # the daemon's, for discovery logins

    def acl_for(self, initiator: str) -> Acl | None:
        """``initiator``'s ACL (None without ACLs: every LUN, as it is)."""
        return next((a for a in self.acls if a.initiator == initiator), None)


#: The keys a target's own table may have (the single-target form has them at the top level).
TARGET_KEYS = ("iqn", "alias", "luns", "chap", "mutual_chap", "allow", "acls")


@dataclass
class TargetConfig:
    listen: str = DEFAULT_LISTEN
    iqn: str = DEFAULT_IQN
    luns: list[LunSpec] = field(default_factory=list)
    chap: Credentials | None = None
    mutual_chap: Credentials | None = None
    allow: frozenset[str] = frozenset()
    acls: list[Acl] = field(default_factory=list)
    discovery_chap: Credentials | None = None
    cross_session_resets: bool = False
    target: list[TargetSpec] = field(default_factory=list)  # [[target]]; empty: the keys above
    max_connections: int = 256
    max_pending_logins: int = 64
    buffers: int = 256
    buffer_size: int = 256 * 1024
    backend: BackendName = "auto"
    zerocopy_probe: bool = True
    read_loop: ReadLoopName = "native"
    sendfile: bool = False
    reservation_state: str = ""
    metrics: str | None = None
    metrics_connections: int = 8
    control_socket: str = ""
    session_commands: int = 128
    session_bytes: int = 32 * 1024 * 1024
    session_buffers: int = 32
    nop_interval: float = 10.0
    nop_timeout: float = 10.0
    user_timeout: float = 30.0

    def acl_for(self, initiator: str) -> Acl | None:
        """``initiator``'s ACL (None without ACLs: every LUN, as it is)."""
        return next((a for a in self.acls if a.initiator == initiator), None)

    def targets(self) -> list[TargetSpec]:
        """The targets served: the ``[[target]]`` tables, else one of the top-level keys."""
        if self.target:
            return self.target
        return [
            TargetSpec(self.iqn, self.luns, "", self.chap, self.mutual_chap, self.allow,
                       self.acls, self.discovery_chap)
        ]  # fmt: skip


class FieldError(ValueError):
    """A bad key of a TOML table inside a setting; ``field`` names it (``read_only``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


_TYPE_NAMES = {
    str: "a string", bool: "true or false", int: "an integer", dict: "a table", list: "an array"
}  # fmt: skip


def _toml_type(value: Any) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return {bool: "a boolean", str: "a string", int: "an integer", float: "a number"}.get(
        type(value), type(value).__name__
    )


def _table(
    value: dict[str, Any], keys: Mapping[str, type | tuple[type, ...]], required: tuple[str, ...]
) -> None:
    """Checks a TOML table as the top level is checked: every key known, every value of its
    key's type (a typo must not fall back to a default: ``read_only`` would serve writable)."""
    for key, item in value.items():
        want = keys.get(key)
        if want is None:
            raise FieldError(key, f"unknown key (known: {', '.join(keys)})")
        wants = want if isinstance(want, tuple) else (want,)
        if type(item) not in wants:  # (bool is an int: isinstance would let true pass as 1)
            names = " or ".join(_TYPE_NAMES[w] for w in wants)
            raise FieldError(key, f"must be {names}, not {_toml_type(item)}")
    for key in required:
        if key not in value:
            raise FieldError(key, "missing")


def _text(value: Any) -> str:
    if not isinstance(value, str):  # only TOML gives anything else
        raise ValueError(f"must be a string, not {_toml_type(value)}")
    return value


_LUN_KEYS = {
    "path": str, "readonly": bool, "mapped": bool, "lun": int, "serial": str, "wwn": str
}  # fmt: skip


def _serial(text: str) -> str:
    if not 0 < len(text) <= MAX_SERIAL or not all(0x21 <= ord(c) <= 0x7E for c in text):
        raise FieldError(
            "serial", f"must be 1 to {MAX_SERIAL} printable ASCII characters without spaces"
        )
    return text


def _wwn(text: str) -> str:
    """``naa.`` and 16 hex digits starting 5 (NAA 5, as LIO's ``wwn``) or 32 starting 6 (NAA 6,
    as this target derives them); colons and the ``naa.``/``0x`` prefix are optional."""
    digits = text.lower().removeprefix("naa.").removeprefix("0x").replace(":", "")
    ok = all(c in "0123456789abcdef" for c in digits) and (
        (len(digits) == 16 and digits[0] == "5") or (len(digits) == 32 and digits[0] == "6")
    )
    if not ok:
        raise FieldError(
            "wwn", f"{text!r} is not an NAA identifier: 16 hex digits starting with 5 (NAA 5) "
            "or 32 starting with 6 (NAA 6), e.g. naa.5001405abcdef012",
        )  # fmt: skip
    return digits


def _lun(item: Any) -> LunSpec:
    if isinstance(item, dict):  # a TOML table
        _table(item, _LUN_KEYS, ("path",))
        number = item.get("lun")
        if number is not None and not 0 <= number <= MAX_LUN:
            raise FieldError("lun", f"must be 0 to {MAX_LUN}, not {number}")
        return LunSpec(
            item["path"],
            item.get("readonly", False),
            item.get("mapped", False),
            number,
            _serial(item["serial"]) if "serial" in item else "",
            _wwn(item["wwn"]) if "wwn" in item else "",
        )
    return LunSpec.parse(_text(item))


def numbered(luns: list[LunSpec]) -> dict[int, LunSpec]:
    """The LUNs by number: their ``lun`` where given (load_config checked all or none have
    one), else their position."""
    return {n if spec.lun is None else spec.lun: spec for n, spec in enumerate(luns)}


def _check_lun_set(luns: list[LunSpec], where: str) -> None:
    """LUN numbers all given or all left to positions, and no number, serial or WWN twice."""
    explicit = [spec.lun is not None for spec in luns]
    if any(explicit) and not all(explicit):
        n = explicit.index(False)
        raise ValueError(
            f"{where}[{n}].lun: missing: once one LUN has a number every one needs one "
            "(numbers by position would move when a LUN is removed)"
        )
    seen: dict[tuple[str, object], int] = {}
    for n, spec in enumerate(luns):
        for key in ("lun", "serial", "wwn"):
            value = getattr(spec, key)
            if value is None or value == "":
                continue
            first = seen.setdefault((key, value), n)
            if first != n:
                raise ValueError(f"{where}[{n}].{key}: {value!r} is also luns[{first}]'s")


_CREDENTIAL_KEYS = {"user": str, "secret": str, "secret_file": str, "credential": str}
_SECRET_SOURCES = ("secret", "secret_file", "credential")


def _credentials(value: Any) -> Credentials:
    """A table ``{ user = ..., secret | secret_file | credential = ... }`` or ``USER:SECRET``."""
    if isinstance(value, dict):  # a TOML table
        _table(value, _CREDENTIAL_KEYS, ())
        sources = [key for key in _SECRET_SOURCES if key in value]
        if len(sources) > 1:
            raise FieldError(sources[1], f"give one of {', '.join(_SECRET_SOURCES)}, not both")
        secret = value.get("secret", "")
        try:
            if "secret_file" in value:
                secret = read_secret_file(value["secret_file"])
            elif "credential" in value:
                secret = read_credential(value["credential"])
        except ValueError as e:
            raise FieldError(sources[0], str(e)) from e
        return Credentials(value.get("user", ""), secret)
    if isinstance(value, str):
        return Credentials.parse(value)
    raise ValueError("must be 'USER:SECRET' or a table with user and secret_file or credential")


def _credentials_cli(text: str) -> Credentials:
    """``user=NAME,secret_file=FILE`` or ``user=NAME,credential=NAME``: the table's keys. A
    secret itself is refused: every local user can read a command line (ps, /proc)."""
    table: dict[str, Any] = {}
    for item in text.split(","):
        key, sep, val = item.partition("=")
        if not sep:
            table = {}
            break
        table[key.strip()] = val
    if not table or "secret" in table:
        raise ValueError(
            "a CHAP secret on the command line is visible to every local user (ps); give "
            "user=NAME,secret_file=FILE (a file only the target's user reads) or "
            "user=NAME,credential=NAME (systemd LoadCredential=), or set it in the config file"
        )
    return _credentials(table)


_ACL_KEYS: dict[str, type | tuple[type, ...]] = {
    "initiator": str, "chap": (dict, str), "mutual_chap": (dict, str), "luns": list,
    "readonly_luns": list, "readonly": bool, "addresses": list,
}  # fmt: skip


def _numbers(key: str, items: list[Any]) -> frozenset[int]:
    for item in items:
        if type(item) is not int or not 0 <= item <= MAX_LUN:
            raise FieldError(key, f"must be LUN numbers (0 to {MAX_LUN}), not {item!r}")
    return frozenset(items)


def _networks(items: list[Any]) -> tuple[Network, ...]:
    out = []
    for item in items:
        try:
            out.append(ipaddress.ip_network(_text(item), strict=False))
        except ValueError as e:
            raise FieldError("addresses", f"{item!r} is not an address or network: {e}") from e
    return tuple(out)


def _chap_pair(item: dict[str, Any]) -> dict[str, Credentials]:
    """A table's ``chap`` and ``mutual_chap``, each checked, errors naming the key inside."""
    creds: dict[str, Credentials] = {}
    for key in ("chap", "mutual_chap"):
        if key in item:
            try:
                creds[key] = _credentials(item[key])
            except FieldError as e:
                raise FieldError(f"{key}.{e.field}", str(e)) from e
            except ValueError as e:
                raise FieldError(key, str(e)) from e
    return creds


def _acl(item: Any) -> Acl:
    """``{ initiator, chap, mutual_chap, luns, readonly_luns, readonly, addresses }``."""
    if not isinstance(item, dict):
        raise ValueError("must be a table { initiator = IQN, ... }")
    _table(item, _ACL_KEYS, ("initiator",))
    creds = _chap_pair(item)
    try:
        check_mutual(creds.get("chap"), creds.get("mutual_chap"))
    except ValueError as e:
        raise FieldError("mutual_chap", str(e)) from e
    return Acl(
        item["initiator"],
        creds.get("chap"),
        creds.get("mutual_chap"),
        _numbers("luns", item["luns"]) if "luns" in item else None,
        _numbers("readonly_luns", item.get("readonly_luns", [])),
        item.get("readonly", False),
        _networks(item.get("addresses", [])),
    )


def _acl_cli(text: str) -> Acl:
    """An inline TOML table, as in the config; its CHAP secrets only from files."""
    try:
        value = tomllib.loads(f"acl = {text}")["acl"]
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f'must be an inline TOML table {{ initiator = "IQN", ... }}: {e}') from e
    for key in ("chap", "mutual_chap"):
        given = value.get(key) if isinstance(value, dict) else None
        if isinstance(given, str) or (isinstance(given, dict) and "secret" in given):
            raise FieldError(key, "a CHAP secret on the command line is visible to every local "
                             "user (ps): use secret_file or credential")  # fmt: skip
    return _acl(value)


def _check_acls(luns: list[LunSpec], acls: list[Acl], allow: frozenset[str], where: str) -> None:
    served = set(numbered(luns))
    seen: dict[str, int] = {}
    for n, acl in enumerate(acls):
        first = seen.setdefault(acl.initiator, n)
        if first != n:
            raise ValueError(f"{where}[{n}].initiator: {acl.initiator} has an ACL already")
        for key, numbers in (("luns", acl.luns or ()), ("readonly_luns", acl.readonly_luns)):
            missing = sorted(set(numbers) - served)
            if missing:
                raise ValueError(f"{where}[{n}].{key}: LUN {missing[0]} is not served")
    if acls and allow:
        raise ValueError("allow and acls both given: with ACLs, list each initiator in acls")


def _backend(value: Any) -> BackendName:
    for name in BACKENDS:
        if value == name:
            return name
    raise ValueError(f"must be one of {', '.join(BACKENDS)}, not {value!r}")


def _read_loop(value: Any) -> ReadLoopName:
    for name in READ_LOOPS:
        if value == name:
            return name
    raise ValueError(f"must be one of {', '.join(READ_LOOPS)}, not {value!r}")


def _on_off(value: Any) -> bool:
    if isinstance(value, bool):  # TOML
        return value
    if value in ("on", "off"):
        return bool(value == "on")
    raise ValueError(f"must be on or off, not {value!r}")


def _integer(value: Any) -> int:
    """An integer: a TOML integer, or digits (the command line, or a quoted TOML value). A
    TOML true or 3.7 is refused (int() would take them as 1 and 3)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    given = repr(value) if isinstance(value, str) else _toml_type(value)
    raise ValueError(f"must be an integer, not {given}")


def _size(value: Any) -> int:
    """A size: an integer number of bytes, or a string with a unit (``64K``, ``1M``)."""
    if isinstance(value, (bool, float)) or not isinstance(value, (int, str)):
        raise ValueError(f'must be a size (bytes, or a string like "64K"), not {_toml_type(value)}')
    return parse_size(str(value))


def _at_least_one(value: Any) -> int:
    number = _integer(value)
    if number < 1:
        raise ValueError(f"must be 1 or more, not {number}")
    return number


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"must be a number of seconds, not {_toml_type(value)}")
    try:
        seconds = float(value)
    except ValueError as e:
        raise ValueError(f"must be a number of seconds, not {value!r}") from e
    if not seconds >= 0:  # also refuses NaN
        raise ValueError(f"must be a number of seconds, 0 or more (0: off), not {value!r}")
    return seconds


def metrics_address(value: Any) -> str:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (loopback). A bare ``9310`` is refused: it
    used to parse as host 9310 and port 3260; a host without a port is refused alike."""
    text = _text(value)
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""
    if not port.isdigit() or int(port) > 65535:
        raise ValueError(
            f"{text!r} has no port: write HOST:PORT, e.g. 127.0.0.1:9310 (this host only) or "
            "0.0.0.0:9310 (every address; anyone who reaches it reads the target's state)"
        )
    host = host or "127.0.0.1"  # an address left out is loopback, never every address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_name(iqn: str, what: str) -> None:
    if not iqn.startswith(("iqn.", "eui.", "naa.")):
        raise ValueError(f"{what} {iqn!r} must start with iqn., eui. or naa.")


def _check_targets(cfg: TargetConfig, options: Mapping[str, Any], table: Mapping[str, Any]) -> None:
    """Several targets: no target key left at the top level (which target would it be?), no
    IQN twice."""
    where = "--target" if options.get("target") else "config key target"
    for key in TARGET_KEYS:
        if key == "alias":
            continue
        s = next(s for s in SETTINGS if s.key == key)
        if options.get(key) or key in table:
            place = s.flag if options.get(key) else f"config key {key}"
            raise ValueError(
                f"{place}: with [[target]] tables each target has its own {key}: put it inside "
                "the target's table"
            )
    seen: dict[str, int] = {}
    for n, spec in enumerate(cfg.target):
        first = seen.setdefault(spec.iqn, n)
        if first != n:
            raise ValueError(f"{where}[{n}].iqn: {spec.iqn} is also {where.split()[-1]}[{first}]'s")
    _check_images(cfg.target, where)


def _image_key(path: str) -> str | None:
    """What identifies an image file (None: memory, which is never shared)."""
    if path.startswith(("mem:", "null:")):
        return None
    return os.path.realpath(path)


def _check_images(targets: list[TargetSpec], where: str) -> None:
    """An image served writable by one LUN is served by no other, of any target: two LUNs
    writing one file would each cache, lock and reserve it as their own."""
    served: dict[str, tuple[str, bool]] = {}
    several = len(targets) > 1 or where.endswith("target")
    for t, spec in enumerate(targets):
        for n, lun in enumerate(spec.luns):
            key = _image_key(lun.path)
            if key is None:
                continue
            place = f"{where}[{t}].luns[{n}]" if several else f"{where}[{n}]"
            first = served.get(key)
            if first is not None and (not lun.readonly or not first[1]):
                raise ValueError(
                    f"{place}.path: {lun.path} is served by {first[0]} too; an image may be "
                    "served by several LUNs only if every one of them is read-only"
                )
            served.setdefault(key, (place, lun.readonly))


_TARGET_TABLE_KEYS: dict[str, type | tuple[type, ...]] = {
    "iqn": str, "alias": str, "luns": list, "chap": (dict, str), "mutual_chap": (dict, str),
    "allow": list, "acls": list,
}  # fmt: skip


def _items(key: str, values: list[Any], convert: Callable[[Any], Any]) -> list[Any]:
    out = []
    for n, item in enumerate(values):
        try:
            out.append(convert(item))
        except FieldError as e:
            raise FieldError(f"{key}[{n}].{e.field}", str(e)) from e
        except (ValueError, TypeError, KeyError) as e:
            raise FieldError(f"{key}[{n}]", str(e)) from e
    return out


def _target(item: Any) -> TargetSpec:
    """A ``[[target]]`` table: ``{ iqn, alias, luns, chap, mutual_chap, allow, acls }``, each
    key as at the top level of the single-target form."""
    if not isinstance(item, dict):
        raise ValueError("must be a table { iqn = IQN, luns = [...], ... }")
    _table(item, _TARGET_TABLE_KEYS, ("iqn", "luns"))
    creds = _chap_pair(item)
    try:
        _check_name(item["iqn"], "target name")
    except ValueError as e:
        raise FieldError("iqn", str(e)) from e
    if "mutual_chap" in creds and "chap" not in creds:
        raise FieldError("mutual_chap", "needs chap as well")
    try:
        check_mutual(creds.get("chap"), creds.get("mutual_chap"))
    except ValueError as e:
        raise FieldError("mutual_chap", str(e)) from e
    luns = _items("luns", item["luns"], _lun)
    if not luns:
        raise FieldError("luns", "no LUN given: a target serves one LUN or more")
    spec = TargetSpec(
        item["iqn"],
        luns,
        item.get("alias", ""),
        creds.get("chap"),
        creds.get("mutual_chap"),
        frozenset(_items("allow", item.get("allow", []), _text)),
        _items("acls", item.get("acls", []), _acl),
    )
    try:
        _check_lun_set(spec.luns, "luns")
    except ValueError as e:
        raise FieldError(*str(e).split(": ", 1)) from e
    try:
        _check_acls(spec.luns, spec.acls, spec.allow, "acls")
    except ValueError as e:
        field_, sep, message = str(e).partition(": ")
        raise (FieldError(field_, message) if sep and field_.startswith("acls[")
               else FieldError("acls", str(e))) from e  # fmt: skip
    return spec


def _target_cli(text: str) -> TargetSpec:
    """An inline TOML table, as in the config; its CHAP secrets only from files."""
    try:
        value = tomllib.loads(f"target = {text}")["target"]
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f'must be an inline TOML table {{ iqn = "IQN", ... }}: {e}') from e
    if isinstance(value, dict):
        tables = [value] + [a for a in value.get("acls", []) if isinstance(a, dict)]
        for table in tables:
            for key in ("chap", "mutual_chap"):
                given = table.get(key)
                if isinstance(given, str) or (isinstance(given, dict) and "secret" in given):
                    raise FieldError(
                        key, "a CHAP secret on the command line is visible to every local "
                        "user (ps): use secret_file or credential",
                    )  # fmt: skip
    return _target(value)


@dataclass(frozen=True)
class Setting:
    """One setting: ``key`` names the TargetConfig field and the TOML key; the option is
    ``--key-with-dashes`` unless ``option`` says otherwise. ``convert`` turns a command-line
    string or a TOML value into the field's value; a ``repeated`` setting is a list."""

    key: str
    help: str
    convert: Callable[[Any], Any]
    metavar: str | None = None
    repeated: bool = False
    option: str = ""
    #: Converts a command-line string where it differs from a TOML value (secrets).
    from_cli: Callable[[str], Any] | None = None

    @property
    def flag(self) -> str:
        return self.option or "--" + self.key.replace("_", "-")


SETTINGS = (
    Setting("listen", "address to listen on", _text, "HOST:PORT"),
    Setting("iqn", "target name", _text),
    Setting(
        "luns",
        "a LUN, numbered from 0 in order; in the config a table { path, readonly, mapped, lun "
        "(its number, kept across reloads; give every LUN one or none), serial (the unit serial "
        "number, VPD page 0x80), wwn (its NAA designator, VPD page 0x83: naa.5 and 15 hex "
        "digits, or naa.6 and 31) } may stand for a string; a LUN's serial and NAA otherwise "
        "derive from the target name, its number and path",
        _lun,
        "PATH[:ro]",
        True,
        "--lun",
    ),
    Setting(
        "chap",
        "require CHAP from initiators: a table { user, and secret_file (a file of mode 0600), "
        'credential (a systemd credential: LoadCredential=) or secret } or "USER:SECRET"; on '
        "the command line user=NAME,secret_file=FILE or user=NAME,credential=NAME (a secret "
        "there is refused). Secrets are read again at each reload",
        _credentials,
        "user=NAME,secret_file=FILE",
        from_cli=_credentials_cli,
    ),
    Setting(
        "mutual_chap",
        "target credentials for mutual CHAP, given as chap is; a secret of its own",
        _credentials,
        "user=NAME,secret_file=FILE",
        from_cli=_credentials_cli,
    ),
    Setting("allow", "only these initiators may log in", _text, "IQN", True),
    Setting(
        "acls",
        "per-initiator access, one table per initiator: { initiator (its IQN), chap and "
        "mutual_chap (its own credentials, given as chap is; default: chap), luns (the LUN "
        "numbers it sees; default all), readonly_luns (those it may only read), readonly (all "
        "read-only), addresses (IPs or networks it may log in from; default any) }. With ACLs "
        "only the initiators they list may log in, and allow is not used; on the command line "
        "an inline TOML table",
        _acl,
        "{ initiator = IQN, ... }",
        True,
        "--acl",
        from_cli=_acl_cli,
    ),
    Setting(
        "discovery_chap",
        "CHAP credentials for discovery logins (SendTargets), given as chap is; default: "
        "discovery logins authenticate with chap",
        _credentials,
        "user=NAME,secret_file=FILE",
        from_cli=_credentials_cli,
    ),
    Setting(
        "cross_session_resets",
        "on: TARGET WARM/COLD RESET from any session reset the target under every session; "
        "off: refused (function authorization failed) while another session is logged in. "
        "LOGICAL UNIT RESET is always allowed (SAM-5): it aborts every session's tasks of the "
        "LUN and tells the other sessions by a unit attention",
        _on_off,
        "on|off",
    ),
    Setting(
        "target",
        "several targets (IQNs) in one daemon, one [[target]] table each: { iqn, alias (its "
        "TargetAlias), luns, chap, mutual_chap, allow, acls }, each key as at the top level, "
        "which then has none of them (the top-level form is one target). Discovery lists each "
        "target an initiator may log in to; a login names one and sees only its LUNs and "
        "ACLs; an image served writable by one LUN is served by no other. On the command line "
        "an inline TOML table",
        _target,
        "{ iqn = IQN, luns = [...], ... }",
        True,
        "--target",
        from_cli=_target_cli,
    ),
    Setting("max_connections", "connections open at once", _at_least_one),
    Setting(
        "max_pending_logins",
        "connections allowed to sit in login at once; the oldest is dropped",
        _at_least_one,
    ),
    Setting("buffers", "transmit buffers in the pool", _at_least_one),
    Setting("buffer_size", "size of each transmit buffer", _size),
    Setting(
        "backend",
        "zerosend backend for every connection; auto copies to peers on this host",
        _backend,
        "|".join(BACKENDS),
    ),
    Setting(
        "zerocopy_probe",
        "on: a connection whose zero-copy sends the kernel keeps copying switches to copy; "
        "off: it keeps sending zero-copy (for measuring and testing zero-copy on veth)",
        _on_off,
        "on|off",
    ),
    Setting(
        "read_loop",
        "the READ fast path's inner loop: native (Rust) or python (the same algorithm, for "
        "comparisons); an install without the native module always runs python",
        _read_loop,
        "|".join(READ_LOOPS),
    ),
    Setting(
        "sendfile",
        "on: READs of 10 KiB or more from a read-only raw image leave with sendfile(2) instead "
        "of a read into a transmit buffer (slower on loopback; kept for measuring on a NIC)",
        _on_off,
        "on|off",
    ),
    Setting(
        "reservation_state",
        "file keeping the persistent reservations initiators ask to survive a restart (APTPL); "
        "default: NAME.reservations.json next to --config NAME.toml, none without a config; "
        "with [[target]] tables one file per target, its IQN before the extension "
        "(NAME.reservations.IQN.json)",
        _text,
        "FILE",
    ),
    Setting(
        "metrics",
        "serve Prometheus metrics at http://HOST:PORT/metrics; :PORT serves loopback only",
        metrics_address,
        "HOST:PORT",
    ),
    Setting(
        "metrics_connections",
        "metrics connections open at once; more are answered 503 and closed",
        _at_least_one,
    ),
    Setting(
        "control_socket",
        "local socket (mode 0600) that zerosend-iscsi show reads the live state from; default: "
        "control in $RUNTIME_DIRECTORY (systemd's RuntimeDirectory=), none without it",
        _text,
        "PATH",
    ),
    Setting(
        "session_commands",
        "commands one session may have queued or in progress: its CmdSN window",
        _at_least_one,
    ),
    Setting(
        "session_bytes",
        "bytes one session may have queued for sending before its window closes",
        lambda v: _at_least_one(_size(v)),
    ),
    Setting(
        "session_buffers",
        "transmit buffers one session may hold; sessions waiting for buffers get equal shares",
        _at_least_one,
    ),
    Setting(
        "nop_interval",
        "seconds without progress, with work outstanding, before a session pings its initiator "
        "(NOP-In); 0: no pings",
        _seconds,
        "SECONDS",
    ),
    Setting(
        "nop_timeout",
        "seconds a ping may go unanswered before the initiator is declared dead and its "
        "connection reset",
        _seconds,
        "SECONDS",
    ),
    Setting(
        "user_timeout",
        "seconds sent data may go unacknowledged before the kernel drops the connection "
        "(TCP_USER_TIMEOUT; keepalive probes every third of it); 0: the kernel's defaults",
        _seconds,
        "SECONDS",
    ),
)
DEFAULTS = TargetConfig()  # for help texts


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except OSError as e:
        raise ValueError(f"cannot read config {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"config {path} is not valid TOML: {e}") from e
    unknown = set(table) - {s.key for s in SETTINGS}
    if unknown:
        raise ValueError(f"config {path}: unknown keys {', '.join(sorted(unknown))}")
    return table


class _Located(ValueError):
    """An error of one item of a list setting: ``place`` says which (``[0].read_only``)."""

    def __init__(self, place: str, message: str) -> None:
        super().__init__(message)
        self.place = place


def _located(e: Exception, index: str) -> _Located:
    return _Located(index + (f".{e.field}" if isinstance(e, FieldError) else ""), str(e))


def _place(e: Exception) -> str:
    if isinstance(e, _Located):
        return e.place
    return f".{e.field}" if isinstance(e, FieldError) else ""


def load_config(options: Mapping[str, Any], path: str | None = None) -> TargetConfig:
    """The settings from the command line (``options``, by key; None or empty where not given)
    over those of the TOML file at ``path`` over the defaults."""
    table = _read_toml(path) if path else {}
    cfg = TargetConfig()
    for s in SETTINGS:
        given = options.get(s.key)
        where = s.flag
        convert = s.from_cli or s.convert
        if not given:
            given, where = table.get(s.key), f"config key {s.key}"
            convert = s.convert
        if given is None:
            continue
        try:
            if s.repeated:
                if not isinstance(given, list):
                    raise ValueError("must be a list")
                value: Any = []
                for n, item in enumerate(given):
                    try:
                        value.append(convert(item))
                    except (ValueError, TypeError, KeyError) as e:
                        raise _located(e, "" if where == s.flag else f"[{n}]") from e
            else:
                value = convert(given)
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{where}{_place(e)}: {e}") from e
        setattr(cfg, s.key, frozenset(value) if s.key == "allow" else value)
    if not cfg.reservation_state and path:
        cfg.reservation_state = os.path.splitext(path)[0] + ".reservations.json"
    if cfg.mutual_chap and not cfg.chap:
        raise ValueError("--mutual-chap needs --chap as well")
    check_mutual(cfg.chap, cfg.mutual_chap)
    _check_name(cfg.iqn, "target name")
    if cfg.target:
        _check_targets(cfg, options, table)
        for spec in cfg.target:
            spec.discovery_chap = cfg.discovery_chap
        return cfg
    _check_lun_set(cfg.luns, "--lun" if options.get("luns") else "config key luns")
    acls_where = "--acl" if options.get("acls") else "config key acls"
    _check_acls(cfg.luns, cfg.acls, cfg.allow, acls_where)
    if not cfg.luns:
        raise ValueError("no LUN given: use --lun PATH (or luns = [...] in the config file)")
    cfg.target = cfg.targets()  # the single-target form: one target
    _check_images(cfg.target, "--lun" if options.get("luns") else "config key luns")
    return cfg


def split_hostport(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT``, ``HOST`` (port 3260)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else "3260"
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, "3260"
    try:
        return host or "0.0.0.0", int(port)
    except ValueError as e:
        raise ValueError(f"bad listen address {text!r}: port is not a number") from e

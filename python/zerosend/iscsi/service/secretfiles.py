"""CHAP secrets kept out of the command line and the config file: read from a file of their
own, or from a systemd credential (``LoadCredential=NAME:PATH`` in the unit puts the file, readable
by the service alone, in ``$CREDENTIALS_DIRECTORY``; the config can stay world-readable for a
``DynamicUser=`` service)."""

from __future__ import annotations

import os
import stat

CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"


def read_secret_file(path: str, private: bool = True) -> str:
    """The secret in ``path``: its text without the final newline. A file other users can read
    is refused: the point of keeping the secret apart is that they cannot."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            data = f.read(4096)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from e
    if private and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(
            f"{path} is open to other users (mode {stat.S_IMODE(mode):04o}): chmod 600 it"
        )
    try:
        text = data.decode()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text") from e
    if text.endswith("\n"):
        text = text[:-1]
    if "\n" in text:
        raise ValueError(f"{path} holds more than one line: put the secret alone in it")
    return text


def read_credential(name: str) -> str:
    """The systemd credential ``name`` (``LoadCredential=name:/path`` or ``SetCredential=``)."""
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"{name!r} is not a credential name")
    directory = os.environ.get(CREDENTIALS_ENV)
    if not directory:
        raise ValueError(
            f"credential {name!r}: ${CREDENTIALS_ENV} is not set (systemd sets it for a unit "
            "with LoadCredential=); outside systemd use secret_file"
        )
    # (systemd owns the directory and gives the service alone access to it)
    return read_secret_file(os.path.join(directory, name), private=False)

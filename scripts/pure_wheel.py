"""Builds the pure-Python wheel (py3-none-any) from the sdist in DIST, into DIST.

pip prefers a platform wheel (manylinux, musllinux) where one matches and takes this one
everywhere else (macOS, the BSDs, other architectures), instead of trying to compile the sdist.
Without the extension, zerosend runs on its pure-Python copy backend: same API and contract,
no zero-copy, and capabilities() says why. The wheel holds exactly the sdist's Python package,
licence files and metadata (maturin's PKG-INFO), so it cannot drift from the binary wheels.

    python scripts/pure_wheel.py DIST
"""

from __future__ import annotations

import base64
import hashlib
import sys
import tarfile
import tomllib
import zipfile
from email.parser import HeaderParser
from pathlib import Path

# Fixed timestamps make the wheel reproducible (zip cannot store times before 1980).
EPOCH = (1980, 1, 1, 0, 0, 0)


def record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def build(dist: Path) -> Path:
    sdists = list(dist.glob("zerosend-*.tar.gz"))
    if len(sdists) != 1:
        sys.exit(f"expected one zerosend sdist in {dist}, found {[p.name for p in sdists]}")
    files: dict[str, bytes] = {}
    with tarfile.open(sdists[0]) as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            _, _, path = member.name.partition("/")
            extracted = tar.extractfile(member)
            assert extracted is not None
            files[path] = extracted.read()
    metadata = files["PKG-INFO"]
    headers = HeaderParser().parsestr(metadata.decode())
    name, version = headers["Name"], headers["Version"]
    dist_info = f"{name}-{version}.dist-info"
    contents = {
        path.removeprefix("python/"): data
        for path, data in files.items()
        if path.startswith("python/zerosend/")
    }
    for licence in headers.get_all("License-File") or []:
        contents[f"{dist_info}/licenses/{licence}"] = files[licence]
    contents[f"{dist_info}/METADATA"] = metadata
    contents[f"{dist_info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: zerosend scripts/pure_wheel.py\n"
        b"Root-Is-Purelib: true\nTag: py3-none-any\n"
    )
    scripts = tomllib.loads(files["pyproject.toml"].decode())["project"].get("scripts", {})
    entry_points = "".join(f"{command} = {target}\n" for command, target in scripts.items())
    contents[f"{dist_info}/entry_points.txt"] = f"[console_scripts]\n{entry_points}".encode()
    record = [record_line(path, data) for path, data in sorted(contents.items())]
    record.append(f"{dist_info}/RECORD,,")
    contents[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()

    wheel = dist / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for path, data in contents.items():
            info = zipfile.ZipInfo(path, EPOCH)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    return wheel


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(build(Path(sys.argv[1])))

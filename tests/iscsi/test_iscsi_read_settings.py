"""How READs are served is set like every other setting (``read_loop``, ``sendfile``: a
command-line option, a TOML key, a line of ``--help``), not by environment variables the
configuration does not know."""

from __future__ import annotations

import asyncio
import queue
import struct
import threading
from pathlib import Path
from typing import Any

import pytest
from iscsi_helpers import IQN, MiniInitiator, make_image

from zerosend.iscsi import LunSpec, Target, TargetConfig
from zerosend.iscsi._accel import NativeReadPath as IscsiReadPath
from zerosend.iscsi.service.cli import build_parser
from zerosend.iscsi.service.config import load_config
from zerosend.iscsi.session import readloop


def test_read_settings_are_options_keys_and_help(tmp_path: Path):
    text = build_parser().format_help()
    assert "--read-loop native|python" in text and "--sendfile on|off" in text
    defaults = load_config(vars(build_parser().parse_args(["--lun", "mem:1M"])))
    assert defaults.read_loop == "native" and defaults.sendfile is False
    argv = ["--lun", "mem:1M", "--read-loop", "python", "--sendfile", "on"]
    from_cli = load_config(vars(build_parser().parse_args(argv)))
    toml = tmp_path / "target.toml"
    toml.write_text('luns = ["mem:1M"]\nread_loop = "python"\nsendfile = true\n')
    from_toml = load_config(vars(build_parser().parse_args(["--config", str(toml)])), str(toml))
    for cfg in (from_cli, from_toml):
        assert cfg.read_loop == "python" and cfg.sendfile is True
    with pytest.raises(ValueError, match="--read-loop: must be one of native, python, not 'rust'"):
        load_config(vars(build_parser().parse_args(["--lun", "mem:1M", "--read-loop", "rust"])))
    toml.write_text('luns = ["mem:1M"]\nsendfile = "yes"\n')
    with pytest.raises(ValueError, match="config key sendfile: must be on or off"):
        load_config(vars(build_parser().parse_args(["--config", str(toml)])), str(toml))


def _python_loop_runs(
    path: Path, data: bytes, read_loop: str, monkeypatch: pytest.MonkeyPatch
) -> int:
    """READs through a target set to ``read_loop``; how many runs the Python inner loop served."""
    runs = 0
    serve = readloop.ReadLoop.serve

    def counted(self: readloop.ReadLoop, *args: Any) -> Any:
        nonlocal runs
        runs += 1
        return serve(self, *args)

    monkeypatch.setattr(readloop.ReadLoop, "serve", counted)
    config = TargetConfig(
        listen="127.0.0.1:0", iqn=IQN, luns=[LunSpec(str(path))], read_loop=read_loop
    )
    target = Target(config)
    started: queue.Queue[int] = queue.Queue()
    loop = asyncio.new_event_loop()

    async def run() -> None:
        started.put((await target.start())[1])
        await target.serve()

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    thread.start()
    try:
        ini = MiniInitiator(started.get(timeout=60))
        ini.login(IQN)
        for lba in (0, 8, 100):
            ini.scsi(struct.pack(">BBIBHB", 0x28, 0, lba, 0, 8, 0), 4096, read=True)
            status, got, _ = ini.read_response()
            assert status == 0 and got == data[lba * 512 : lba * 512 + 4096]
        ini.close()
    finally:
        loop.call_soon_threadsafe(target.stop)
        thread.join(60)
        loop.close()
    return runs


@pytest.mark.parametrize("read_loop", ["native", "python"])
def test_the_read_loop_setting_picks_the_inner_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, read_loop: str
):
    if read_loop == "native" and IscsiReadPath is None:
        pytest.skip("no native module: the Python inner loop always runs")
    path = tmp_path / "disk.img"
    data = make_image(path, 1 << 20, seed=5)
    # The environment variable that used to choose the loop chooses nothing any more.
    monkeypatch.setenv("ZEROSEND_ISCSI_NATIVE", "0" if read_loop == "native" else "1")
    runs = _python_loop_runs(path, data, read_loop, monkeypatch)
    assert (runs > 0) == (read_loop == "python"), runs

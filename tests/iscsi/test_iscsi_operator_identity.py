"""Device identity an operator sets and keeps: per-LUN ``serial`` and ``wwn`` (NAA), explicit
LUN numbers kept across reloads, and REPORTED LUNS DATA HAS CHANGED after a reload that changes
the LUN set."""

from __future__ import annotations

import signal
import struct
from pathlib import Path

import pytest
from iscsi_helpers import IQN, MiniInitiator, RunningTarget, need, run, wait_for

from zerosend.iscsi.service.config import load_config

UNIT_ATTENTION = 0x6
CHECK_CONDITION = 0x02
TUR = bytes(6)


def inquiry_vpd(page: int) -> bytes:
    return bytes((0x12, 0x01, page, 0x01, 0x00, 0x00))


def report_luns() -> bytes:
    return bytes((0xA0, 0, 0, 0, 0, 0)) + struct.pack(">I", 4096) + bytes(2)


def command(ini: MiniInitiator, cdb: bytes, lun: int, edtl: int = 0) -> tuple[int, bytes, bytes]:
    ini.scsi(cdb, edtl, read=edtl > 0, lun=lun)
    return ini.read_response()


def naa_designator(page: bytes) -> bytes:
    """The NAA designator (type 3, logical unit) of a VPD 0x83 page."""
    body, i = page[4:], 0
    while i + 4 <= len(body):
        kind, size = body[i + 1], body[i + 3]
        if kind & 0x0F == 3 and (kind >> 4) & 3 == 0:
            return body[i + 4 : i + 4 + size]
        i += 4 + size
    raise AssertionError(f"no NAA designator in {page.hex()}")


def reported(ini: MiniInitiator) -> list[int]:
    status, data, _ = command(ini, report_luns(), 0, 4096)
    assert status == 0
    size = struct.unpack_from(">I", data)[0]
    return [int.from_bytes(data[8 + i : 10 + i], "big") & 0x3FFF for i in range(0, size, 8)]


def serve(target_factory, tmp_path: Path, luns: str) -> tuple[RunningTarget, Path]:
    config = tmp_path / "target.toml"
    config.write_text(f"luns = [{luns}]\n")
    return target_factory("--config", str(config)), config


def reload(t: RunningTarget, config: Path, luns: str) -> None:
    config.write_text(f"luns = [{luns}]\n")
    before = t.log().count("reload done")
    t.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: t.log().count("reload done") > before, "the reload", 60)


def logged_in(t: RunningTarget, name: str = "iqn.2024-01.org.zerosend:mini") -> MiniInitiator:
    ini = MiniInitiator(t.port)
    ini.login(IQN, {"InitiatorName": name})
    return ini


def test_serial_and_wwn_as_set(target_factory, tmp_path: Path):
    t, _ = serve(target_factory, tmp_path,
                 '{ path = "mem:1M", serial = "SN-0001", wwn = "naa.5001405abcdef012" }, '
                 '{ path = "mem:1M", wwn = "60014051234567890123456789abcdef" }')  # fmt: skip
    inq = need("iscsi-inq")
    out = run([inq, "-e", "1", "-c", "128", t.url(0)]).stdout
    assert "Unit Serial Number:[SN-0001]" in out
    ini = logged_in(t)
    status, page, _ = command(ini, inquiry_vpd(0x83), 0, 255)
    assert status == 0 and naa_designator(page) == bytes.fromhex("5001405abcdef012")
    _, page, _ = command(ini, inquiry_vpd(0x83), 1, 255)
    assert naa_designator(page) == bytes.fromhex("60014051234567890123456789abcdef")
    _, page, _ = command(ini, inquiry_vpd(0x80), 0, 255)
    assert page[4:] == b"SN-0001"
    ini.close()


def test_identity_stays_when_the_image_moves_and_the_target_is_renamed(
    target_factory, tmp_path: Path
):
    """The WWID multipath keys on (VPD 0x83 NAA, 0x80 serial) is the operator's, not derived."""
    ids = []
    for n, (name, iqn) in enumerate([("a.img", IQN), ("b.img", IQN + "-renamed")]):
        image = tmp_path / name
        image.write_bytes(bytes(1 << 20))
        config = tmp_path / f"t{n}.toml"
        config.write_text(
            f'luns = [{{ path = "{image}", serial = "S1", wwn = "naa.5001405000000001" }}]\n'
        )
        t = target_factory("--config", str(config), iqn=iqn)
        ini = MiniInitiator(t.port)
        ini.login(iqn)
        ids.append(
            (command(ini, inquiry_vpd(0x83), 0, 255)[1], command(ini, inquiry_vpd(0x80), 0, 255)[1])
        )
        ini.close()
    assert naa_designator(ids[0][0]) == naa_designator(ids[1][0]) and ids[0][1] == ids[1][1]


@pytest.mark.parametrize(
    ("luns", "message"),
    [
        ('{ path = "mem:1M", wwn = "naa.6001405abcdef012" }', "luns[0].wwn: 'naa.6001405abcdef"),
        ('{ path = "mem:1M", wwn = "5zz1405abcdef012" }', "luns[0].wwn: "),
        ('{ path = "mem:1M", serial = "has space" }', "luns[0].serial: must be 1 to 40"),
        ('{ path = "mem:1M", serial = "" }', "luns[0].serial: must be 1 to 40"),
        ('{ path = "mem:1M", lun = -1 }', "luns[0].lun: must be 0 to 16383"),
        ('{ path = "mem:1M", lun = "3" }', "luns[0].lun: must be an integer"),
        ('{ path = "mem:1M", lun = 3 }, "mem:1M"', "luns[1].lun: missing: once one LUN"),
        ('{ path = "mem:1M", lun = 3 }, { path = "mem:2M", lun = 3 }', "luns[1].lun: 3 is also"),
        ('{ path = "mem:1M", serial = "A" }, { path = "mem:2M", serial = "A" }', "luns[1].serial"),
    ],
)  # fmt: skip
def test_bad_identity_settings_name_the_key(tmp_path: Path, luns: str, message: str):
    config = tmp_path / "t.toml"
    config.write_text(f"luns = [{luns}]\n")
    with pytest.raises(ValueError) as e:
        load_config({}, str(config))
    assert f"config key {message}" in str(e.value)


def test_explicit_lun_numbers_survive_removing_an_earlier_lun(target_factory, tmp_path: Path):
    """Removing LUN 3 leaves LUN 7 numbered 7: its session stays, and learns of the change by
    one REPORTED LUNS DATA HAS CHANGED unit attention (3F/0E)."""
    t, config = serve(target_factory, tmp_path,
                      '{ path = "mem:1M", lun = 3 }, { path = "mem:2M", lun = 7 }')  # fmt: skip
    ini = logged_in(t)
    assert reported(ini) == [3, 7]
    assert command(ini, TUR, 7)[0] == 0
    reload(t, config, '{ path = "mem:2M", lun = 7 }')
    status, _, sense = command(ini, TUR, 7)
    assert status == CHECK_CONDITION and sense[2] & 0x0F == UNIT_ATTENTION, sense.hex()
    assert (sense[12], sense[13]) == (0x3F, 0x0E)
    assert command(ini, TUR, 7)[0] == 0  # once
    assert reported(ini) == [7]
    assert "ending session" not in t.log()
    ini.close()


def test_adding_a_lun_tells_every_session(target_factory, tmp_path: Path):
    t, config = serve(target_factory, tmp_path, '"mem:1M"')
    a = logged_in(t, "iqn.2024-01.org.zerosend:a")
    b = logged_in(t, "iqn.2024-01.org.zerosend:b")
    reload(t, config, '"mem:1M", "mem:2M"')
    for ini in (a, b):
        status, _, sense = command(ini, TUR, 0)
        assert status == CHECK_CONDITION and (sense[12], sense[13]) == (0x3F, 0x0E)
        assert reported(ini) == [0, 1]
        status, _, sense = command(ini, TUR, 1)  # the new LUN reports it too (SAM-5: every LU)
        assert status == CHECK_CONDITION and (sense[12], sense[13]) == (0x3F, 0x0E)
        assert command(ini, TUR, 0)[0] == 0 and command(ini, TUR, 1)[0] == 0
        ini.close()


def test_a_reload_that_keeps_the_lun_set_raises_no_attention(target_factory, tmp_path: Path):
    t, config = serve(target_factory, tmp_path, '{ path = "mem:1M", lun = 2 }')
    ini = logged_in(t)
    config.write_text(
        'luns = [{ path = "mem:1M", lun = 2 }]\nallow = ["iqn.2024-01.org.zerosend:mini"]\n'
    )
    before = t.log().count("reload done")
    t.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: t.log().count("reload done") > before, "the reload", 60)
    assert command(ini, TUR, 2)[0] == 0
    ini.close()


def test_libiscsi_sees_explicit_numbers(target_factory, tmp_path: Path):
    ls = need("iscsi-ls")
    t, _ = serve(
        target_factory, tmp_path, '{ path = "mem:1M", lun = 5 }, { path = "mem:1M", lun = 200 }'
    )
    out = run([ls, "-s", t.url(None)]).stdout
    assert "Lun:5 " in out and "Lun:200 " in out, out
    assert "Vendor:ZEROSEND" in run([need("iscsi-inq"), t.url(200)]).stdout


def test_attention_with_reads_in_flight_answers_every_read(target_factory, tmp_path: Path):
    """Pipelined READs when the attention is raised: one gets it, every other is answered."""
    t, config = serve(target_factory, tmp_path, '"mem:1M", "mem:1M"')
    ini = logged_in(t)
    reload(t, config, '"mem:1M"')
    read = bytes((0x28, 0, 0, 0, 0, 0, 0, 0, 64, 0))
    for _ in range(4):
        ini.scsi(read, 64 * 512, read=True, lun=0)
    statuses = sorted(ini.read_response()[0] for _ in range(4))
    assert statuses == [0, 0, 0, CHECK_CONDITION]
    ini.close()

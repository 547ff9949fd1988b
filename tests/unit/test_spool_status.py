"""What `dicomgw status` says of the spool's room: free space against the reserve kept for the site's own
modalities, LOW below it (peers' studies are refused then), and a spool it cannot read."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from gateway.cli import _spool_space, _spool_text
from gateway.settings import PathSettings, Settings


def test_the_spool_line_says_free_space_the_reserve_and_when_it_is_low(tmp_path: Path) -> None:
    settings = Settings(paths=PathSettings(spool_dir=tmp_path, watch_dir=None, quarantine_dir=tmp_path / "q",
                                           spool_reserve_mb=1))
    roomy = _spool_space(settings)
    assert roomy["free_bytes"] > 10**6 and roomy["low"] is False
    assert _spool_text(roomy).endswith(f"MB free on {tmp_path} (1 MB kept for this site's modalities)")
    low = _spool_space(replace(settings, paths=replace(settings.paths, spool_reserve_mb=2**40)))
    assert low["low"] is True and _spool_text(low).endswith("; LOW: peers' studies are refused until there is room")
    gone = _spool_space(replace(settings, paths=replace(settings.paths, spool_dir=tmp_path / "missing\x1b[2J")))
    assert gone["error"] == "No such file or directory"
    assert _spool_text(gone) == f"{tmp_path}/missing[2J: free space cannot be read (No such file or directory)"  # no ESC

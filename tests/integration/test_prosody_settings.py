"""The Prosody the tests, demo and benchmarks start runs the shipped sample's performance settings, and the
Prosody of Debian 12 (Lua 5.4) takes them: its garbage-collector setting (`gc`) is refused only in Prosody's
log ("Failed to apply GC configuration"), the server starting anyway with its own default, so the log is read."""

from __future__ import annotations

from pathlib import Path

from tests.integration.test_xmpp_transfer import running_prosody

SAMPLE = Path(__file__).resolve().parents[2] / "conf" / "prosody" / "prosody.cfg.lua"
SETTINGS = ("gc = ", "network_default_read_size = ", "network_settings = ")


def test_the_lab_prosody_runs_the_samples_settings_and_takes_its_gc_setting(tmp_path: Path) -> None:
    sample = SAMPLE.read_text().splitlines()
    wanted = [next(line for line in sample if line.startswith(setting)) for setting in SETTINGS]
    with running_prosody(tmp_path / "prosody") as prosody:
        lab = prosody.config_path.read_text().splitlines()
        assert [line for line in wanted if line not in lab] == []
        log = "".join((prosody.workdir / name).read_text() for name in ("prosody.log", "prosody.err")
                      if (prosody.workdir / name).exists())
        assert "Prosody is using the" in log or "Hello and welcome to Prosody" in log, log[-2000:]  # the log is this run's
        assert "Failed to apply GC configuration" not in log, log[-2000:]

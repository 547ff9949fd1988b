"""Values from studies, peers and the server printed by the CLI literally (issue 16 §2): rich markup is shown,
not obeyed or failed on, and control characters never reach the terminal. The real CLI, on a real SQLite
queue, in a process of its own (its output piped, as a script or a terminal multiplexer reads it)."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from sqlalchemy.engine import Engine

from gateway.model import InstanceHeader
from gateway.store import QueueStore, make_engine, upgrade_schema
from tests.helpers import REPO

HOSTILE_DESCRIPTION = "CT [/] [link=https://evil.example]click[/link] [bold red]x"
HOSTILE_NAME = "DOE^\x1b]0;pwned\x07JANE\x1b[2J\u202eEVIL"


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args, "--config", str(config)], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)


def queue_config(tmp_path: Path) -> tuple[Path, Engine]:
    """A config file naming a fresh SQLite queue at the newest schema, and that queue's engine."""
    config = tmp_path / "gateway.toml"
    config.write_text(f'[paths]\nspool_dir = "spool"\nwatch_dir = ""\nquarantine_dir = "q"\n'
                      f'[queue]\ndb_url = "sqlite:///{tmp_path / "queue.db"}"\n')
    engine = make_engine(f"sqlite:///{tmp_path / 'queue.db'}")
    upgrade_schema(engine)
    return config, engine


def test_queue_queue_show_and_peers_ls_print_hostile_values_literally(tmp_path: Path) -> None:
    config, engine = queue_config(tmp_path)
    store = QueueStore(engine)
    header = InstanceHeader("1.2.3.4.1", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", "1.2.3.4", "1.2.3.4.0",
                            patient_name=HOSTILE_NAME, study_description=HOSTILE_DESCRIPTION, modality="CT")
    store.record_instance(header, spool_path="s/1.dcm", size_bytes=10, sha256="a" * 64, source="test", conflict=False)
    store.record_instance(replace(header, sop_instance_uid="1.2.3.4.2"), spool_path="s/2.dcm", size_bytes=10,
                          sha256="b" * 64, source="test", conflict=False)
    store.add_peer("radiology.hospital-b@net.test", "[/]\x1b[31mRed\x1b[0m [link=https://evil.example]B[/link]", None)
    engine.dispose()
    for args in (("queue",), ("queue", "show", "1.2.3.4"), ("peers", "ls")):
        done = cli(config, *args)
        assert done.returncode == 0, (args, done.stderr)
        shown = done.stdout
        assert "\x1b" not in shown and "\x07" not in shown and "\u202e" not in shown, (args, shown)
        assert "MarkupError" not in done.stderr
        if args[0] == "queue":
            assert HOSTILE_DESCRIPTION in shown  # shown as it is, markup and all
            assert "DOE^]0;pwnedJANE[2JEVIL" in shown  # the escape characters gone, the rest literal
        else:
            assert "[/][31mRed[0m [link=https://evil.example]B[/link]" in shown


def test_roster_names_that_would_inject_into_the_groups_file_are_refused(tmp_path: Path) -> None:
    """A display name or --group with a line break injected sections into Prosody's groups file: refused with
    the reason at `peers add|edit` and at `peers export`, which also refuses a name stored before this check."""
    config = tmp_path / "gateway.toml"
    config.write_text(f'[paths]\nspool_dir = "spool"\nwatch_dir = ""\nquarantine_dir = "q"\n'
                      f'[queue]\ndb_url = "sqlite:///{tmp_path / "queue.db"}"\n'
                      f'[xmpp]\njid = "radiology.hospital-a@net.test/gw1"\npassword = "x"\n')
    config.chmod(0o600)  # it holds a password
    evil = "Radiology B\n[Injected]\nradiology.hospital-c@net.test=C"
    added = cli(config, "peers", "add", "radiology.hospital-b@net.test", "--name", evil)
    assert added.returncode == 2 and "names may not hold line breaks" in added.stderr
    assert cli(config, "peers", "add", "radiology.hospital-b@net.test", "--name", "Radiology, Hospital B").returncode == 0
    assert cli(config, "peers", "edit", "radiology.hospital-b@net.test", "--name", "B]x").returncode == 2
    grouped = cli(config, "peers", "export", "prosody", "--group", "G\n[Other]")
    assert grouped.returncode == 2 and "--group" in grouped.stderr
    exported = cli(config, "peers", "export", "prosody")
    assert exported.returncode == 0 and exported.stdout.count("[") == 1  # one section, the group's own
    engine = make_engine(f"sqlite:///{tmp_path / 'queue.db'}")
    QueueStore(engine).edit_peer("radiology.hospital-b@net.test", evil, None)  # as an older version could store it
    engine.dispose()
    refused = cli(config, "peers", "export", "prosody")
    assert refused.returncode == 2 and "display name of radiology.hospital-b@net.test" in refused.stderr
    assert refused.stdout == ""


def test_audit_shows_a_long_detail_whole_and_says_where_a_very_long_one_is_cut(tmp_path: Path) -> None:
    """A pin change names two fingerprints: its audit detail (~200 characters) was cut at 120 in the table. It is
    shown whole now; only a detail over 1000 characters is cut, saying how much more `--json` holds."""
    config, engine = queue_config(tmp_path)
    store = QueueStore(engine)
    change = f"radiology.hospital-b@net.test: fingerprint {'a' * 64} -> {'a' * 64},{'b' * 64}"
    store.audit("peer_edited", change)
    store.audit("offer_refused", "x" * 1500)
    store.audit("receipt_refused", HOSTILE_NAME * 1000)  # control characters, repeated: shown literally, cut, never obeyed
    engine.dispose()
    done = cli(config, "audit")
    assert done.returncode == 0, done.stderr
    squeezed = re.sub(r"[\s│]", "", done.stdout)  # the table wraps a long cell over lines of its column
    assert change.replace(" ", "") in squeezed
    assert "x" * 1000 + "...(500morecharacters:--jsonhasthem)" in squeezed and "x" * 1001 not in squeezed
    assert "\x1b" not in done.stdout and "\x07" not in done.stdout and "\u202e" not in done.stdout
    assert "morecharacters:--jsonhasthem)" in squeezed.split("receipt_refused", 1)[1]


def test_counts_ages_and_unit_ids_out_of_range_are_usage_errors_not_tracebacks(tmp_path: Path) -> None:
    """A count of 10^20, a negative or zero one, a superscript digit, an age of 10^11 days: exit 2 with the option
    and its range named (each was a traceback, or an empty table for --limit 0); a unit id beyond any integer is
    looked up as what it can only be, a Study Instance UID; a UID of 3000 characters is named cut."""
    config, engine = queue_config(tmp_path)
    engine.dispose()
    for args, said in ((("queue", "--limit", "99999999999999999999"), "--limit: '99999999999999999999': a whole number from 1"),
                       (("queue", "--limit", "-1"), "--limit: '-1': a whole number from 1"),
                       (("queue", "--page", "0"), "--page: '0': a whole number from 1"),
                       (("queue", "--limit", "\u00b2"), "--limit: '\u00b2': a whole number"),
                       (("audit", "--limit", "0"), "--limit: '0': a whole number from 1"),
                       (("audit", "--transfers", "--limit", "-5"), "--limit: '-5': a whole number from 1"),
                       (("stats", "--since", "99999999999d"), "--since '99999999999d': at most 36500d back"),
                       (("stats", "--since", "\u00b2h"), "--since '\u00b2h': give an ISO date/time"),
                       (("testdata", str(tmp_path / "td"), "--slices", "999999999"), "--slices: '999999999': a whole number from 1 to 10000")):
        done = cli(config, *args)
        assert (done.returncode, "Traceback" in done.stderr) == (2, False), (args, done.stderr[-1500:])
        assert said in done.stderr, (args, done.stderr)
    for args, said in ((("queue", "retry", "9" * 30), f"study {'9' * 30} has no failed or dead unit"),
                       (("queue", "release", "\u00b2"), "\u00b2 has no held unit"),
                       (("queue", "show", "1." * 1500), "... (3000 characters) in the queue")):
        done = cli(config, *args)
        assert (done.returncode, "Traceback" in done.stderr) == (1, False), (args, done.stderr[-1500:])
        assert said in done.stderr and len(done.stderr) < 300, (args, done.stderr)


def test_echo_and_maintenance_refuse_what_they_cannot_use_with_a_usage_error(tmp_path: Path) -> None:
    """A port over 65535 (was an OverflowError inside the answer), an AE title of 40 characters or with a backslash
    (a pynetdicom traceback), a timeout of nan or 1e308, a maintenance message longer than peers are shown:
    exit 2 naming what is wrong; nothing is sent and the maintenance state is unchanged."""
    config, engine = queue_config(tmp_path)
    engine.dispose()
    for args, said in ((("echo", "PACS@127.0.0.1:99999"), "port '99999': a number from 1 to 65535"),
                       (("echo", "A" * 40 + "@127.0.0.1:104"), "called AE title 'AAAAAAAAAAAAAAAA"),
                       (("echo", "PACS@127.0.0.1:104", "--calling-ae", "X\\Y"), "calling AE title 'X\\\\Y'"),
                       (("echo", "PACS@127.0.0.1:104", "--timeout", "nan"), "--timeout nan: from 0.1 to 600"),
                       (("echo", "PACS@127.0.0.1:104", "--timeout", "1e308"), "--timeout 1e+308: from 0.1 to 600"),
                       (("echo", "PACS127.0.0.1:104"), "expected AE@HOST:PORT"),
                       (("maintenance", "on", "--message", "m" * 201), "--message of 201 characters: at most 200")):
        done = cli(config, *args)
        assert (done.returncode, "Traceback" in done.stderr) == (2, False), (args, done.stderr[-1500:])
        assert said in done.stderr, (args, done.stderr)
    assert cli(config, "maintenance").stdout.strip() == "maintenance off"
    done = cli(config, "maintenance", "on", "--message", "m" * 200)
    assert done.returncode == 0 and "m" * 200 in done.stdout

"""docs/deploy.md cannot go stale: every command block of the guide is in docs/deploy-region.sh, and the script
deploys a region as written, on loopback: a CA, Prosody (or ejabberd) from the shipped sample run as its own
user, two gateways with pinned identities and a merged roster, B's Orthanc, the first study delivered into it,
a restart, maintenance, a window and a key rotation with a second study delivered. Every process it started is
stopped by PID at the end."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from adapters.lab.ejabberd_peer import pid_alive
from adapters.lab.localpeers import free_port
from tests.helpers import REPO

GUIDE = REPO / "docs" / "deploy.md"
SCRIPT = REPO / "docs" / "deploy-region.sh"


def test_every_command_block_of_the_guide_is_in_the_script() -> None:
    script = [line.strip() for line in SCRIPT.read_text().splitlines()]
    blocks = re.findall(r"```bash\n(.*?)```", GUIDE.read_text(), re.S)
    assert len(blocks) >= 12
    for block in blocks:
        lines = [line.strip() for line in block.splitlines()]
        starts = [i for i, line in enumerate(script) if line == lines[0]]
        assert any(script[i:i + len(lines)] == lines for i in starts), f"not in deploy-region.sh as written:\n{block}"


def _ports(names: tuple[str, ...]) -> dict[str, str]:
    """The lab's free ports (below the kernel's ephemeral range, this worker's own): the script binds them many
    seconds after they are picked, and a port of the ephemeral range may meanwhile be the local end of any outgoing
    connection on the machine (a PACS port taken that way left Orthanc unreachable in CI)."""
    return {name: str(free_port()) for name in names}


def _pids(region: Path) -> list[int]:
    found = []
    for pid_file in [*region.glob("gw-*/run.pid"), region / "pacs" / "orthanc.pid", region / "prosody" / "prosody.pid",
                     region / "ejabberd" / "ejabberd.pid"]:
        try:
            found.append(int(pid_file.read_text().strip()))
        except (OSError, ValueError):
            pass
    return found


@pytest.mark.parametrize("server", ["prosody", "ejabberd"])
def test_the_guide_deploys_a_region(server: str) -> None:
    region = Path(tempfile.mkdtemp(prefix="dicomgw-region-"))
    region.chmod(0o755)  # the servers run as their own users: they must reach their directories
    ports = _ports(("C2S_PORT", "PROXY_PORT", "EJABBERD_DIST_PORT", "A_DICOM_PORT", "B_DICOM_PORT", "A_WEB_PORT",
                    "PACS_DICOM_PORT", "PACS_HTTP_PORT"))
    env = {**os.environ, **ports, "REGION": str(region), "SERVER": server, "DOMAIN": "helsenett.test",
           "DICOMGW_HOME": str(REPO)}
    try:
        done = subprocess.run(["bash", str(SCRIPT), "all"], env=env, capture_output=True, text=True, timeout=900)
        logs = "".join(f"\n--- {log.relative_to(region)} (tail)\n" + log.read_text(errors="replace")[-3000:]
                       for log in sorted([*region.glob("gw-*/gateway.log"), *region.glob("pacs/orthanc.log")])) \
            if done.returncode else ""
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:] + logs  # the gateways' logs say why
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['PACS_HTTP_PORT']}/statistics", timeout=30) as answer:
            assert json.loads(answer.read())["CountInstances"] == 12 + 6  # both studies in B's PACS
        config = region / "gw-a" / "gateway.toml"
        units = json.loads(subprocess.run([str(REPO / ".venv" / "bin" / "dicomgw"), "--config", str(config), "queue",
                                           "--json"], capture_output=True, text=True, timeout=60, check=True).stdout)
        assert sorted((u["state"], u["priority"]) for u in units) == [("delivered", "routine"), ("delivered", "stat")]
        assert "stopped" not in done.stderr and "timed out" not in done.stderr
    finally:
        pids = _pids(region)
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
            time.sleep(0.2)
        left = [pid for pid in pids if pid_alive(pid)]  # what `deploy-region.sh stop` did not stop
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(region, ignore_errors=True)
    assert len(pids) >= 4 and not left, f"still running after `stop`: {left}"

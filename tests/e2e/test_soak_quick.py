"""`bench/soak --quick` in CI: real Prosody, Orthanc and two `dicomgw run` processes, every kind of fault
injected, and every acknowledged instance in the PACS exactly once."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import REPO


def test_quick_soak_loses_nothing_and_duplicates_nothing() -> None:
    done = subprocess.run([sys.executable, "-m", "bench.soak", "--quick"], cwd=REPO, capture_output=True, text=True,
                          timeout=900, check=False)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert result["lost"] == 0 and result["duplicates"] == 0
    assert result["instances_in_pacs"] == result["instances_acknowledged"] > 0
    assert set(result["faults"]) == {"cut", "stall", "prosody_restart", "gateway_kill", "pacs_outage"}
    assert result["a_states"] == {"delivered": result["studies"]}
    assert result["S"] >= result["studies"] and result["N"] == result["S"] + result["F"]

"""The module map holds: adapters/ may import gateway/, never the reverse (the composition root bootstrap and the
CLI excepted); the lab (adapters/lab/) is imported by the CLI's demo/testdata commands, tests and benchmarks only,
never by the running gateway; dicom_store does not import dicom_scp (which imports it)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_dependencies_point_inward_and_the_lab_stays_out_of_the_gateway() -> None:
    for path in (REPO / "gateway").glob("*.py"):
        if path.name in ("bootstrap.py", "cli.py", "cli_peers.py"):  # composition root and the command line
            continue
        assert not {m for m in imports(path) if m.startswith("adapters")}, f"{path.name} imports an adapter"
    for path in [*(REPO / "adapters").glob("*.py"), *(REPO / "adapters" / "xmpp").glob("*.py"), REPO / "gateway" / "bootstrap.py"]:
        assert not {m for m in imports(path) if m.startswith("adapters.lab")}, f"{path} imports the lab"
    assert "adapters.dicom_scp" not in imports(REPO / "adapters" / "dicom_store.py")
    loaded = subprocess.run([sys.executable, "-c", "import sys, gateway.bootstrap, gateway.cli; "
                             "print(sorted(m for m in sys.modules if m.startswith('adapters.lab')))"],
                            cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    assert loaded.stdout.strip() == "[]"

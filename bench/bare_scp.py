"""Reference (d) for bench/ingest: a bare pynetdicom Storage SCP that writes the received bytes with
fsync + rename and nothing else (no parsing, no DB): the library's own ceiling.

Usage: python -m bench.bare_scp PORT OUT_DIR
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt


def main() -> None:
    port, out_dir = int(sys.argv[1]), Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)

    def on_store(event: evt.Event) -> int:
        temp = out_dir / f".{uuid.uuid4().hex}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            os.write(fd, event.encoded_dataset())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, out_dir / f"{event.request.AffectedSOPInstanceUID}.dcm")
        return 0x0000

    ae = AE(ae_title="BARESCP")
    ae.maximum_pdu_size = 262144
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.start_server(("127.0.0.1", port), block=True, evt_handlers=[(evt.EVT_C_STORE, on_store)])


if __name__ == "__main__":
    main()

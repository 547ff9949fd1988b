"""Structured logs: bound fields on every line of a block, in threads started with to_thread, JSON lines."""

from __future__ import annotations

import asyncio
import json
import logging
import re

import pytest

from gateway.logs import (
    JsonFormatter,
    TextFormatter,
    _ContextFilter,
    bind,
    bound,
    set_fields,
)


def record(msg: str = "hello %s", args: tuple = ("world",)) -> logging.LogRecord:
    rec = logging.LogRecord("gateway.test", logging.INFO, __file__, 1, msg, args, None)
    _ContextFilter().filter(rec)
    return rec


def test_bound_fields_reach_json_and_text_lines_and_end_with_the_block() -> None:
    with bind(study_uid="1.2.3", unit_id=7), bind(transfer_id="abc"):
        line = json.loads(JsonFormatter().format(record()))
        text = TextFormatter().format(record())
    assert (line["msg"], line["study_uid"], line["unit_id"], line["transfer_id"]) == ("hello world", "1.2.3", 7, "abc")
    assert text.endswith("[study_uid=1.2.3 unit_id=7 transfer_id=abc]")
    assert "study_uid" not in json.loads(JsonFormatter().format(record()))


def test_fields_follow_into_to_thread_and_stay_inside_their_task() -> None:
    async def attempt(sid: str) -> dict:
        set_fields(transfer_id=sid)
        return await asyncio.to_thread(bound)

    async def main() -> tuple[dict, dict, dict]:
        with bind(unit_id=1):
            first = await asyncio.create_task(attempt("s1"))
            second = await asyncio.create_task(attempt("s2"))
            return first, second, bound()

    first, second, after = asyncio.run(main())
    assert first == {"unit_id": 1, "transfer_id": "s1"} and second == {"unit_id": 1, "transfer_id": "s2"}
    assert after == {"unit_id": 1}


def test_an_exception_is_in_the_json_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), __import__("sys").exc_info())
    _ContextFilter().filter(rec)
    assert "ValueError: boom" in json.loads(JsonFormatter().format(rec))["exc"]


def test_the_config_key_is_checked(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from gateway.settings import SettingsError, load_settings

    path = tmp_path / "g.toml"
    path.write_text('[log]\nformat = "json"\n')
    assert load_settings(path, environ={}).log_format == "json"
    path.write_text('[log]\nformat = "xml"\n')
    with pytest.raises(SettingsError, match="log.format"):
        load_settings(path, environ={})


def test_a_thread_started_for_a_stream_carries_the_fields_of_its_caller() -> None:
    import asyncio

    from adapters.xmpp.common import on_own_thread
    from gateway.logs import bound, set_fields

    seen: list[dict] = []

    async def attempt() -> None:
        set_fields(transfer_id="sid-1", peer="radiology.b@net.test")
        await on_own_thread("test-thread", lambda: seen.append(bound()))

    asyncio.run(attempt())
    assert seen == [{"transfer_id": "sid-1", "peer": "radiology.b@net.test"}]


def test_with_json_every_line_is_json_warnings_and_thread_errors_included(capsys: pytest.CaptureFixture[str]) -> None:
    """Before: pydicom's UserWarnings and 'Exception in thread folder-watch' were printed raw beside the JSON."""
    import sys
    import threading
    import warnings

    from gateway.logs import configure

    root = logging.getLogger()
    saved = (root.handlers[:], root.level, threading.excepthook, sys.excepthook)
    try:
        configure("INFO", "json")
        warnings.warn("The value length (65) exceeds the maximum length of 64 allowed for VR LO.", UserWarning, stacklevel=1)

        def fail() -> None:
            raise RuntimeError("watcher broke")

        worker = threading.Thread(target=fail, name="folder-watch")
        worker.start()
        worker.join()
        logging.getLogger("uvicorn.error").error("Exception in ASGI application", exc_info=ValueError("bad"))
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    finally:
        logging.captureWarnings(False)
        root.handlers[:], threading.excepthook, sys.excepthook = saved[0], saved[2], saved[3]
        root.setLevel(saved[1])
    parsed = [json.loads(line) for line in lines]  # every line one JSON object
    assert any(p["logger"] == "py.warnings" and "exceeds the maximum length" in p["msg"] for p in parsed)
    assert any("folder-watch" in p["msg"] and "RuntimeError: watcher broke" in p.get("exc", "") for p in parsed)
    assert any(p["logger"] == "uvicorn.error" for p in parsed)


def test_library_warnings_are_aggregated_and_ours_never_held_back() -> None:
    """pydicom/pynetdicom warnings about parsed data: the first of a kind per window passes, the rest are
    counted and the next one after the window says how many were left out."""
    import logging
    import time

    from gateway.logs import LibraryFlood

    flood = LibraryFlood(window_s=0.2)

    def record(name: str, msg: str) -> logging.LogRecord:
        return logging.LogRecord(name, logging.WARNING, __file__, 1, msg, None, None)

    passed = [flood.filter(record("py.warnings", "Invalid value for VR UI: 'x'")) for _ in range(50)]
    assert passed.count(True) == 1
    assert all(flood.filter(record("gateway.dispatch", "ours")) for _ in range(50))
    assert flood.filter(record("pynetdicom.acse", "another kind"))
    time.sleep(0.25)
    later = record("py.warnings", "Invalid value for VR UI: 'x'")
    # The window's seconds as this machine took them (a loaded one may oversleep): the count is the point.
    assert flood.filter(later) and re.search(r"\(49 more like it in the last \d+ s not shown\)", later.getMessage())


def test_refusals_log_once_per_key_and_window_then_a_count(caplog) -> None:  # type: ignore[no-untyped-def]
    import logging
    import time

    from gateway.refusals import RefusalLog

    caplog.set_level(logging.WARNING, logger="gateway.refusals")
    refusals = RefusalLog(log_window_s=0.2)
    for n in range(30):
        refusals.note("association_rejected", "10.0.0.9 tls", f"DICOM TLS handshake from 10.0.0.9:{n} refused: x")
    refusals.note("association_rejected", "10.0.0.8 tls", "DICOM TLS handshake from 10.0.0.8:1 refused: y")
    assert [r.getMessage() for r in caplog.records] == ["DICOM TLS handshake from 10.0.0.9:0 refused: x",
                                                       "DICOM TLS handshake from 10.0.0.8:1 refused: y"]
    time.sleep(0.25)
    refusals.flush_quiet()
    assert re.fullmatch(r"29 more association_rejected like it from 10\.0\.0\.9 tls in the last \d+ s "
                        r"\(first: DICOM TLS handshake from 10\.0\.0\.9:0 refused: x\)", caplog.records[-1].getMessage())
    assert sum(t.count for t in refusals.drain()) == 31  # every one counted for the audit

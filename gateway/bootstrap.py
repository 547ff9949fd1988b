"""The composition root: the one place that wires the edges (adapters) to the core and runs them.

``Gateway(settings)`` builds everything without side effects; ``await gateway.run(stop)`` upgrades the DB,
recovers the spool, starts the SCP and the watched folder, ticks the completeness check, and on ``stop``
shuts every part down in reverse order. ``run_forever(settings)`` adds SIGINT/SIGTERM handling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable

from adapters.dicom_scp import StorageSCP
from adapters.dicom_scu import EchoResult, echo
from adapters.folder_watch import FolderWatcher
from adapters.spool import Spool
from gateway.model import IngestResult
from gateway.service import CompletenessService, IngestService
from gateway.settings import Settings
from gateway.store import QueueStore, make_engine, upgrade_schema

log = logging.getLogger(__name__)

__all__ = ["EchoResult", "Gateway", "GatewayController", "echo", "open_store", "run_demo", "run_forever"]


def run_demo(as_json: bool = False) -> dict:
    from adapters.demo import run_demo as demo

    return demo(as_json=as_json)


def open_store(settings: Settings) -> QueueStore:
    """Engine + schema at head + repository: what the CLI's read commands need."""
    engine = make_engine(settings.queue.db_url)
    upgrade_schema(engine)
    return QueueStore(engine)


class Gateway:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = make_engine(settings.queue.db_url)
        self.store = QueueStore(self.engine)
        self.spool = Spool(settings.paths.spool_dir, settings.paths.quarantine_dir)
        self.ingest = IngestService(self.store, self.spool)
        self.completeness = CompletenessService(self.store, settings.queue.stable_age_s)
        self.instances_stored = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self.scp = StorageSCP(settings.dicom, self.ingest, self.spool, self._audit, self._stored_threadsafe)
        self.watcher = (
            FolderWatcher(
                settings.paths.watch_dir,
                self.ingest,
                self.spool,
                self._audit,
                settle_s=settings.watch.settle_s,
                scan_interval_s=settings.watch.scan_interval_s,
                on_stored=self._stored_threadsafe,
            )
            if settings.paths.watch_dir
            else None
        )

    def _audit(self, event_name: str, detail: str) -> None:
        self.store.audit(event_name, detail)

    def _stored_threadsafe(self, result: IngestResult) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stored, result)

    def _stored(self, result: IngestResult) -> None:
        self.instances_stored += 1

    async def run(self, stop: asyncio.Event, ready: Callable[[], None] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(upgrade_schema, self.engine)
        for kept in self.spool.start():
            self._audit("quarantined", f"recovered at start-up: {kept}")
        self.scp.start()
        try:
            if self.watcher is not None:
                self.watcher.start()
            log.info(
                "gateway ready: AE %s on %s:%s, spool %s",
                self.settings.dicom.ae_title,
                self.settings.dicom.host,
                self.scp.port,
                self.settings.paths.spool_dir,
            )
            if ready is not None:
                ready()
            while not stop.is_set():
                await asyncio.to_thread(self.completeness.tick)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.settings.queue.stable_check_interval_s)
        finally:
            if self.watcher is not None:
                await asyncio.to_thread(self.watcher.stop)
            await asyncio.to_thread(self.scp.stop)
            self.engine.dispose()
            log.info("gateway stopped")


def run_forever(settings: Settings) -> None:
    """Run until SIGINT or SIGTERM."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await Gateway(settings).run(stop)

    asyncio.run(main())


class GatewayController:
    """Run a :class:`Gateway` on its own event loop in a thread (tests, the demo); ready-wait with a deadline."""

    def __init__(self, settings: Settings) -> None:
        self.gateway = Gateway(settings)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self, timeout_s: float = 30.0) -> Gateway:
        self._thread = threading.Thread(target=self._main, name="gateway", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"gateway not ready after {timeout_s} s")
        if self._error is not None:
            raise RuntimeError("gateway failed to start") from self._error
        return self.gateway

    def stop(self, timeout_s: float = 30.0) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _main(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await self.gateway.run(self._stop, ready=self._ready.set)

        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            self._ready.set()

"""Sender side of the transfer: route stable studies, then offer due units to their peers, STAT first.

- every tick: local ``stable`` units get their destinations (``gateway.routing.Router``) and move to
  ``queued``, one unit per destination;
- due units are claimed STAT first, then oldest first (``gateway.claims``); each is offered on a task of its
  own, so a long routine transfer never holds the queue: per peer at most ``max_concurrent`` routine
  transfers (``dicomgw peers edit --max-concurrent``) and one STAT transfer beside them;
- the link goes to STAT: when a STAT transfer of this process starts, its routine streams are suspended
  (:class:`LinkGate`: aborted, so none of their bytes stay queued ahead of STAT's) and no routine offer
  starts until it ends; then they resume at the receiver's offset (an attempt ``suspended`` is no failure);
- a routine unit waits outside its peer's transfer windows in ``waiting-window`` with the next opening
  (``gateway.windows``, clock injected); STAT ignores windows;
- a unit is offered only when the peer is online and not ``dnd`` (a STAT study also to a peer busy at its
  inbound limit: the receiver keeps room for STAT); otherwise it waits in ``waiting-peer`` with the peer's
  backoff (``gateway.retry``);
- ``offering`` -> ``sending`` (progress in bytes, the method) -> ``sent`` once the receiver's verdict says
  ``received``; a refusal, a cut stream or a rejected bundle goes back to ``queued`` with the reason and a
  backoff, or ``failed``/``dead`` by the retry policy; every attempt is a ``transfers`` row.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import stat
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import and_, not_

from gateway.claims import Claims
from gateway.lifecycle import IllegalTransition, State
from gateway.logs import bind
from gateway.manifest import DEFAULT_CHUNK_BYTES, BundleFile, Manifest, stream_bundle
from gateway.model import PeerConfig, StudySummary
from gateway.outage import reason, said, unreachable
from gateway.retry import PEER_SPOOL_FULL, ErrorKind, RetryPolicy, classify
from gateway.rows import StudyUnitRow
from gateway.store import ConcurrentMove, QueueStore, utcnow
from gateway.transfer import SenderPort, SendOutcome, StreamSuspended
from gateway.windows import local_clock, local_zone, parse_schedule
from gateway.wire import Adaptive, encode_frames

log = logging.getLogger(__name__)


def manifest_for(store: QueueStore, unit: StudySummary) -> tuple[Manifest, list[Path], list[datetime]]:
    """The unit's bundle manifest, the spool paths of its files and when each file's row was written (UTC),
    in bundle order."""
    instances = store.unit_instances(unit.unit_id)
    files = tuple(
        BundleFile(i.sop_instance_uid, i.sop_class_uid, i.transfer_syntax_uid, i.size_bytes, i.sha256) for i in instances
    )
    return (Manifest(unit.study_instance_uid, unit.unit_seq, DEFAULT_CHUNK_BYTES, files), [Path(i.spool_path) for i in instances],
            [i.received_at for i in instances])


class Withheld(ValueError):
    """A unit that must not leave as it is (an instance with burned-in text under a de-identifying rule)."""


class RoutineBlocks:
    """The block source of a routine stream: raises :class:`StreamSuspended` at the next block once a STAT
    transfer started. A transport that can stop at once sets ``on_suspend`` (called from any thread; e.g.
    reset its socket) and checks ``suspended`` to tell that end from a cut."""

    def __init__(self, gate: LinkGate, blocks: Iterator[bytes]) -> None:
        self.gate = gate
        self.blocks = blocks
        self.suspended = False
        self.on_suspend: Callable[[], None] | None = None

    def __iter__(self) -> RoutineBlocks:
        return self

    def __next__(self) -> bytes:
        if self.suspended or self.gate.stat_running:
            self.suspend()
            raise StreamSuspended("suspended for a STAT transfer")
        return next(self.blocks)

    def suspend(self) -> None:
        if not self.suspended:
            self.suspended = True
            self.gate.count_suspension()
            if self.on_suspend is not None:
                self.on_suspend()


class LinkGate:
    """STAT gets the link: when a STAT transfer of this process starts, every routine stream is suspended
    (:class:`RoutineBlocks`: at once where its transport allows, else at its next block) and no routine offer
    starts until the last STAT transfer ends. Thread-safe: S5B streams are pumped on threads."""

    def __init__(self) -> None:
        self._stat = 0
        self._lock = threading.Lock()
        self._streams: weakref.WeakSet[RoutineBlocks] = weakref.WeakSet()
        self.suspended = 0  # routine streams suspended so far (log, tests, bench)

    @property
    def stat_running(self) -> bool:
        with self._lock:
            return self._stat > 0

    def stat_started(self) -> None:
        with self._lock:
            self._stat += 1
            streams = list(self._streams)
        for stream in streams:
            stream.suspend()

    def stat_ended(self) -> None:
        with self._lock:
            self._stat = max(0, self._stat - 1)

    def count_suspension(self) -> None:
        with self._lock:
            self.suspended += 1

    def routine(self, blocks: Iterator[bytes]) -> RoutineBlocks:
        stream = RoutineBlocks(self, blocks)
        with self._lock:
            self._streams.add(stream)
        return stream


class Dispatcher:
    """Offers due units, each on a task of its own, STAT first; see the module. ``route(summary)`` gives a
    stable unit's (peer JIDs, priority, rule) or None; ``peer_configs()`` the admin's per-peer settings;
    ``clock()`` the local time (aware) that transfer windows are read in; ``wake()`` is called when a send
    ends (the loop may start the next at once)."""

    def __init__(
        self,
        store: QueueStore,
        spool_root: Path,
        sender: SenderPort,
        route: Callable[[StudySummary], Any],
        policy: RetryPolicy | None = None,
        receipt_timeout_s: float = 3600.0,
        max_sends: int = 3,
        claims: Claims | None = None,
        peer_configs: Callable[[], Mapping[str, PeerConfig]] | None = None,
        clock: Callable[[], datetime] | None = None,
        wake: Callable[[], None] | None = None,
        max_starts_per_tick: int = 100,
        deidentify: Callable[[StudySummary, Manifest, list[Path], Any], tuple[Manifest, list[Path], dict[str, str]]] | None = None,
    ) -> None:
        self.deidentify = deidentify  # a rule with deidentify = "basic" (adapters.dicom_deid): what leaves instead
        self.store = store
        self.spool_root = spool_root
        self.sender = sender
        self.route = route
        self.policy = policy or RetryPolicy()
        self.receipt_timeout_s = receipt_timeout_s
        self.max_sends = max_sends
        self.claims = claims or Claims(store.engine)
        self.peer_configs = peer_configs or (lambda: {})
        zone = local_zone() if clock is None else None
        self.clock = clock or (lambda: local_clock(zone))  # type: ignore[arg-type]
        self.wake = wake or (lambda: None)
        self.max_starts_per_tick = max_starts_per_tick
        self.gate = LinkGate()
        self._adaptive: dict[str, Adaptive] = {}  # per peer: whether compressing its stream pays (gateway.wire)
        self._running: dict[int, tuple[str, str, asyncio.Task[None]]] = {}  # unit -> (peer, priority, task)
        # Units whose send a queue database outage cut (its writes failed: the unit left offering/sending, claimed
        # by this live process, which no recovery took back): put back to queued at the first tick that can write.
        self._cut: set[int] = set()

    @property
    def running(self) -> list[tuple[int, str, str]]:
        """(unit, peer, priority) of the sends in flight in this process."""
        return [(unit_id, peer, priority) for unit_id, (peer, priority, _t) in self._running.items()]

    async def tick(self) -> None:
        if self._cut:
            await asyncio.to_thread(self._resume_cut)
        await asyncio.to_thread(self.store.route_stable, self.route)
        await asyncio.to_thread(self._chase_receipts)
        if not self.sender.online:
            return
        configs = await asyncio.to_thread(self.peer_configs)
        for _ in range(self.max_starts_per_tick):
            claimed = await asyncio.to_thread(self.claims.claim_due, self._due_where(configs), 1)
            if not claimed:
                return
            unit = await asyncio.to_thread(self.store.unit, claimed[0])
            if not await self._start(unit, configs.get(unit.destination or "")):
                await asyncio.to_thread(self.claims.release, unit.unit_id)

    async def stop(self) -> None:
        """Cancel the sends in flight (their units resume at the next start, ``recover_in_flight``)."""
        tasks = [task for _p, _q, task in self._running.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _due_where(self, configs: Mapping[str, PeerConfig]) -> tuple[Any, ...]:
        """Due units, without those whose peer has no free lane: ``max_concurrent`` routine, one STAT."""
        routine: dict[str, int] = {}
        stat: set[str] = set()
        for peer, priority, _task in self._running.values():
            if priority == "stat":
                stat.add(peer)
            else:
                routine[peer] = routine.get(peer, 0) + 1
        where = list(self.store.due_for_sending_where())
        if self._running:  # ours, not yet moved to offering by their task
            where.append(StudyUnitRow.id.not_in(sorted(self._running)))
        if self.gate.stat_running:  # the link is STAT's: routine waits
            where.append(StudyUnitRow.priority == "stat")
        full = [peer for peer, count in routine.items() if count >= (configs[peer].max_concurrent if peer in configs else 1)]
        if full:
            where.append(not_(and_(StudyUnitRow.destination.in_(full), StudyUnitRow.priority != "stat")))
        if stat:
            where.append(not_(and_(StudyUnitRow.destination.in_(sorted(stat)), StudyUnitRow.priority == "stat")))
        return tuple(where)

    async def _start(self, unit: StudySummary, config: PeerConfig | None) -> bool:
        """Begin the unit's send on a task of its own; False when it was decided here (held or waiting)."""
        peer_bare = unit.destination or ""
        with bind(study_uid=unit.study_instance_uid, unit_id=unit.unit_id, peer=peer_bare):
            if config is not None and config.allowed and not config.may_send_to:
                await asyncio.to_thread(
                    self.store.transition, unit.unit_id, State.FAILED, f"{peer_bare} is set to receive only",
                    f"this gateway only receives from {peer_bare} (dicomgw peers edit {peer_bare} --directions both)")
                return False
            if unit.priority != "stat" and config is not None and config.schedule:
                opening = parse_schedule(config.schedule).next_opening(self.clock())
                if opening is not None:
                    await asyncio.to_thread(self._wait_for_window, unit, peer_bare, opening, config.schedule)
                    return False
            full_jid, availability = self.sender.peer_availability(peer_bare, unit.priority)
            if full_jid is None:
                await asyncio.to_thread(self._peer_unavailable, unit, peer_bare, availability)
                return False
        task = asyncio.create_task(self._send(unit, full_jid))
        self._running[unit.unit_id] = (peer_bare, unit.priority, task)
        return True

    async def _send(self, unit: StudySummary, full_jid: str) -> None:
        try:
            with bind(study_uid=unit.study_instance_uid, unit_id=unit.unit_id, peer=unit.destination):
                if unit.priority == "stat":
                    self.gate.stat_started()
                    try:
                        await self._send_unit(unit, full_jid)
                    finally:
                        self.gate.stat_ended()
                else:
                    await self._send_unit(unit, full_jid)
        except Exception as exc:
            if not unreachable(exc):
                log.exception("sending unit %s failed unexpectedly", unit.unit_id)
            else:  # one line, no traceback: the outage itself is said once (gateway.outage)
                self._cut.add(unit.unit_id)
                log.error("sending unit %s was cut: %s (%s); it is offered again once the database takes writes "
                          "(the receiver keeps what it took)", unit.unit_id, said(exc), reason(exc))
        finally:
            # Released while still listed as running: a tick meanwhile must not start the unit's next send,
            # whose claim this release would clear (and an unowned unit mid-stream is any process's to recover).
            try:
                await asyncio.to_thread(self.claims.release, unit.unit_id)
            except Exception as exc:
                if not unreachable(exc):
                    raise
                self._cut.add(unit.unit_id)  # still ours in the database: released with its move back
            finally:
                self._running.pop(unit.unit_id, None)
            self.wake()

    def _resume_cut(self) -> None:
        """Units whose send an outage cut go back from offering/sending to queued, due now (as a restart's
        recovery does: the resend resumes at the receiver's offset, or the receiver answers that it holds the
        bundle); a unit that reached another state meanwhile is left as it is. Raises while the database still
        takes no writes (the tick's outage), keeping them for the next tick."""
        cut = sorted(self._cut)
        # Not a unit another live process took up meanwhile (its claim lapsed while ours could not be written).
        moved = self.store.recover_in_flight(self.claims.free(), units=cut, why="its send was cut by a queue database outage")
        for unit_id in cut:
            self.claims.release(unit_id)
        self._cut.difference_update(cut)
        for unit_id, before, after in moved:
            log.warning("unit %s: %s -> %s: its send was cut by a queue database outage; offered again", unit_id, before, after)

    def _wait_for_window(self, unit: StudySummary, peer_bare: str, opening: datetime, schedule: str) -> None:
        """Outside the peer's transfer window: ``waiting-window`` until the next opening (UTC in the row)."""
        at = opening.astimezone(UTC).replace(tzinfo=None)
        text = f"outside {peer_bare}'s transfer window ({schedule}): opens {opening.isoformat(timespec='minutes')}"
        if unit.state != State.WAITING_WINDOW.value:
            self.store.transition(unit.unit_id, State.WAITING_WINDOW, text, text, next_attempt_at=at)
        else:
            self.store.reschedule(unit.unit_id, at, unit.attempts, error=text)

    def _chase_receipts(self) -> None:
        """``sent`` without a delivery receipt for ``receipt_timeout_s``: send again (the receiver recognises
        the bundle and only repeats its receipt), and after ``max_sends`` sends mark it failed."""
        for unit in self.store.overdue_sent(self.receipt_timeout_s):
            if not self.claims.claim(unit.unit_id):
                continue
            try:
                sends = sum(1 for t in self.store.transfers(unit.unit_id) if t["direction"] == "out" and t["outcome"] in ("received", "held"))
                if sends >= self.max_sends:
                    self.store.transition(
                        unit.unit_id, State.FAILED, f"no delivery receipt from {unit.destination} after {sends} send(s)",
                        f"no delivery receipt after {sends} send(s) and {self.receipt_timeout_s:g} s",
                    )
                else:
                    self.store.transition(
                        unit.unit_id, State.QUEUED, f"no delivery receipt after {self.receipt_timeout_s:g} s: sending again",
                        "no delivery receipt yet", next_attempt_at=None,
                    )
            except (ConcurrentMove, IllegalTransition):
                pass  # a late receipt moved it first (to delivered: no move from there)
            finally:
                self.claims.release(unit.unit_id)

    def _age_s(self, unit: StudySummary) -> float:
        return (utcnow() - unit.created_at).total_seconds()

    async def _send_unit(self, unit: StudySummary, full_jid: str) -> None:
        peer_bare = unit.destination or ""
        manifest, relative_paths, recorded = await asyncio.to_thread(manifest_for, self.store, unit)
        paths = [self.spool_root / p for p in relative_paths]
        # A first attempt trusts a file nothing has touched since its row was written; after a failed attempt
        # (the receiver may have found a file's bytes differ: a disk's silent error) every file is hashed.
        damaged = await asyncio.to_thread(check_spool, manifest, paths, recorded if unit.attempts == 0 else None)
        if damaged is not None:  # the integrity row first: whoever sees the study stopped finds why in the audit
            await asyncio.to_thread(self.store.audit, "integrity", damaged, unit.unit_id, unit.study_instance_uid)
            await asyncio.to_thread(self.store.transition, unit.unit_id, State.FAILED, f"not sent: {damaged}", damaged)
            return
        rule = self._rule(unit)
        if rule is not None and rule.deidentify and self.deidentify is not None:
            try:
                manifest, paths, mapping = await asyncio.to_thread(self.deidentify, unit, manifest, paths, rule)
            except Withheld as exc:  # burned-in text: held for a person to decide, never sent
                await asyncio.to_thread(self.store.transition, unit.unit_id, State.FAILED, f"withheld: {exc}", f"withheld: {exc}")
                await asyncio.to_thread(self.store.add_flag, unit.unit_id, "held")
                return
            await asyncio.to_thread(
                self.store.audit, "deidentified",
                f"de-identified by rule {rule.name!r} (PS3.15 Annex E Basic Profile{''.join(', ' + o for o in rule.deid_options)}): "
                f"{len(manifest.files)} instance(s), study {unit.study_instance_uid} sent as {manifest.study_instance_uid}; "
                f"{len(mapping)} UIDs mapped (kept here)", unit.unit_id, unit.study_instance_uid)
        encoded = manifest.encode()
        size = manifest.bundle_bytes
        await asyncio.to_thread(
            self.store.transition, unit.unit_id, State.OFFERING, f"offering {size} bytes to {full_jid}", None,
            bundle_bytes=size, progress_bytes=0, bundle_sha256=hashlib.sha256(encoded).hexdigest(),
        )
        progress = _ProgressWriter(self.store, unit.unit_id, full_jid)
        adaptive = self._adaptive.setdefault(peer_bare, Adaptive())  # what it learnt of this peer's link

        def stream_from(offset: int, framed: bool = False) -> Iterator[bytes]:
            blocks = encode_frames(manifest, paths, offset, adaptive) if framed else stream_bundle(manifest, paths, offset)
            return blocks if unit.priority == "stat" else self.gate.routine(blocks)

        outcome = await self.sender.send_bundle(full_jid, size, hashlib.sha256(encoded).hexdigest(), stream_from,
                                                progress.update, priority=unit.priority)
        if outcome.detail.startswith("peer refused the offer: conflict (already received") and outcome.attempts:
            # The earlier attempt did deliver (the process stopped, or the verdict was lost, after its last
            # byte): that attempt is closed as received, and this answer is not a transfer of its own.
            if await asyncio.to_thread(self.store.close_as_received, unit.unit_id,
                                       f"{peer_bare} answered the next offer: {outcome.detail}"):
                outcome.attempts.pop()
        await asyncio.to_thread(progress.finish, outcome)
        if outcome.ok:
            self.policy.peer_ok(peer_bare)
            await asyncio.to_thread(progress.ensure_sending, _method_name(outcome.method))
            await asyncio.to_thread(
                self.store.mark_sent, unit.unit_id, f"{full_jid} verified it: {outcome.detail}",
                method=_method_name(outcome.method), progress_bytes=size,
            )
            return
        if outcome.suspended:
            await asyncio.to_thread(
                self.store.transition, unit.unit_id, State.QUEUED,
                f"suspended for a STAT transfer at byte {outcome.offset + outcome.bytes_sent}; resumes after it",
                "suspended for a STAT transfer", next_attempt_at=None)
            return
        if outcome.detail.startswith("peer refused the offer: conflict") and not progress.moved_to_sending:
            await asyncio.to_thread(
                self.store.mark_sent, unit.unit_id, f"{full_jid} already holds this bundle: {outcome.detail}",
            )
            return
        await asyncio.to_thread(self._attempt_failed, unit, peer_bare, outcome.detail, progress.moved_to_sending)

    def _rule(self, unit: StudySummary) -> Any:
        rules = getattr(getattr(self.route, "rules", None), "rules", ())
        return next((r for r in rules if r.name == unit.rule), None) if unit.rule else None

    def _peer_unavailable(self, unit: StudySummary, peer_bare: str, availability: str) -> None:
        """The peer is offline or busy: wait with the peer's backoff (not a failed attempt of the study), until
        the study's age says ``dead``."""
        if self.policy.gives_up(0, self._age_s(unit)):
            self.store.transition(unit.unit_id, State.DEAD, f"gave up: {peer_bare} {availability} for "
                                  f"{self._age_s(unit):.0f} s", f"peer {availability}")
            return
        # The first unit of this peer this round counts one failure of the peer; the others wait with it.
        delay = self.policy.peer_wait_s(peer_bare) or self.policy.peer_failed(peer_bare)
        next_at = utcnow() + timedelta(seconds=delay)
        if unit.state != State.WAITING_PEER.value:
            self.store.transition(unit.unit_id, State.WAITING_PEER, f"{peer_bare} is {availability}",
                                  f"peer {availability}", next_attempt_at=next_at)
        else:
            self.store.reschedule(unit.unit_id, next_at, unit.attempts, error=f"peer {availability}")

    def _attempt_failed(self, unit: StudySummary, peer_bare: str, detail: str, streamed: bool) -> None:
        # A peer that refused the offer busy (its inbound limit, no spool room for the study) is waited for as a
        # peer whose presence says busy is (``_peer_unavailable``): with the peer's backoff until the study's
        # age says ``dead``, not counted as a failed attempt of the study (20 such refusals made it ``dead``).
        # So is a peer whose disk filled during the stream (what it took is kept; the next offer resumes there):
        # its PACS or anything else on that disk can fill it after the offer was admitted, again and again.
        refused_busy = "resource-constraint" in detail and not streamed
        disk_full = PEER_SPOOL_FULL in detail
        busy = refused_busy or disk_full
        attempts = unit.attempts if busy else unit.attempts + 1
        if classify(detail) is ErrorKind.PERMANENT:
            self.store.transition(unit.unit_id, State.FAILED, f"attempt {attempts} refused for good: {detail}", detail,
                                  attempts=attempts)
            return
        if self.policy.gives_up(attempts, self._age_s(unit)):
            self.store.transition(unit.unit_id, State.DEAD, f"gave up after {attempts} attempt(s) over "
                                  f"{self._age_s(unit):.0f} s: {detail}", detail, attempts=attempts)
            return
        delay = self.policy.peer_failed(peer_bare) if busy else self.policy.delay_s(attempts)
        target = State.WAITING_PEER if refused_busy else State.QUEUED  # a stream ran: queued (sending -> queued)
        self.store.transition(
            unit.unit_id, target,
            f"{peer_bare} refused the offer busy: {detail}" if refused_busy
            else f"{peer_bare}'s spool filled during the stream (kept, resumed later): {detail}" if disk_full
            else f"attempt {attempts} failed: {detail}",
            detail, next_attempt_at=utcnow() + timedelta(seconds=delay), attempts=attempts,
        )



def check_spool(manifest: Manifest, paths: list[Path], recorded: list[datetime] | None = None) -> str | None:
    """Check every spool file against the size and SHA-256 recorded at ingest; the first difference (in the
    manifest's order), or None. With ``recorded`` (when each file's row was written, UTC), a file of the
    recorded size whose inode has not changed since (its ctime is older: any write, rename, chmod or touch
    sets ctime to the present, and no one but the clock's owner can set it back) is taken as it was, without
    reading it; any other is hashed. The files are hashed on a few threads (hashlib lets go of the GIL): on
    one, a 400-slice CT study held its offer back ~140 ms on a 2-core machine, on four ~120 ms; its ctimes
    take ~2 ms."""
    todo = [i for i in range(len(paths)) if recorded is None or not _untouched(manifest.files[i], paths[i], recorded[i])]
    if not todo:  # the common case: ctimes only, on this thread (400 tasks on a pool cost ~70 ms of GIL hand-offs)
        return None
    workers = max(1, min(4, os.cpu_count() or 1, len(todo)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="spool-check") as pool:
        try:
            return next(filter(None, pool.map(lambda i: _check_spool_file(manifest.files[i], paths[i]), todo)), None)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _untouched(entry: BundleFile, path: Path, recorded: datetime) -> bool:
    """The file has the recorded size and its inode has not changed since its row was written."""
    try:
        status = path.stat()
    except OSError:
        return False  # hashed: the hash names the error
    return status.st_size == entry.size and status.st_ctime_ns < _epoch_ns(recorded)


def _epoch_ns(at: datetime) -> int:
    """A naive UTC datetime (as rows hold them) in nanoseconds since the epoch, exactly."""
    delta = at.replace(tzinfo=UTC) - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


def _check_spool_file(entry: BundleFile, path: Path) -> str | None:
    try:  # opened without blocking and read only if a regular file: a FIFO or a device put there would never end
        with open(path, "rb", opener=lambda name, flags: os.open(name, flags | os.O_NONBLOCK)) as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise OSError(errno.EINVAL, "not a regular file")
            digest = hashlib.file_digest(fh, "sha256")
            size = fh.tell()
    except OSError as exc:
        return f"spool file of instance {entry.sop_instance_uid} cannot be read: {exc.strerror or exc}"
    if size != entry.size or digest.hexdigest() != entry.sha256:
        return (f"spool file of instance {entry.sop_instance_uid} changed since ingest ({size} bytes, SHA-256 "
                f"{digest.hexdigest()[:16]}..., recorded {entry.size} bytes, {entry.sha256[:16]}...)")
    return None


class _ProgressWriter:
    """Moves the unit to ``sending`` at the first byte; each stream attempt gets its ``transfers`` row at its
    first byte, whose byte count follows the stream (written at most once a second, and at its last byte) and
    is closed by :meth:`finish` (a killed gateway leaves it ``running``, closed as ``interrupted`` at recovery)."""

    def __init__(self, store: QueueStore, unit_id: int, peer_jid: str) -> None:
        self.store = store
        self.unit_id = unit_id
        self.peer_jid = peer_jid
        self.moved_to_sending = False
        self._last = 0.0
        self._rows: dict[str, tuple[int, int]] = {}  # sid -> (row id, offset)
        self._lock = threading.Lock()
        self._rows_lock = threading.Lock()
        self._finished = False

    def ensure_sending(self, method: str) -> None:
        with self._lock:
            if not self.moved_to_sending:
                self.store.transition(self.unit_id, State.SENDING, f"streaming over {method}", None, method=method)
                self.moved_to_sending = True

    def update(self, position: int, method: str, sid: str = "", offset: int = 0, final: bool = False) -> None:
        """``final``: every byte handed to the network (the verdict still to come): written whatever the time.
        A queue database that takes no writes does not stop the stream: its progress goes unwritten (the outage
        is said once by gateway.outage; the send's end, which must be written, meets it again)."""
        try:
            self._update(position, method, sid, offset, final)
        except Exception as exc:
            if not unreachable(exc):
                raise

    def _update(self, position: int, method: str, sid: str, offset: int, final: bool) -> None:
        self.ensure_sending(method)
        with self._rows_lock:
            if self._finished:
                return
            if sid and sid not in self._rows:
                self._rows[sid] = (self.store.open_transfer(self.unit_id, sid, self.peer_jid, "out", method, offset), offset)
            now = time.monotonic()
            if final or now - self._last >= 1.0:
                self._last = now
                self.store.set_progress(self.unit_id, position, method)
                if sid:
                    self.store.transfer_progress(self._rows[sid][0], position - self._rows[sid][1])

    def finish(self, outcome: SendOutcome) -> None:
        """Close (or write) one row per attempt of ``outcome`` with its bytes, outcome and error."""
        with self._rows_lock:
            self._finished = True
        for attempt in outcome.attempts:
            sid = str(attempt.get("sid", ""))
            self.store.close_transfer(
                self._rows.get(sid, (None, 0))[0], self.unit_id, sid, self.peer_jid, "out",
                _method_name(str(attempt.get("method", ""))), int(attempt.get("offset", 0) or 0),
                int(attempt.get("bytes", 0) or 0),
                datetime.fromtimestamp(float(attempt.get("started", time.time())), UTC).replace(tzinfo=None),
                str(attempt.get("outcome", "")), str(attempt.get("error") or "") or None,
                float(attempt["stream_s"]) if attempt.get("stream_s") is not None else None,
                int(attempt["wire_bytes"]) if attempt.get("wire_bytes") is not None else None,
            )


def _method_name(method: str) -> str:
    return {"http://jabber.org/protocol/bytestreams": "s5b", "http://jabber.org/protocol/ibb": "ibb"}.get(method, method)



"""The admin web page and ``/metrics``: Starlette with Jinja2 templates, served by uvicorn in the gateway's
own event loop (``[web]``; loopback by default). Read-only: nothing on the page changes the queue.

Pages (auto-refreshing every ``refresh_s``): ``/`` the queue by state, studies in flight with their
progress, the latest moves, the XMPP connection and maintenance; ``/study/{uid}`` a study's units, audit
trail and transfer attempts; ``/peers`` presence, pinned fingerprints and per-peer settings; ``/stats`` the
field study's metrics with a throughput chart. ``/metrics``: Prometheus text format (prometheus-client),
gathered from the queue database at each scrape, so several processes of one gateway report the same.

Access: optional HTTP basic auth (``auth_user`` and a PBKDF2-SHA256 ``auth_password_hash`` made by
``dicomgw web hash-password``), and/or TLS with a required client certificate (``tls_cert_file``,
``tls_key_file``, ``client_ca_file``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import logging
import math
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn
from jinja2 import DictLoader, Environment, select_autoescape
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Route

from adapters.web_templates import TEMPLATES
from gateway import dashboard
from gateway.lifecycle import State
from gateway.outage import UNREACHABLE, reason
from gateway.passwords import check_password
from gateway.processes import overall
from gateway.store import QueueStore, utcnow

log = logging.getLogger(__name__)

LATENCY_BUCKETS_S = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600)  # the tallies' buckets (migration 0015)


@dataclass(frozen=True)
class WebAccess:
    auth_user: str = ""
    auth_password_hash: str = ""  # pbkdf2_sha256$iterations$salt_b64$hash_b64
    tls_cert_file: str = ""
    tls_key_file: str = ""
    client_ca_file: str = ""


class _BasicAuth(BaseHTTPMiddleware):
    """HTTP basic auth with the same work for every attempt (the password hash is checked whether or not the
    user name is right, so a wrong user answers no faster than a wrong password: user names cannot be
    guessed by timing), any bytes in the header answered 401 (never 500), and at most ``MAX_FAILURES`` failed
    attempts per client address in ``FAILURE_WINDOW_S`` (then 429 with Retry-After, no hash computed)."""

    MAX_FAILURES = 10
    FAILURE_WINDOW_S = 60.0

    def __init__(self, app: Any, access: WebAccess) -> None:
        super().__init__(app)
        self.access = access
        self._failures: dict[str, tuple[int, float]] = {}  # address -> (failures, window start)

    async def dispatch(self, request: Request, call_next: Any) -> Response:
        address = request.client.host if request.client else "?"
        now = time.monotonic()
        failures, since = self._failures.get(address, (0, now))
        if now - since > self.FAILURE_WINDOW_S:
            failures, since = 0, now
        if failures >= self.MAX_FAILURES:
            retry = max(1, int(self.FAILURE_WINDOW_S - (now - since)))
            return PlainTextResponse(f"too many failed logins from {address}; try again in {retry} s", status_code=429,
                                     headers={"Retry-After": str(retry)})
        header = request.headers.get("authorization", "")
        if not header:  # a browser's first request: nothing to check, nothing counted
            return PlainTextResponse("authentication required", status_code=401,
                                     headers={"WWW-Authenticate": 'Basic realm="dicomgw", charset="UTF-8"'})
        user, password = b"", b""
        if header.lower().startswith("basic "):
            try:
                user, _, password = base64.b64decode(header[6:], validate=True).partition(b":")
            except (ValueError, binascii.Error):
                user, password = b"", b""
        user_ok = hmac.compare_digest(user, self.access.auth_user.encode())
        password_ok = await asyncio.to_thread(check_password, password.decode("utf-8", "replace"), self.access.auth_password_hash)
        if user_ok and password_ok:
            self._failures.pop(address, None)
            return await call_next(request)
        if len(self._failures) > 10_000:  # bounded memory under a spread-out attack
            self._failures.clear()
        self._failures[address] = (failures + 1, since)
        return PlainTextResponse("authentication required", status_code=401,
                                 headers={"WWW-Authenticate": 'Basic realm="dicomgw", charset="UTF-8"'})


METHOD_LABELS = frozenset({"s5b", "ibb", "none"})
OUTCOME_LABELS = frozenset({"received", "rejected", "incomplete", "refused", "cut", "held", "running", "suspended",
                            "interrupted"})


class QueueCollector(Collector):
    """Prometheus metrics read from the queue database at each scrape."""

    def __init__(self, store: QueueStore, xmpp_online: Callable[[], bool | None],
                 spool_space: Callable[[], tuple[int, int]] | None = None,
                 outage: Callable[[], dict[str, Any] | None] = lambda: None) -> None:
        self.store = store
        self.xmpp_online = xmpp_online
        self.spool_space = spool_space  # (free bytes, bytes kept for the site's modalities)
        self.outage = outage  # this process's queue database outage (gateway.outage.DatabaseOutage.state)

    def collect(self) -> Iterator[Any]:
        depth = GaugeMetricFamily("dicomgw_queue_units", "Study units in the queue by direction and state",
                                  labels=["direction", "state"])
        counts = self.store.state_counts()
        for state in State:
            for direction in ("out", "in"):
                depth.add_metric([direction, state.value], counts.get((direction, state.value), 0))
        yield depth
        attempts = CounterMetricFamily("dicomgw_transfers", "Transfer attempts by direction, method and outcome",
                                       labels=["direction", "method", "outcome"])
        moved = CounterMetricFamily("dicomgw_transfer_bytes", "Study bytes (the bundle's own) moved by transfer attempts",
                                    labels=["direction", "method", "outcome"])
        wire = CounterMetricFamily("dicomgw_transfer_wire_bytes", "Bytes on the stream (after compression, before "
                                   "end-to-end encryption) of transfer attempts", labels=["direction", "method", "outcome"])
        failures = CounterMetricFamily("dicomgw_transfer_failures", "Failed transfer attempts by kind", labels=["direction", "kind"])
        # One sample per label set, label values from closed sets: rows are summed per label set first (a refusal
        # recorded with two methods gave two samples of one failure series, and scrapers keep one of them).
        totals: dict[tuple[str, str, str], list[int]] = {}
        failed: dict[tuple[str, str], int] = {}
        for row in self.store.transfer_totals():
            direction = row["direction"] if row["direction"] in ("in", "out") else "other"
            method = row["method"] if row["method"] in METHOD_LABELS else "other"
            outcome = row["outcome"] if row["outcome"] in OUTCOME_LABELS else "other"
            counted = totals.setdefault((direction, method, outcome), [0, 0, 0])
            counted[0] += row["count"]
            counted[1] += row["bytes"]
            counted[2] += row["wire_bytes"]
            if outcome not in ("received", "held", "running", "suspended"):
                failed[(direction, outcome)] = failed.get((direction, outcome), 0) + row["count"]
        for labels, (count, moved_bytes, wire_bytes) in sorted(totals.items()):
            attempts.add_metric(list(labels), count)
            moved.add_metric(list(labels), moved_bytes)
            wire.add_metric(list(labels), wire_bytes)
        for (direction, outcome), count in sorted(failed.items()):
            failures.add_metric([direction, outcome], count)
        yield attempts
        yield moved
        yield wire
        yield failures
        counted, seconds = self.store.import_latency_histogram()
        buckets, seen = [], 0
        for bound in LATENCY_BUCKETS_S:
            seen += counted.get(str(bound), 0)
            buckets.append((str(float(bound)), seen))
        buckets.append(("+Inf", sum(counted.values())))
        latency = HistogramMetricFamily("dicomgw_import_latency_seconds",
                                        "From a received study's verification to the local PACS holding it")
        latency.add_metric([], buckets, seconds)
        yield latency
        online = self.xmpp_online()
        connected = GaugeMetricFamily("dicomgw_xmpp_connected", "1 while the XMPP session is online")
        connected.add_metric([], 1.0 if online else 0.0)
        yield connected
        found = overall(self.store, utcnow())  # the heartbeats `dicomgw status` and the web page read
        up = GaugeMetricFamily("dicomgw_up", "1 while a gateway process of this queue runs (its heartbeat is current)")
        up.add_metric([], 1.0 if found.running else 0.0)
        yield up
        running = GaugeMetricFamily("dicomgw_processes", "Gateway processes of this queue by heartbeat state",
                                    labels=["state"])
        running.add_metric(["running"], sum(1 for p in found.processes if p.running))
        running.add_metric(["silent"], sum(1 for p in found.processes if p.silent))
        running.add_metric(["not_running"], sum(1 for p in found.processes if not p.running and not p.silent))
        yield running
        outage = self.outage()
        writable = GaugeMetricFamily("dicomgw_queue_database_writable", "1 while this process's writes to the queue "
                                     "database succeed; 0 while its disk is full, it is read-only or it cannot be reached")
        writable.add_metric([], 0.0 if outage else 1.0)
        yield writable
        lasting = GaugeMetricFamily("dicomgw_queue_database_outage_seconds", "Seconds since this process's queue "
                                    "database outage began (instances refused with A700 meanwhile); 0 when there is none")
        lasting.add_metric([], max(0.0, time.time() - float(outage["since"])) if outage and outage.get("since") else 0.0)
        yield lasting
        if self.spool_space is not None:
            try:
                free, reserve = self.spool_space()
            except OSError:
                return  # no sample rather than a wrong one (the spool's file system cannot be read)
            spool = GaugeMetricFamily("dicomgw_spool_free_bytes", "Bytes free on the spool's file system")
            spool.add_metric([], float(free))
            yield spool
            kept = GaugeMetricFamily("dicomgw_spool_reserve_bytes", "Spool bytes kept free for the site's own "
                                     "modalities: peers' studies are refused below it ([paths] spool_reserve_mb)")
            kept.add_metric([], float(reserve))
            yield kept


def make_app(store: QueueStore, presence: Callable[[str], str], configured_peers: tuple[str, ...],
             xmpp_online: Callable[[], bool | None], access: WebAccess | None = None, refresh_s: int = 5,
             own_jid: str = "", pin_for: Callable[[str], str | None] = lambda _jid: None,
             spool_space: Callable[[], tuple[int, int]] | None = None,
             outage: Callable[[], dict[str, Any] | None] = lambda: None) -> Starlette:
    """``outage``: this process's queue database outage (``gateway.outage.DatabaseOutage.state``), said on every
    page and in /metrics: a disk full under the database leaves its reads working, so the pages would show the
    queue as usual while every instance is refused."""
    env = Environment(loader=DictLoader(TEMPLATES), autoescape=select_autoescape(default=True))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(QueueCollector(store, xmpp_online, spool_space, outage))

    def page(name: str, **data: Any) -> HTMLResponse:
        return HTMLResponse(env.get_template(name).render(refresh_s=refresh_s, own_jid=own_jid,
                                                          outage=outage_banner(outage()), **data))

    async def index(_request: Request) -> Response:
        return page("index.html", title="Queue", spool=await asyncio.to_thread(_spool_view, spool_space),
                    **await asyncio.to_thread(dashboard.overview, store))

    async def study(request: Request) -> Response:
        found = await asyncio.to_thread(dashboard.study, store, request.path_params["study_uid"])
        if found is None:
            return page("missing.html", title="Not found", what=request.path_params["study_uid"])
        return page("study.html", title=f"Study {found['study_uid']}", study=found)

    async def peers(_request: Request) -> Response:
        rows = await asyncio.to_thread(dashboard.peers, store, configured_peers, presence, pin_for)
        return page("peers.html", title="Peers", peers=rows)

    async def statistics(request: Request) -> Response:
        text = request.query_params.get("hours", "24") or "24"
        try:
            hours = float(text)
        except ValueError:
            hours = float("nan")
        if not math.isfinite(hours):
            return PlainTextResponse(f"hours must be a number of hours, e.g. 24 (got {text[:40]!r})", status_code=400)
        found = await asyncio.to_thread(dashboard.statistics, store, max(0.1, min(hours, 24 * 366)))
        return page("stats.html", title="Statistics", stats=found, chart=dashboard.chart_svg(found["points"]))

    async def metrics(_request: Request) -> Response:
        body = await asyncio.to_thread(generate_latest, registry)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    middleware = [Middleware(_BasicAuth, access=access)] if access is not None and access.auth_user else []
    routes = [Route("/", index), Route("/study/{study_uid}", study), Route("/peers", peers),
              Route("/stats", statistics), Route("/metrics", metrics)]
    handlers = {error: _database_away for error in UNREACHABLE}
    return Starlette(routes=routes, middleware=middleware, exception_handlers=handlers)  # type: ignore[arg-type]


async def _database_away(_request: Request, exc: Exception) -> Response:
    """Every page (and /metrics: a failed scrape) while the queue database cannot be reached: 503 saying so,
    after the login as any page (gateway.outage says the outage once in the log). A browser reloads it (the
    Refresh header; it used to stay on this text after the database was back, until the admin reloaded)."""
    return PlainTextResponse(f"The queue database cannot be reached ({reason(exc)}).\nThe gateway refuses instances "
                             "(Out of Resources, A700) and sends nothing until it answers again; this page reloads "
                             "every 5 s and shows the queue once it does.\n", status_code=503,
                             headers={"Retry-After": "5", "Refresh": "5"})


def outage_banner(state: dict[str, Any] | None) -> str:
    """The page's line for a queue database outage ('' when there is none): what, since when, the driver's words."""
    if not state:
        return ""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(state["since"]))) if state.get("since") else "?"
    until = "it answers again" if state.get("kind") == "unreachable" else "it takes writes again"
    said = str(state.get("said") or "the queue database cannot be used")
    return (f"{said[:1].upper()}{said[1:]} (since {since}: {state.get('reason') or '?'}). Every instance is refused "
            f"(Out of Resources, A700) and nothing is sent or imported until {until}.")


def _spool_view(spool_space: Callable[[], tuple[int, int]] | None) -> dict[str, Any] | None:
    """The spool's room for the page: MB free, MB kept for the site's modalities, low (peers refused) or not."""
    if spool_space is None:
        return None
    try:
        return dashboard.spool_room(*spool_space())
    except OSError as exc:
        return {"error": exc.strerror or type(exc).__name__}


class _Server(uvicorn.Server):
    """uvicorn inside the gateway's loop: the gateway owns SIGINT/SIGTERM, not the web server."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class WebServer:
    """``start()`` on the running loop serves the app; ``stop()`` ends it (open requests get a moment)."""

    def __init__(self, app: Starlette, host: str, port: int, access: WebAccess | None = None) -> None:
        access = access or WebAccess()
        tls: dict[str, Any] = {}
        if access.tls_cert_file:
            tls = {"ssl_certfile": access.tls_cert_file, "ssl_keyfile": access.tls_key_file}
            if access.client_ca_file:
                tls.update(ssl_ca_certs=access.client_ca_file, ssl_cert_reqs=ssl.CERT_REQUIRED)
        # log_config=None: uvicorn's loggers keep no handlers of their own and reach ours (gateway.logs), so its
        # errors ("Exception in ASGI application") are JSON lines like every other one.
        self.config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off", log_config=None,
                                     access_log=False, timeout_graceful_shutdown=2, **tls)
        self.server = _Server(self.config)
        self.task: asyncio.Task[None] | None = None
        self.scheme = "https" if tls else "http"
        self.host, self.port = host, port

    async def start(self) -> None:
        """Bind (an error here, e.g. the port in use, raises OSError naming it), then serve."""
        try:
            sock = socket.create_server((self.host, self.port), reuse_port=False)
        except OSError as exc:
            raise OSError(exc.errno, f"admin web page: cannot listen on {self.host}:{self.port}: {exc.strerror}") from None
        self.port = sock.getsockname()[1]
        self.task = asyncio.ensure_future(self.server.serve(sockets=[sock]))
        for _ in range(200):  # bounded: the socket is bound within a moment or the start failed
            if self.server.started or self.task.done():
                break
            await asyncio.sleep(0.025)
        if self.task.done():
            self.task.result()  # raises what stopped it (e.g. the port in use)
            raise RuntimeError(f"web server on {self.host}:{self.port} did not start")
        log.info("admin web page on %s://%s:%d/", self.scheme, self.host, self.port)

    async def stop(self) -> None:
        if self.task is None:
            return
        self.server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(self.task, 10)

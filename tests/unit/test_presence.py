"""Presence components (adapters.xmpp.presence): what peers show and what it means for an offer; our flow-control
presence coalesced to at most one stanza per interval, the last state always sent."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from adapters.xmpp.presence import FlowControl, PeerPresence


class Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.timers: list[tuple[float, Callable[[], None]]] = []

    def call_later(self, delay: float, fn: Callable[[], None]) -> object:
        self.timers.append((self.now + delay, fn))
        return object()

    def advance(self, seconds: float) -> None:
        self.now += seconds
        due = [t for t in self.timers if t[0] <= self.now]
        self.timers = [t for t in self.timers if t[0] > self.now]
        for _when, fn in sorted(due, key=lambda t: t[0]):
            fn()


def flow(interval: float = 2.0) -> tuple[FlowControl, list[tuple[str | None, str]], Clock]:
    sent: list[tuple[str | None, str]] = []
    clock = Clock()
    control = FlowControl(lambda show, status: sent.append((show, status)), interval, clock.call_later, lambda: clock.now)
    return control, sent, clock


def test_a_gateway_flapping_at_its_limit_sends_at_most_one_presence_per_interval_and_ends_true() -> None:
    control, sent, clock = flow()
    control.session_started()
    assert sent == [(None, "ready")]
    control.set(True, "busy: at the inbound transfer limit", online=True)
    assert sent[-1] == ("dnd", "busy: at the inbound transfer limit")  # right after the login: at once
    control.set(False, "ready", online=True)
    for n in range(100):  # a transfer starts and ends, 100 times within one second
        control.set(n % 2 == 0, "busy: at the inbound transfer limit" if n % 2 == 0 else "ready", online=True)
        clock.advance(0.01)
    assert len(sent) == 2  # inside the interval nothing more left
    clock.advance(2.0)
    assert sent[-1] == (None, "ready") and len(sent) == 3  # at its end the state the peers last saw is corrected, once
    clock.advance(5.0)
    control.set(True, "busy: at the inbound transfer limit", online=True)
    assert sent[-1] == ("dnd", "busy: at the inbound transfer limit")  # an interval passed: at once
    control.set(False, "ready", online=True)
    control.set(True, "maintenance: PACS upgrade", online=True)
    assert len(sent) == 4
    clock.advance(2.0)
    assert sent[-1] == ("dnd", "maintenance: PACS upgrade") and len(sent) == 5  # the last wanted state, once
    assert control.sent == 5


def test_offline_changes_wait_for_the_session_and_a_new_session_says_the_state_at_once() -> None:
    control, sent, clock = flow()
    control.set(True, "busy: at the inbound transfer limit", online=False)
    assert sent == []
    control.session_started()
    assert sent == [("dnd", "busy: at the inbound transfer limit")]
    control.session_ended()
    control.session_started()  # a reconnect within the interval: the server knows nothing of us
    assert len(sent) == 2
    control2, sent2, _clock2 = flow(interval=0.0)
    control2.session_started()
    for n in range(5):
        control2.set(n % 2 == 0, "x", online=True)
    assert len(sent2) == 6  # interval 0: every change goes out


def test_peer_presence_and_what_it_means_for_an_offer() -> None:
    peers = PeerPresence()
    bare = "radiology.hospital-b@helsenett.test"
    assert peers.availability(bare) == (None, "offline")
    peers.update(bare, "gw1", "available", "dnd", "busy: at the inbound transfer limit")
    assert peers.availability(bare) == (None, "busy (at the inbound transfer limit)")
    peers.update(bare, "gw1", "available", "dnd", "")
    assert peers.availability(bare) == (None, "busy")
    peers.update(bare, "gw1", "available", "dnd", "busy: spool\n\r\tfull\u2028 here")  # a peer's words: one line
    assert peers.availability(bare) == (None, "busy (spool full here)")
    peers.update(bare, "gw1", "available", "dnd", "busy: at the inbound transfer limit")
    assert peers.availability(bare, "stat") == (f"{bare}/gw1", "busy (STAT offered into its reserved room)")
    peers.update(bare, "gw2", "available", "", "ready")
    assert peers.availability(bare) == (f"{bare}/gw2", "available")
    peers.update(bare, "gw2", "unavailable", "", "")
    peers.update(bare, "gw1", "available", "dnd", "maintenance: PACS upgrade" + "x" * 500)
    assert peers.availability(bare, "stat")[0] is None  # maintenance holds STAT too
    assert len(peers.text[bare]["gw1"]) == 200 and peers.online_resource(bare) == f"{bare}/gw1"
    assert peers.received == 7
    peers.clear()
    assert peers.availability(bare) == (None, "offline")


@pytest.mark.parametrize("status", [
    "busy: " + "x" * 100_000,  # oversized
    "busy: spool\x1b[2J\x1b]0;title\x07 low\u202e",  # escape sequences, a bidirectional override
    "busy: \x00\x01\x7f\x9f",  # C0, DEL, C1 alone
    "busy: \udcff\ufffd not utf-8",  # a lone surrogate (what undecodable bytes become), the replacement character
    "busy: line\nbreak\r\n\u2028\u2029end",  # line and paragraph separators
    "busy: full " * 1000,  # repeated 1000 times
    "busy: ",  # nothing after the prefix
    "",
])
def test_a_peers_busy_reason_reaches_the_queue_on_one_short_line_of_printable_text(status: str) -> None:
    """The peer's status text is the peer's (or the server's) word: what the sender's queue shows of it is one
    line of at most 200 characters with no control or direction characters, and the peer is still busy."""
    from gateway.terminal import plain

    peers = PeerPresence()
    bare = "radiology.hospital-b@helsenett.test"
    peers.update(bare, "gw1", "available", "dnd", status)
    full, said = peers.availability(bare)
    assert full is None and said.startswith("busy")
    assert len(said) <= len("busy ()") + 200 and plain(said) == said and said == " ".join(said.split())

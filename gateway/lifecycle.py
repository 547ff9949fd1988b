"""A study's life in the gateway: the states and the one table of legal moves.

A *study unit* (one row in the queue) is what the gateway moves: all instances of one Study Instance UID
that arrived together. Late instances of a study whose unit has already left ``received`` start a
follow-up unit of the same study, so nothing that arrives is ever lost behind a state that moved on.

Sender side (ingest -> transfer)::

    received --(no new instance for stable_age_s)--> stable --(routed)--> queued
    queued -> waiting-peer | waiting-window | offering;  offering -> sending -> sent -> delivered
    waiting-window: a routine study outside its peer's transfer window, until the next opening
    sent --(no delivery receipt within receipt_timeout_s)--> queued (sent again) | failed
    offering -> sent when the peer answers that it already holds the bundle (a resend after a lost verdict)
    queued | waiting-peer | failed -> delivered when a late receipt for the same bundle arrives

Receiver side (transfer -> PACS)::

    receiving -> received -> importing -> delivered   (the PACS holds every instance; receipt to the sender)
    importing -> received (transient PACS failure, retried with backoff) | failed (permanent refusal)

``failed`` is a permanent refusal (``gateway.retry``) the admin can retry from; ``dead`` is where a study
goes whose transient failures went on for the retry policy's attempts or age, keeping its last error; the
admin's ``dicomgw queue retry`` brings either back (``queued`` on the sender, ``received`` on the receiver).
The state lives in one DB column (``study_units.state``); every move goes through :func:`check_move`
and writes an audit row (see ``gateway.store``). An illegal move raises :class:`IllegalTransition`.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    RECEIVING = "receiving"
    RECEIVED = "received"
    STABLE = "stable"
    QUEUED = "queued"
    WAITING_PEER = "waiting-peer"
    WAITING_WINDOW = "waiting-window"
    OFFERING = "offering"
    SENDING = "sending"
    SENT = "sent"
    IMPORTING = "importing"
    DELIVERED = "delivered"
    FAILED = "failed"
    DEAD = "dead"


class IllegalTransition(RuntimeError):
    """A move that the transition table does not allow."""

    def __init__(self, current: State, target: State) -> None:
        super().__init__(f"illegal study state move {current.value} -> {target.value}")
        self.current = current
        self.target = target


S = State
TRANSITIONS: dict[State, frozenset[State]] = {
    S.RECEIVING: frozenset({S.RECEIVED, S.FAILED}),
    S.RECEIVED: frozenset({S.STABLE, S.IMPORTING, S.FAILED, S.DEAD}),
    S.STABLE: frozenset({S.QUEUED, S.DEAD}),
    S.QUEUED: frozenset({S.WAITING_PEER, S.WAITING_WINDOW, S.OFFERING, S.DELIVERED, S.FAILED, S.DEAD}),
    S.WAITING_PEER: frozenset({S.QUEUED, S.WAITING_WINDOW, S.OFFERING, S.DELIVERED, S.FAILED, S.DEAD}),
    S.WAITING_WINDOW: frozenset({S.QUEUED, S.WAITING_PEER, S.OFFERING, S.DELIVERED, S.FAILED, S.DEAD}),
    S.OFFERING: frozenset({S.SENDING, S.SENT, S.WAITING_PEER, S.QUEUED, S.FAILED, S.DEAD}),
    S.SENDING: frozenset({S.SENT, S.QUEUED, S.FAILED, S.DEAD}),
    S.SENT: frozenset({S.DELIVERED, S.QUEUED, S.FAILED}),
    S.IMPORTING: frozenset({S.DELIVERED, S.RECEIVED, S.FAILED}),
    S.DELIVERED: frozenset(),
    S.FAILED: frozenset({S.QUEUED, S.RECEIVED, S.DELIVERED, S.DEAD}),
    S.DEAD: frozenset({S.QUEUED, S.RECEIVED}),
}

#: States in which a unit still accepts new instances from modalities.
OPEN_FOR_INSTANCES: frozenset[State] = frozenset({S.RECEIVED})


def check_move(current: State | str, target: State | str) -> State:
    """Return ``target`` as a :class:`State` if the move is legal, else raise :class:`IllegalTransition`."""
    current_state, target_state = State(current), State(target)
    if target_state not in TRANSITIONS[current_state]:
        raise IllegalTransition(current_state, target_state)
    return target_state

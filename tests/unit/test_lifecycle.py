"""The study state machine: a table of legal moves; anything else raises."""

from __future__ import annotations

import pytest

from gateway.lifecycle import TRANSITIONS, IllegalTransition, State, check_move


def test_every_state_has_a_row_and_every_target_is_a_state() -> None:
    assert set(TRANSITIONS) == set(State)
    for targets in TRANSITIONS.values():
        assert targets <= set(State)


@pytest.mark.parametrize(
    ("current", "target"),
    [("received", "stable"), ("stable", "queued"), ("queued", "offering"), ("offering", "sending"),
     ("sending", "sent"), ("sent", "delivered"), ("failed", "queued"), ("queued", "waiting-peer"),
     ("receiving", "received"), ("received", "importing"), ("importing", "delivered")],
)
def test_the_main_path_is_legal(current: str, target: str) -> None:
    assert check_move(current, target) == State(target)


@pytest.mark.parametrize(
    ("current", "target"),
    [("received", "sent"), ("stable", "received"), ("delivered", "queued"), ("dead", "sending"), ("sent", "sending")],
)
def test_illegal_moves_raise_with_both_states_named(current: str, target: str) -> None:
    with pytest.raises(IllegalTransition, match=f"{current} -> {target}"):
        check_move(current, target)


def test_delivered_is_terminal_and_dead_only_leaves_by_the_admins_retry() -> None:
    assert TRANSITIONS[State.DELIVERED] == frozenset()
    assert TRANSITIONS[State.DEAD] == frozenset({State.QUEUED, State.RECEIVED})


def test_unknown_state_is_an_error() -> None:
    with pytest.raises(ValueError):
        check_move("received", "lost")

"""Which XMPP server node next, and when (adapters.xmpp.connection.ServerRotation)."""

from __future__ import annotations

import pytest

from adapters.xmpp.connection import ServerRotation


def test_the_next_node_at_once_then_rounds_that_wait_at_most_reconnect_s() -> None:
    rotation = ServerRotation((("n1", 5222), ("n2", 5222), ("n3", 5222)), reconnect_s=5.0)
    assert rotation.current == ("n1", 5222)
    waits = []
    for _ in range(12):
        waits.append(rotation.after_failure())
    assert waits[:2] == [0.2, 0.2]  # n2, n3 at once
    assert waits[2:] == [2.0, 2.0, 2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 5.0, 5.0]  # rounds: 2, 4, then the cap
    assert rotation.current == ("n1", 5222)  # 12 moves over 3 nodes
    rotation.connected()
    assert rotation.after_failure() == 0.2 and rotation.current == ("n2", 5222)  # a lost session: next node at once


def test_one_node_waits_between_attempts_and_names_itself() -> None:
    rotation = ServerRotation((("127.0.0.1", 5222),), reconnect_s=3.0)
    assert [rotation.after_failure() for _ in range(4)] == [2.0, 3.0, 3.0, 3.0]
    assert rotation.describe("helsenett.test") == "127.0.0.1:5222"
    assert ServerRotation((("", 5222),)).describe("helsenett.test") == "helsenett.test (DNS)"
    with pytest.raises(ValueError, match="no XMPP server"):
        ServerRotation(())

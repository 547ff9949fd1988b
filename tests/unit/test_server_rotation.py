"""Which XMPP server node next, and when (adapters.xmpp.connection.ServerRotation)."""

from __future__ import annotations

import pytest

from adapters.xmpp.connection import ServerRotation
from adapters.xmpp.srv import Node


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
    with pytest.raises(ValueError, match="no XMPP server"):
        ServerRotation(())


def test_nodes_from_dns_are_looked_up_at_every_round_and_named_with_their_target() -> None:
    rotation = ServerRotation((), reconnect_s=4.0, from_dns=True)
    assert rotation.needs_lookup and rotation.describe("helsenett.test") == "helsenett.test (DNS SRV)"
    rotation.use((Node("192.0.2.1", 5222, "xmpp1.helsenett.test"), Node("192.0.2.2", 5223, "xmpp2.helsenett.test")))
    assert rotation.current == ("192.0.2.1", 5222)
    assert rotation.describe("helsenett.test") == "192.0.2.1:5222 (xmpp1.helsenett.test, DNS SRV)"
    assert rotation.after_failure() == 0.2 and not rotation.needs_lookup  # the backup at once, no new lookup
    assert rotation.describe("helsenett.test") == "192.0.2.2:5223 (xmpp2.helsenett.test, DNS SRV)"
    assert rotation.after_failure() == 2.0 and rotation.needs_lookup  # a round failed: wait, then look up again
    rotation.use(())  # the lookup failed: a round with no node
    assert rotation.after_failure() == 4.0 and rotation.needs_lookup
    rotation.use((Node("192.0.2.1", 5222, "xmpp1.helsenett.test"),))
    rotation.connected()
    assert rotation.after_failure() == 2.0 and rotation.needs_lookup  # one node: every retry looks up anew

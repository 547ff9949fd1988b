"""RFC 2782 order of SRV records (adapters.xmpp.srv.srv_order): priority first, then weighted random draws."""

from __future__ import annotations

import random
from collections import Counter

from adapters.xmpp.srv import srv_order


def test_a_lower_priority_always_comes_first_whatever_the_weights() -> None:
    records = [(10, 1000, "backup", 5222), (0, 0, "primary", 5222), (20, 5, "last", 5223)]
    for seed in range(50):
        assert srv_order(records, random.Random(seed)) == [("primary", 5222), ("backup", 5222), ("last", 5223)]


def test_within_a_priority_the_weights_share_the_first_place_and_every_record_is_tried_once() -> None:
    records = [(0, 90, "heavy", 5222), (0, 10, "light", 5222), (0, 0, "zero", 5222)]
    firsts = Counter()
    rng = random.Random(7)
    for _ in range(1000):
        order = srv_order(records, rng)
        assert sorted(order) == [("heavy", 5222), ("light", 5222), ("zero", 5222)]
        firsts[order[0][0]] += 1
    assert 850 <= firsts["heavy"] <= 950 and 50 <= firsts["light"] <= 150 and firsts["zero"] < 20


def test_an_srv_target_that_is_no_host_name_is_not_used() -> None:
    """SRV answers are untrusted: a target that is not a plausible host name is dropped (never connected to, never
    shown in the status) whatever it holds."""
    from adapters.xmpp.srv import _name

    assert _name("xmpp1.helsenett.test") == "xmpp1.helsenett.test"
    for hostile in ["x" * 254, "xmpp\x1b]0;x\x07.test", "xmpp\n.test", "xmpp1.helsenett.test\x00", "xmp\u00e9.test",
                    "a b.test", "a/b.test", "\udcff.test", "xmpp." * 1000]:
        assert _name(hostile) == "", hostile

"""Who may offer a study, how large, how many at once (presence as flow control)."""

from __future__ import annotations

from gateway.transfer import InboundPolicy


class FakeStore:
    def __init__(self, allowed: set[str]) -> None:
        self.allowed = allowed
        self.audited: list[tuple[str, str]] = []

    def peer_allowed(self, jid: str) -> bool:
        return jid in self.allowed

    def audit(self, event: str, detail: str) -> None:
        self.audited.append((event, detail))


def test_admission_rules_and_capacity_signal() -> None:
    store = FakeStore({"radiology.b@net.test"})
    capacity: list[bool] = []
    policy = InboundPolicy(store, ("radiology.a@net.test",), max_study_bytes=1000, max_inbound=1, on_capacity=capacity.append)  # type: ignore[arg-type]
    assert policy.authorize("radiology.x@net.test", 10, "1.2")[0] == "forbidden"
    assert store.audited[-1][0] == "offer_refused" and "radiology.x@net.test" in store.audited[-1][1]
    assert policy.authorize("radiology.a@net.test", 1001, "1.2")[0] == "not-acceptable"
    assert policy.authorize("radiology.a@net.test", 1000, "1.2") is None
    assert capacity == [True]
    assert policy.authorize("radiology.b@net.test", 10, "1.3") == ("resource-constraint", "busy: 1 inbound transfer(s) running")
    policy.release()
    assert capacity == [True, False]
    assert policy.authorize("radiology.b@net.test", 10, "1.3") is None

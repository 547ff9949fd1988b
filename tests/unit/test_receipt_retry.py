"""A delivery receipt the sender does not acknowledge is sent again after a wait that doubles (1 s up to 30 s), not
at every tick: a sender that refuses it (a key it does not pin, a study it does not know) would otherwise get
one every tick for ever. An acknowledged receipt is not sent again; another unit's receipt does not wait."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from gateway.lifecycle import State
from gateway.transfer import ReceiptSender


class Store:
    def __init__(self, *unit_ids: int) -> None:
        self.due = {u: SimpleNamespace(unit_id=u, origin_peer="radiology.hospital-a@helsenett.test", state=State.DELIVERED.value,
                                       instances=3, error=None, study_instance_uid=f"1.2.{u}", bundle_sha256="ab" * 32)
                    for u in unit_ids}

    def receipts_due(self) -> list[SimpleNamespace]:
        return list(self.due.values())

    def audit_entries(self, _limit: int, _unit_id: int) -> list[dict]:
        return []

    def receipt_acknowledged(self, unit_id: int, _detail: str) -> None:
        self.due.pop(unit_id)


class Port:
    def __init__(self) -> None:
        self.sent: list[tuple[float, int]] = []
        self.accept: set[int] = set()
        self.clock = 0.0

    def peer_online(self, _peer: str) -> str:
        return "radiology.hospital-a@helsenett.test/gw1"

    async def send_receipt(self, _peer: str, receipt: SimpleNamespace) -> tuple[bool, str]:
        unit = int(receipt.study_instance_uid.rsplit(".", 1)[1])
        self.sent.append((self.clock, unit))
        return (True, "acknowledged") if unit in self.accept else (False, "refused: not the certificate pinned")


def test_a_refused_receipt_waits_longer_each_time_and_an_acknowledged_one_ends() -> None:
    store, port = Store(1, 2), Port()
    port.accept = {2}
    sender = ReceiptSender(store, port, clock=lambda: port.clock)  # type: ignore[arg-type]
    for tick in range(0, 800):  # 80 s of 0.1 s ticks
        port.clock = tick / 10
        asyncio.run(sender.tick())
    refused = [at for at, unit in port.sent if unit == 1]
    assert [at for at, unit in port.sent if unit == 2] == [0.0]  # acknowledged at once, never again
    assert refused == [0.0, 1.0, 3.0, 7.0, 15.0, 31.0, 61.0]  # waits of 1, 2, 4, 8, 16, 30 s (the cap)
    port.accept.add(1)
    port.clock = 91.0
    asyncio.run(sender.tick())
    assert port.sent[-1] == (91.0, 1) and 1 not in store.due

"""Who may offer a study, with which certificate, how large, how many at once (presence as flow control)."""

from __future__ import annotations

import pytest

from gateway.directory import PeerDirectory
from gateway.model import PeerConfig
from gateway.pins import grouped, normalize_fingerprint, redact
from gateway.refusals import RefusalLog
from gateway.transfer import InboundPolicy

PIN_A = "ab" * 32
OTHER = "cd" * 32


def directory(store: "FakeStore", peers: tuple[str, ...] = (), pins: dict[str, str] | None = None,
              configs: dict[str, PeerConfig] | None = None) -> PeerDirectory:
    """The peers the admin set (the store's rows, or ``configs``) and the TOML file's ``peers`` and pins."""
    found = PeerDirectory(lambda: {**store.peer_configs(), **(configs or {})}, peers, (pins or {}).get)
    found.refresh()
    return found


class FakeStore:
    def __init__(self, allowed: set[str]) -> None:
        self.allowed = allowed
        self.audited: list[tuple[str, str]] = []
        self.held: dict[str, int] = {}  # bundle -> bytes a paused stream of it left here

    def peer_configs(self) -> dict[str, PeerConfig]:
        return {jid: PeerConfig(jid) for jid in self.allowed}

    def audit(self, event: str, detail: str) -> None:
        self.audited.append((event, detail))

    def inbound_bundle_state(self, peer: str, bundle: str) -> None:
        return None

    def bytes_held(self, peer: str, bundle: str) -> int:
        return self.held.get(bundle, 0)


def test_admission_rules_and_capacity_signal() -> None:
    store = FakeStore({"radiology.b@net.test"})
    capacity: list[bool] = []
    refusals = RefusalLog()
    policy = InboundPolicy(store, directory(store, ("radiology.a@net.test",)), max_study_bytes=1000,  # type: ignore[arg-type]
                           max_inbound=1, on_capacity=capacity.append, require_e2e=False, refusals=refusals)
    assert policy.authorize("radiology.x@net.test", 10)[0] == "forbidden"
    assert policy.screen("radiology.x@net.test")[0] == "forbidden"  # type: ignore[index]
    (tally,) = refusals.drain()  # counted in memory, not written per refusal
    assert (tally.event, tally.key, tally.count) == ("offer_refused", "radiology.x@net.test", 2)
    assert store.audited == []
    assert policy.authorize("radiology.a@net.test", 1001)[0] == "not-acceptable"
    assert policy.authorize("radiology.a@net.test", 1000) is None
    assert capacity == [True]
    assert policy.authorize("radiology.b@net.test", 10) == ("resource-constraint", "busy: 1 inbound transfer(s) running")
    policy.release()
    assert capacity == [True, False]
    assert policy.authorize("radiology.b@net.test", 10) is None


def test_certificate_must_match_the_pin_before_any_admission() -> None:
    store = FakeStore(set())
    refusals = RefusalLog()
    policy = InboundPolicy(store, directory(store, ("radiology.a@net.test", "radiology.b@net.test"),  # type: ignore[arg-type]
                                            {"radiology.a@net.test": PIN_A}), 1000, 5, require_e2e=True, refusals=refusals)
    condition, text = policy.authorize("radiology.a@net.test", 10, "ff" * 32, OTHER)  # type: ignore[misc]
    assert condition == "not-authorized" and f"{OTHER} of radiology.a@net.test does not match the pin {PIN_A}" in text
    assert refusals.drain()[0].event == "e2e_refused"
    condition, text = policy.authorize("radiology.b@net.test", 10, "ff" * 32, OTHER)  # type: ignore[misc]
    assert condition == "not-authorized" and "no certificate pinned for radiology.b@net.test" in text
    assert policy.authorize("radiology.a@net.test", 10, "ff" * 32, None)[0] == "not-authorized"  # type: ignore[index]
    assert policy.active == 0  # nothing was admitted
    assert policy.authorize("radiology.a@net.test", 10, "ff" * 32, PIN_A) is None and policy.active == 1


def test_lab_mode_exchanges_in_plaintext_only_without_a_pin() -> None:
    store = FakeStore(set())
    policy = InboundPolicy(store, directory(store, ("radiology.a@net.test",), {"radiology.a@net.test": PIN_A}),  # type: ignore[arg-type]
                           1000, 5, require_e2e=False)
    assert policy.authorize("radiology.a@net.test", 10, "ff" * 32, None)[0] == "not-authorized"  # pinned: encrypted only
    lab = InboundPolicy(store, directory(store, ("radiology.a@net.test",)), 1000, 5, require_e2e=False)  # type: ignore[arg-type]
    assert lab.authorize("radiology.a@net.test", 10, "ff" * 32, None) is None


def test_fingerprints_are_read_in_any_usual_spelling() -> None:
    spaced = grouped(PIN_A)
    assert spaced.count(" ") == 15 and normalize_fingerprint(spaced) == PIN_A
    assert normalize_fingerprint("SHA256:" + ":".join(PIN_A[i:i + 2].upper() for i in range(0, 64, 2))) == PIN_A
    with pytest.raises(ValueError, match="not a SHA-256 fingerprint"):
        normalize_fingerprint("abc")


def test_redact_names_no_study_and_no_instance() -> None:
    text = "SHA-256 mismatch for instance 1.2.3.4.5 of study 1.2.3 (not 1.2.3.4.55 nor 11.2.3)"
    assert redact(text, "1.2.3", ["1.2.3.4.5"]) == "SHA-256 mismatch for instance <instance 1> of study <study> (not 1.2.3.4.55 nor 11.2.3)"


def test_stat_offers_use_the_room_kept_for_them_and_send_only_peers_are_refused() -> None:
    store = FakeStore({"radiology.b@net.test", "archive.c@net.test"})
    configs = {"archive.c@net.test": PeerConfig("archive.c@net.test", directions="send")}
    policy = InboundPolicy(store, directory(store, configs=configs), max_study_bytes=1000, max_inbound=1,  # type: ignore[arg-type]
                           require_e2e=False, stat_reserve=1)
    assert policy.authorize("radiology.b@net.test", 10) is None  # the one routine admission
    assert policy.authorize("radiology.b@net.test", 10) == ("resource-constraint", "busy: 1 inbound transfer(s) running")
    assert policy.authorize("radiology.b@net.test", 10, priority="stat") is None  # the room kept for STAT
    assert policy.authorize("radiology.b@net.test", 10, priority="stat")[0] == "resource-constraint"  # kept room is 1
    assert store.audited[-1][1].startswith("STAT bundle") or any(d.startswith("STAT bundle") for _e, d in store.audited)
    assert policy.full
    policy.release()
    policy.release()
    assert not policy.full
    assert policy.authorize("archive.c@net.test", 10) == (
        "forbidden", "this gateway does not take studies from archive.c@net.test (it only sends to it)")


def test_an_offer_the_spool_cannot_take_with_the_reserve_kept_is_refused_busy() -> None:
    """Free space minus what the admitted streams still bring minus the study must leave the reserve; a paused
    bundle needs only its rest; an admission's bytes count until it ends (then the disk itself says)."""
    store = FakeStore({"radiology.a@net.test"})
    free = [10_000_000]
    policy = InboundPolicy(store, directory(store), max_study_bytes=10**9, max_inbound=5,  # type: ignore[arg-type]
                           require_e2e=False, free_bytes=lambda: free[0], reserve_bytes=2_000_000)
    assert policy.authorize("radiology.a@net.test", 5_000_000, "b1" * 32) is None  # 10 - 5 leaves 5 >= 2
    refusal = policy.authorize("radiology.a@net.test", 4_000_000, "b2" * 32)  # 10 - 5 coming - 4 leaves 1 < 2
    assert refusal == ("resource-constraint", "busy: not enough spool space here: 10 MB free, 5 MB still to come for "
                                              "the transfers under way, 4 MB needed for this study, 2 MB kept for this "
                                              "site's modalities")
    assert store.audited[-1] == ("offer_refused", f"offer of bundle {'b2' * 6} from radiology.a@net.test: "
                                 f"{refusal[1].removeprefix('busy: ')}")
    assert policy.active == 1  # the refusal took no admission
    store.held["b2" * 32] = 3_500_000  # a paused stream of it holds most of it: only the rest is needed
    assert policy.authorize("radiology.a@net.test", 4_000_000, "b2" * 32) is None
    policy.release("b1" * 32)  # its bytes are on disk now (the free space went down by them)
    free[0] = 5_000_000
    assert policy.authorize("radiology.a@net.test", 3_000_000, "b3" * 32)[0] == "resource-constraint"  # 5 - 0.5 - 3
    assert policy.authorize("radiology.a@net.test", 2_500_000, "b3" * 32) is None  # 5 - 0.5 - 2.5 leaves the 2


def test_bytes_a_running_stream_wrote_count_once_as_less_free_space_not_also_as_still_to_come() -> None:
    store = FakeStore({"radiology.a@net.test"})
    free = [10_000_000]
    policy = InboundPolicy(store, directory(store), max_study_bytes=10**9, max_inbound=5,  # type: ignore[arg-type]
                           require_e2e=False, free_bytes=lambda: free[0], reserve_bytes=2_000_000)
    assert policy.authorize("radiology.a@net.test", 5_000_000, "b1" * 32) is None
    policy.landed("b1" * 32, 4_000_000)  # written: the disk shows it
    free[0] = 6_000_000
    assert policy.authorize("radiology.a@net.test", 3_000_000, "b2" * 32) is None  # 6 - 1 still to come - 3 = 2
    assert policy.authorize("radiology.a@net.test", 1_000_000, "b3" * 32)[0] == "resource-constraint"  # 6 - 1 - 3 - 1


def test_the_receivers_progress_is_thinned_to_once_a_second_but_its_last_byte_is_written() -> None:
    """B's `dicomgw queue` says `receiving n %`: written about once a second, and at the last byte, so that it
    does not stay at the last thinned position while the whole bundle is verified (minutes for a large one)."""
    from types import SimpleNamespace

    from gateway.receiving import AuditedSink

    written: list[tuple[int, int]] = []

    class Bundle:
        manifest = SimpleNamespace(study_instance_uid="1.2.3")
        offset, size = 0, 300

        def write(self, data: bytes) -> None:
            self.offset += len(data)

    store = SimpleNamespace(begin_receiving=lambda *_args: 7, set_progress=lambda unit, at: written.append((unit, at)))
    host = SimpleNamespace(store=store, inbound_policy=SimpleNamespace(landed=lambda *_args: None))
    sink = AuditedSink(host, Bundle(), "a@helsenett.test", SimpleNamespace(manifest_sha256="k" * 64), "ibb")  # type: ignore[arg-type]
    for _ in range(3):
        sink.write(b"x" * 100)
    assert written == [(7, 100), (7, 300)]

"""The XMPP service's nodes from DNS SRV (adapters.xmpp.srv, RFC 6120 §3.2.1), asked of a real DNS server (dnsmasq
on loopback): the order to try them, the fallback to the domain itself, and every answer that gives nothing to try
refused with its reason, not a hang."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from adapters.lab.dns import Dnsmasq
from adapters.lab.localpeers import free_port
from adapters.xmpp.srv import LookupFailed, Node, client_nodes

ZONE = "helsenett.test"
SERVICE = f"_xmpp-client._tcp.{ZONE}"


@pytest.fixture(scope="module")
def dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dnsmasq]:
    srv = [
        (SERVICE, f"xmpp2.{ZONE}", 5269, 10, 10), (SERVICE, f"xmpp1.{ZONE}", 5222, 0, 10),  # backup listed first
        (f"_xmpp-client._tcp.closed.{ZONE}", ".", 0, 0, 0),
        (f"_xmpp-client._tcp.noaddr.{ZONE}", f"nowhere.{ZONE}", 5222, 0, 0),
        (f"_xmpp-client._tcp.portzero.{ZONE}", f"xmpp1.{ZONE}", 0, 0, 0),
    ]
    hosts = [(f"xmpp1.{ZONE}", "127.0.0.1"), (f"xmpp2.{ZONE}", "127.0.0.2"), (f"xmpp2.{ZONE}", "127.0.0.3")]
    with Dnsmasq(tmp_path_factory.mktemp("dns"), ZONE, srv=srv, hosts=hosts) as server:
        server.start()
        yield server


def lookup(domain: str, *nameservers: str, timeout_s: float = 5.0) -> tuple[Node, ...]:
    return asyncio.run(client_nodes(domain, nameservers, timeout_s))


def test_the_primary_first_then_every_address_of_the_backup(dns: Dnsmasq) -> None:
    for _ in range(5):
        first, *backup = lookup(ZONE, dns.nameserver)
        assert first == Node("127.0.0.1", 5222, f"xmpp1.{ZONE}")
        assert sorted(backup, key=str) == [Node("127.0.0.2", 5269, f"xmpp2.{ZONE}"), Node("127.0.0.3", 5269, f"xmpp2.{ZONE}")]


def test_a_domain_without_srv_records_is_its_own_node_on_5222(dns: Dnsmasq) -> None:
    assert lookup(f"plain.{ZONE}", dns.nameserver) == (Node(f"plain.{ZONE}", 5222, f"plain.{ZONE}"),)


@pytest.mark.parametrize(("domain", "said"), [
    (f"closed.{ZONE}", 'offers no XMPP client service (target ".")'),
    (f"noaddr.{ZONE}", f"no target with an address (nowhere.{ZONE})"),
    (f"portzero.{ZONE}", "no target with an address (none usable)"),
    ("elsewhere.example", "refused"),  # not this server's zone: REFUSED
])
def test_an_answer_with_nothing_to_try_is_refused_with_its_reason(dns: Dnsmasq, domain: str, said: str) -> None:
    with pytest.raises(LookupFailed, match="DNS SRV _xmpp-client._tcp." + domain.replace(".", r"\.")) as failed:
        lookup(domain, dns.nameserver)
    assert said in str(failed.value)


def test_a_resolver_that_does_not_answer_fails_within_its_timeout() -> None:
    started = time.monotonic()
    with pytest.raises(LookupFailed, match="DNS SRV"):
        lookup(ZONE, f"127.0.0.1:{free_port()}", timeout_s=1.0)  # nothing listens there
    assert time.monotonic() - started < 30  # a bound against a hang, not a speed figure


def test_a_gateway_whose_domain_offers_no_service_says_so_and_keeps_trying(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The agent with ``host = ""``: the lookup's reason is its status (``dicomgw status``, the web page), and it
    looks up again after each wait instead of giving up (the log shows each lookup dnsmasq answered)."""
    from adapters.xmpp.agent import GatewayAgent
    from adapters.xmpp.common import XmppSettings

    srv = [("_xmpp-client._tcp.closed.helsenett.test", ".", 0, 0, 0)]
    with Dnsmasq(tmp_path_factory.mktemp("dns-closed"), ZONE, srv=srv) as server:
        server.start()
        settings = XmppSettings(jid="radiology.hospital-b@closed.helsenett.test/gw1", password="pw", host="",
                                dns_servers=(server.nameserver,), reconnect_s=0.5)

        async def start() -> dict[str, object]:
            agent = GatewayAgent(settings, inbound=None)  # type: ignore[arg-type]  # never online: no inbound call
            try:
                with pytest.raises(TimeoutError):
                    await agent.start(timeout_s=3)
                return dict(agent.status)
            finally:
                await agent.stop()

        status = asyncio.run(start())
        assert status["state"] == "disconnected" and status["server"] == "closed.helsenett.test (DNS SRV)"
        assert 'DNS SRV _xmpp-client._tcp.closed.helsenett.test: the domain offers no XMPP client service (target ".")' == status["last_error"]
        assert server.log_path.read_text().count("query[SRV] _xmpp-client._tcp.closed.helsenett.test") >= 3

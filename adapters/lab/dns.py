"""A DNS server on loopback for the tests: Debian's dnsmasq (package ``dnsmasq-base``), authoritative for the names
given and nothing else (no upstream, no /etc/hosts), answering on 127.0.0.1 at a free port (UDP and TCP).

``Dnsmasq(workdir, srv=[...], hosts=[...])``: SRV records as (service name, target, port, priority, weight), "."
as target for "no service"; address records as (name, IPv4 address). Stopped by the PID we started.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from adapters.lab.localpeers import PeerProcess, free_port, port_open

DNSMASQ = "/usr/sbin/dnsmasq"


class Dnsmasq(PeerProcess):
    name = "dnsmasq"

    def __init__(self, workdir: Path, zone: str, srv: Sequence[tuple[str, str, int, int, int]] = (),
                 hosts: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(workdir)
        self.port = free_port()
        self.zone = zone
        self.srv = list(srv)
        self.hosts = list(hosts)

    @property
    def nameserver(self) -> str:
        """What ``[xmpp] dns_servers`` lists for it."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> Dnsmasq:
        argv = [DNSMASQ, "--keep-in-foreground", "--conf-file=/dev/null", "--pid-file=", "--log-queries",
                "--log-facility=-", f"--port={self.port}", "--listen-address=127.0.0.1", "--bind-interfaces",
                "--no-resolv", "--no-hosts", f"--local=/{self.zone}/"]
        argv += [f"--srv-host={name},{target},{port},{priority},{weight}" for name, target, port, priority, weight in self.srv]
        argv += [f"--host-record={name},{address}" for name, address in self.hosts]
        self._spawn(argv)
        self._wait_ready(lambda: port_open(self.port), 15)
        return self

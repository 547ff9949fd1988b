"""Which server node the agent connects to next, and when (issue 18 §2 and §5: the connection as a component with
its own state, held by the agent).

``ServerRotation`` knows the nodes (``[xmpp] servers``, or the one ``host:port``) and the failures since the session
was last up: after a lost session or a failed attempt the next node is tried at once (0.2 s) until every node has
failed once since; then each further round waits 2, 4, 8 ... s, at most ``reconnect_s``. Pure state, no I/O: the
agent asks ``after_failure()`` for the delay and calls ``connected()`` when a session is up.

With no node given (``host = ""`` and no ``servers``) the nodes come from DNS (``srv.py``): ``needs_lookup`` is true
at the start of every round, the agent looks them up and hands them over with ``use``; a failed lookup counts as a
failed round.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from adapters.xmpp.srv import Node


@dataclass
class ServerRotation:
    servers: tuple[tuple[str, int], ...]
    reconnect_s: float = 5.0
    index: int = 0  # the node tried now
    failures: int = field(default=0)  # since the session was last up
    from_dns: bool = False  # the nodes come from DNS, looked up again at every round
    targets: tuple[str, ...] = ()  # from DNS: the SRV target each node is an address of

    def __post_init__(self) -> None:
        if not self.servers and not self.from_dns:
            raise ValueError("no XMPP server to connect to")

    @property
    def current(self) -> tuple[str, int]:
        return self.servers[self.index]

    @property
    def needs_lookup(self) -> bool:
        """From DNS, at the start of a round (or before the first): look the nodes up before connecting."""
        return self.from_dns and self.index == 0

    def use(self, nodes: Sequence[Node]) -> None:
        """The nodes a lookup gave, in the order to try them."""
        self.servers = tuple((node.address, node.port) for node in nodes)
        self.targets = tuple(node.target for node in nodes)
        self.index = 0

    def describe(self, domain: str) -> str:
        if self.from_dns:
            if not self.servers:
                return f"{domain} (DNS SRV)"
            host, port = self.current
            return f"{host}:{port} ({self.targets[self.index]}, DNS SRV)"
        host, port = self.current
        return f"{host}:{port}"

    def after_failure(self) -> float:
        """A lost session or a failed attempt (or lookup): move to the next node; returns the seconds to wait
        before trying it."""
        self.failures += 1
        if self.servers:
            self.index = (self.index + 1) % len(self.servers)
            rounds = self.failures // len(self.servers)
        else:  # the lookup failed: a round with no node
            rounds = self.failures
        return 0.2 if rounds == 0 else min(self.reconnect_s, 2.0 ** min(rounds, 6))

    def connected(self) -> None:
        self.failures = 0

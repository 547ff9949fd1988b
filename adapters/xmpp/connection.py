"""Which server node the agent connects to next, and when (issue 18 §2 and §5: the connection as a component with
its own state, held by the agent).

``ServerRotation`` knows the nodes (``[xmpp] servers``, or the one ``host:port``) and the failures since the session
was last up: after a lost session or a failed attempt the next node is tried at once (0.2 s) until every node has
failed once since; then each further round waits 2, 4, 8 ... s, at most ``reconnect_s``. Pure state, no I/O: the
agent asks ``after_failure()`` for the delay and calls ``connected()`` when a session is up.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ServerRotation:
    servers: tuple[tuple[str, int], ...]
    reconnect_s: float = 5.0
    index: int = 0  # the node tried now
    failures: int = field(default=0)  # since the session was last up

    def __post_init__(self) -> None:
        if not self.servers:
            raise ValueError("no XMPP server to connect to")

    @property
    def current(self) -> tuple[str, int]:
        return self.servers[self.index]

    def describe(self, domain: str) -> str:
        host, port = self.current
        return f"{host}:{port}" if host else f"{domain} (DNS)"

    def after_failure(self) -> float:
        """A lost session or a failed attempt: move to the next node; returns the seconds to wait before trying it."""
        self.failures += 1
        self.index = (self.index + 1) % len(self.servers)
        rounds = self.failures // len(self.servers)
        return 0.2 if rounds == 0 else min(self.reconnect_s, 2.0 ** min(rounds, 6))

    def connected(self) -> None:
        self.failures = 0

"""The nodes of an XMPP service from DNS (RFC 6120 §3.2.1, RFC 2782): the ``_xmpp-client._tcp`` SRV records of the
JID's domain, ordered by priority and, within a priority, picked at random by weight; each target's addresses
(A, then AAAA) in that order. No SRV record: the domain itself on 5222 (§3.2.2). A single record whose target is
"." says the domain offers no client service.

The agent connects to these addresses itself (``ServerRotation``), so that a node that fails is left for the next
one, as with ``[xmpp] servers``; TLS is verified against the JID's domain on every node. ``nameservers``
(``[xmpp] dns_servers``) are the resolvers asked; none: the system's (``/etc/resolv.conf``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import aiodns
import pycares

CLIENT_SERVICE = "_xmpp-client._tcp"
DEFAULT_PORT = 5222
MAX_NODES = 64  # more addresses than this from one lookup are not tried in one round


class LookupFailed(Exception):
    """The lookup gave no node to try: DNS unreachable or failing, no service, no target with an address."""


@dataclass(frozen=True)
class Node:
    address: str  # what is connected to (an IP address, or the domain when it has no SRV record)
    port: int
    target: str  # the SRV target the address is of (for the status)


def srv_order(records: Sequence[tuple[int, int, str, int]], rng: random.Random) -> list[tuple[str, int]]:
    """(priority, weight, target, port) records in the order RFC 2782 tries them: lowest priority first; within one
    priority, repeatedly the next is drawn with chance proportional to its weight (weight 0: only when no other
    is left, or with a tiny chance among others of weight 0)."""
    ordered: list[tuple[str, int]] = []
    for priority in sorted({record[0] for record in records}):
        left = [record for record in records if record[0] == priority]
        left.sort(key=lambda record: record[1])  # RFC 2782: the weight-0 ones first in the running sum
        while left:
            total = sum(record[1] for record in left)
            draw = rng.randint(0, total)
            running = 0
            for index, record in enumerate(left):
                running += record[1]
                if running >= draw:
                    ordered.append((record[2], record[3]))
                    del left[index]
                    break
    return ordered


async def client_nodes(domain: str, nameservers: Sequence[str] = (), timeout_s: float = 5.0,
                       rng: random.Random | None = None) -> tuple[Node, ...]:
    """The nodes to try for ``domain``, in order; raises :class:`LookupFailed` with the reason."""
    resolver = aiodns.DNSResolver(nameservers=list(nameservers) or None, timeout=timeout_s, tries=2)
    try:
        return await _nodes(resolver, domain, rng or random.Random())
    finally:
        await resolver.close()


async def _nodes(resolver: aiodns.DNSResolver, domain: str, rng: random.Random) -> tuple[Node, ...]:
    name = f"{CLIENT_SERVICE}.{domain}"
    try:
        answer = await resolver.query_dns(name, "SRV")
    except aiodns.error.DNSError as exc:
        if exc.args and exc.args[0] in (pycares.errno.ARES_ENOTFOUND, pycares.errno.ARES_ENODATA):
            return (Node(domain, DEFAULT_PORT, domain),)  # no SRV record: the domain itself (RFC 6120 §3.2.2)
        raise LookupFailed(f"DNS SRV {name}: {_reason(exc)}") from None
    records = [(r.data.priority, r.data.weight, r.data.target.rstrip("."), r.data.port)
               for r in answer.answer if r.type == pycares.QUERY_TYPE_SRV]
    if not records:
        return (Node(domain, DEFAULT_PORT, domain),)
    if len(records) == 1 and not records[0][2]:
        raise LookupFailed(f"DNS SRV {name}: the domain offers no XMPP client service (target \".\")")
    given: dict[str, list[str]] = {}
    for extra in answer.additional:
        if extra.type in (pycares.QUERY_TYPE_A, pycares.QUERY_TYPE_AAAA):
            given.setdefault(extra.name.rstrip(".").lower(), []).append(extra.data.addr)
    nodes: list[Node] = []
    unresolved: list[str] = []
    usable = [(priority, weight, _name(target), port) for priority, weight, target, port in records]
    for target, port in srv_order([r for r in usable if r[2] and r[3]], rng):  # port 0: nothing to connect to
        addresses = await _addresses(resolver, target, given)
        if not addresses:
            unresolved.append(target)
        nodes.extend(Node(address, port, target) for address in addresses)
    if not nodes:
        raise LookupFailed(f"DNS SRV {name}: no target with an address ({', '.join(unresolved)[:200] or 'none usable'})")
    return tuple(nodes[:MAX_NODES])


async def _addresses(resolver: aiodns.DNSResolver, target: str, given: dict[str, list[str]]) -> list[str]:
    """A target's IPv4 then IPv6 addresses (from the SRV answer's additional section when it has them)."""
    if target.lower() in given:
        return given[target.lower()]
    found: list[str] = []
    for qtype in ("A", "AAAA"):
        try:
            answer = await resolver.query_dns(target, qtype)
        except aiodns.error.DNSError:
            continue
        found.extend(r.data.addr for r in answer.answer if r.type in (pycares.QUERY_TYPE_A, pycares.QUERY_TYPE_AAAA))
    return found


def _name(target: str) -> str:
    """An SRV target as a host name to look up and show; "" (not used) for one that is not a plausible host name
    (the answer is untrusted: control characters, over 253 characters)."""
    name = target
    return name if len(name) <= 253 and all(c.isascii() and (c.isalnum() or c in "-._") for c in name) else ""


def _reason(exc: aiodns.error.DNSError) -> str:
    return str(exc.args[1]) if len(exc.args) > 1 else str(exc)

"""The gateway naming standard: how a health network names its imaging gateways on XMPP.

A gateway's address is a full JID::

    <department>.<institution>@<domain>/<gateway-node>
    radiology.hospital-b@helsenett.test/gw1

- ``department``: the unit that owns the modalities or the PACS (``radiology``, ``cardiology``, ``nuclear-med``).
- ``institution``: a short, stable name the network assigns (``hospital-b``, ``ous-rikshospitalet``).
- ``domain``: the XMPP domain of the health network (one server for all, or one per region).
- ``gateway-node``: the resource, one per gateway process of that department (``gw1``, ``gw2``): several
  processes of one department share the bare JID and can be told apart.

Every label is lower case ASCII letters, digits and inner hyphens (1-63 characters, like a DNS label), so a
name is nodeprep-safe (RFC 7622) and survives any XMPP server unchanged. A *destination* in routing rules is
the bare part without the domain (``radiology.hospital-b``); :func:`destination_jid` maps it to a peer JID.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.terminal import quoted

LABEL_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
DOMAIN_RE = re.compile(r"^(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$")


class AddressError(ValueError):
    """A name that does not follow the naming standard; the message says which part and why."""


@dataclass(frozen=True, order=True)
class GatewayAddress:
    department: str
    institution: str
    domain: str
    node: str = ""

    @property
    def local(self) -> str:
        return f"{self.department}.{self.institution}"

    @property
    def bare(self) -> str:
        return f"{self.local}@{self.domain}"

    @property
    def full(self) -> str:
        return f"{self.bare}/{self.node}" if self.node else self.bare

    @property
    def destination(self) -> str:
        return self.local

    def __str__(self) -> str:
        return self.full


def _label(value: str, part: str) -> str:
    if value != value.lower():
        raise AddressError(f"{part} {quoted(value)} must be lower case")
    if not LABEL_RE.match(value):
        raise AddressError(
            f"{part} {quoted(value)} must be 1-63 characters of a-z, 0-9 and inner hyphens (no dots, spaces or '@')"
        )
    return value


def build(department: str, institution: str, domain: str, node: str = "") -> GatewayAddress:
    """Build and validate an address from its parts."""
    if not DOMAIN_RE.match(domain or ""):
        raise AddressError(f"domain {quoted(domain)} is not a valid lower-case DNS name")
    return GatewayAddress(
        _label(department, "department"),
        _label(institution, "institution"),
        domain,
        _label(node, "gateway node") if node else "",
    )


def parse(jid: str) -> GatewayAddress:
    """Parse ``department.institution@domain[/node]``; raises :class:`AddressError` with the reason."""
    text = jid.strip()
    local, at, rest = text.partition("@")
    if not at:
        raise AddressError(f"{quoted(jid)} has no '@domain' part")
    domain, _, node = rest.partition("/")
    department, dot, institution = local.partition(".")
    if not dot:
        raise AddressError(f"{quoted(jid)}: the part before '@' must be <department>.<institution>")
    return build(department, institution, domain, node)


def destination_jid(destination: str, domain: str) -> str:
    """Bare JID of a routing destination (``radiology.hospital-b`` -> ``radiology.hospital-b@domain``);
    a destination already holding '@' is parsed as a JID."""
    if "@" in destination:
        return parse(destination).bare
    department, dot, institution = destination.partition(".")
    if not dot:
        raise AddressError(f"destination {quoted(destination)} must be <department>.<institution>")
    return build(department, institution, domain).bare

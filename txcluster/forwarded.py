"""
Forwarded headers (C{--forwarded-allow-ips}): which client and scheme a
trusted proxy says a request came from.

Only a peer in the trusted list is believed, and only as far as the chain
of proxies stays trusted: each proxy appends the address it received the
request from, so the chain is read from the right, and the first address
that is not a trusted proxy is the client (a client can put anything it
likes on the left).  If every hop is trusted, the leftmost is the client.
RFC 7239 C{Forwarded} wins over C{X-Forwarded-For} and C{-Proto} when both
are present.  As in gunicorn and uvicorn; no Twisted import, so that the
option can be checked where it is parsed.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import attr

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

#: Every value of a request header, by its name.
HeaderValues = Callable[[str], Sequence[str]]

#: Schemes a proxy may forward; C{https} and C{wss} are secure.
SCHEMES = {"http": False, "https": True, "ws": False, "wss": True}


#: How many addresses' verdicts a L{TrustedProxies} remembers.
REMEMBERED = 4096


@attr.s(frozen=True, auto_attribs=True)
class TrustedProxies:
    """The peers whose forwarded headers are believed."""

    networks: Tuple[Network, ...] = ()
    everyone: bool = False
    #: verdicts by address: parsing an address is the costly part, and a
    #: server sees the same few proxies and clients again and again
    _verdicts: Dict[str, bool] = attr.ib(factory=dict, eq=False, repr=False)

    @classmethod
    def parse(cls, text: str) -> "TrustedProxies":
        """C{*}, or addresses and networks separated by commas.

        @raise ValueError: naming the entry that is neither.
        """
        entries = [entry.strip() for entry in text.split(",") if entry.strip()]
        if "*" in entries:
            return cls(everyone=True)
        networks = []
        for entry in entries:
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or network "
                                 f"(expected e.g. 10.0.0.0/8,::1 or *)") from None
        return cls(tuple(networks))

    def __str__(self) -> str:
        return "*" if self.everyone else ",".join(str(n) for n in self.networks)

    def believed(self, peer: object) -> Optional[str]:
        """The host of C{peer} (a Twisted address) if its forwarded headers
        are believed, else None.  A Unix socket's peer is on this host."""
        host = getattr(peer, "host", None) or "127.0.0.1"
        return host if self.trusts(host) else None

    def trusts(self, host: str) -> bool:
        if self.everyone:
            return True
        verdict = self._verdicts.get(host)
        if verdict is None:
            if len(self._verdicts) >= REMEMBERED:
                self._verdicts.clear()
            verdict = self._verdicts[host] = self._check(host)
        return verdict

    def _check(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)


class Hop(NamedTuple):
    """One entry of a forwarded chain: who sent it, over which scheme."""

    host: str
    scheme: Optional[str] = None


def forwarded_client(peer: str, header: HeaderValues,
                     trusted: TrustedProxies) -> Optional[Hop]:
    """
    The client and scheme the proxy at C{peer} forwarded, or C{None} when
    C{peer} is not trusted or sent no forwarded header.

    @param header: C{header(name)} gives every value of a request header.
    """
    if not trusted.trusts(peer):
        return None
    return forwarded_by_trusted(peer, header, trusted)


def forwarded_by_trusted(peer: str, header: HeaderValues,
                         trusted: TrustedProxies) -> Optional[Hop]:
    """L{forwarded_client}, for a C{peer} already known to be trusted."""
    forwarded = header("forwarded")
    if forwarded:
        hops = _forwarded_hops(forwarded)
    else:
        hops = _x_forwarded_hops(header("x-forwarded-for"), header("x-forwarded-proto"))
    if not hops:
        return None
    chosen = hops[0]
    for hop in reversed(hops):  # nearest proxy first
        chosen = hop
        if not trusted.trusts(hop.host):
            break
    if chosen.host:
        return chosen
    return Hop(peer, chosen.scheme)  # a proto without a for


def _split(values: Sequence[str]) -> List[str]:
    if len(values) == 1 and "," not in values[0]:  # the usual case: one proxy
        value = values[0].strip()
        return [value] if value else []
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def _scheme(text: Optional[str]) -> Optional[str]:
    scheme = (text or "").strip().lower()
    return scheme if scheme in SCHEMES else None


def _x_forwarded_hops(fors: Sequence[str], protos: Sequence[str]) -> List[Hop]:
    hosts = [_host(entry) for entry in _split(fors)]
    schemes = [_scheme(entry) for entry in _split(protos)]
    if not hosts:
        return [Hop("", schemes[-1])] if schemes else []
    if len(schemes) == len(hosts):  # one per hop: each proxy added both
        return [Hop(host, scheme) for host, scheme in zip(hosts, schemes)]
    # Otherwise the nearest proxy's word for the scheme stands for them all.
    scheme = schemes[-1] if schemes else None
    return [Hop(host, scheme) for host in hosts]


_PAIR = re.compile(r'\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;,\s]*)\s*')


def _forwarded_hops(values: Sequence[str]) -> List[Hop]:
    """RFC 7239: C{for=192.0.2.60;proto=http, for="[2001:db8::1]:4711"}."""
    hops = []
    for element in _split_elements(values):
        pairs = {}
        for pair in element.split(";"):
            match = _PAIR.fullmatch(pair)
            if match:
                value = match[2]
                if value.startswith('"'):
                    value = re.sub(r"\\(.)", r"\1", value[1:-1])
                pairs[match[1].lower()] = value
        hops.append(Hop(_host(pairs.get("for", "")), _scheme(pairs.get("proto"))))
    return hops


def _split_elements(values: Sequence[str]) -> List[str]:
    """Split on commas outside quoted strings."""
    elements = []
    for value in values:
        elements += [e for e in re.findall(r'(?:[^,"]|"(?:[^"\\]|\\.)*")+', value) if e.strip()]
    return elements


def _host(entry: str) -> str:
    """An address without its port or brackets: C{[2001:db8::1]:80},
    C{192.0.2.1:80}; anything else (C{unknown}, C{_hidden}) as it is."""
    entry = entry.strip()
    if entry.startswith("["):
        return entry[1:entry.index("]")] if "]" in entry else entry
    if entry.count(":") == 1:
        return entry.split(":", 1)[0]
    return entry

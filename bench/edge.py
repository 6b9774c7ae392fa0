"""
What the HTTP edge costs a worker per request, in CPU: the same keep-alive
requests parsed and answered in memory (no sockets, no wrk) by

 - Twisted's own Site and HTTPChannel (the baseline),
 - txcluster's ClusterSite with its limits and timers, and
 - the same with a trusted proxy's X-Forwarded-For and -Proto.

    python bench/edge.py [--requests N] [--rounds R]

Prints microseconds per request (the median of R rounds) and the ratios.
To see what the edge itself costs, run it alternately against this tree
and a checkout from before the edge (PYTHONPATH=that-checkout), whose
ClusterSite has everything else.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, List

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource
from twisted.web.server import Site

from txcluster.worker.site import ClusterSite

PLAIN = b"GET / HTTP/1.1\r\nHost: example.com\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"
FORWARDED = (b"GET / HTTP/1.1\r\nHost: example.com\r\nUser-Agent: bench\r\nAccept: */*\r\n"
             b"X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: https\r\n\r\n")


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request):
        return b"hello"


def per_request(site: Site, request: bytes, count: int) -> float:
    """Seconds of CPU per request, on one kept-alive connection."""
    channel = site.buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    channel.makeConnection(transport)
    started = time.process_time()
    for _ in range(count):
        channel.dataReceived(request)
        transport.clear()
    elapsed = time.process_time() - started
    channel.connectionLost(None)
    return elapsed / count


def twisted_site() -> Site:
    site = Site(Hello(), reactor=Clock())
    site.log = lambda request: None  # no access log, as ClusterSite by default
    return site


def cluster_site() -> ClusterSite:
    """With its defaults: the edge's limits, 127.0.0.1 trusted."""
    return ClusterSite(Hello(), Clock())


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=9)
    options = parser.parse_args(argv)
    variants: List[tuple] = [
        ("twisted Site", twisted_site, PLAIN),
        ("txcluster edge", cluster_site, PLAIN),
        ("txcluster edge, forwarded", cluster_site, FORWARDED),
        ("twisted Site, forwarded headers ignored", twisted_site, FORWARDED),
    ]
    results = {name: [] for name, _, _ in variants}
    for _ in range(options.rounds):  # interleaved, so that drift hits all alike
        for name, make, request in variants:
            results[name].append(per_request(make(), request, options.requests))
    medians = {name: statistics.median(values) * 1e6 for name, values in results.items()}
    for name, micros in medians.items():
        print(f"{name:<42} {micros:6.1f} us/request")
    print(f"edge / twisted:                              "
          f"{medians['txcluster edge'] / medians['twisted Site']:.3f}")
    print(f"edge forwarded / twisted with the same headers: "
          f"{medians['txcluster edge, forwarded'] / medians['twisted Site, forwarded headers ignored']:.3f}")


if __name__ == "__main__":
    main()

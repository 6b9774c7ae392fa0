"""
A pausable TCP relay for tests: a link that can go down and come back.

L{Relay} listens on 127.0.0.1 and joins each connection it accepts to a new
one to its upstream address, forwarding bytes both ways in a thread of its
own.  L{Relay.cut} stops it reading and writing in both directions while
every TCP connection stays open and every byte it holds stays queued, as
when a link goes down (the kernels buffer and retransmit, nobody is told);
L{Relay.heal} forwards everything queued, in order, and goes on.  A
connection that comes in while the link is cut waits in the listening
socket's backlog until it heals.
"""

import selectors
import socket
import threading
from typing import Dict, List, Optional, Tuple

from twisted.trial import unittest

#: Bytes a relay holds per direction before it stops reading from the
#: sender (which then fills its own socket buffers, as over a slow link).
HELD_PER_DIRECTION = 1 << 20


class _Pipe:
    """One direction of a relayed connection: what was read from C{source}
    and is still to be written to C{sink}."""

    def __init__(self, source: socket.socket, sink: socket.socket) -> None:
        self.source, self.sink = source, sink
        self.queued = bytearray()
        self.source_done = False  # the source sent its FIN
        self.sink_done = False  # the FIN went on to the sink

    def read(self) -> None:
        data = self.source.recv(65536)
        if data:
            self.queued += data
        else:
            self.source_done = True

    def write(self) -> None:
        if self.queued:
            del self.queued[:self.sink.send(self.queued)]
        if self.source_done and not self.queued and not self.sink_done:
            self.sink.shutdown(socket.SHUT_WR)
            self.sink_done = True


class Relay:
    """A relay to C{upstream} ((host, port)) on 127.0.0.1:L{port}, running
    until L{stop} (which C{test}'s cleanup calls)."""

    def __init__(self, test: unittest.TestCase, upstream: Tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.port: int = self.listener.getsockname()[1]
        self.pipes: List[Tuple[_Pipe, _Pipe]] = []
        self.is_cut = False
        self.stopping = False
        self.failure: Optional[BaseException] = None
        self.wakeup, self.waker = socket.socketpair()
        self.thread = threading.Thread(target=self._run, name=f"relay-{self.port}", daemon=True)
        self.thread.start()
        test.addCleanup(self.stop)

    def cut(self) -> None:
        """The link goes down: nothing more is read or written either way."""
        self.is_cut = True
        self._wake()

    def heal(self) -> None:
        """The link is back: everything queued goes on, then new bytes."""
        self.is_cut = False
        self._wake()

    def stop(self) -> None:
        """Stop the thread and close every socket; raise what broke the
        thread, if anything did."""
        if self.thread.is_alive():
            self.stopping = True
            self._wake()
            self.thread.join(10)
        for pipe, _ in self.pipes:
            pipe.source.close()
            pipe.sink.close()
        self.pipes.clear()
        for s in (self.listener, self.wakeup, self.waker):
            s.close()
        if self.failure is not None:
            raise AssertionError(f"the relay to {self.upstream} failed: {self.failure!r}")

    def _wake(self) -> None:
        """Have the thread look at C{is_cut} and C{stopping} again."""
        self.waker.send(b"x")

    # In the relay's thread ---------------------------------------------------

    def _run(self) -> None:
        try:
            while not self.stopping:
                with selectors.DefaultSelector() as selector:
                    for s, events in self._interest().items():
                        selector.register(s, events)
                    ready = selector.select()
                for key, events in ready:
                    self._ready(key.fileobj, events)
        except BaseException as e:  # reported by stop()
            self.failure = e

    def _interest(self) -> Dict[socket.socket, int]:
        """What to wait for on each socket: while the link is cut, nothing
        but the wake-up."""
        interest = {self.wakeup: selectors.EVENT_READ}
        if self.is_cut:
            return interest
        interest[self.listener] = selectors.EVENT_READ
        for pipe in (pipe for pair in self.pipes for pipe in pair):
            if not pipe.source_done and len(pipe.queued) < HELD_PER_DIRECTION:
                interest[pipe.source] = interest.get(pipe.source, 0) | selectors.EVENT_READ
            if pipe.queued or (pipe.source_done and not pipe.sink_done):
                interest[pipe.sink] = interest.get(pipe.sink, 0) | selectors.EVENT_WRITE
        return interest

    def _ready(self, s: socket.socket, events: int) -> None:
        if s is self.wakeup:
            s.recv(4096)
        elif s is self.listener:
            self._accept()
        else:
            for pair in [pair for pair in self.pipes if s in (pair[0].source, pair[0].sink)]:
                try:
                    for pipe in pair:
                        if pipe.source is s and events & selectors.EVENT_READ:
                            pipe.read()
                        if pipe.sink is s and events & selectors.EVENT_WRITE:
                            pipe.write()
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:  # a reset: both ends go
                    self._drop(pair)
                    continue
                if all(pipe.sink_done for pipe in pair):  # both sides said goodbye
                    self._drop(pair)

    def _accept(self) -> None:
        try:
            client, _ = self.listener.accept()
        except BlockingIOError:
            return
        try:
            server = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            client.close()  # upstream refused: so does the relay
            return
        for s in (client, server):
            s.setblocking(False)
        self.pipes.append((_Pipe(client, server), _Pipe(server, client)))

    def _drop(self, pair: Tuple[_Pipe, _Pipe]) -> None:
        self.pipes.remove(pair)
        pair[0].source.close()
        pair[0].sink.close()

#!/usr/bin/env python3
"""A TCP relay that adds latency: every chunk is held DELAY ms in each direction.

This machine's kernel has no netem (sch_netem is not built in and there are no modules),
so bench/shaped_starts.py shapes the link's rate with tbf on a veth pair and emulates the
round-trip time here, in the server's network namespace, in front of each server:

    worker --veth (tbf rate)--> relay (DELAY each way) --lo--> apache / docker-registry

A request and its response are each held DELAY, so one exchange costs 2 x DELAY more; the
first bytes of a new connection are held 2 x DELAY more (the TCP handshake's round trip).
What it does not emulate: TCP's own reaction to the RTT (slow start, window growth), as
the relay terminates TCP on both sides.

    python3 bench/delay_relay.py --delay-ms 5 LISTEN_HOST:PORT=UPSTREAM_HOST:PORT ...
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import signal
import socket
from typing import Deque, Optional, Tuple

HIGH_WATER = 4 << 20


class Half:
    """One direction: data from `src` is written to `dst` DELAY after it arrived."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        self.loop = loop
        self.delay = delay
        self.queue: Deque[Tuple[float, Optional[bytes]]] = collections.deque()
        self.handle: Optional[asyncio.TimerHandle] = None
        self.dst: Optional[Side] = None
        self.extra_first = 0.0

    def push(self, data: Optional[bytes]) -> None:  # None: end of stream
        due = self.loop.time() + self.delay + self.extra_first
        self.extra_first = 0.0
        if self.queue and self.queue[-1][0] > due:
            due = self.queue[-1][0]
        self.queue.append((due, data))
        self._arm()

    def _arm(self) -> None:
        if self.handle is None and self.queue and self.dst is not None:
            self.handle = self.loop.call_at(self.queue[0][0], self._flush)

    def attach(self, dst: Side) -> None:
        self.dst = dst
        self._arm()

    def _flush(self) -> None:
        self.handle = None
        now = self.loop.time()
        chunks = []
        eof = False
        while self.queue and self.queue[0][0] <= now + 0.0002:
            _, data = self.queue.popleft()
            if data is None:
                eof = True
                break
            chunks.append(data)
        t = self.dst.transport if self.dst is not None else None
        if t is not None and not t.is_closing():
            if chunks:
                t.write(b"".join(chunks))
            if eof:
                self.dst.sent_eof = True
                if self.dst.got_eof or not t.can_write_eof():
                    t.close()
                else:
                    t.write_eof()
        self._arm()

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        self.queue.clear()


class Side(asyncio.Protocol):
    """One TCP connection of a relayed pair; `out` carries what it receives."""

    def __init__(self, out: Half) -> None:
        self.out = out
        self.transport: Optional[asyncio.Transport] = None
        self.peer: Optional[Side] = None
        self.closed = False
        self.got_eof = False
        self.sent_eof = False

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        self.out.push(data)

    def eof_received(self) -> bool:
        self.got_eof = True
        self.out.push(None)
        if self.sent_eof and self.transport is not None:
            self.transport.close()
        return True  # keep the other half open until the peer closes

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.peer is not None and self.peer.transport is not None:
            # flush what is queued, then close
            self.out.push(None)

    # flow control: when our writes back up, stop reading the peer
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


def serve(loop: asyncio.AbstractEventLoop, listen: Tuple[str, int], upstream: Tuple[str, int],
          delay: float):
    def factory() -> Side:
        down_to_up = Half(loop, delay)
        down_to_up.extra_first = 2 * delay  # the handshake's round trip
        up_to_down = Half(loop, delay)
        client = Side(down_to_up)

        async def connect() -> None:
            try:
                _, server = await loop.create_connection(lambda: Side(up_to_down), *upstream)
            except OSError:
                if client.transport is not None:
                    client.transport.close()
                return
            client.peer, server.peer = server, client
            up_to_down.attach(client)
            down_to_up.attach(server)

        loop.create_task(connect())
        return client

    return loop.create_server(factory, *listen, reuse_address=True, backlog=512)


def parse(spec: str) -> Tuple[Tuple[str, int], Tuple[str, int]]:
    a, b = spec.split("=")
    ha, pa = a.rsplit(":", 1)
    hb, pb = b.rsplit(":", 1)
    return (ha, int(pa)), (hb, int(pb))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--delay-ms", type=float, default=5.0)
    ap.add_argument("routes", nargs="+", metavar="LISTEN=UPSTREAM")
    args = ap.parse_args()
    loop = asyncio.new_event_loop()
    servers = [loop.run_until_complete(serve(loop, *parse(r), args.delay_ms / 1000))
               for r in args.routes]
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, loop.stop)
    print("relay ready", flush=True)
    try:
        loop.run_forever()
    finally:
        for s in servers:
            s.close()


if __name__ == "__main__":
    main()

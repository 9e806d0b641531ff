"""uvicorn's server, with the shutdown this project wants.

Ctrl-C or SIGTERM: the listening socket closes (new connections are refused), requests in flight get
`drain_timeout` seconds to finish, then the rest are cancelled, each answered with a 503 error (a streaming
one with an error event and [DONE]); then the engine stops and the process exits with status 0. A second
Ctrl-C stops waiting. uvicorn's own handler raises the signal again once it has shut down, so a server
stopped by SIGTERM would end "killed by signal"; this one returns normally.
"""
from __future__ import annotations

import contextlib
import signal
import socket
import sys
import threading

import uvicorn

from .service import Service


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service: Service, drain_timeout: float, announce=None):
        super().__init__(config)
        self.service, self.drain_timeout, self.announce = service, drain_timeout, announce

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():   # signals reach the main thread only
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started and self.announce is not None:
            self.announce(self.servers[0].sockets[0].getsockname())

    async def shutdown(self, sockets=None) -> None:
        if self.should_exit:
            print("shutting down: finishing the requests in flight"
                  + (f" (at most {self.drain_timeout:g} s, then they are cancelled)" if self.drain_timeout else "")
                  + "; Ctrl-C again to stop at once", file=sys.stderr, flush=True)
        self.service.begin_shutdown(self.drain_timeout)
        await super().shutdown(sockets)


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port); OSError as it comes."""
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = info[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock

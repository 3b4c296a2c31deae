"""A TCP relay in front of a real server (Redis, PostgreSQL) that can lose a reply: the network
fault between a client and its server, with the server itself untouched.

Each accepted connection is relayed to the upstream in both directions by two threads.
`drop_next_reply()` makes the next chunk the server sends back, on any connection, be
thrown away and that connection closed on both sides: the server has run the command, the
client never hears about it. `pause()` holds everything, in both directions, until `resume()`:
connections are still accepted and what clients send is taken, nothing answers, as from a
server that stopped (SIGSTOP, a frozen VM) behind a kernel that keeps its sockets.
"""

from __future__ import annotations

import contextlib
import socket
import threading


class TcpRelay:
    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._drop = False
        self.dropped = 0
        self._closed = False
        self._flowing = threading.Event()
        self._flowing.set()
        threading.Thread(target=self._accept, daemon=True).start()

    def pause(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def drop_next_reply(self) -> None:
        with self._lock:
            self._drop = True

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        self._flowing.wait()
        server = socket.create_connection(self.upstream)
        threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
        threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, replies: bool) -> None:
        try:
            while data := source.recv(65536):
                if replies:
                    with self._lock:
                        drop, self._drop = self._drop, False
                    if drop:
                        self.dropped += 1
                        return
                self._flowing.wait()
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

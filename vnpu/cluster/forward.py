"""A loopback port on the host that leads into the node's network namespace.

On a real local node the API server listens on the ``kubernetes`` Service address inside the node's
private network namespace (see :mod:`vnpu.cluster.nodens`), which the host cannot route to. ``vnpu up``
forwards ``127.0.0.1:<port>`` to it, so a plain ``kubectl --kubeconfig ...`` on the host works (the
serving certificate already names 127.0.0.1). Bytes are copied as they are: TLS stays end to end.

The trick is where each socket is created: a socket belongs to the network namespace of the thread
that created it. The listening socket is made in the constructor, which must run in the host's
namespace; the connections to the target are made by a thread that entered the node's namespace.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from typing import Any


class LoopbackForwarder:
    """Accept on ``127.0.0.1:<port>`` (host) and connect each client to ``target`` (node namespace)."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._closed = threading.Event()

    def start(self, target: tuple[str, int], enter_namespace: Callable[[], Any]) -> LoopbackForwarder:
        """Serve in a daemon thread; ``enter_namespace()`` is a context manager that moves the calling
        thread into the target's network namespace (:meth:`NodeNamespaces.entered`)."""

        def serve() -> None:
            with enter_namespace():
                while not self._closed.is_set():
                    try:
                        client, _ = self._listener.accept()
                    except OSError:
                        return  # closed
                    try:
                        upstream = socket.create_connection(target, timeout=10)
                    except OSError:
                        client.close()
                        continue
                    upstream.settimeout(None)
                    for src, dst in ((client, upstream), (upstream, client)):
                        threading.Thread(target=_pump, args=(src, dst), daemon=True).start()

        threading.Thread(target=serve, name="loopback-forwarder", daemon=True).start()
        return self

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy ``src`` to ``dst`` until either side closes; then close both."""
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

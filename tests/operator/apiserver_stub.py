"""A tiny Kubernetes API server stand-in on 127.0.0.1 (plain HTTP) for the operator's I/O tests.

GET of a collection answers ``lists[<last path segment>]`` (403 for a segment in ``forbidden``); a
watch stays open, sending no event, until the client or the stub closes it; any other GET answers an
empty object; a write answers 201 with the body it was sent. While ``hang`` is set a request is read
and never answered (a half-open connection), until the stub closes. Every request and the client port
it came from are recorded, so a test can count the connections its calls used.
"""

from __future__ import annotations

import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kubernetes import client


class ApiServerStub:
    def __init__(self) -> None:
        self.lists: dict[str, list[dict[str, Any]]] = {}  # last path segment -> items
        self.forbidden: set[str] = set()  # last path segments answered 403
        self.requests: list[tuple[str, str, bool]] = []  # (method, path, watch)
        self.writes: list[tuple[str, str, Any]] = []  # (method, path, body) of the answered writes
        self.client_ports: set[int] = set()  # one per TCP connection the clients opened
        self.hang = threading.Event()
        self._closing = threading.Event()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: connections can be reused

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                watch = urllib.parse.parse_qs(url.query).get("watch") == ["true"]
                if stub._seen(self, watch):
                    return
                last = url.path.rstrip("/").rsplit("/", 1)[-1]
                if last in stub.forbidden:
                    self._reply(403, {"kind": "Status", "code": 403, "reason": "Forbidden"})
                elif watch:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Transfer-Encoding", "chunked")  # as the API server streams it
                    self.end_headers()
                    # No events; a blank line now and then (the API server sends bookmarks), so a
                    # reader notices a watch its client closed.
                    self.close_connection = True
                    while not stub._closing.wait(0.05):
                        try:
                            self.wfile.write(b"1\r\n\n\r\n")
                            self.wfile.flush()
                        except OSError:
                            return
                elif last in stub.lists or last in (
                    "pods",
                    "nodes",
                    "services",
                    "poddisruptionbudgets",
                    "secrets",
                    "inferencemodels",
                    "customresourcedefinitions",
                ):
                    items = stub.lists.get(last, [])
                    self._reply(200, {"kind": "List", "metadata": {"resourceVersion": "1"}, "items": items})
                else:
                    self._reply(200, {"kind": "Object", "metadata": {"name": last}})

            def _write(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b"{}"
                if stub._seen(self, False):
                    return
                stub.writes.append((self.command, self.path, json.loads(body)))
                self._reply(201 if self.command == "POST" else 200, json.loads(body))

            do_POST = do_PUT = do_PATCH = do_DELETE = _write

            def _reply(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        class Server(ThreadingHTTPServer):
            # socketserver's default backlog of 5 drops the SYNs of a burst of connections (a test's
            # 13 concurrent calls): their retransmission comes after the 1 s connect timeout.
            request_queue_size = 128

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that closed its connection (a watch it stopped) is no error here

        self._server = Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="apiserver-stub", daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def _seen(self, handler: BaseHTTPRequestHandler, watch: bool) -> bool:
        """Record the request; True when it must go unanswered (``hang``)."""
        self.requests.append((handler.command, handler.path, watch))
        self.client_ports.add(handler.client_address[1])
        if self.hang.is_set():
            self._closing.wait()
            handler.close_connection = True
            return True
        return False

    def api_client(self, retries: int | None = None) -> client.ApiClient:
        configuration = client.Configuration(host=self.url)
        configuration.retries = retries
        return client.ApiClient(configuration)

    def close(self) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()

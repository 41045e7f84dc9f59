"""The HTTP handler of the server (``kto_jax.serve.app``): a thread per connection, JSON answers and
errors (every 4xx and 5xx an OpenAI-style ``{"error": {...}}`` body, the stdlib's own included),
405 for methods other than GET and POST, and streamed answers as server-sent events."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from absl import logging

from kto_jax.serve.requests import RequestError
from kto_jax.serve.streaming import EventStream, peer_closed

MAX_BODY_BYTES = 32 * 1024 * 1024


def error_body(message: str, kind: str, code: str | None = None) -> dict:
    """OpenAI's error body."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 (keep-alive) JSON handler; ``self.server.app`` answers. Streams are sent as
    server-sent events on a connection closed after them."""

    protocol_version = "HTTP/1.1"
    allowed = "GET, POST"

    def do_GET(self):
        self._answer(lambda app: app.get(self._route()))

    def do_POST(self):
        self._answer(lambda app: app.post(self._route(), self._body()))

    def _refuse_method(self):
        """405 for a method the API has not (the body, if any, is left unread: the connection closes)."""
        self.close_connection = True
        self._send_json(
            405,
            error_body(f"method {self.command} is not allowed; use {self.allowed}", "invalid_request_error"),
            {"Allow": self.allowed},
        )

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_TRACE = do_CONNECT = _refuse_method

    def send_error(self, code, message=None, explain=None):
        """The stdlib's own errors (a bad request line, an unknown method, headers too long) as JSON."""
        self.close_connection = True
        kind = "invalid_request_error" if 400 <= code < 500 else "server_error"
        self._send_json(code, error_body(message or self.responses.get(code, ("error",))[0], kind))

    def _route(self) -> str:
        """The path without query, repeated or trailing slashes (``/v1//chat/completions/`` works too)."""
        return "/" + "/".join(part for part in self.path.split("?")[0].split("/") if part)

    def _body(self):
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            raise RequestError(f"bad Content-Length header {self.headers.get('Content-Length')!r}", None) from None
        if length > MAX_BODY_BYTES:
            self.close_connection = True  # the body is not read
            raise RequestError(f"request body over {MAX_BODY_BYTES} bytes", None, 413)
        raw = self.rfile.read(length)
        try:
            return json.loads(raw)
        except ValueError as e:
            raise RequestError(f"the request body is not valid JSON: {e}", None) from None

    def _answer(self, endpoint):
        app = self.server.app  # type: ignore[attr-defined]
        try:
            if self._route() not in ("/health", "/v1/health"):
                app.authorize(self.headers.get("Authorization"))
            status, body = 200, endpoint(app)
        except RequestError as e:
            status, body = e.status, e.body()
            if e.status == 401 or e.status == 413:  # the unread body would be parsed as the next request
                self.close_connection = True
        except Exception as e:  # noqa: BLE001 -- a generation failure: a 500 with its message
            logging.exception("request failed")
            status, body = 500, error_body(f"{type(e).__name__}: {e}", "server_error")
        if isinstance(body, EventStream):
            self._stream(body)
        else:
            self._send_json(status, body)

    def _send_json(self, status: int, body: dict, headers: dict | None = None):
        data = json.dumps(body).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _stream(self, stream: EventStream):
        """``stream``'s chunks as server-sent events; a client that leaves cancels its job."""
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            try:
                for chunk in stream.chunks(gone=lambda: peer_closed(self.connection)):
                    self.wfile.write(b"data: " + json.dumps(chunk).encode("utf-8") + b"\n\n")
                    self.wfile.flush()
            except Exception as e:  # noqa: BLE001 -- the generation failed after the headers went out
                logging.exception("streamed request failed")
                failure = error_body(f"{type(e).__name__}: {e}", "server_error")
                self.wfile.write(b"data: " + json.dumps(failure).encode("utf-8") + b"\n\n")
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except OSError:  # BrokenPipe, ConnectionReset: the client left mid-stream
            stream.cancel()

    def log_message(self, format, *args):
        logging.info("%s %s", self.address_string(), format % args)


class Server(ThreadingHTTPServer):
    """A thread per connection (daemons), and a listen backlog for many concurrent clients."""

    daemon_threads = True
    request_queue_size = 256

    def __init__(self, address):
        super().__init__(address, Handler)

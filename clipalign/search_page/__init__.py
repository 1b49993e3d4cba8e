"""The search page (`clipalign-search INDEX_DIR --serve`): one local page over a small JSON API, standard library only.

    GET /                       the page (page.html, page.js, page.css beside this file; nothing from elsewhere)
    GET /api/info               the model, the embedding directory and each index
    GET /api/search?q=TEXT      the top k (`&k=`, default 20) images (`&modality=text`: captions) matching a text
    GET /api/search?key=KEY     ... matching the indexed sample KEY's image (what a click on a result asks)
    GET /api/image?key=KEY      that sample's image: from its file or out of its shard

A bad request (empty or huge query, unknown key, bad k) is answered `{"error": "..."}` with status 400 or 404, which
the page shows; nothing else is served, so a path never reaches the file system: images are found by key, through
the metadata. Bound to 127.0.0.1 unless told otherwise, and there only requests addressed to this machine by name
are answered (a web page elsewhere cannot reach the API through a DNS name of its own).
"""

from __future__ import annotations

import json
import socket
import sys
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from clipalign.search import MODALITIES, Searcher, SearchError, UnknownKey

PAGE_K = 20
PAGE_MAX_K = 100
_STATIC = {"/": ("page.html", "text/html; charset=utf-8"), "/page.js": ("page.js", "text/javascript; charset=utf-8"),
           "/page.css": ("page.css", "text/css; charset=utf-8")}
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")  # as a Host header writes them


class _Handler(BaseHTTPRequestHandler):
    server: _SearchServer
    server_version = "clipalign-search"
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        try:
            self._route()
        except (BrokenPipeError, ConnectionResetError):  # the browser went away: nothing to answer
            pass
        except Exception as e:  # a bug must not stop the server: the page says what failed, the log too
            print(f"clipalign-search: error answering {self.path[:100]}: {type(e).__name__}: {e}", file=sys.stderr)
            self._json({"error": f"internal error ({type(e).__name__}: {e})"}, HTTPStatus.INTERNAL_SERVER_ERROR)

    def _route(self) -> None:
        if not self._host_allowed():
            self._json({"error": "this server answers only requests addressed to it by its own address"},
                       HTTPStatus.FORBIDDEN)
            return
        url = urlsplit(self.path)
        params = parse_qs(url.query, keep_blank_values=True)
        if url.path in _STATIC:
            name, content_type = _STATIC[url.path]
            self._send(resources.files(__package__).joinpath(name).read_bytes(), content_type)
        elif url.path == "/api/info":
            self._json(self.server.searcher.describe())
        elif url.path == "/api/search":
            self._search(params)
        elif url.path == "/api/image":
            self._image(params)
        else:
            self._json({"error": f"nothing here: {url.path[:100]}"}, HTTPStatus.NOT_FOUND)

    def _search(self, params: dict[str, list[str]]) -> None:
        searcher = self.server.searcher
        try:
            k = _k(_one(params, "k"))
            modality = _one(params, "modality") or "image"
            if modality not in MODALITIES:
                raise SearchError(f"modality {modality[:20]!r}: expected image or text")
            start = time.perf_counter()
            key = _one(params, "key")
            if key is not None:
                hits, query = searcher.search_key(key, k, modality), {"key": key}
            else:
                text = _one(params, "q") or ""
                hits, query = searcher.search_text(text, k, modality), {"text": text.strip()}
        except SearchError as e:
            self._json({"error": str(e)}, HTTPStatus.NOT_FOUND if isinstance(e, UnknownKey) else HTTPStatus.BAD_REQUEST)
            return
        results = [{"rank": h.rank, "score": h.score, "key": h.key, "caption": h.caption,
                    "image": f"/api/image?key={quote(h.key, safe='')}" if h.image_path or h.shard else None}
                   for h in hits]
        self._json({"query": query, "modality": modality, "results": results,
                    "seconds": round(time.perf_counter() - start, 4)})

    def _image(self, params: dict[str, list[str]]) -> None:
        try:
            data, content_type = self.server.searcher.image_bytes(_one(params, "key") or "")
        except SearchError as e:
            self._json({"error": str(e)}, HTTPStatus.NOT_FOUND)
            return
        self._send(data, content_type, cache=True)

    def _host_allowed(self) -> bool:
        if not self.server.loopback:
            return True
        host = (self.headers.get("Host") or "").strip().lower()
        port = self.server.server_address[1]
        return host in {f"{name}:{port}" for name in _LOOPBACK_HOSTS} or (port == 80 and host in _LOOPBACK_HOSTS)

    def _json(self, data: dict[str, Any], status: HTTPStatus = HTTPStatus.OK) -> None:
        self._send(json.dumps(data, ensure_ascii=False).encode(), "application/json; charset=utf-8", status)

    def _send(self, body: bytes, content_type: str, status: HTTPStatus = HTTPStatus.OK, cache: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "private, max-age=3600" if cache else "no-store")
        for name, value in _SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Only failures reach the terminal: one line each."""
        if isinstance(code, HTTPStatus):
            code = code.value
        if str(code).isdigit() and int(code) >= 400:
            print(f"clipalign-search: {code} for {self.requestline[:100]}", file=sys.stderr)

    def log_error(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        pass  # log_request reports the same request with its status


def _one(params: dict[str, list[str]], name: str) -> str | None:
    values = params.get(name)
    return values[-1] if values else None


def _k(value: str | None) -> int:
    if value is None or value == "":
        return PAGE_K
    if not value.isdigit() or not 1 <= int(value) <= PAGE_MAX_K:
        raise SearchError(f"k={value[:20]!r}: expected a whole number from 1 to {PAGE_MAX_K}")
    return int(value)


class _SearchServer(ThreadingHTTPServer):
    daemon_threads = True  # a browser holding a connection open does not keep Ctrl-C waiting

    def __init__(self, address: tuple[str, int], searcher: Searcher):
        self.searcher = searcher
        self.loopback = address[0] in _LOOPBACK
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)


def make_server(searcher: Searcher, host: str = "127.0.0.1", port: int = 0) -> tuple[ThreadingHTTPServer, str]:
    """A search page server bound to host:port (0: any free port), not yet serving, and its URL.

    Raises:
        SearchError: the address cannot be listened on (a port in use, an address not of this machine).
    """
    try:
        server = _SearchServer((host, port), searcher)
    except OSError as e:
        raise SearchError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    shown = f"[{host}]" if ":" in host else host
    return server, f"http://{shown}:{server.server_address[1]}/"


def serve(searcher: Searcher, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve the search page until interrupted, printing its URL once it answers.

    Raises:
        SearchError: the address cannot be listened on, or the model does not load.
    """
    server, url = make_server(searcher, host, port)  # first: a port in use is said before the slow model load
    try:
        searcher.model  # noqa: B018 - loaded now, so that a bad model stops here and the first query is not slow
        info = searcher.describe()
        print(f"serving {url}  (model {info['model']['name']}, index {info['index']}); Ctrl-C to stop", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()

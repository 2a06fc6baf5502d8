"""The tracker's HTTP protocol: uvicorn's httptools one, with a cap on a request's head.

httptools reads a request line and headers of any size, so a client that never ends its
headers would grow a tracker process without bound. ``HeaderLimited`` counts the bytes that
arrive while a request's head is incomplete, and answers 431 and closes past
``MAX_HEADER_BYTES`` (within one read, 256 KB at most); a head that arrives whole is measured
when it is parsed, and its request answered 431 instead of served.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEADER_BYTES = 16 * 1024  # uvicorn's own cap when it speaks h11; pixels send ~1 KB
_MESSAGE = b"request headers too large\n"
_HEAD = [
    (b"content-type", b"text/plain; charset=utf-8"),
    (b"content-length", str(len(_MESSAGE)).encode()),
    (b"connection", b"close"),
]
_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    + b"".join(name + b": " + value + b"\r\n" for name, value in _HEAD)
    + b"\r\n"
    + _MESSAGE
)


async def _refuse(scope: Any, receive: Any, send: Any) -> None:
    """The ASGI app a request with too large a head gets instead of the tracker."""
    await send({"type": "http.response.start", "status": 431, "headers": _HEAD})
    await send({"type": "http.response.body", "body": _MESSAGE})


class HeaderLimited(HttpToolsProtocol):
    """Pass it to uvicorn as ``http=HeaderLimited``."""

    _in_head = True  # a connection starts with a request's head
    _head_bytes = 0

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        over = self._in_head and self._head_bytes > MAX_HEADER_BYTES
        if over and not self.transport.is_closing():
            self.transport.write(_TOO_LARGE)
            self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size <= MAX_HEADER_BYTES:
            super().on_headers_complete()
            return
        # uvicorn starts the request with ``self.app``: this one gets the refusal instead.
        app, self.app = self.app, _refuse
        try:
            super().on_headers_complete()
        finally:
            self.app = app

"""What a slow or stalled client may hold in `sharp serve`, and for how long.

uvicorn bounds neither how long a request's headers nor how long its body may take. A client that
connects and sends a few bytes, or announces a body and stalls, would hold its connection (and,
when the queue counted requests from their arrival, a place in the queue) for ever. Here: the
headers must be in within Settings.header_seconds (a 408 and the connection closed), the body must
not pause longer than body_idle_seconds nor take longer than body_seconds (a 408), and the bytes
of bodies being read, over all requests, are bounded (a 503 beyond), since a request takes its
place in the queue only once its body is in.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import contextmanager

from starlette.requests import ClientDisconnect

from sharp_cli.serve import schema
from sharp_cli.serve.schema import ApiError


class BodyBytes:
    """Bytes of request bodies being read, over all requests, at most `limit` (503 beyond)."""

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0

    @contextmanager
    def hold(self):
        taken = [0]

        def take(n: int) -> None:
            if self.held + n > self.limit:
                raise ApiError(503, "too many requests are sending their bodies at once; try again later",
                               "queue_full")
            self.held += n
            taken[0] += n

        try:
            yield take
        finally:
            self.held -= taken[0]


async def read_body(request, settings, hold=lambda n: None) -> bytes:
    """The body, refused with 413 beyond the largest upload, and with 408 when it pauses longer
    than settings.body_idle_seconds or takes longer than settings.body_seconds. What is over the
    size limit is read and dropped (up to a hard cap), so that clients still sending it can read
    the 413 instead of a reset connection. hold(n) counts the bytes kept (BodyBytes)."""
    limit = settings.media.max_body_bytes
    declared = request.headers.get("content-length", "")
    too_large = declared.isdigit() and int(declared) > limit
    chunks, size = [], 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.body_seconds
    stream = request.stream()
    while True:
        wait = min(settings.body_idle_seconds, deadline - loop.time())
        try:
            async with asyncio.timeout(max(wait, 0.0)):
                chunk = await anext(stream)
        except StopAsyncIteration:
            break
        except ClientDisconnect:  # gone mid-body: nobody reads this, and it is no server failure
            raise ApiError(499, "the client closed the request", "client_closed") from None
        except TimeoutError:
            await stream.aclose()
            late = loop.time() >= deadline
            raise ApiError(408, f"the request body did not arrive in time ({'took over' if late else 'no data for'} "
                           f"{settings.body_seconds if late else settings.body_idle_seconds:g} s)",
                           "request_timeout") from None
        size += len(chunk)
        if size > limit:
            too_large = True
            if size > 4 * limit:
                break
        if not too_large:
            hold(len(chunk))
            chunks.append(chunk)
    if too_large:
        raise ApiError(413, f"the request body is larger than this server takes ({limit / 1e6:.0f} MB; "
                       "see --max-upload-mb)", "request_too_large")
    return b"".join(chunks)


def timed_h11(header_seconds: float):
    """uvicorn's h11 protocol with a deadline on every request's headers: a connection whose
    request line and headers are not all in within `header_seconds` (counted from the connection,
    or from the end of the previous response) gets a 408 and is closed. uvicorn has no such
    timeout of its own: its keep-alive timer stops at the first byte, so a client sending a few
    header bytes and stalling held its connection for ever."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        _header_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._watch_headers()

        def data_received(self, data):
            super().data_received(data)
            self._watch_headers()

        def on_response_complete(self):
            super().on_response_complete()
            self._watch_headers()

        def connection_lost(self, exc):
            self._stop_watching()
            super().connection_lost(exc)

        def _waiting_for_headers(self) -> bool:
            return self.conn.their_state is h11.IDLE and not self.transport.is_closing()

        def _watch_headers(self):
            if not self._waiting_for_headers():
                self._stop_watching()
            elif self._header_timer is None:
                self._header_timer = self.loop.call_later(header_seconds, self._headers_too_slow)

        def _stop_watching(self):
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self):
            self._header_timer = None
            if not self._waiting_for_headers():
                return
            body = json.dumps(schema.error_body(f"the request headers did not arrive within {header_seconds:g} s",
                                                "request_timeout")).encode()
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            self.transport.close()

    return TimedH11Protocol

"""The web server's gate (an aiohttp middleware on trame's server): the access policy of
:mod:`samv2view.access` on every request, and one browser tab at a time.

trame keeps one state per server, shared by every connected page. Unless ``--shared-session``,
the view therefore serves one tab at a time: while a tab is connected another one is refused
with a page saying so, and when the tab goes the session is reset (``on_last_client_left``), so
the next tab sees nothing of the previous one (its paths, errors, points).
"""
from __future__ import annotations

import asyncio
import html
from typing import Callable

from aiohttp import web

from .access import Exposure, check_request

WEBSOCKET_PATH = "/ws"
PAGE_PATHS = ("/", "/index.html")
RECONNECT_GRACE_S = 3.0  # a reloaded tab asks for the page before its old websocket has closed


def _page(status: int, text: str) -> web.Response:
    body = (f"<!doctype html><title>SAMv2 view</title><p id='refused' style='font: 1.1em sans-serif'>"
            f"{html.escape(text)}</p>")
    return web.Response(status=status, text=body, content_type="text/html")


class Gate:
    """Counts connected tabs and applies the exposure to each request."""

    def __init__(self, exposure: Exposure, port: int, shared_session: bool,
                 on_last_client_left: Callable[[], None]):
        self.exposure = exposure
        self.cookie = f"samv2_view_token_{port}"
        self.shared_session = shared_session
        self.on_last_client_left = on_last_client_left
        self.connected = 0

    async def _wait_until_free(self) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RECONNECT_GRACE_S
        while self.connected and loop.time() < deadline:
            await asyncio.sleep(0.1)
        return self.connected == 0

    @web.middleware
    async def middleware(self, request: web.Request, handler):
        verdict = check_request(self.exposure, request.headers.get("Host"), request.headers.get("Origin"),
                                request.query.get("token"), request.cookies.get(self.cookie))
        if not verdict.allowed:
            return _page(403, f"Refused: {verdict.reason}.")
        is_socket = request.path == WEBSOCKET_PATH
        if not self.shared_session and (is_socket or request.path in PAGE_PATHS) and not await self._wait_until_free():
            return _page(409, "This view is open in another browser tab (one session per tab). Close that tab, "
                              "or start samv2 view with --shared-session to share one session between tabs.")
        if not is_socket:
            response = await handler(request)
            if verdict.set_cookie:
                response.set_cookie(self.cookie, self.exposure.token, httponly=True, samesite="Strict", path="/")
            return response
        self.connected += 1
        try:
            return await handler(request)  # returns when the websocket closes
        finally:
            self.connected -= 1
            if self.connected == 0 and not self.shared_session:
                self.on_last_client_left()

"""Who may reach the browser view: the address it listens on, its token, and the check of each request.

By default the view listens on the loopback address only. Another ``--host`` needs a token (the
user's ``--token``, or one generated and printed) or the explicit ``--insecure-no-token``, which
prints a warning. With a token, every request (page, assets, websocket) must carry it, in the
address (``?token=``, the printed URL) or in the cookie the first such request sets. Without a
token on loopback, the ``Host`` header must name this machine (no DNS rebinding) and a request from
another web site (its ``Origin``) is refused, so a page open in the same browser cannot drive the view.
"""
from __future__ import annotations

import hmac
import ipaddress
import re
import secrets
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from samv2core.errors import InputError

TOKEN_PATTERN = re.compile(r"[A-Za-z0-9._~-]{16,256}")
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


def is_loopback(host: str) -> bool:
    """True when every address ``host`` stands for is a loopback one (127.0.0.0/8, ::1)."""
    name = host.strip().strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(name, None)
    except (OSError, UnicodeError):
        raise InputError(f"--host {host}: not an address of this machine") from None
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


@dataclass(frozen=True)
class Exposure:
    """Where the view listens and what a request needs: ``token`` None means no token is asked."""

    host: str
    token: str | None
    loopback: bool
    generated: bool = False
    warning: str = ""

    def url(self, port: int) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{port}/" + (f"?token={self.token}" if self.token else "")


def decide_exposure(host: str, token: str | None = None, insecure_no_token: bool = False) -> Exposure:
    """The exposure the command line asks for; refuses a weak token and a token-less non-loopback host
    only by generating a token (unless ``insecure_no_token``)."""
    host = (host or "").strip()
    if not host:
        raise InputError("--host is empty")
    if token is not None and not TOKEN_PATTERN.fullmatch(token):
        raise InputError("--token must be 16 to 256 characters from A-Z a-z 0-9 . _ ~ -")
    if token is not None and insecure_no_token:
        raise InputError("--token and --insecure-no-token contradict each other")
    loopback = is_loopback(host)
    if token is not None:
        return Exposure(host, token, loopback)
    if loopback:
        return Exposure(host, None, True)
    if insecure_no_token:
        return Exposure(host, None, False, warning=(
            f"samv2 view: WARNING: serving on {host} with no token (--insecure-no-token): anyone who can reach "
            "this address can see the scans and open any file the view may open"))
    return Exposure(host, secrets.token_urlsafe(24), False, generated=True)


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str = ""
    set_cookie: bool = False  # the token came in the address: keep it in a cookie for the page's other requests


def check_request(exposure: Exposure, host_header: str | None, origin: str | None,
                  query_token: str | None, cookie_token: str | None) -> Verdict:
    """May this HTTP request (page, asset or websocket upgrade) be served?"""
    if origin is not None:
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or (parts.netloc or "").lower() != (host_header or "").lower():
            return Verdict(False, "a request from another web site")
    if exposure.loopback and exposure.token is None:
        name = urlsplit(f"//{host_header or ''}").hostname or ""
        if not (name in LOOPBACK_NAMES or _is_loopback_literal(name) or name == exposure.host.strip("[]").lower()):
            return Verdict(False, "this view answers only to this machine's own address")
    if exposure.token is None:
        return Verdict(True)
    if query_token is not None and hmac.compare_digest(query_token.encode(), exposure.token.encode()):
        return Verdict(True, set_cookie=True)
    if cookie_token is not None and hmac.compare_digest(cookie_token.encode(), exposure.token.encode()):
        return Verdict(True)
    return Verdict(False, "a token is needed: open the address samv2 view printed")


def _is_loopback_literal(name: str) -> bool:
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False

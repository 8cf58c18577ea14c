"""Who may talk to the server: the Host a request names, and the Origin a browser says it comes from.

DNS rebinding: a page on evil.example can make its name resolve to 127.0.0.1 and then read this
server's answers as its own (the same origin, as the browser sees it); its requests still say
`Host: evil.example:8000`. So only the names the server is reached by are accepted: the loopback
names (localhost, 127.0.0.1, [::1]) and the address it is bound to, with its port, and the names the
operator allows (`--allowed-host`); any other Host gets 421, a missing or malformed one 400.

Cross-site requests: any page can make a browser POST here (a form, or a `fetch` with a "simple"
content type), and the browser then says in `Origin` where that page comes from. A request that can
change something (any method but GET, HEAD and OPTIONS) whose Origin is not this server's gets 403.
A browser too old to send Origin is stopped too: such a page cannot declare its body
`application/json`, which the API requires (`state.read_body`).

The checks run in an ASGI middleware, before routing: they hold for every route, the ones to come
included, and a refused request is never read further.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from fastapi.responses import JSONResponse

from chatkit.serve.protocol import ApiError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_ADDRESSES = ("0.0.0.0", "::", "")
"""Binding one of these serves every network the machine is on: its names must be listed."""
SAFE_METHODS = (b"GET", b"HEAD", b"OPTIONS")
_DEFAULT_PORT = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_NOT_IN_NAMES = set(" \t/\\@?#[]:,;\"'<>")


def _name(raw: str) -> str | None:
    """A host name or IP address, normalized (lower case; IP addresses in their short form)."""
    try:
        return str(ipaddress.ip_address(raw))
    except ValueError:
        pass
    name = raw.lower()
    if not name or any(c in _NOT_IN_NAMES or not c.isprintable() for c in name):
        return None
    return name


def split_host(value: str) -> tuple[str, int | None] | None:
    """`NAME`, `NAME:PORT`, `[IPV6]` or `[IPV6]:PORT` -> (normalized name, port or None); None when
    malformed (a bare IPv6 address included: a Host header brackets it)."""
    if value.startswith("["):
        end = value.find("]")
        name, rest = value[1:end], value[end + 1 :]
        if end < 0 or ":" not in name or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:] if rest else None
    else:
        name, sep, port_text = value.partition(":")
        if ":" in port_text:
            return None
        port_text = port_text if sep else None
    port = None
    if port_text is not None:
        if not (port_text.isascii() and port_text.isdigit() and 0 < int(port_text) < 65536):
            return None
        port = int(port_text)
    normal = _name(name)
    return None if normal is None else (normal, port)


def parse_allowed(entry: str) -> tuple[str, int | None]:
    """One `--allowed-host`: `NAME`, `NAME:PORT`, `[IPV6]:PORT`, or a bare IPv6 address."""
    try:
        return str(ipaddress.ip_address(entry)), None
    except ValueError:
        pass
    parsed = split_host(entry.strip())
    if parsed is None:
        raise ValueError(f"--allowed-host {entry!r}: expected NAME, NAME:PORT or [IPV6]:PORT (or '*')")
    return parsed


@dataclass(frozen=True)
class HostRules:
    """The names (and ports) this server answers to; see the module's docstring."""

    own: frozenset[str]
    """Loopback names and the bound address: accepted with the server's port."""
    port: int | None
    """The server's port; None: not known (an app served in-process), any port."""
    extra: frozenset[tuple[str, int | None]]
    """The operator's names; a None port: any port."""
    any_host: bool = False
    """`--allowed-host '*'`: every Host is accepted (Origin must still match it)."""

    @classmethod
    def make(cls, host: str, port: int | None, allowed: tuple[str, ...]) -> HostRules:
        """Rules for a server bound to `host`:`port` with the operator's `allowed` names; a
        malformed name is a ValueError."""
        own = set(LOOPBACK_NAMES)
        bound = _name(host.strip("[]"))
        if host not in WILDCARD_ADDRESSES and bound is not None:
            own.add(bound)
        extra = frozenset(parse_allowed(a) for a in allowed if a != "*")
        return cls(frozenset(own), port, extra, "*" in allowed)

    def allows(self, name: str, port: int, wildcard: bool = True) -> bool:
        if wildcard and self.any_host:
            return True
        if (name, None) in self.extra or (name, port) in self.extra:
            return True
        return name in self.own and (self.port is None or port == self.port)


def _refuse(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse(ApiError(status, message, code=code).body(), status_code=status)


def _shown(value: str) -> str:
    return repr(value if len(value) <= 80 else value[:80] + "...")


class RequestGuard:
    """ASGI middleware: checks each HTTP request's Host and, for a request that changes something,
    its Origin; answers 400/421 or 403 in the API's error shape without calling the app."""

    def __init__(self, app: Any, rules: HostRules) -> None:
        self.app, self.rules = app, rules

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and (refusal := self.check(scope)) is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def check(self, scope: dict[str, Any]) -> JSONResponse | None:
        """The refusal for this request, or None when it may go on."""
        headers: dict[bytes, bytes] = {}
        for key, value in scope["headers"]:
            headers.setdefault(key.lower(), value)  # the first of repeated headers
        host = headers.get(b"host", b"").decode("latin-1")
        parsed = split_host(host)
        if parsed is None:
            return _refuse(400, f"a valid Host header is required, got {_shown(host)}", "invalid_host")
        default = _DEFAULT_PORT.get(scope.get("scheme", "http"), 80)
        name, port = parsed[0], parsed[1] or default
        if not self.rules.allows(name, port):
            return _refuse(
                421,
                f"the Host header {_shown(host)} does not name this server (the operator can allow "
                "a name with --allowed-host)",
                "misdirected_request",
            )
        origin = headers.get(b"origin")
        if origin is None or scope["method"].encode() in SAFE_METHODS:
            return None
        text = origin.decode("latin-1")
        if not self.same_site(text, host):
            return _refuse(403, f"cross-site request refused: Origin {_shown(text)} is not this server",
                           "cross_site_request")  # fmt: skip
        return None

    def same_site(self, origin: str, host: str) -> bool:
        """Whether a page at `origin` belongs to this server: it names the request's own host (the
        page came from here), or a name the server answers to. `*` does not widen this."""
        try:
            parts = urlsplit(origin)
        except ValueError:
            return False
        if parts.scheme not in ("http", "https") or parts.path or parts.query or parts.fragment:
            return False
        if parts.netloc.lower() == host.lower():
            return True
        parsed = split_host(parts.netloc)
        if parsed is None:
            return False
        return self.rules.allows(parsed[0], parsed[1] or _DEFAULT_PORT[parts.scheme], wildcard=False)

"""Key functions (``slowapi.util``).

``get_remote_address`` and ``get_ipaddr`` keep slowapi's names. Both trust
whatever the client sends in ``X-Forwarded-For`` (``get_ipaddr``) or nothing
at all (``get_remote_address``). Behind a reverse proxy, use
:func:`trusted_proxy_key_func` (or :class:`ForwardedAddress`): it reads
``X-Forwarded-For`` / ``Forwarded`` only when the peer is a configured trusted
proxy, so clients cannot choose their own bucket by sending a header.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Union

from starlette.requests import HTTPConnection

__all__ = [
    "ForwardedAddress",
    "get_ipaddr",
    "get_remote_address",
    "trusted_proxy_key_func",
]

_LOCALHOST = "127.0.0.1"

_Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def get_remote_address(request: HTTPConnection) -> str:
    """The peer's address, or ``127.0.0.1`` when the server gives none."""
    client = request.scope.get("client")
    if client:
        host: str = client[0]
        if host:
            return host
    return _LOCALHOST


def _header(request: HTTPConnection, name: bytes) -> str | None:
    for key, value in request.scope.get("headers") or ():
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


def get_ipaddr(request: HTTPConnection) -> str:
    """The first address of ``X-Forwarded-For``, else the peer's address.

    slowapi looked for a header literally named ``X_FORWARDED_FOR`` (which
    proxies never send) and returned its whole value; this reads the real
    ``X-Forwarded-For`` header (then the legacy underscore spelling) and
    returns its first, client-side entry. The header is set by the client
    unless a proxy overwrites it: use :func:`trusted_proxy_key_func` when
    that matters.
    """
    value = _header(request, b"x-forwarded-for")
    if value is None:
        value = _header(request, b"x_forwarded_for")
    if value is not None:
        first = value.split(",", 1)[0].strip()
        if first:
            return first
    return get_remote_address(request)


def _strip_port(address: str) -> str:
    address = address.strip().strip('"')
    if address.startswith("["):  # "[2001:db8::1]:4711"
        end = address.find("]")
        return address[1:end] if end > 0 else address[1:]
    if address.count(":") == 1:  # "192.0.2.1:8080"
        return address.split(":", 1)[0]
    return address


def _forwarded_for(value: str) -> list[str]:
    """The ``for=`` addresses of an RFC 7239 ``Forwarded`` header, in order."""
    found: list[str] = []
    for element in value.split(","):
        for pair in element.split(";"):
            name, _, param = pair.partition("=")
            if name.strip().lower() == "for" and param:
                found.append(_strip_port(param))
    return found


class ForwardedAddress:
    """A key function that honours proxy headers from trusted proxies only.

    ``trusted_proxies`` is a list of addresses or networks
    (``"10.0.0.0/8"``, ``"127.0.0.1"``, ``"::1"``); the default is none, which
    makes it behave like :func:`get_remote_address`. When the peer is trusted,
    the chain in ``X-Forwarded-For`` (or, failing that, ``Forwarded``) is read
    from the right, skipping trusted proxies; the first untrusted address is
    the client. If every hop is trusted the leftmost one is used.
    """

    def __init__(
        self,
        trusted_proxies: Iterable[str] = (),
        *,
        headers: Iterable[str] = ("x-forwarded-for", "forwarded"),
    ) -> None:
        self._networks: tuple[_Network, ...] = tuple(
            ipaddress.ip_network(p.strip(), strict=False) for p in trusted_proxies
        )
        self._headers = tuple(h.lower().encode("latin-1") for h in headers)
        for name in self._headers:
            if name not in (b"x-forwarded-for", b"forwarded"):
                raise ValueError(
                    f"unsupported proxy header {name.decode()!r}: "
                    "expected X-Forwarded-For or Forwarded"
                )
        self._cache: dict[str, bool] = {}

    def is_trusted(self, address: str) -> bool:
        """Whether ``address`` belongs to a trusted proxy."""
        known = self._cache.get(address)
        if known is not None:
            return known
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            trusted = False
        else:
            trusted = any(ip in net for net in self._networks)
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[address] = trusted
        return trusted

    def __call__(self, request: HTTPConnection) -> str:
        peer = get_remote_address(request)
        if not self._networks or not self.is_trusted(peer):
            return peer
        for name in self._headers:
            value = _header(request, name)
            if value is None:
                continue
            if name == b"forwarded":
                chain = _forwarded_for(value)
            else:
                chain = [_strip_port(v) for v in value.split(",")]
            chain = [hop for hop in chain if hop]
            if not chain:
                continue
            for hop in reversed(chain):
                if not self.is_trusted(hop):
                    return hop
            return chain[0]
        return peer


def trusted_proxy_key_func(trusted_proxies: Iterable[str]) -> ForwardedAddress:
    """Builds a key function that reads proxy headers from ``trusted_proxies``.

    ``Limiter(key_func=trusted_proxy_key_func(["10.0.0.0/8"]))``
    """
    return ForwardedAddress(trusted_proxies)

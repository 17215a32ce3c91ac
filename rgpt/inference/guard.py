"""Who may call the server: the Host and Origin a web page could send it, checked before anything else."""

import ipaddress

from starlette.datastructures import Headers

from rgpt.inference.request import ApiError, error_response

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")  # Host names a loopback server always answers to


# ---- who may call -----------------------------------------------------------------------------------
def host_name(value: str) -> str | None:
    """A Host header's name: '[::1]:8000' -> '::1', 'LocalHost:80' -> 'localhost'; None if malformed."""
    if value.startswith("["):
        name, bracket, port = value[1:].partition("]")
        port = port.removeprefix(":") if bracket else "x"
    else:
        name, _, port = value.partition(":")
    return name.lower().rstrip(".") if name and (port == "" or port.isdigit()) else None


class Guard:
    """ASGI middleware, outermost: refuses what a web page from another site could send this server. A
    Host that is not one of its names gets 400 (DNS rebinding: a page whose own name has been re-pointed
    at 127.0.0.1); an Origin that is neither its own nor in cors_origins gets 403 (cross-site requests and
    their CORS preflights). A name is an address's, localhost, `host` or in allowed_hosts; an address
    cannot be re-pointed, so any address literal is fine where the server listens on all of them."""

    def __init__(self, app, host: str, allowed_hosts=(), cors_origins=()):
        self.app, self.origins = app, {o.lower() for o in cors_origins}
        self.names = {*LOOPBACK_NAMES, host.strip("[]").lower(), *(h.lower() for h in allowed_hosts)}
        self.any_address = host in ("0.0.0.0", "::", "")

    async def __call__(self, scope, receive, send):
        error = self.check(Headers(scope=scope), scope["scheme"]) if scope["type"] == "http" else None
        if error is not None:
            return await error_response(error)(scope, receive, send)
        await self.app(scope, receive, send)

    def check(self, headers: Headers, scheme: str) -> ApiError | None:
        host = headers.get("host")
        if host is not None and not self.known(host_name(host)):
            why = f"the Host header {host!r} is not a name of this server: add it to allowed_hosts"
            return ApiError(400, why, code="invalid_host")
        origin, own = headers.get("origin"), f"{scheme}://{host}".lower()
        if origin is None or "*" in self.origins or origin.lower() in (own, *self.origins):
            return None
        why = f"the web page at {origin} may not call this server: add its origin to cors_origins to allow it"
        return ApiError(403, why, code="cross_origin_refused")

    def known(self, name: str | None) -> bool:
        if name is None:
            return False
        if name in self.names or "*" in self.names:
            return True
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            return False
        return address.is_loopback or self.any_address

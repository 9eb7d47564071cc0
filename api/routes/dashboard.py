"""``GET /``: the dashboard, one static page and its assets, served by the node itself.

The page is public HTML with no data in it; it reads the JSON API with the token the user gives
it, so a tenant sees only what the API shows that tenant. Nothing is loaded from another origin
(the page works offline), and the Content-Security-Policy says so to the browser.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Response

from cache_node.errors import NotFound

router = APIRouter(tags=["dashboard"], include_in_schema=False)

_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# An allow-list, never a path from the URL: the only files the page needs.
_ASSETS = {
    "dashboard.css": "text/css; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}


def _read(name: str) -> bytes:
    return resources.files("api").joinpath("static", name).read_bytes()


def _headers() -> dict[str, str]:
    # no-cache: a node upgrade must not leave an old script talking to a new API
    return {
        "Content-Security-Policy": _CSP,
        "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }


@router.get("/")
async def dashboard() -> Response:
    """The dashboard page."""
    return Response(_read("dashboard.html"), media_type="text/html; charset=utf-8",
                    headers=_headers())


@router.get("/static/{name}")
async def asset(name: str) -> Response:
    """One of the page's assets."""
    media_type = _ASSETS.get(name)
    if media_type is None:
        raise NotFound(f"no asset {name!r}")
    return Response(_read(name), media_type=media_type, headers=_headers())


@router.get("/favicon.ico")
async def favicon() -> Response:
    return Response(_read("favicon.svg"), media_type="image/svg+xml", headers=_headers())

"""The one place where errors become HTTP responses: ``{"error": {"code", "message", ...}}``,
for the API and the data plane alike, and where a bearer token is read off a request."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cache_node.errors import WeightCacheError, error_headers

log = logging.getLogger("weightcache.api")


def error_response(status: int, code: str, message: str, **details: object) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message, **details}}, status_code=status
    )


def exception_response(exc: WeightCacheError) -> JSONResponse:
    """A domain error as its HTTP answer: status, body and headers (``Retry-After``...)."""
    response = error_response(exc.http_status, exc.code, exc.message, **exc.details)
    response.headers.update(error_headers(exc))
    return response


def http_error_code(status: int) -> str:
    """The code of a framework's own refusal (unknown path, wrong method)."""
    return {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer`` header; None when missing or malformed."""
    scheme, _, value = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def install_error_handlers(app: FastAPI) -> None:
    """Map every error to the contract's body; never a bare 500 page."""

    @app.exception_handler(WeightCacheError)
    async def _weightcache(_: Request, exc: WeightCacheError) -> JSONResponse:
        return exception_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {"loc": [str(p) for p in e.get("loc", ())], "message": str(e.get("msg", ""))}
            for e in exc.errors()
        ]
        first = problems[0] if problems else {"loc": [], "message": "invalid request"}
        message = f"{'.'.join(first['loc'])}: {first['message']}" if first["loc"] else str(
            first["message"]
        )
        return error_response(422, "invalid_input", message, problems=problems)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, http_error_code(exc.status_code), str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "internal", f"internal error: {type(exc).__name__}")

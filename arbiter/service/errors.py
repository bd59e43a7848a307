"""Typed errors and the one OpenAI-shaped error body: {"error": {"message", "type", "param", "code"}}.

A client mistake is always a 4xx (the openai client retries 5xx); bodies never carry tracebacks.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse


class APIError(Exception):
    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        if status is not None:
            self.status = status
        self.headers = headers

    def body(self) -> dict[str, dict[str, str | None]]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code, self.headers)


class InvalidRequest(APIError):
    status = 400


class NotFound(APIError):
    status = 404
    type = "not_found_error"


class AuthError(APIError):
    status = 401
    type = "authentication_error"


class PermissionDenied(APIError):
    status = 403
    type = "permission_error"


class Overloaded(APIError):
    status = 429
    type = "rate_limit_error"


class Unavailable(APIError):
    status = 503
    type = "service_unavailable"


class Timeout(APIError):
    status = 504
    type = "timeout_error"


class Conflict(APIError):
    status = 409


class ServerError(APIError):
    status = 500
    type = "server_error"


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None,
               ) -> dict[str, dict[str, str | None]]:
    """THE error body (``protocol.ErrorResponse``): every JSON error response and every in-stream error event."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(message, type_, param, code), headers=headers)

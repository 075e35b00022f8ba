"""One exception tree. Every error a client sees is one of these, rendered as problem+json."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.types import Send

Loc = Sequence[str | int]  # where in the request a problem is: ("body", 3, "timestamp")


class ApiError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    title: ClassVar[str] = "Internal Server Error"

    def __init__(self, detail: str | None = None, **extra: Any) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.extra = extra
        self.headers: dict[str, str] = {}

    def body(self) -> dict[str, Any]:
        return {
            "type": "about:blank",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
            **self.extra,
        }


class BadRequest(ApiError):
    status, code, title = 400, "bad_request", "Bad Request"


class InvalidCredentials(ApiError):
    status, code, title = 401, "invalid_credentials", "Invalid email or password"


class Unauthenticated(ApiError):
    status, code, title = 401, "unauthenticated", "Unauthenticated"

    def __init__(self, detail: str | None = None, **extra: Any) -> None:
        super().__init__(detail, **extra)
        self.headers["WWW-Authenticate"] = "Bearer"


class Forbidden(ApiError):
    status, code, title = 403, "forbidden", "Forbidden"


class HttpsRequired(ApiError):
    status, code, title = 403, "https_required", "HTTPS required"


class NotFound(ApiError):
    status, code, title = 404, "not_found", "Not Found"


class NoSuchRoute(NotFound):
    """A path no endpoint has (a typo, a trailing slash, a wrong base URL): not `not_found`,
    which tells the app that a contact is gone and its local copy may go too."""

    code = "no_such_route"


class MethodNotAllowed(ApiError):
    status, code, title = 405, "method_not_allowed", "Method Not Allowed"


class Conflict(ApiError):
    status, title = 409, "Conflict"


class EmailTaken(Conflict):
    code = "email_taken"


class PhoneTaken(Conflict):
    code = "phone_taken"


class CannotDeleteSelf(Conflict):
    code = "cannot_delete_self"


class LastAdmin(Conflict):
    code = "last_admin"


class RequestTimeout(ApiError):
    status, code, title = 408, "request_timeout", "Request Timeout"


class PreconditionFailed(ApiError):
    status, code, title = 412, "precondition_failed", "Precondition Failed"


class PayloadTooLarge(ApiError):
    status, code, title = 413, "payload_too_large", "Content Too Large"


class UnsupportedEncoding(ApiError):
    status, code, title = 415, "unsupported_media_type", "Unsupported Media Type"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        # RFC 9110 15.5.16: a 415 for a Content-Encoding names the encodings that are accepted.
        self.headers["Accept-Encoding"] = "gzip"


class ValidationFailed(ApiError):
    status, code, title = 422, "validation_error", "Unprocessable Content"

    def __init__(self, errors: Sequence[dict[str, Any]], detail: str | None = None) -> None:
        super().__init__(detail or "Request validation failed", errors=list(errors))

    @classmethod
    def one(cls, loc: Loc, msg: str, type_: str = "value_error") -> ValidationFailed:
        return cls([{"loc": list(loc), "msg": msg, "type": type_}])


class TooManyAttempts(ApiError):
    status, code, title = 429, "too_many_attempts", "Too Many Requests"

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"Too many failed logins; retry in {retry_after} s")
        self.headers["Retry-After"] = str(retry_after)


class ServiceUnavailable(ApiError):
    status, code, title = 503, "unavailable", "Service Unavailable"

    def __init__(self, detail: str, *, retry_after: int) -> None:
        super().__init__(detail)
        self.headers["Retry-After"] = str(retry_after)


class ItemProblem(BaseModel):
    """What failed, where: one entry of a 422's `errors`, or of a rejected batch item's."""

    loc: list[str | int]
    msg: str
    type: str


def item_problems(error: ValidationError, loc: Loc) -> list[dict[str, Any]]:
    """A batch item's validation errors as ItemProblem entries, each `loc` prefixed."""
    return [
        {"loc": [*loc, *e["loc"]], "msg": e["msg"], "type": e["type"]}
        for e in error.errors(include_url=False, include_context=False, include_input=False)
    ]


async def send_problem(send: Send, error: ApiError, *, close: bool = False) -> None:
    """Answer with a problem straight from ASGI code, where no exception handler runs
    (middleware, before the application or after it failed)."""
    body = orjson.dumps(error.body())
    headers = [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(body)).encode()),
    ]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})

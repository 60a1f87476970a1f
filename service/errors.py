"""Errors that are the client's fault: each carries the HTTP status and the message it is answered with."""
from __future__ import annotations


class ClientError(Exception):
    """A bad request; the app answers ``{"detail": detail}`` with ``status_code`` (always 4xx)."""

    status_code = 400

    def __init__(self, detail: str, status_code: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if status_code is not None:
            self.status_code = status_code


class EmptyBody(ClientError):
    """The request carries no image bytes at all (400). Bad image bytes are the decoder's
    :class:`~bna_gateway.models.decode.BadImage` errors, answered by ``api.errors``."""

    status_code = 400


class PayloadTooLarge(ClientError):
    """Body, image dimensions or image count above the configured limits (413)."""

    status_code = 413


class UnsupportedMediaType(ClientError):
    """The request or one of its parts does not declare an image content type (415)."""

    status_code = 415


class MalformedRequest(ClientError):
    """The request is well-formed HTTP but not what /classify expects (422)."""

    status_code = 422


class RequestTimeout(ClientError):
    """The request body did not arrive within ``body_timeout_s`` (408; the connection is closed)."""

    status_code = 408


class ClientLeft(Exception):
    """The client closed the connection before its request was complete: nobody to answer, not a fault
    of the server. Counted as status 499 (nginx's "client closed request") and logged at INFO."""


REFUSAL_REASONS = ("queue_full", "deadline", "not_ready", "draining", "connection_limit")


class Unavailable(Exception):
    """The gateway refuses the request for now (503 with ``Retry-After``): ``reason`` is one of
    :data:`REFUSAL_REASONS`, the label of ``bna_requests_refused_total``."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in REFUSAL_REASONS:
            raise ValueError(f"unknown refusal reason {reason!r}")
        super().__init__(detail)
        self.reason = reason
        self.detail = detail

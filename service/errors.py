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

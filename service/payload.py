"""From an HTTP request to the encoded images it carries (the first half of LitServe's *decode_request*).

``/classify`` takes either ``multipart/form-data`` with one or more parts named ``file``, or a raw body
with an ``image/*`` content type. The body is read with a hard byte limit, then split into images;
every way a client can get this wrong is a :class:`~bna_gateway.service.errors.ClientError` with its 4xx status.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from bna_gateway.service.errors import (
    ClientLeft,
    EmptyBody,
    MalformedRequest,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
)


FIELD = "file"
_ACCEPTED_PART_TYPES = (b"", b"application/octet-stream")


@dataclass(frozen=True)
class ImagePart:
    """One encoded image as it arrived."""

    data: bytes
    filename: str | None = None
    content_type: str | None = None

    def describe(self, index: int) -> str:
        return f"image {index}" + (f" ({self.filename!r})" if self.filename else "")


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The whole body, or a client error: :class:`PayloadTooLarge` as soon as it passes ``max_bytes``
    (declared or counted), :class:`RequestTimeout` when it is not all there within ``timeout_s``,
    :class:`ClientLeft` when the client goes away first.

    A refused body is not read to its end here: ``api.middleware.UnreadBodyMiddleware`` reads a bounded
    amount more (so a client that sends everything before reading sees the answer) and closes the
    connection."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise MalformedRequest(f"invalid Content-Length header: {declared!r}") from None
        if length > max_bytes:
            raise PayloadTooLarge(f"request body of {length} bytes exceeds the limit of {max_bytes} bytes")
    try:
        return await asyncio.wait_for(_read(request, max_bytes), timeout_s)
    except asyncio.TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {timeout_s:g} s") from None
    except ClientDisconnect:
        raise ClientLeft("the client closed the connection while sending its request") from None


async def _read(request: Request, max_bytes: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > max_bytes:
            raise PayloadTooLarge(f"request body exceeds the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def split_payload(content_type: str | None, body: bytes, max_images: int) -> list[ImagePart]:
    """The images in a request body, checked against the content type and the image-count limit."""
    mime, params = parse_options_header(content_type)
    if mime == b"multipart/form-data":
        if not body:
            raise EmptyBody("request body is empty")
        return _MultipartSplitter(params, max_images).split(body)
    if mime.startswith(b"image/"):
        if not body:
            raise EmptyBody("request body is empty")
        return [ImagePart(body, None, mime.decode("latin-1"))]
    shown = content_type or "none"
    raise UnsupportedMediaType(
        f"Content-Type {shown!r} is not accepted: send multipart/form-data with one or more '{FIELD}' "
        "parts, or a raw body with an image/* content type"
    )


class _MultipartSplitter:
    """Collects the parts of a ``multipart/form-data`` body in memory (the body is already bounded)."""

    def __init__(self, params: dict[bytes, bytes], max_images: int) -> None:
        boundary = params.get(b"boundary")
        if not boundary:
            raise MalformedRequest("multipart/form-data without a boundary parameter")
        self.boundary = boundary
        self.max_images = max_images
        self.parts: list[ImagePart] = []
        self._headers: list[tuple[bytes, bytes]] = []
        self._name = b""
        self._value = b""
        self._data = bytearray()

    def split(self, body: bytes) -> list[ImagePart]:
        callbacks = {
            "on_part_begin": self._on_part_begin,
            "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end,
            "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value,
            "on_header_end": self._on_header_end,
        }
        try:
            parser = MultipartParser(self.boundary, callbacks)  # type: ignore[arg-type]
            parser.write(body)
            parser.finalize()
        except FormParserError as exc:
            raise MalformedRequest(f"malformed multipart body: {exc}") from None
        if not self.parts:
            raise MalformedRequest(f"multipart body has no '{FIELD}' part: send each image as a '{FIELD}' field")
        return self.parts

    def _on_part_begin(self) -> None:
        self._headers = []
        self._data = bytearray()

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _on_header_end(self) -> None:
        self._headers.append((self._name.strip().lower(), self._value.strip()))
        self._name, self._value = b"", b""

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._data += data[start:end]

    def _on_part_end(self) -> None:
        headers = dict(self._headers)
        _, disposition = parse_options_header(headers.get(b"content-disposition"))
        name = disposition.get(b"name")
        if name is None:
            raise MalformedRequest("a multipart part has no Content-Disposition name")
        field = name.decode("utf-8", "replace")
        if field != FIELD:
            raise MalformedRequest(f"unexpected form field {field!r}: send each image as a '{FIELD}' field")
        if len(self.parts) >= self.max_images:
            raise PayloadTooLarge(f"more than {self.max_images} images in one request")
        part_type, _ = parse_options_header(headers.get(b"content-type"))
        filename = disposition.get(b"filename")
        shown = filename.decode("utf-8", "replace") if filename is not None else None
        if not (part_type.startswith(b"image/") or part_type in _ACCEPTED_PART_TYPES):
            where = f"part {len(self.parts)}" + (f" ({shown!r})" if shown else "")
            raise UnsupportedMediaType(
                f"{where} has content type {part_type.decode('latin-1')!r}; images must be image/* "
                "(or application/octet-stream)"
            )
        self.parts.append(ImagePart(bytes(self._data), shown, part_type.decode("latin-1") or None))

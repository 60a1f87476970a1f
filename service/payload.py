"""From an HTTP request to the encoded images it carries (the first half of LitServe's *decode_request*).

``/classify`` takes either ``multipart/form-data`` with one or more parts named ``file``, or a raw body
with an ``image/*`` content type. The body is read with a hard byte limit, then split into images;
every way a client can get this wrong is a :class:`~bna_gateway.service.errors.ClientError` with its 4xx status.
"""
from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from functools import lru_cache

from python_multipart.multipart import parse_options_header
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
        if sys.version_info >= (3, 11):  # a timer on this task; wait_for would start another task
            async with asyncio.timeout(timeout_s):
                return await _read(request, max_bytes)
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
        return _split_multipart(params, body, max_images)
    if mime.startswith(b"image/"):
        if not body:
            raise EmptyBody("request body is empty")
        return [ImagePart(body, None, mime.decode("latin-1"))]
    shown = content_type or "none"
    raise UnsupportedMediaType(
        f"Content-Type {shown!r} is not accepted: send multipart/form-data with one or more '{FIELD}' "
        "parts, or a raw body with an image/* content type"
    )


def _split_multipart(params: dict[bytes, bytes], body: bytes, max_images: int) -> list[ImagePart]:
    """The parts of a ``multipart/form-data`` body (RFC 7578), cut out with ``bytes.find`` (the body is in
    memory and bounded; a byte-by-byte parser would cost the event loop more than decoding some images)."""
    boundary = params.get(b"boundary")
    if not boundary:
        raise MalformedRequest("multipart/form-data without a boundary parameter")
    delimiter = b"--" + boundary
    pos = 0 if body.startswith(delimiter) else body.find(b"\r\n" + delimiter) + 2  # a preamble may come first
    if pos == 1:
        raise MalformedRequest(f"malformed multipart body: no '--{boundary.decode('latin-1')}' delimiter")
    parts: list[ImagePart] = []
    while True:
        pos += len(delimiter)
        if body.startswith(b"--", pos):  # the closing delimiter; an epilogue after it is ignored
            break
        line_end = body.find(b"\r\n", pos)
        if line_end == -1 or body[pos:line_end].strip(b" \t"):
            raise MalformedRequest("malformed multipart body: a delimiter is not followed by a line break")
        end = body.find(b"\r\n" + delimiter, line_end)
        if end == -1:
            raise MalformedRequest("malformed multipart body: a part is not closed by a delimiter")
        head_end = body.find(b"\r\n\r\n", line_end)  # == line_end for a part without headers
        if head_end == -1 or head_end + 4 > end:
            raise MalformedRequest("malformed multipart body: a part's headers do not end with an empty line")
        if len(parts) >= max_images:
            raise PayloadTooLarge(f"more than {max_images} images in one request")
        headers = _part_headers(body[line_end + 2 : head_end])
        parts.append(_image_part(headers, body[head_end + 4 : end], len(parts)))
        pos = end + 2
    if not parts:
        raise MalformedRequest(f"multipart body has no '{FIELD}' part: send each image as a '{FIELD}' field")
    return parts


def _part_headers(block: bytes) -> dict[bytes, bytes]:
    headers = {}
    for line in block.split(b"\r\n") if block else ():
        name, colon, value = line.partition(b":")
        if not colon:
            raise MalformedRequest(f"malformed multipart body: header line {line[:80]!r} has no ':'")
        headers[name.strip().lower()] = value.strip()
    return headers


@lru_cache(maxsize=4096)
def _disposition(value: bytes) -> tuple[bytes | None, bytes | None]:
    """``name`` and ``filename`` of a Content-Disposition header (cached: clients repeat theirs)."""
    _, params = parse_options_header(value)
    return params.get(b"name"), params.get(b"filename")


@lru_cache(maxsize=256)
def _mime(value: bytes) -> bytes:
    return parse_options_header(value)[0]


def _image_part(headers: dict[bytes, bytes], data: bytes, index: int) -> ImagePart:
    """One part, checked: named ``file``, an image content type (or none, or octet-stream)."""
    name, filename = _disposition(headers.get(b"content-disposition", b""))
    if name is None:
        raise MalformedRequest("a multipart part has no Content-Disposition name")
    field = name.decode("utf-8", "replace")
    if field != FIELD:
        raise MalformedRequest(f"unexpected form field {field!r}: send each image as a '{FIELD}' field")
    part_type = _mime(headers.get(b"content-type", b""))
    shown = filename.decode("utf-8", "replace") if filename is not None else None
    if not (part_type.startswith(b"image/") or part_type in _ACCEPTED_PART_TYPES):
        where = f"part {index}" + (f" ({shown!r})" if shown else "")
        raise UnsupportedMediaType(
            f"{where} has content type {part_type.decode('latin-1')!r}; images must be image/* "
            "(or application/octet-stream)"
        )
    return ImagePart(data, shown, part_type.decode("latin-1") or None)

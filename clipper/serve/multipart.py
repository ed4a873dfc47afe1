"""multipart/form-data bodies (RFC 7578) parsed in one linear pass, every count bounded while parsing.

The standard library's email parser, which `clipper serve` used before, parses whole MIME trees:
encoded words in a file name, thousands of parameters, comments in parentheses and nested
multiparts each cost it seconds and gigabytes (issue #37), and it counted parts only afterwards.
A form needs far less: parts split at the boundary (a C-speed `bytes.find`), a few headers each,
the `name` and whether a `filename` is there. Each count (parts, header bytes, headers,
parameters) is checked as it is reached, a nested multipart is refused, and the parse runs off
the event loop in the server. Errors are `FormError`s, one line naming what is wrong.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from urllib.parse import unquote

MAX_HEADER_BYTES = 4096  # of one part's header block
MAX_HEADERS = 16  # lines in one part's header block
MAX_PARAMETERS = 16  # in one header value (Content-Disposition, the request's Content-Type)
MAX_CONTENT_TYPE_CHARS = 1024  # the request's Content-Type header
MAX_BOUNDARY = 70  # RFC 2046


class FormError(ValueError):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Part:
    name: str
    data: bytes
    is_file: bool  # a filename was given: the data are a file's bytes, not a text field


def parameters(value: str, where: str) -> tuple[str, dict[str, str]]:
    """A header value `type; key=value; key="quoted \\" value"` as (type lowercased, {key: value}),
    at most MAX_PARAMETERS, keys lowercased, each key once; one pass over the characters."""
    head, _, rest = value.partition(";")
    params: dict[str, str] = {}
    i, n = 0, len(rest)
    while i < n:
        while i < n and rest[i] in " \t;":
            i += 1
        if i >= n:
            break
        eq = rest.find("=", i)
        semi = rest.find(";", i)
        if eq < 0 or (0 <= semi < eq):
            raise FormError(f"{where}: parameter {rest[i:i + 40]!r} has no value")
        key = rest[i:eq].strip().lower()
        i = eq + 1
        while i < n and rest[i] in " \t":
            i += 1
        if i < n and rest[i] == '"':  # quoted string: backslash escapes the next character
            chars, i = [], i + 1
            while i < n and rest[i] != '"':
                if rest[i] == "\\" and i + 1 < n:
                    i += 1
                chars.append(rest[i])
                i += 1
            if i >= n:
                raise FormError(f"{where}: unterminated quoted parameter {key!r}")
            val, i = "".join(chars), i + 1
        else:
            end = rest.find(";", i)
            end = n if end < 0 else end
            val, i = rest[i:end].strip(), end
        if not key:
            raise FormError(f"{where}: a parameter without a name")
        if key in params:
            raise FormError(f"{where}: parameter {key!r} given twice")
        if len(params) == MAX_PARAMETERS:
            raise FormError(f"{where}: more than {MAX_PARAMETERS} parameters")
        params[key] = val
    return head.strip().lower(), params


def boundary_of(content_type: str) -> bytes:
    """The boundary of a `multipart/form-data` Content-Type header."""
    if len(content_type) > MAX_CONTENT_TYPE_CHARS:
        raise FormError(f"Content-Type: over {MAX_CONTENT_TYPE_CHARS} characters")
    media, params = parameters(content_type, "Content-Type")
    if media != "multipart/form-data":
        raise FormError(f"Content-Type: expected multipart/form-data, got {media[:60]!r}")
    boundary = params.get("boundary", "")
    if not 1 <= len(boundary) <= MAX_BOUNDARY or not boundary.isascii():
        raise FormError(f"body: not valid multipart/form-data (a boundary of 1 to {MAX_BOUNDARY} ASCII characters "
                        "is needed)")
    return boundary.encode("ascii")


def _extended(value: str) -> str:
    """An RFC 5987 / 2231 value `charset'language'percent-encoded`."""
    charset, _, rest = value.partition("'")
    _, _, text = rest.partition("'")
    try:
        return unquote(text, encoding=charset or "utf-8", errors="strict")
    except (LookupError, UnicodeDecodeError):
        raise FormError(f"Content-Disposition: {value[:60]!r} is not valid in its charset") from None


def _disposition(value: str) -> tuple[str, bool]:
    """(the field name, whether a file name is given) of a part's Content-Disposition."""
    kind, params = parameters(value, "Content-Disposition")
    if kind != "form-data":
        raise FormError(f"Content-Disposition: expected form-data, got {kind[:40]!r}")
    name = _extended(params["name*"]) if "name*" in params else params.get("name", "")
    if not name:
        raise FormError("body: a multipart part without a name (Content-Disposition: form-data; name=...)")
    return name, "filename" in params or "filename*" in params


def _decoded(data: bytes, encoding: str, name: str) -> bytes:
    """A part's bytes under its (deprecated, RFC 7578 4.7) Content-Transfer-Encoding."""
    if encoding in ("", "7bit", "8bit", "binary"):
        return data
    try:
        if encoding == "base64":
            return base64.b64decode(b"".join(data.split()), validate=True)
        if encoding == "quoted-printable":
            return binascii.a2b_qp(data)
    except (binascii.Error, ValueError):
        raise FormError(f"{name}: not valid {encoding}") from None
    raise FormError(f"{name}: Content-Transfer-Encoding {encoding[:40]!r} is not supported (send the bytes as "
                    "they are)")


def _part(chunk: bytes) -> Part:
    """One part between two delimiters: headers, an empty line, its data."""
    if chunk.startswith(b"\r\n"):
        head, data = b"", chunk[2:]
    else:
        end = chunk.find(b"\r\n\r\n", 0, MAX_HEADER_BYTES + 4)
        if end < 0:
            raise FormError(f"body: a multipart part's headers are over {MAX_HEADER_BYTES} bytes or do not end")
        head, data = chunk[:end], chunk[end + 4:]
    headers: dict[str, str] = {}
    lines = head.split(b"\r\n") if head else []
    if len(lines) > MAX_HEADERS:
        raise FormError(f"body: a multipart part with over {MAX_HEADERS} header lines")
    last = None
    for line in lines:
        text = line.decode("utf-8", "replace")
        if text[:1] in (" ", "\t") and last is not None:  # an obsolete folded line continues the last header
            headers[last] += " " + text.strip()
            continue
        key, colon, value = text.partition(":")
        if not colon:
            raise FormError(f"body: malformed multipart header line {text[:60]!r}")
        last = key.strip().lower()
        headers[last] = value.strip()
    if "content-disposition" not in headers:
        raise FormError("body: a multipart part without a name (Content-Disposition: form-data; name=...)")
    name, is_file = _disposition(headers["content-disposition"])
    if headers.get("content-type", "").lower().lstrip().startswith("multipart/"):
        raise FormError(f"{name}: nested multipart parts are not supported")
    encoding = headers.get("content-transfer-encoding", "").lower()
    return Part(name, _decoded(data, encoding, name), is_file)


def parse_form(body: bytes, content_type: str, max_parts: int) -> list[Part]:
    """The parts of a multipart/form-data `body`, in order; FormError (400, or 413 past `max_parts`)."""
    boundary = boundary_of(content_type)
    delimiter = b"\r\n--" + boundary
    # the first delimiter may open the body; anything before it is a preamble, ignored
    if body.startswith(delimiter[2:]):
        pos = len(delimiter) - 2
    elif (found := body.find(delimiter)) >= 0:
        pos = found + len(delimiter)
    else:
        raise FormError("body: not valid multipart/form-data (no boundary, or no parts)")
    parts: list[Part] = []
    while True:
        if body.startswith(b"--", pos):  # the close delimiter
            break
        line_end = body.find(b"\r\n", pos, pos + 256)  # transport padding (whitespace), then the line's end
        if line_end < 0 or body[pos:line_end].strip(b" \t"):
            raise FormError("body: not valid multipart/form-data (a delimiter line is malformed or the body is cut)")
        start = line_end + 2
        end = body.find(delimiter, start)
        if end < 0:
            raise FormError("body: not valid multipart/form-data (the last part has no closing boundary)")
        if len(parts) == max_parts:
            raise FormError(f"body: multipart/form-data with 1 to {max_parts} parts", 413)
        parts.append(_part(body[start:end]))
        pos = end + len(delimiter)
    if not parts:
        raise FormError(f"body: multipart/form-data with 1 to {max_parts} parts")
    return parts

"""Images a chat request names by http(s) URL. The server fetches only from the hosts its operator
allows (`clipper serve --image-host HOST`, repeatable; none: data: URLs only), without following
redirects (a redirect could lead anywhere), within the request's byte limit and read timeout."""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request

from .body import BadRequest


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # None: the 3xx is raised as an HTTPError
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def checked_url(url: str, hosts: tuple[str, ...], where: str) -> str:
    """`url` if it is http(s) on one of `hosts` ("*": any), else a 400 naming why."""
    if not hosts:
        raise BadRequest(f"{where}: only data: URLs (base64 images in the request); this server fetches nothing "
                         "from elsewhere (clipper serve --image-host HOST allows a host)")
    try:
        parts = urllib.parse.urlsplit(url)
        host = (parts.hostname or "").lower()
        port_ok = parts.port is None or 0 < parts.port < 65536
    except ValueError:
        raise BadRequest(f"{where}: not a valid URL") from None
    if parts.scheme not in ("http", "https") or not host or not port_ok or parts.username or parts.password:
        raise BadRequest(f"{where}: an http(s) URL without credentials")
    if "*" not in hosts and host not in hosts:
        raise BadRequest(f"{where}: {host[:100]} is not a host this server fetches images from", 403)
    return url


def fetch(url: str, max_bytes: int, timeout_s: float, where: str) -> bytes:
    """The body of `url` (checked by `checked_url`): at most `max_bytes`, else 413; any failure a 400."""
    request = urllib.request.Request(url, headers={"User-Agent": "clipper-serve", "Accept": "image/*"})
    try:
        with _OPENER.open(request, timeout=timeout_s) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise BadRequest(f"{where}: {int(length)} bytes, at most {max_bytes}", 413)
            data = response.read(max_bytes + 1)
    except urllib.error.HTTPError as e:
        why = "a redirect (not followed)" if 300 <= e.code < 400 else f"HTTP {e.code}"
        raise BadRequest(f"{where}: could not fetch the image: {why}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise BadRequest(f"{where}: could not fetch the image: {str(getattr(e, 'reason', e))[:200]}") from None
    if len(data) > max_bytes:
        raise BadRequest(f"{where}: more than {max_bytes} bytes", 413)
    return data

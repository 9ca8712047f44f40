"""Target URIs as people may see them: listings and logs show where a snapshot went, never a
password someone put in the URI's user info (nbds://user:secret@host/). The rest stays as it
was, so it still reads like the URI the operator typed (a tls-psk-file= path is not a secret)."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def redact_uri(uri: str) -> str:
    """nbds://alice:secret@dr:10809/?tls-psk-file=/k -> nbds://alice@dr:10809/?tls-psk-file=/k"""
    try:
        parts = urlsplit(uri)
    except ValueError:  # not a URI at all: show nothing of it that could be a secret
        return "<unparsable URI>"
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return uri
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}@{hostport}" if user else hostport))


def redact(text: str, uri: str) -> str:
    """An error text with the target URI's password taken out (errors quote the URI)."""
    return text.replace(uri, redact_uri(uri)) if uri != redact_uri(uri) else text

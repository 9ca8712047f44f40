"""TLS pre-shared key files, in the format nbdkit `--tls-psk` and libnbd `tls-psk-file=` read
(GnuTLS psktool's): one `USER:HEXKEY` line per user.

Notes on the design:
- GnuTLS reads such a file lazily, at each handshake, and skips what it cannot parse: a typo
  there shows up as every client failing its handshake with no reason given. So `serve
  --tls-psk` checks the file first (check()) and refuses it with one line that says what is
  wrong.
- create() writes 32 random bytes (GnuTLS psktool's default key size) from `secrets`, mode 0600,
  with O_EXCL: it never replaces a key some server or client already uses.
- User names are [A-Za-z0-9._-]{1,64} when we create them (they go into URIs:
  nbds://USER@host/); check() accepts any name without whitespace, as psktool writes them.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
import sys
from pathlib import Path

from .errors import AlreadyExists, InvalidArgument, NotFound

KEY_BYTES = 32
USER_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_HEX_RE = re.compile(r"(?:[0-9a-fA-F]{2})+")


def validate_user(user: str) -> None:
    if not USER_RE.fullmatch(user):
        raise InvalidArgument(f"invalid PSK user {user!r}: use 1-64 of A-Z a-z 0-9 . _ - "
                              "(no ':', no whitespace)")


def create(path: str | os.PathLike, user: str) -> Path:
    """Write a new PSK file for user; refuses to replace an existing file."""
    validate_user(user)
    p = Path(path)
    line = f"{user}:{secrets.token_hex(KEY_BYTES)}\n".encode()
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise AlreadyExists(f"{p} already exists; refusing to replace a key in use (remove it first)") from None
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, line)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        p.unlink(missing_ok=True)
        raise
    os.close(fd)
    return p


def check(path: str | os.PathLike) -> list[str]:
    """The users of a PSK file; raises InvalidArgument/NotFound naming the first problem. Warns
    (stderr) when others than its owner may read or change it."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise NotFound(f"TLS PSK file {p} does not exist") from None
    if not stat.S_ISREG(st.st_mode):
        raise InvalidArgument(f"TLS PSK file {p} is not a regular file")
    try:
        text = p.read_bytes().decode("ascii")
    except UnicodeDecodeError:
        raise InvalidArgument(f"TLS PSK file {p} is not text: expected USER:HEXKEY lines") from None
    except PermissionError:
        raise InvalidArgument(f"TLS PSK file {p} is not readable by this user") from None
    users: list[str] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        user, sep, key = line.partition(":")
        if not sep or not user or any(c.isspace() for c in user):
            raise InvalidArgument(f"TLS PSK file {p} line {n}: expected USER:HEXKEY")
        if not _HEX_RE.fullmatch(key):
            raise InvalidArgument(f"TLS PSK file {p} line {n}: the key of {user} is not an even number of hex "
                                  "digits (make one with `blockrep psk create FILE USER`)")
        if user in users:
            raise InvalidArgument(f"TLS PSK file {p} line {n}: user {user} appears twice")
        users.append(user)
    if not users:
        raise InvalidArgument(f"TLS PSK file {p} holds no USER:HEXKEY line")
    if st.st_mode & 0o077:
        print(f"blockrep: warning: TLS PSK file {p} is accessible to others than its owner "
              f"(mode {stat.S_IMODE(st.st_mode):04o}): chmod 600 it", file=sys.stderr)
    return users

"""The SMTP AUTH password table: salted scrypt hashes, never plaintext.

File format (``smtpd_sasl_password_file``, 0600): one ``user:scrypt$N$r$p$salt$hash``
line per login (salt and hash in base64).  ``trimail passwd add|delete USER``
edits it atomically (write a temporary file, fsync, rename).  Verification is
constant-time (``hmac.compare_digest``) and CPU-bound, so serve runs it on a
worker thread.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import tempfile
from pathlib import Path

N, R, P = 2**14, 8, 1
_USER = re.compile(r"[A-Za-z0-9._@+=-]{1,128}")


class PasswordError(Exception):
    pass


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=N, r=R, p=P, dklen=32)
    return f"scrypt${N}${R}${P}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(password.encode("utf-8"), salt=base64.b64decode(salt), n=int(n), r=int(r),
                                p=int(p), dklen=len(expected), maxmem=64 * 1024 * 1024)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


def read_table(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise PasswordError(f"{path}: {exc.strerror}") from None
    table = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            user, _, stored = line.partition(":")
            table[user] = stored
    return table


def check_user(user: str) -> str:
    if not _USER.fullmatch(user):
        raise PasswordError(f"bad user name {user!r} (letters, digits and ._@+=- only)")
    return user


def write_table(path: Path, table: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for user, stored in sorted(table.items()):
                handle.write(f"{user}:{stored}\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def authenticate(path: Path, user: str, password: str) -> bool:
    stored = read_table(path).get(user)
    if stored is None:
        verify_password(password, hash_password("x"))  # same cost for unknown users
        return False
    return verify_password(password, stored)

"""The SMTP AUTH password table: salted scrypt hashes, never plaintext.

File format (``smtpd_sasl_password_file``, 0600): one ``user:scrypt$N$r$p$salt$hash``
line per login (salt and hash in base64).  ``trimail passwd add|delete USER``
edits it atomically (write a temporary file, fsync, rename).  Verification is
constant-time (``hmac.compare_digest``) and CPU-bound, so serve runs it on a
worker thread.

Security notes: an unknown user costs what a known one does: the password is
checked against a dummy hash with the scrypt cost of the table's entries, made once
per process (``dummy_hash``, ``prepare``), so each attempt runs exactly one scrypt
either way and the reply is the same (``smtpd``: ``535 5.7.8``); the time an
answer takes does not say whether a login exists.  ``scrypt_computations`` counts
every scrypt run (the tests check the one-per-attempt property with it).

Parameter (through the caller): smtpd_sasl_password_file.
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


scrypt_computations = 0  # every scrypt run, for the tests that AUTH costs the same


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    global scrypt_computations
    scrypt_computations += 1
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=dklen, maxmem=64 * 1024 * 1024)


def hash_password(password: str, n: int = N, r: int = R, p: int = P) -> str:
    salt = secrets.token_bytes(16)
    digest = _scrypt(password.encode("utf-8"), salt, n, r, p, 32)
    return f"scrypt${n}${r}${p}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        actual = _scrypt(password.encode("utf-8"), base64.b64decode(salt), int(n), int(r), int(p), len(expected))
    except (ValueError, TypeError, OverflowError):  # malformed, or a cost scrypt refuses
        return False
    return hmac.compare_digest(actual, expected)


def read_table(path: str | os.PathLike[str]) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8") as table:
            text = table.read()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise PasswordError(f"{path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise PasswordError(f"{path}: not UTF-8 text") from None
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


_dummies: dict[tuple[str, str, str], str] = {}  # (N, r, p) -> a hash of a random secret
_DUMMY_LIMIT = 16  # distinct cost settings kept; a table has one or two


def _cost(stored: str) -> tuple[str, str, str] | None:
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != "scrypt" or not all(x.isascii() and x.isdigit() for x in parts[1:4]):
        return None
    return parts[1], parts[2], parts[3]


def dummy_hash(table: dict[str, str]) -> str:
    """A hash to verify an unknown user's password against, with the scrypt cost of
    the table's first well-formed entry (the defaults for an empty table), so that
    the check costs what a known user's costs.  Each is computed once per process
    and kept: an attempt then runs exactly one scrypt, like a known user's."""
    cost = next((c for c in map(_cost, table.values()) if c is not None), (str(N), str(R), str(P)))
    dummy = _dummies.get(cost)
    if dummy is None:
        if len(_dummies) >= _DUMMY_LIMIT:
            _dummies.clear()
        try:
            dummy = hash_password(secrets.token_urlsafe(16), int(cost[0]), int(cost[1]), int(cost[2]))
        except (ValueError, TypeError, OverflowError):  # a cost scrypt refuses (TypeError: N past
            # an unsigned long): so does verify_password for the real entry
            dummy = hash_password(secrets.token_urlsafe(16))
        _dummies[cost] = dummy
    return dummy


def prepare(path: str | os.PathLike[str]) -> None:
    """Compute the dummy hash for *path*'s table now (serve, at start), so that not
    even the first unknown user of a process pays for making it; PasswordError."""
    dummy_hash(read_table(path))


def authenticate(path: str | os.PathLike[str], user: str, password: str) -> bool:
    """Check *password* for *user*: one scrypt whether or not the user exists
    (docs/security.md); PasswordError when the table cannot be read."""
    table = read_table(path)
    stored = table.get(user)
    if stored is None:
        verify_password(password, dummy_hash(table))  # same cost for unknown users
        return False
    return verify_password(password, stored)

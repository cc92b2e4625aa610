"""Postfix's lists of local users: who may view the queue (``authorized_mailq_users``),
flush it (``authorized_flush_users``) and submit mail with sendmail
(``authorized_submit_users``).

An entry is a user name (``unknown``, as in Postfix, names every uid the password
file does not), ``uid:N`` for the uid N whatever its name, a ``type:table`` looked
up by user name, or ``static:anyone`` (every default) for everyone; each may
be negated with ``!``, and the first entry that matches decides (none: refused).
Inside serve's chroot jail the password file is out of reach: the names are those
it had when serve entered the jail (``remember_names``), else a name-based entry
never matched there and ``!www-data, static:anyone`` let www-data through (red
team 35a; a user added since is ``unknown`` there until serve restarts).
postqueue always lets root and mail_owner view and flush the queue; sendmail and
postdrop exempt nobody (``authorized_submit_users = !www-data, static:anyone``
keeps a web server from sending mail).  A refusal is Postfix's text, ``User
NAME(UID) is not allowed to ...``, with exit status 77 (EX_NOPERM); serve logs the
refusals it makes as a warning, once a minute per user and list (``judged_by_serve``).

Parameters: authorized_mailq_users, authorized_flush_users, authorized_submit_users,
mail_owner (read through the caller's configuration).
"""

from __future__ import annotations

import logging
import os
import pwd
import time

from trimail.config import Config
from trimail.maps import TableError, open_table
from trimail.postqueue import uid_of

log = logging.getLogger("trimail.master")

# the parameter, what its users may do (the refusal's words), and whether root,
# serve's own user and mail_owner may always (postqueue) or only when listed (postdrop)
LISTS = {
    "authorized_mailq_users": ("view the mail queue", True),
    "authorized_flush_users": ("flush the mail queue", True),
    "authorized_submit_users": ("submit mail", False),
}


_NAMES: dict[int, str] = {}  # the password file's names when serve entered the chroot jail
WARN_EVERY = 60.0  # seconds between two warnings of a list's table that cannot be read, or of one refusal
_told: dict[tuple, tuple[str, float]] = {}  # the last warning of each list (and user), and when


def remember_names() -> None:
    """Keep the password file's names for ``user_key`` (called before the chroot jail)."""
    for entry in pwd.getpwall():
        _NAMES.setdefault(entry.pw_uid, entry.pw_name)  # the first of a uid's names, as getpwuid


def user_key(uid: int) -> str:
    """The user's name (from the password file, else as it was when serve entered
    its jail), ``uid:N`` for a uid without one."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return _NAMES.get(uid, f"uid:{uid}")


def authorized(users: list[str], uid: int, config: Config, exempt: bool = True) -> bool:
    """Whether *uid* is one of *users*; root, this process's user and mail_owner
    always are when *exempt*.  TableError when a table cannot answer."""
    if exempt and uid in (0, os.geteuid(), uid_of(config.mail_owner)):
        return True
    key = user_key(uid)
    # a table looks up the name (Postfix's "unknown" too, for a uid without one); an
    # entry also matches uid:N, whatever the uid's name (red team 35a: !uid:33 let www-data through)
    keys = [key, "unknown"] if key.startswith("uid:") else [key]
    names = {k.lower() for k in keys} | {f"uid:{uid}"}
    for item in users:
        pattern = item.removeprefix("!")
        if ":" in pattern and not pattern.startswith("uid:"):  # opened once per configuration (it reloads
            # itself when its file changes): read per request, a big texthash cost serve 0.16 s a request
            table = config.memo(f"userlists {pattern}", lambda p=pattern: open_table(p, lazy=True), keeps=tuple(LISTS))
            hit = any(table.lookup(k) is not None for k in keys)
        else:
            hit = pattern.lower() in names
        if hit:
            return not item.startswith("!")
    return False


def refusal(config: Config, parameter: str, uid: int) -> str | None:
    """Postfix's refusal when the list *parameter* does not name *uid*; None when it
    does.  A table that cannot be read names nobody, and is logged once a minute
    (red team 35a: any local user wrote a warning per request, 1,900 lines a second)."""
    what, exempt = LISTS[parameter]
    try:
        if authorized(config.get(parameter), uid, config, exempt):
            return None
    except TableError as exc:
        _warn((parameter,), f"{parameter}: {exc}")
    return f"User {user_key(uid)}({uid}) is not allowed to {what}"


def judged_by_serve(config: Config, parameter: str, uid: int) -> str | None:
    """``refusal`` for a request on serve's public socket, and the refusal in the mail
    log, as Postfix's postqueue and postdrop log theirs: once a minute per user and
    list, since any local user may ask again and again."""
    refused = refusal(config, parameter, uid)
    if refused is not None:
        _warn((parameter, uid), refused)
    return refused


def _warn(key: tuple[str, ...] | tuple[str, int], text: str) -> None:
    """A warning, unless the same one for *key* was logged less than ``WARN_EVERY`` ago."""
    now = time.monotonic()
    last = _told.get(key)
    if last is None or last[0] != text or now - last[1] >= WARN_EVERY:
        if len(_told) >= 1000:  # uids are many at most: forget, rather than grow
            _told.clear()
        _told[key] = (text, now)
        log.warning("%s", text)

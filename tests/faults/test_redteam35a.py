"""Red team 35a: the authorized_* lists of local users (trimail/userlists.py:
authorized_submit_users, and authorized_mailq_users / authorized_flush_users, which
share it) against a hostile local user and a careless operator, with a real serve.

- Inside the chroot jail serve could not read the password file, so every user was
  ``uid:N`` to it: ``authorized_submit_users = !www-data, static:anyone`` (the
  documented way to keep a web server from mailing) let www-data submit, and list
  the queue past ``authorized_mailq_users``.
- ``uid:N`` matched only a uid without a name (``!uid:33`` let www-data through),
  and Postfix's ``unknown`` (its documented name for such a uid, ``!unknown`` to
  block accounts that do not exist) matched nothing.
- ``! www-data, static:anyone`` (a space after the ``!``) was two entries, ``!``
  naming nobody and ``www-data`` letting www-data in: a configuration error now,
  as Postfix's "no pattern after '!'".
- A list's table was opened at every request: one that could not be read wrote a
  warning per connection any local user opened, and a big one cost serve its CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.faults.conftest import queued, wait_until
from tests.faults.test_local_submission import readable  # noqa: F401
from tests.faults.test_startup import background, chroot_config, jail, needs_root  # noqa: F401
from tests.ports import free_port
from trimail.config import ConfigError
from trimail.maps import TextHashTable
from trimail.userlists import refusal

# the test's interpreter imports what it needs as root, then takes the uid given first
AS_USER = """
import os, sys
uid = int(sys.argv.pop(1))
import encodings.idna, trimail.postqueue, trimail.standalone, trimail.cli, trimail.cli.queue
import trimail.cleanup.submit as submit
os.setgroups([]); os.setgid(uid); os.setuid(uid)
trimail.cli.main(sys.argv[1:]) if sys.argv[1] == "queue" else submit.main(sys.argv[1:])
"""


def as_user(uid: int, config: Path, *args: str) -> subprocess.CompletedProcess:
    """``trimail sendmail ARGS`` (``queue ...``: that CLI command) as *uid*, with *config*."""
    options = ["-c", str(config)] if args[0] == "queue" else ["-C", str(config), "-f", "me@mx.test.example"]
    return subprocess.run([sys.executable, "-c", AS_USER, str(uid), *args, *options],
                          input=b"Subject: x\n\nhello\n", capture_output=True, timeout=60, cwd="/", check=False)


def users_config(readable: Path, queue_directory: Path) -> Path:  # noqa: F811
    config = readable / "main.cf"
    config.write_text(f"myhostname = mx.test.example\nqueue_directory = {queue_directory}\nmail_owner = nobody\n"
                      "alias_maps =\nalias_database =\n")
    config.chmod(0o644)
    return config


@needs_root
def test_a_name_in_the_lists_names_its_user_inside_the_chroot_jail(tmp_path, background, jail, readable):  # noqa: F811
    port = free_port()
    maillog = tmp_path / "maillog"
    listed = "!www-data, static:anyone"
    serve = background(chroot_config(tmp_path, jail, port, authorized_submit_users=listed,
                                     authorized_mailq_users=listed))
    wait_until(lambda: (maillog.exists() and "daemon started" in maillog.read_text()) or not serve.alive,
               timeout=30)
    assert serve.alive, maillog.read_text() if maillog.exists() else ""
    config = users_config(readable, jail)
    refused = as_user(33, config, "you@dest.example")
    assert refused.returncode == 77, refused.stderr
    assert refused.stderr.decode().strip() == "sendmail: fatal: User www-data(33) is not allowed to submit mail"
    listing = as_user(33, config, "queue", "list")
    assert listing.returncode == 77, listing.stderr
    assert queued(jail) == 0
    taken = as_user(65533, config, "you@dest.example")  # a uid without a name is not www-data
    assert taken.returncode == 0, taken.stderr
    assert queued(jail) == 1


def test_uid_n_names_its_uid_whatever_its_name_and_unknown_a_uid_without_one(make_config):
    config = make_config(authorized_submit_users="!uid:65534, !unknown, static:anyone")
    assert refusal(config, "authorized_submit_users", 65534) == "User nobody(65534) is not allowed to submit mail"
    assert refusal(config, "authorized_submit_users", 65533) == "User uid:65533(65533) is not allowed to submit mail"
    assert refusal(config, "authorized_submit_users", 33) is None
    # a table is asked for Postfix's "unknown" too
    config = make_config(authorized_mailq_users="!inline:{ unknown=yes }, static:anyone")
    assert refusal(config, "authorized_mailq_users", 65533) == (
        "User uid:65533(65533) is not allowed to view the mail queue")
    assert refusal(config, "authorized_mailq_users", 65534) is None


def test_postfixs_unknown_keeps_a_uid_without_a_name_from_submitting(daemon, readable):  # noqa: F811
    d = daemon(smtpd_workers=0, authorized_submit_users="!unknown, static:anyone")
    config = users_config(readable, d.queue_directory)
    refused = as_user(65533, config, "you@dest.example")
    assert refused.returncode == 77, refused.stderr
    assert refused.stderr.decode().strip() == "sendmail: fatal: User uid:65533(65533) is not allowed to submit mail"
    assert queued(d.queue_directory) == 0
    assert as_user(65534, config, "you@dest.example").returncode == 0


@pytest.mark.parametrize("users", ["! www-data, static:anyone", "!!www-data, static:anyone", "!, static:anyone"])
def test_a_negation_without_its_name_is_a_configuration_error(make_config, users):
    with pytest.raises(ConfigError, match="after '!'"):
        make_config(authorized_submit_users=users)


def test_a_table_that_cannot_be_read_is_not_a_log_line_per_request(daemon, readable, tmp_path):  # noqa: F811
    """Any local user could write a warning to the mail log per connection (about
    1,900 a second) while a table of the list could not be read; once a minute now.
    Each request is still refused, as Postfix refuses when the table cannot answer."""
    d = daemon(smtpd_workers=0, authorized_submit_users=f"!hash:{tmp_path}/missing, static:anyone")
    config = users_config(readable, d.queue_directory)
    for _ in range(4):
        refused = as_user(65534, config, "you@dest.example")
        assert refused.returncode == 77, refused.stderr
    wait_until(lambda: any("missing.db" in line for line in d.proc.log))
    assert len([line for line in d.proc.log if "authorized_submit_users: hash:" in line]) == 1, d.proc.log[-6:]
    assert queued(d.queue_directory) == 0


def test_a_lists_table_is_read_once_not_per_request(make_config, tmp_path, monkeypatch):
    """Each request read the list's tables again: a 100,000-line texthash cost serve
    0.16 s of CPU per connection any local user opened.  The table is kept with the
    configuration and reloads itself when its file changes."""
    table = tmp_path / "users"
    table.write_text("nobody x\n")
    loads: list[int] = []
    load = TextHashTable._load
    monkeypatch.setattr(TextHashTable, "_load", lambda self: loads.append(1) or load(self))
    config = make_config(authorized_submit_users=f"!texthash:{table}, static:anyone")
    for _ in range(5):
        assert refusal(config, "authorized_submit_users", 65534) == "User nobody(65534) is not allowed to submit mail"
        assert refusal(config, "authorized_submit_users", 33) is None
    assert len(loads) == 1

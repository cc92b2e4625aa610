"""AUTH costs the same for unknown and known users, and says the same.

Timing itself is not asserted (noisy); the property that makes it constant is: every
attempt runs exactly one scrypt computation with the cost parameters a real entry
has, whether the user exists or not, and the dummy hash an unknown user is checked
against is computed once, not per attempt.  ``passwords.scrypt_computations``
counts the real computations (no mock).
"""

from __future__ import annotations

from pathlib import Path

from tests.security.test_tls_auth import Line, auth_plain, client_context, run
from trimail import passwords


def _table(tmp_path: Path, stored: str) -> Path:
    path = tmp_path / "sasl_passwd"
    path.write_text(f"alice:{stored}\n")
    return path


def _cost(path: Path, user: str, password: str) -> tuple[bool, int]:
    before = passwords.scrypt_computations
    ok = passwords.authenticate(path, user, password)
    return ok, passwords.scrypt_computations - before


def test_unknown_user_costs_one_scrypt_like_a_known_one(tmp_path):
    path = _table(tmp_path, passwords.hash_password("correct horse"))
    passwords.authenticate(path, "nobody", "x")  # the dummy may be made once per process
    assert _cost(path, "alice", "correct horse") == (True, 1)
    assert _cost(path, "alice", "wrong") == (False, 1)
    for _ in range(3):
        assert _cost(path, "nobody", "x") == (False, 1)


def test_the_dummy_hash_has_the_cost_of_the_real_entries(tmp_path):
    cheap = passwords.hash_password("pw", n=2**12)  # an entry made with other parameters
    path = _table(tmp_path, cheap)
    dummy = passwords.dummy_hash(passwords.read_table(path))
    assert dummy.split("$")[:4] == cheap.split("$")[:4]
    assert dummy == passwords.dummy_hash(passwords.read_table(path))  # computed once, then kept
    default = passwords.dummy_hash({})
    assert default.split("$")[1:4] == [str(passwords.N), str(passwords.R), str(passwords.P)]


async def test_unknown_user_and_wrong_password_get_the_same_reply(submission, ca):
    srv = await submission()
    port = srv.addresses_by_kind["smtps"][0].port

    def talk():
        c = Line(port, client_context(ca))
        c.reply()
        c.cmd("EHLO client.example")
        return c.cmd(auth_plain("mallory", "guess")), c.cmd(auth_plain("alice", "guess"))

    unknown, wrong = await run(talk)
    assert unknown == wrong == (535, ["535 5.7.8 Error: authentication failed: authentication failure"])


async def test_unreadable_password_file_is_a_temporary_failure(submission, ca, tmp_path):
    srv = await submission()
    table = tmp_path / "sasl_passwd"
    table.unlink()
    table.mkdir()  # reading it now fails (root reads any file: a directory cannot be read)
    port = srv.addresses_by_kind["smtps"][0].port

    def talk():
        c = Line(port, client_context(ca))
        c.reply()
        c.cmd("EHLO client.example")
        return c.cmd(auth_plain("alice", "correct horse")), c.cmd("NOOP")

    failed, noop = await run(talk)
    assert failed == (454, ["454 4.7.0 Temporary authentication failure"])
    assert noop[0] == 250  # the session goes on

"""``trimail postmap -s`` (dump every entry) and ``trimail postalias -q/-s``, as
postmap(1) and postalias(1) print them; compared with Postfix's own tools when installed."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import trimail

SOURCE = "# access table\nExample.COM   OK\nbad.example   REJECT go away\n  (continued)\n1.2.3.4 DUNNO\n"
ALIASES = "root: admin\nList: a, b,\n  c@far.example\npostmaster: root\n"


def test_postmap_s_prints_every_key_tab_value(tmp_path):
    source = tmp_path / "access"
    source.write_text(SOURCE)
    assert trimail("postmap", str(source)).returncode == 0
    dumped = trimail("postmap", "-s", f"hash:{source}")
    assert dumped.returncode == 0, dumped.stderr
    assert sorted(dumped.stdout.splitlines()) == [
        "1.2.3.4\tDUNNO", "bad.example\tREJECT go away  (continued)", "example.com\tOK"]
    assert trimail("postmap", "-s", str(source)).stdout == dumped.stdout  # hash: is the default type
    assert sorted(trimail("postmap", "-s", f"texthash:{source}").stdout.splitlines()) == sorted(
        dumped.stdout.splitlines())
    assert trimail("postmap", "-s", "inline:{ a=1, b=2 }").stdout == "a\t1\nb\t2\n"


def test_postmap_s_refuses_tables_without_a_sequence(tmp_path):
    cidr = tmp_path / "clients.cidr"
    cidr.write_text("10.0.0.0/8 OK\n")
    refused = trimail("postmap", "-s", f"cidr:{cidr}")
    assert refused.returncode == 1 and refused.stdout == ""
    assert f"table cidr:{cidr}: sequence operation is not supported" in refused.stderr
    missing = trimail("postmap", "-s", f"hash:{tmp_path / 'nothing'}")
    assert missing.returncode == 1 and "nothing.db" in missing.stderr


def test_postmap_q_and_s_together_is_a_usage_error(tmp_path):
    source = tmp_path / "access"
    source.write_text(SOURCE)
    assert trimail("postmap", str(source)).returncode == 0
    both = trimail("postmap", "-q", "example.com", "-s", str(source))
    assert both.returncode == 1 and both.stdout == "" and "specify only one of -q or -s" in both.stderr


def test_postalias_q_looks_up_like_postmap_q(tmp_path):
    aliases = tmp_path / "aliases"
    aliases.write_text(ALIASES)
    assert trimail("postalias", str(aliases)).returncode == 0
    found = trimail("postalias", "-q", "LIST", str(aliases))
    assert found.returncode == 0 and found.stdout == "a, b, c@far.example\n"
    assert trimail("postalias", "-q", "root", f"hash:{aliases}").stdout == "admin\n"
    absent = trimail("postalias", "-q", "nobody", str(aliases))
    assert absent.returncode == 1 and absent.stdout == "" and absent.stderr == ""


def test_postalias_s_prints_name_colon_tab_value(tmp_path):
    aliases = tmp_path / "aliases"
    aliases.write_text(ALIASES)
    assert trimail("postalias", str(aliases)).returncode == 0
    dumped = trimail("postalias", "-s", str(aliases))
    assert dumped.returncode == 0
    assert sorted(dumped.stdout.splitlines()) == [
        "list:\ta, b, c@far.example", "postmaster:\troot", "root:\tadmin"]


def _postfix(tool: str, config_dir, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool, "-c", str(config_dir), *args], capture_output=True, text=True, timeout=30,
                          check=False)


@pytest.mark.skipif(shutil.which("postmap") is None or shutil.which("postalias") is None,
                    reason="Postfix's postmap and postalias are not installed")
def test_same_answers_as_postfix_postmap_and_postalias(tmp_path):
    config_dir = tmp_path / "postfix"
    config_dir.mkdir()
    (config_dir / "main.cf").write_text("myhostname = mx.example.test\n")
    ours_dir, theirs_dir = tmp_path / "ours", tmp_path / "theirs"
    for directory in (ours_dir, theirs_dir):
        directory.mkdir()
        (directory / "access").write_text(SOURCE)
        (directory / "aliases").write_text(ALIASES)
    assert _postfix("postmap", config_dir, f"hash:{theirs_dir / 'access'}").returncode == 0
    assert _postfix("postalias", config_dir, f"hash:{theirs_dir / 'aliases'}").returncode == 0
    assert trimail("postmap", str(ours_dir / "access")).returncode == 0
    assert trimail("postalias", str(ours_dir / "aliases")).returncode == 0

    def same(ours: subprocess.CompletedProcess[str], theirs: subprocess.CompletedProcess[str],
             skip: tuple[str, ...] = ()) -> None:
        assert ours.returncode == theirs.returncode, (ours.stderr, theirs.stderr)
        theirs_lines = [line for line in theirs.stdout.splitlines() if not line.startswith(skip)]
        assert sorted(ours.stdout.splitlines()) == sorted(theirs_lines)

    same(trimail("postmap", "-s", str(ours_dir / "access")),
         _postfix("postmap", config_dir, "-s", str(theirs_dir / "access")))
    for key in ("EXAMPLE.com", "bad.example", "missing.example"):
        same(trimail("postmap", "-q", key, str(ours_dir / "access")),
             _postfix("postmap", config_dir, "-q", key, str(theirs_dir / "access")))
    # Postfix adds Sendmail's "@" and NIS's YP_* entries to alias databases; trimail does not
    same(trimail("postalias", "-s", str(ours_dir / "aliases")),
         _postfix("postalias", config_dir, "-s", str(theirs_dir / "aliases")), skip=("@:", "YP_"))
    for key in ("List", "root", "nobody"):
        same(trimail("postalias", "-q", key, str(ours_dir / "aliases")),
             _postfix("postalias", config_dir, "-q", key, str(theirs_dir / "aliases")))


@pytest.mark.parametrize("tool", ["postmap", "postalias"])
def test_root_compiles_a_users_table_as_that_user(tool):
    """Red team 33b: root's postmap of a table in a directory its owner may write made
    a temporary file there, then chmodded (by name) and wrote it as root: the owner
    swapped it for a symlink and /etc/shadow became 0666.  As Postfix's postmap and
    postalias, root now compiles a source another user owns with that user's ids, so
    whatever the owner plants, nothing is done as root; the .db is the owner's."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    nobody = pwd.getpwnam("nobody")
    with tempfile.TemporaryDirectory(prefix="trimail-t33-") as name:
        os.chmod(name, 0o755)  # (pytest's own directories are root's alone)
        home = Path(name) / "user"
        home.mkdir()
        source = home / "table"
        source.write_text(ALIASES if tool == "postalias" else SOURCE)
        os.chmod(source, 0o640)
        for path in (home, source):
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        result = trimail(tool, str(source))
        assert result.returncode == 0, result.stderr
        compiled = Path(f"{source}.db").stat()
        assert (compiled.st_uid, compiled.st_gid, compiled.st_mode & 0o777) == (nobody.pw_uid, nobody.pw_gid, 0o640)
        os.chown(home, 0, 0)  # a directory the owner may not write: the user's ids cannot write there
        os.chmod(home, 0o755)
        refused = trimail(tool, str(source))
        assert refused.returncode != 0 and "Permission denied" in refused.stderr, refused.stderr


def test_root_does_not_write_a_table_where_another_user_may_replace_it():
    """Red team 33c: root's own source in a directory a user may write (root keeps
    its ids there): the user renamed a file of their own over root's temporary
    table, and postmap installed it.  Root refuses to write there."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    with tempfile.TemporaryDirectory(prefix="trimail-t33-") as name:
        home = Path(name) / "user"
        home.mkdir()
        os.chown(home, 65534, 65534)
        source = home / "table"
        source.write_text(SOURCE)  # root's
        result = trimail("postmap", str(source))
        assert result.returncode != 0 and "another user may replace files" in result.stderr, result.stderr
        assert not Path(f"{source}.db").exists()

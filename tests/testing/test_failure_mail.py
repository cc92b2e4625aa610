"""A failing test's captured mail is saved as .eml files (``--trimail-failures``):
a small suite run by pytest in a subprocess, as a user's suite would be."""

from __future__ import annotations

import email
import email.policy
import subprocess
import sys

from trimail.testing.failures import folder_name

SUITE = '''
import smtplib
import pytest

HOST = "127.0.41.2"


def send(mta, subject):
    with smtplib.SMTP(HOST, mta.port) as client:
        client.sendmail("app@example.org", ["ann@example.com"], f"Subject: {subject}\\r\\n\\r\\nx\\r\\n")


@pytest.mark.trimail(smtpd_listen=HOST + ":0")
@pytest.mark.parametrize("case", ["a b"])
def test_fails_after_sending(trimail_mta, case):
    send(trimail_mta, "first")
    send(trimail_mta, "second")
    trimail_mta.wait_for(count=2)
    assert False, "the app did something wrong"


@pytest.mark.trimail(smtpd_listen=HOST + ":0")
def test_passes(trimail_mta):
    send(trimail_mta, "kept quiet")
    trimail_mta.wait_for()
'''


def run_suite(tmp_path, *options):
    (tmp_path / "test_app.py").write_text(SUITE)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0",
                           *options, "test_app.py"], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          check=False)


def test_a_failing_test_leaves_its_mail_as_eml_files_named_in_the_report(tmp_path):
    result = run_suite(tmp_path, "--trimail-failures=mail-of-failures")
    assert result.returncode == 1, result.stdout[-3000:]
    folder = tmp_path / "mail-of-failures" / "test_app.py_test_fails_after_sending_a_b"
    saved = sorted(folder.iterdir())
    assert [p.name.split("-", 1)[0] for p in saved] == ["01", "02"] and all(p.suffix == ".eml" for p in saved)
    subjects = [email.message_from_bytes(p.read_bytes(), policy=email.policy.default)["Subject"] for p in saved]
    assert subjects == ["first", "second"]
    assert "trimail captured mail" in result.stdout and str(saved[0]) in result.stdout
    assert [p.name for p in (tmp_path / "mail-of-failures").iterdir()] == [folder.name]  # nothing for the pass


def test_the_default_folder_and_turning_it_off(tmp_path):
    run_suite(tmp_path)
    assert len(list((tmp_path / ".trimail-failures").rglob("*.eml"))) == 2
    (tmp_path / "off").mkdir()
    result = run_suite(tmp_path / "off", "--trimail-failures=")
    assert result.returncode == 1 and not (tmp_path / "off" / ".trimail-failures").exists()
    assert "trimail captured mail" not in result.stdout


def test_folder_names_are_safe_and_bounded():
    assert folder_name("tests/a.py::test_b[x/y z]") == "tests_a.py_test_b_x_y_z"
    long = folder_name("t.py::test_" + "x" * 500)
    assert len(long) <= 150 and long != folder_name("t.py::test_" + "x" * 499)

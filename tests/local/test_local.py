"""Local mail: the seed's quick-and-dirty procedure, its alias file, loops, sendmail,
masquerading and mailbox safety."""

from __future__ import annotations

import email
import email.policy
import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tests.conftest import trimail, write_main_cf
from tests.delivery.test_delivery import parse_dsn, send, wait_empty
from tests.net.test_serve import smtplib_send_reply
from tests.peers import Sink
from trimail import rewrite
from trimail.cleanup.rewrite import LOCAL, header_rewriter, masquerade, virtual_expand
from trimail.delivery.local.aliases import AliasError, Expander, parse_alias_source
from trimail.delivery.local.mailbox import MailboxError, deliver_mbox, mailbox_path
from trimail.maps import open_table


def maildir_messages(spool: Path, user: str) -> list[email.message.EmailMessage]:
    new = spool / user / "Maildir" / "new"
    if not new.is_dir():
        return []
    return [email.message_from_bytes(p.read_bytes(), policy=email.policy.default) for p in sorted(new.iterdir())]


def test_quick_and_dirty_procedure_of_the_seed(tmp_path, serve_process):
    aliases = tmp_path / "aliases"
    aliases.write_text("root: mick\n")
    config_path = write_main_cf(
        tmp_path, master_service_disable="", myhostname="buford.dogpeople.org",
        mydestination="$myhostname, localhost.$mydomain, $mydomain",
        alias_maps=f"hash:{aliases}", alias_database=f"hash:{aliases}")
    newaliases = trimail("newaliases", "-c", str(config_path))
    assert newaliases.returncode == 0, newaliases.stderr
    proc = serve_process(config_path)
    queue_id = smtplib_send_reply(proc.port, ["root@dogpeople.org"]).rsplit(" ", 1)[1]
    # local(8)'s line names the final recipient and the address it was sent to (Postfix)
    proc.wait_log(rf"{queue_id}: to=<mick@buford.dogpeople.org>, orig_to=<root@dogpeople.org>, relay=local, "
                  r".*status=sent \(delivered to maildir mick\)")
    [message] = maildir_messages(tmp_path / "queue" / "mailboxes", "mick")
    assert message["Delivered-To"] == "root@dogpeople.org"
    assert message["Return-Path"] == "<alice@client.example>"
    assert message["Subject"] == "hello"
    assert proc.stop() == 0


SEED_ALIASES = """\
postmaster:     root
mailer-daemon:  root
hostmaster:     root
root:           bdewinter
mailguys:       bdewinter,mick.bauer
mick.bauer:     mbauer@biscuit.stpaul.dogpeople.org
clients:        :include:{clientlist}
spam-reports:   {spambucket}
"""


@pytest.fixture
async def seed_gateway(tmp_path, start_mta):
    import shutil
    import tempfile

    clientlist = tmp_path / "clientlist.txt"
    clientlist.write_text("# our clients\nclient1@customer.example, client2@customer.example\nbdewinter\n")
    # /file targets of the alias table are written as default_privs (nobody), as in Postfix
    spam = Path(tempfile.mkdtemp(prefix="trimail-spam-", dir="/tmp"))
    if os.geteuid() == 0:
        os.chown(spam, pwd.getpwnam("nobody").pw_uid, -1)
    spambucket = spam / "spambucket.txt"
    aliases = tmp_path / "aliases"
    aliases.write_text(SEED_ALIASES.format(clientlist=clientlist, spambucket=spambucket))
    assert trimail("postalias", str(aliases)).returncode == 0
    yield aliases, spambucket
    shutil.rmtree(spam, ignore_errors=True)


async def test_seed_alias_file_delivers_every_alias_where_it_points(tmp_path, start_mta, seed_gateway):
    aliases, spambucket = seed_gateway
    with Sink() as biscuit, Sink() as customers:
        srv = await start_mta(
            myhostname="gw.dogpeople.org", mydestination="$myhostname, $mydomain",
            alias_maps=f"hash:{aliases}", local_recipient_maps="$alias_maps",
            transport_maps=f"inline:{{ biscuit.stpaul.dogpeople.org=smtp:[127.0.0.1]:{biscuit.port}, "
                           f"customer.example=smtp:[127.0.0.1]:{customers.port} }}")
        for alias in ["postmaster", "mailer-daemon", "hostmaster", "root", "mailguys", "mick.bauer",
                      "clients", "spam-reports"]:
            await send(srv, "alice@client.example", [f"{alias}@dogpeople.org"], f"Subject: to {alias}\r\n\r\nx\r\n")
        await wait_empty(srv)
        spool = tmp_path / "queue" / "mailboxes"
        subjects = sorted(m["Subject"] for m in maildir_messages(spool, "bdewinter"))
        assert subjects == sorted(f"to {a}" for a in ["postmaster", "mailer-daemon", "hostmaster", "root",
                                                      "mailguys", "clients"])
        assert sorted(biscuit.recorder.recipients()) == ["mbauer@biscuit.stpaul.dogpeople.org"] * 2
        assert sorted(customers.recorder.recipients()) == ["client1@customer.example", "client2@customer.example"]
        assert b"Subject: to spam-reports" in spambucket.read_bytes()
        assert spambucket.read_bytes().startswith(b"From alice@client.example ")
        assert os.stat(spambucket).st_mode & 0o777 == 0o600
        if os.geteuid() == 0:
            assert os.stat(spambucket).st_uid == pwd.getpwnam("nobody").pw_uid


async def test_unknown_local_user_is_refused_at_rcpt(tmp_path, start_mta, seed_gateway):
    aliases, _ = seed_gateway
    srv = await start_mta(myhostname="gw.dogpeople.org", mydestination="$mydomain",
                          alias_maps=f"hash:{aliases}", local_recipient_maps="$alias_maps")

    def try_rcpt() -> tuple[int, bytes]:
        import smtplib

        with smtplib.SMTP("127.0.0.1", srv.addresses[0].port, timeout=30) as client:
            client.ehlo("x")
            client.mail("a@client.example")
            return client.rcpt("nobody@dogpeople.org")

    code, text = await trio.to_thread.run_sync(try_rcpt)
    assert (code, text) == (550, b"5.1.1 <nobody@dogpeople.org>: Recipient address rejected: "
                                 b"User unknown in local recipient table")


@pytest.mark.parametrize("aliases_text, include", [
    ("a: b\nb: c\nc: a\n", None),
    ("list: :include:{inc}\n", "list\n"),
], ids=["alias-loop", "self-include"])
async def test_alias_loops_bounce_instead_of_hanging(tmp_path, start_mta, aliases_text, include):
    inc = tmp_path / "inc.txt"
    if include:
        inc.write_text(f":include:{inc}\n")
    aliases = tmp_path / "aliases"
    aliases.write_text(aliases_text.format(inc=inc))
    assert trimail("postalias", str(aliases)).returncode == 0
    first = aliases_text.split(":")[0]
    with Sink() as senders:
        srv = await start_mta(alias_maps=f"hash:{aliases}",
                              transport_maps=f"inline:{{ client.example=smtp:[127.0.0.1]:{senders.port} }}")
        await send(srv, "alice@client.example", [f"{first}@mx.test.example"])
        await wait_empty(srv)
        _, recipients, _ = parse_dsn(senders.messages[0][2])
        assert recipients == [(f"rfc822; {first}@mx.test.example", "failed", "5.4.6")]


def test_sendmail_with_serve_down_then_delivered_when_it_starts(tmp_path, serve_process):
    with Sink() as sink:
        config_path = write_main_cf(tmp_path, master_service_disable="", relayhost=f"[127.0.0.1]:{sink.port}",
                                    myorigin="origin.example")
        result = subprocess.run(
            [sys.executable, "-m", "trimail", "sendmail", "-t", "-c", str(config_path)],
            input=b"Subject: x\nTo: to@far.example\nBcc: hidden@far.example\n\nbody\n", capture_output=True,
            timeout=60)
        assert result.returncode == 0, result.stderr
        [entry] = [m for m in __import__("json").loads(trimail("queue", "list", "--json", "-c",
                                                                   str(config_path)).stdout)]
        assert entry["state"] == "maildrop"
        assert sorted(r["address"] for r in entry["recipients"]) == ["hidden@far.example", "to@far.example"]
        proc = serve_process(config_path)
        proc.wait_log(r"removed")
        [(sender, rcpts, content)] = sink.messages
        assert sorted(rcpts) == ["hidden@far.example", "to@far.example"]
        message = email.message_from_bytes(content, policy=email.policy.default)
        assert message["Bcc"] is None
        assert message["From"] and message["Date"] and message["Message-ID"]
        assert sender.endswith("@origin.example")
        assert message.get_content().strip() == "body"
        assert proc.stop() == 0


@pytest.mark.parametrize("entry", ["trimail.entry", "trimail.cli"])
def test_sendmail_personality_through_a_link(tmp_path, entry):
    """The installed binary (trimail.entry) through a link named sendmail submits
    without loading the command line (cyclopts and every command: about 100 ms of
    each local submission); ``trimail.cli.main`` knows the personality too."""
    link = tmp_path / "sendmail"
    link.write_text(f"#!{sys.executable}\nimport sys\nfrom {entry} import main\nmain()\n")
    link.chmod(0o755)
    config_path = write_main_cf(tmp_path)
    result = subprocess.run([str(link), "-oi", "-f", "me@example.org", "-c", str(config_path), "you@example.com"],
                            input=b"Subject: via link\n\nhi\n.\nstill body\n", capture_output=True, timeout=60,
                            env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"})
    assert result.returncode == 0, result.stderr
    if entry == "trimail.entry":
        assert b"| cyclopts" not in result.stderr and b"trimail.cli" not in result.stderr
    listed = __import__("json").loads(trimail("queue", "list", "--json", "-c", str(config_path)).stdout)
    assert [(m["sender"], m["recipients"][0]["address"]) for m in listed] == [("me@example.org", "you@example.com")]


def test_sendmail_without_recipients_fails():
    result = subprocess.run([sys.executable, "-m", "trimail", "sendmail", "-t"], input=b"Subject: x\n\n",
                            capture_output=True, timeout=60)
    assert result.returncode != 0 and b"no recipient" in result.stderr


@pytest.mark.parametrize("address, expected", [
    ("joe@host.sub.example.com", "joe@example.com"),
    ("joe@example.com", "joe@example.com"),
    ("root@host.example.com", "root@host.example.com"),  # masquerade_exceptions = root
    ("joe@eng.keep.example.com", "joe@eng.keep.example.com"),  # !keep.example.com
    ("joe@other.example.net", "joe@other.example.net"),
])
def test_masquerade_domains_and_exceptions(address, expected):
    assert masquerade(address, ["!keep.example.com", "example.com"], ["root"]) == expected


def test_masquerade_classes_choose_headers(make_config):
    content = (b"From: Joe <joe@host.example.com>\r\nTo: ann@x.example.com,\r\n bob@y.example.com\r\n"
               b"Subject: joe@host.example.com\r\n\r\nbody joe@host.example.com\r\n")

    def masquerade_headers(classes: str) -> bytes:  # cleanup's header rewriting, local context
        config = make_config(masquerade_domains="example.com", masquerade_classes=classes)
        return header_rewriter(config, LOCAL)(content)

    both = masquerade_headers("header_sender, header_recipient")
    assert both == (b"From: Joe <joe@example.com>\r\nTo: ann@example.com,\r\n bob@example.com\r\n"
                    b"Subject: joe@host.example.com\r\n\r\nbody joe@host.example.com\r\n")
    senders_only = masquerade_headers("header_sender")
    assert b"To: ann@x.example.com" in senders_only and b"From: Joe <joe@example.com>" in senders_only


async def test_masquerading_applies_to_mail_leaving_the_host(start_mta):
    with Sink() as sink:
        srv = await start_mta(relayhost=f"[127.0.0.1]:{sink.port}", masquerade_domains="client.example",
                              masquerade_exceptions="root")
        await send(srv, "joe@host.client.example", ["ann@far.example"],
                   "From: joe@host.client.example\r\nTo: ann@far.example\r\n\r\nx\r\n")
        await send(srv, "root@host.client.example", ["ann@far.example"], "From: root@host.client.example\r\n\r\nx\r\n")
        await wait_empty(srv)
        senders = sorted(s for s, _, _ in sink.messages)
        assert senders == ["joe@client.example", "root@host.client.example"]
        assert any(b"From: joe@client.example\r\n" in c for _, _, c in sink.messages)


def test_virtual_alias_maps_rewrite_any_domain():
    table = open_table("inline:{ info@example.com=ann@example.net, @old.example=catch@new.example, "
                       "{ team@example.com = a@x.example, team@example.com } }")
    assert virtual_expand(["Info@example.com", "x@old.example", "team@example.com", "z@else.example"], [table]) == [
        "ann@example.net", "catch@new.example", "a@x.example", "team@example.com", "z@else.example"]


def test_local_parts_cannot_escape_the_mailbox_root(tmp_path):
    spool = tmp_path / "mailboxes"
    for bad in ["../etc", "a/b", "..", ".hidden", "x\x00y", "UPPER/../x"]:
        with pytest.raises(MailboxError):
            mailbox_path(spool, bad, "Maildir/")
    (tmp_path / "outside").mkdir()
    spool.mkdir()
    os.symlink(tmp_path / "outside", spool / "victim")
    with pytest.raises(MailboxError):
        mailbox_path(spool, "victim", "Maildir/")
    os.symlink(tmp_path / "outside" / "f", tmp_path / "link")
    with pytest.raises(OSError):
        deliver_mbox(tmp_path / "link", b"x\r\n", "a@b")
    assert list((tmp_path / "outside").iterdir()) == []


async def test_quoted_traversal_local_part_bounces_and_writes_nothing(tmp_path, start_mta):
    with Sink() as senders:
        srv = await start_mta(transport_maps=f"inline:{{ client.example=smtp:[127.0.0.1]:{senders.port} }}",
                              alias_maps="", local_recipient_maps="")  # every local name is accepted
        await send(srv, "alice@client.example", ['"../../../tmp/evil"@mx.test.example'])
        await wait_empty(srv)
        _, recipients, _ = parse_dsn(senders.messages[0][2])
        assert recipients[0][1:] == ("failed", "5.3.5")
    assert not (tmp_path / "queue" / "mailboxes").exists() or not any(
        "evil" in str(p) for p in (tmp_path / "queue").rglob("*"))


def test_alias_source_syntax(tmp_path):
    source = tmp_path / "aliases"
    source.write_text('# c\n"quoted name": a,\n  b\nPlain: |"/usr/bin/x y"\n')
    assert parse_alias_source(source) == [("quoted name", "a, b", 2), ("plain", '|"/usr/bin/x y"', 4)]
    expander = Expander([open_table("inline:{ list=a, { x = |/bin/cat } }")], rewrite.Settings(frozenset({"here.example"})))
    with pytest.raises(AliasError, match="allow_mail_to_commands"):
        expander.expand("x")


async def test_command_target_runs_without_shell_as_unprivileged_user(tmp_path, start_mta):
    import tempfile

    outdir = Path(tempfile.mkdtemp(prefix="trimail-pipe-"))
    try:
        outdir.chmod(0o777)
        aliases = tmp_path / "aliases"
        aliases.write_text(f'pipe: "|/usr/bin/tee {outdir / "got"}"\n')
        assert trimail("postalias", str(aliases)).returncode == 0
        srv = await start_mta(alias_maps=f"hash:{aliases}", allow_mail_to_commands="alias")
        await send(srv, "alice@client.example", ["pipe@mx.test.example"], "Subject: piped\r\n\r\nx\r\n")
        await wait_empty(srv)
        got = (outdir / "got").read_bytes()
        assert b"Subject: piped\n" in got and b"Delivered-To: pipe@mx.test.example\n" in got
        if os.geteuid() == 0:
            assert (outdir / "got").stat().st_uid != 0  # ran as mail_owner or nobody, not root
    finally:
        shutil.rmtree(outdir, ignore_errors=True)


async def test_mbox_delivery_when_home_mailbox_is_empty(tmp_path, start_mta):
    srv = await start_mta(alias_maps="", local_recipient_maps="", home_mailbox="")
    await send(srv, "alice@client.example", ["carol@mx.test.example"], "Subject: one\r\n\r\nFrom here on\r\n")
    await wait_empty(srv)
    mbox = (tmp_path / "queue" / "mailboxes" / "carol").read_bytes()
    assert mbox.startswith(b"From alice@client.example ")
    assert b"\n>From here on\n" in mbox and b"\r\n" not in mbox and mbox.endswith(b"\n\n")


async def test_delivered_to_loop_bounces(tmp_path, start_mta):
    with Sink() as senders:
        srv = await start_mta(alias_maps="", local_recipient_maps="",
                              transport_maps=f"inline:{{ client.example=smtp:[127.0.0.1]:{senders.port} }}")
        await send(srv, "alice@client.example", ["carol@mx.test.example"],
                   "Delivered-To: carol@mx.test.example\r\nSubject: loop\r\n\r\nx\r\n")
        await wait_empty(srv)
        _, recipients, _ = parse_dsn(senders.messages[0][2])
        assert recipients == [("rfc822; carol@mx.test.example", "failed", "5.4.6")]


def test_stale_alias_database_warns_in_check(tmp_path):
    aliases = tmp_path / "aliases"
    aliases.write_text("root: mick\n")
    config_path = write_main_cf(tmp_path, alias_maps=f"hash:{aliases}", alias_database=f"hash:{aliases}")
    missing = trimail("check", "-c", str(config_path))
    assert missing.returncode == 0 and "aliases.db does not exist; run trimail newaliases" in missing.stderr
    assert trimail("newaliases", "-c", str(config_path)).returncode == 0
    assert "warning" not in trimail("check", "-c", str(config_path)).stderr
    aliases.write_text("root: ann\n")
    os.utime(aliases, (2**31, 2**31))
    stale = trimail("check", "-c", str(config_path))
    assert "is older than source file" in stale.stderr


async def test_serve_notices_a_rebuilt_alias_database(tmp_path, start_mta, monkeypatch):
    monkeypatch.setattr("trimail.maps.RECHECK_SECONDS", 0)
    aliases = tmp_path / "aliases"
    aliases.write_text("boss: ann\n")
    assert trimail("postalias", str(aliases)).returncode == 0
    srv = await start_mta(alias_maps=f"hash:{aliases}", local_recipient_maps="$alias_maps")
    await send(srv, "a@client.example", ["boss@mx.test.example"], "Subject: first\r\n\r\nx\r\n")
    await wait_empty(srv)
    aliases.write_text("boss: bob\n")
    assert trimail("postalias", str(aliases)).returncode == 0
    db = tmp_path / "aliases.db"
    os.utime(db, ns=(db.stat().st_mtime_ns + 10**9,) * 2)
    await send(srv, "a@client.example", ["boss@mx.test.example"], "Subject: second\r\n\r\nx\r\n")
    await wait_empty(srv)
    spool = tmp_path / "queue" / "mailboxes"
    assert [m["Subject"] for m in maildir_messages(spool, "ann")] == ["first"]
    assert [m["Subject"] for m in maildir_messages(spool, "bob")] == ["second"]


async def test_list_mail_goes_out_with_the_owner_as_envelope_sender(tmp_path, start_mta):
    aliases = tmp_path / "aliases"
    aliases.write_text("staff: ann@far.example, bob@far.example\nowner-staff: ann\n")
    assert trimail("postalias", str(aliases)).returncode == 0
    with Sink() as sink:
        srv = await start_mta(alias_maps=f"hash:{aliases}", myorigin="gw.example",
                              transport_maps=f"inline:{{ far.example=smtp:[127.0.0.1]:{sink.port} }}")
        await send(srv, "alice@client.example", ["staff@mx.test.example"])
        await wait_empty(srv)
        [(sender, rcpts, content)] = sink.messages
        assert sender == "owner-staff@gw.example"
        assert sorted(rcpts) == ["ann@far.example", "bob@far.example"]
        assert b"Delivered-To: staff@mx.test.example\r\n" in content


async def test_envelope_recipient_class_masquerades_recipients(start_mta):
    with Sink() as sink:
        srv = await start_mta(relayhost=f"[127.0.0.1]:{sink.port}", masquerade_domains="far.example",
                              masquerade_classes="envelope_recipient")
        await send(srv, "joe@host.client.example", ["ann@eng.far.example"])
        await wait_empty(srv)
        [(sender, rcpts, _)] = sink.messages
        assert (sender, rcpts) == ("joe@host.client.example", ["ann@far.example"])

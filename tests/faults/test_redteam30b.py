"""Red team 30b: SIGHUP during a stop (a90fc18's SIGHUP task, e3d42e7's stop while
a reload runs), attacked on a real ``trimail serve``.  The rule: nothing outside one
SMTP session ends or wedges serve, a control command or signal does not lie.
Loopback only; each test under 20 s.  Found failing on a90fc18 (a helper's attack
on that session's fixes, 25 minutes).
"""

from __future__ import annotations

import signal
import socket

from tests.faults.conftest import connectable, wait_until
from tests.ports import free_port as _free_port


def _busy_session(port: int) -> socket.socket:
    """A session inside DATA (not idle): the stop's drain waits up to graceful_timeout for it."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    replies = sock.makefile("rb")
    replies.readline()
    for line in (b"EHLO c.example\r\n", b"MAIL FROM:<a@c.example>\r\n", b"RCPT TO:<r@far.example>\r\n",
                 b"DATA\r\n"):
        sock.sendall(line)
        while replies.readline()[3:4] == b"-":
            pass
    sock.sendall(b"Subject: x\r\n\r\npartial")
    return sock


def test_a_sighup_during_the_stop_opens_no_new_listener_single_process(daemon):
    """``smtpd_workers = 0``: serve is stopping (SIGTERM; a session in DATA holds the
    drain for graceful_timeout), main.cf now names one more smtpd_listen address, and
    a SIGHUP comes (a config-management run, a logrotate hook).  The master with
    workers says "reload ignored: serve is stopping"; the single process reloads
    anyway: ``service.Server.reload`` binds the new address (``open_listeners``),
    then ``start_listening`` fails on the closed accepting nursery ("reload on SIGHUP
    failed: RuntimeError: Nursery is closed to new arrivals").  The bound listener
    is left open for the rest of the drain: clients connect (the kernel completes the
    handshake into its backlog) and nobody ever greets them -- a port that says serve
    is there while it is going away, and half a reload applied (``self.listening``
    changed, the rest not).  Same on a90fc18^ (the SIGHUP task did not add it)."""
    d = daemon(smtpd_workers=0, master_service_disable="qmgr", graceful_timeout="8s")
    busy = _busy_session(d.port)
    try:
        d.proc.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: not connectable(d.port), timeout=5)  # draining: its listeners are closed
        extra = _free_port("127.0.0.1")
        text = d.config_path.read_text().replace("smtpd_listen = 127.0.0.1:0",
                                                 f"smtpd_listen = 127.0.0.1:0, 127.0.0.1:{extra}")
        d.config_path.write_text(text)
        d.proc.proc.send_signal(signal.SIGHUP)
        # the reload's outcome, whatever it is (found: "reload on SIGHUP failed: RuntimeError: ...")
        outcome = d.proc.wait_log(r"reload (refused|ignored|cancelled|--)|reload on SIGHUP failed", timeout=10)
        # said at info level, as the master with workers says it (it was an error line here)
        assert "reload ignored: serve is stopping" in outcome and "error" not in outcome, outcome
        assert not connectable(extra), (f"a reload during the stop bound 127.0.0.1:{extra}, where connections are "
                                     "accepted and never greeted; log:\n" + "\n".join(d.proc.log[-5:]))
    finally:
        busy.close()
        d.proc.proc.wait(timeout=15)

"""``scripts/bench --mode testmta``: trimail.testing's cost beside the usual choices.

Three figures, each for ``trimail.testing.TestMTA``, aiosmtpd's ``Controller`` (with
a handler that keeps the messages in a list) and smtpdfix's ``SMTPDFix``, in this
process, alternating between them run by run:

- ``start_stop``: ``with X: pass``, an MTA started and stopped;
- ``tls_auth_start_stop``: the same with STARTTLS and AUTH configured (a
  certificate made once beforehand for the other two, as their fixtures do; the
  test MTA makes its own test CA once per process);
- ``capture_100``: 100 messages sent by smtplib over one connection, from the
  connect until all 100 are captured (the MTA's start and stop not included).

Each figure is the median of ``--runs`` runs (at least 10), with min and max, and
the ratio of the medians trimail / aiosmtpd.  The first run of each is a warm-up
(imports, the test CA) and is not counted.  The machine should be quiet: these are
milliseconds.  Prints a table; ``--json`` also writes the figures.
"""

from __future__ import annotations

import contextlib
import os
import smtplib
import socket
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

USER, PASSWORD = "app", "secret"
MESSAGE = "Subject: bench\r\n\r\nHello\r\n"
CONTESTANTS = ("trimail", "aiosmtpd", "smtpdfix")
FIGURES = ("start_stop", "tls_auth_start_stop", "capture_100")
LABELS = {"start_stop": "start + stop", "tls_auth_start_stop": "start + stop, STARTTLS and AUTH",
          "capture_100": "100 messages captured (one connection)",
          "trimail": "trimail.testing", "aiosmtpd": "aiosmtpd Controller", "smtpdfix": "smtpdfix"}


HOST = "127.0.0.1"  # where every contestant listens (the tests use another loopback address)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class Certificate:
    """One server certificate for aiosmtpd and smtpdfix, made before any timing."""

    def __init__(self, directory: Path) -> None:
        import trustme

        ca = trustme.CA()
        self.file = directory / "server.pem"
        ca.issue_cert(HOST, "localhost").private_key_and_cert_chain_pem.write_to_path(str(self.file))
        self.ca = ca

    def client_context(self) -> Any:
        import ssl

        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context


# -- each contestant: a context manager yielding Running -----------------------------------

class Running:
    """A started contestant: where it listens, how many messages it has, and a client
    TLS context that trusts its certificate."""

    def __init__(self, host: str, port: int, captured: Callable[[], int], client_context: Callable[[], Any]) -> None:
        self.host, self.port, self.captured, self.client_context = host, port, captured, client_context


@contextlib.contextmanager
def trimail(tls_auth: bool, certificate: Certificate) -> Iterator[Running]:
    from trimail.testing import TestMTA

    options: dict[str, Any] = {"tls": True, "auth": {USER: PASSWORD}} if tls_auth else {}
    with TestMTA(smtpd_listen=f"{HOST}:0", **options) as mta:
        yield Running(mta.host, mta.port, lambda: len(mta.messages), mta.ssl_context)


@contextlib.contextmanager
def aiosmtpd(tls_auth: bool, certificate: Certificate) -> Iterator[Running]:
    import ssl

    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult

    class Keep:
        def __init__(self) -> None:
            self.messages: list[bytes] = []

        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            self.messages.append(envelope.original_content)
            return "250 OK"

    def authenticate(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        return AuthResult(success=(data.login, data.password) == (USER.encode(), PASSWORD.encode()))

    handler = Keep()
    kwargs: dict[str, Any] = {}
    if tls_auth:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(certificate.file))
        kwargs = {"tls_context": context, "authenticator": authenticate, "auth_require_tls": True}
    controller = Controller(handler, hostname=HOST, port=free_port(), **kwargs)
    controller.start()
    try:
        yield Running(HOST, controller.port, lambda: len(handler.messages), certificate.client_context)
    finally:
        controller.stop()


@contextlib.contextmanager
def smtpdfix(tls_auth: bool, certificate: Certificate) -> Iterator[Running]:
    from smtpdfix import Config, SMTPDFix

    config = Config()
    config.login_username, config.login_password = USER, PASSWORD
    if tls_auth:
        config.ssl_cert_files = (str(certificate.file), None)
        config.use_starttls = True
        config.enforce_auth = True
    with SMTPDFix(hostname=HOST, port=free_port(), config=config) as controller:
        yield Running(HOST, controller.port, lambda: len(controller.messages), certificate.client_context)


MTAS: dict[str, Callable[..., Any]] = {"trimail": trimail, "aiosmtpd": aiosmtpd, "smtpdfix": smtpdfix}


# -- the three measurements ---------------------------------------------------------------

def start_stop(name: str, certificate: Certificate, tls_auth: bool = False) -> float:
    began = time.perf_counter()
    with MTAS[name](tls_auth, certificate):
        pass
    return time.perf_counter() - began


def capture_100(name: str, certificate: Certificate) -> float:
    with MTAS[name](False, certificate) as mta:
        began = time.perf_counter()
        with smtplib.SMTP(mta.host, mta.port, timeout=30) as client:
            for number in range(100):
                client.sendmail("app@example.org", [f"user{number}@example.com"], MESSAGE)
        deadline = time.monotonic() + 30
        while mta.captured() < 100:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: only {mta.captured()} of 100 messages captured in 30 s")
            time.sleep(0.0005)
        return time.perf_counter() - began


def check_tls_auth(name: str, certificate: Certificate) -> None:
    """Once, untimed: each contestant really speaks STARTTLS and AUTH as configured."""
    with MTAS[name](True, certificate) as mta:
        with smtplib.SMTP(mta.host, mta.port, timeout=30) as client:
            client.starttls(context=mta.client_context())
            client.login(USER, PASSWORD)
            client.sendmail("app@example.org", ["ann@example.com"], MESSAGE)
        if mta.captured() != 1:
            raise RuntimeError(f"{name}: the message sent with STARTTLS and AUTH was not captured")


def summary(samples: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(samples) * 1000, "min_ms": min(samples) * 1000,
            "max_ms": max(samples) * 1000}


def bench_test_mtas(runs: int, contestants: tuple[str, ...] = CONTESTANTS) -> dict:
    """Measure, print the table, return the figures (``runs`` per figure and contestant)."""
    warnings.filterwarnings("ignore", message="Session.login_data is deprecated")  # smtpdfix's, not ours
    measures: dict[str, Callable[[str, Certificate], float]] = {
        "start_stop": start_stop,
        "tls_auth_start_stop": lambda name, certificate: start_stop(name, certificate, tls_auth=True),
        "capture_100": capture_100,
    }
    samples: dict[str, dict[str, list[float]]] = {figure: {name: [] for name in contestants} for figure in FIGURES}
    with tempfile.TemporaryDirectory(prefix="bench-testmta-") as directory:
        certificate = Certificate(Path(directory))
        os.environ.setdefault("SMTPD_SSL_CERTIFICATE_FILE", str(certificate.file))  # smtpdfix's Config reads it
        for name in contestants:
            check_tls_auth(name, certificate)
            for measure in measures.values():  # warm-up: imports, first-use costs
                measure(name, certificate)
        for _ in range(runs):
            for figure, measure in measures.items():
                for name in contestants:
                    samples[figure][name].append(measure(name, certificate))
    figures: dict[str, Any] = {"runs": runs, "unit": "ms", "figures": {}}
    for figure in FIGURES:
        row = {name: summary(samples[figure][name]) for name in contestants}
        if "trimail" in row and "aiosmtpd" in row:
            row["ratio_trimail_aiosmtpd"] = row["trimail"]["median_ms"] / row["aiosmtpd"]["median_ms"]
        figures["figures"][figure] = row
    print(table(figures, contestants))
    return figures


def table(figures: dict[str, Any], contestants: tuple[str, ...] = CONTESTANTS) -> str:
    """Markdown: one row per figure, the median (min-max) of each contestant."""
    header = ["", *(LABELS[name] for name in contestants)]
    ratio = "trimail" in contestants and "aiosmtpd" in contestants
    if ratio:
        header.append("trimail / aiosmtpd")
    lines = [f"medians of {figures['runs']} runs, ms (min-max)", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for figure, row in figures["figures"].items():
        cells = [LABELS[figure]]
        cells += [f"{row[name]['median_ms']:.1f} ({row[name]['min_ms']:.1f}-{row[name]['max_ms']:.1f})"
                  for name in contestants]
        if ratio:
            cells.append(f"{row['ratio_trimail_aiosmtpd']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)

"""``trimail dkim keygen DOMAIN SELECTOR``: a new DKIM signing key, as opendkim-genkey
makes one: the private key in ``DIRECTORY/SELECTOR.private`` (mode 0600, never
over an existing file) and the DNS TXT record to publish, printed as a zone file
line and written to ``DIRECTORY/SELECTOR.txt``; then a dkim_key_table line.

Parameters: none read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from cyclopts import App, Parameter

from trimail.cli import Failure, app

dkim_app = App(name="dkim", help="DKIM signing keys (dkim_signing_table, dkim_key_table).")
app.command(dkim_app)


@dkim_app.command(name="keygen")
def keygen(domain: str, selector: str, *,
           type: Annotated[Literal["rsa", "ed25519"], Parameter(name=["--type", "-t"])] = "rsa",
           bits: Annotated[int, Parameter(name=["--bits", "-b"])] = 2048,
           directory: Annotated[str, Parameter(name=["--directory", "-D"])] = ".") -> None:
    """Write a new private key to DIRECTORY/SELECTOR.private (mode 0600) and print
    the DNS TXT record to publish at SELECTOR._domainkey.DOMAIN."""
    # here, not at the top: dkimpy and dnspython cost every other command 80 ms to import
    from trimail.authcheck.signing import dns_txt_zone_line, generate_key, public_record

    domain = domain.lower().rstrip(".")
    if not domain or "/" in selector or not selector or selector.startswith("."):
        raise Failure(f"bad domain or selector: {domain!r} {selector!r}")
    if type == "rsa" and not 1024 <= bits <= 8192:
        raise Failure(f"--bits {bits}: use 1024 to 8192 (2048 is the usual size; RFC 8301 refuses less than 1024)")
    pem = generate_key(type, bits)
    path = Path(directory) / f"{selector}.private"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise Failure(f"{path} exists already: choose another selector or remove it") from None
    except OSError as exc:
        raise Failure(f"cannot create {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    line = dns_txt_zone_line(selector, domain, public_record(pem))
    try:
        (Path(directory) / f"{selector}.txt").write_text(line + "\n")
    except OSError as exc:
        raise Failure(f"cannot write {Path(directory) / f'{selector}.txt'}: {exc.strerror or exc}") from None
    print(line)
    print(f"# dkim_key_table entry:  {selector}._domainkey.{domain}  {domain}:{selector}:{path.resolve()}")

"""The web page of ``trimail catch`` in a real browser (headless Chromium, Debian's
``chromium``): the list shows the captured subjects, one message shows its HTML in
a sandboxed frame (no script runs, nothing is fetched from outside), its text,
header fields and raw source; screenshots are taken and checked (the PNG has the
window's size and is not one flat colour)."""

from __future__ import annotations

import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from tests.catch.conftest import message

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")

HOSTILE_HTML = ("<h1 style='color:#c00'>Your invoice</h1><p>Pay <b>now</b> "
                "<img src='https://tracker.invalid/p.gif'>"
                "<script>parent.document.body.innerHTML='pwned'</script></p>")


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               f"--user-data-dir={tmp_path / 'profile'}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def _png_pixels(path: Path) -> tuple[int, int, set[bytes]]:
    """Width, height and the set of distinct pixels of an 8-bit RGB(A) PNG (a small
    decoder: zlib and the five row filters)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    at, idat, header = 8, b"", None
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        chunk = data[at + 8:at + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        at += 12 + length
    assert header is not None
    width, height, depth, colour = header[:4]
    assert depth == 8 and colour in (2, 6)
    size = 3 if colour == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * size
    previous = bytearray(stride)
    seen: set[bytes] = set()
    for row in range(height):
        kind = raw[row * (stride + 1)]
        line = bytearray(raw[row * (stride + 1) + 1:(row + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - size] if i >= size else 0
            up = previous[i]
            corner = previous[i - size] if i >= size else 0
            if kind == 1:
                line[i] = (line[i] + left) & 255
            elif kind == 2:
                line[i] = (line[i] + up) & 255
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 255
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 255
        if row % 8 == 0:  # every eighth row is plenty to tell a page from a blank
            seen.update(bytes(line[i:i + size]) for i in range(0, stride, size * 4))
        previous = line
    return width, height, seen


@pytest.fixture(scope="module")
def mailbox(shared_catch):
    shared_catch.request("DELETE", "/api/v1/messages")
    shared_catch.send(message("Reset your password", text="Your code is 424242\n"))
    shared_catch.send(message("Weekly newsletter"))
    shared_catch.send(message("Invoice due", text="see the HTML\n", html=HOSTILE_HTML,
                              attachments=[("invoice.pdf", "application/pdf", b"%PDF-1.4")]))
    shared_catch.wait_for(3)
    return shared_catch


def test_the_list_shows_every_subject_in_the_browser(mailbox, tmp_path):
    done = _chromium(tmp_path, "--dump-dom", mailbox.base + "/")
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    for subject in ("Reset your password", "Weekly newsletter", "Invoice due"):
        assert subject in dom
    assert "3 message(s)" in dom


def test_the_list_pages_with_start_and_limit_as_mailpits_does(mailbox, tmp_path):
    dom = _chromium(tmp_path, "--dump-dom", mailbox.base + "/?limit=2").stdout
    assert "Invoice due" in dom and "Weekly newsletter" in dom and "Reset your password" not in dom
    assert "1-2 of 3" in dom and 'href="/?start=2&amp;limit=2"' in dom
    dom = _chromium(tmp_path, "--dump-dom", mailbox.base + "/?start=2&limit=2").stdout
    assert "Reset your password" in dom and "Invoice due" not in dom
    assert "3-3 of 3" in dom and 'href="/?limit=2"' in dom


def test_search_box_filters_the_list(mailbox, tmp_path):
    dom = _chromium(tmp_path, "--dump-dom", mailbox.base + "/?query=subject%3Ainvoice").stdout
    assert "Invoice due" in dom and "Weekly newsletter" not in dom


def test_one_message_shows_html_sandboxed_text_headers_and_raw(mailbox, tmp_path):
    [found] = mailbox.json("/api/v1/search?query=subject:invoice")["messages"]
    done = _chromium(tmp_path, "--dump-dom", f"{mailbox.base}/view/{found['ID']}")
    dom = done.stdout
    assert "pwned" not in dom.split("<section id=\"raw\">")[0]  # the message's script ran nowhere
    assert '<iframe sandbox=""' in dom and f'src="/view/{found["ID"]}.html"' in dom
    assert "see the HTML" in dom and "invoice.pdf" in dom
    assert "Message-Id" in dom and "&lt;Invoice.due@example.org&gt;" in dom
    status, headers, body = mailbox.request("GET", f"/view/{found['ID']}.html")
    assert status == 200 and b"Your invoice" in body
    assert headers["Content-Security-Policy"].startswith("sandbox;") and "default-src 'none'" in \
        headers["Content-Security-Policy"]
    page_csp = mailbox.request("GET", "/")[1]["Content-Security-Policy"]
    assert "script-src" not in page_csp and "default-src 'none'" in page_csp


@pytest.mark.parametrize(("path", "size"), [("/", (1200, 700)), ("message", (1000, 1400))])
def test_screenshots_are_the_window_size_and_not_blank(mailbox, tmp_path, path, size):
    if path == "message":
        path = "/view/" + mailbox.json("/api/v1/search?query=subject:invoice")["messages"][0]["ID"]
    shot = tmp_path / "shot.png"
    done = _chromium(tmp_path, f"--screenshot={shot}", f"--window-size={size[0]},{size[1]}", mailbox.base + path)
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    width, height, colours = _png_pixels(shot)
    assert (width, height) == size
    assert len(colours) > 20  # text, header bar, table lines: far from one flat colour

"""The CLI's side of the control socket: it trusts nothing a process posing as serve
answers (the socket lives in mail_owner's directory)."""

from __future__ import annotations

import os
import socket
import threading
import time

from trimail.net.control import CONTROL_NAME, MAX_ANSWER, send_command


def test_an_answer_without_end_is_cut_at_max_answer(tmp_path):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(tmp_path / CONTROL_NAME))
    server.listen(1)
    stop = threading.Event()

    def stream_forever():
        conn, _ = server.accept()
        with conn:
            conn.recv(100)
            try:
                while not stop.is_set():
                    conn.sendall(b"x" * 65536)
            except OSError:
                return

    thread = threading.Thread(target=stream_forever, daemon=True)
    thread.start()
    try:
        answer = send_command(tmp_path, "status", timeout=5)
    finally:
        stop.set()
        server.close()
    assert answer is not None and len(answer) <= MAX_ANSWER


def test_a_symlink_planted_as_the_control_socket_is_not_followed(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(elsewhere / "sock"))
    server.listen(1)
    server.settimeout(0.5)
    queue = tmp_path / "queue"
    queue.mkdir()
    os.symlink(elsewhere / "sock", queue / CONTROL_NAME)
    try:
        started = time.monotonic()
        assert send_command(queue, "status", timeout=2) is None
        try:
            server.accept()
            connected = True
        except TimeoutError:
            connected = False
        assert not connected, "the CLI connected through the symlink"
        assert time.monotonic() - started < 5
    finally:
        server.close()


async def test_a_queue_directory_deeper_than_a_socket_address_still_has_its_control_socket(tmp_path):
    """A queue under a deep $TMPDIR (pytest's tmp_path under xdist, macOS's /var/folders)
    makes queue/control longer than the 107 bytes of a UNIX socket address: serve binds
    it all the same, and the CLI reaches it."""
    import trio

    from trimail.net.control import open_control_listener, serve_control

    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    assert len(os.fsencode(deep / CONTROL_NAME)) > 107
    listener = await open_control_listener(deep)
    assert (deep / CONTROL_NAME).is_socket()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_control, listener, {"ping": lambda: "pong"})
        answer = await trio.to_thread.run_sync(send_command, deep, "ping")
        nursery.cancel_scope.cancel()
    assert answer == "pong"

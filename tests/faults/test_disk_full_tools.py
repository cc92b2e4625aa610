"""The operator's queue tools on a full queue file system (found by a red team on
646ad3d): ``trimail queue delete`` ended in a traceback (``apsw.FullError``).  A
change the file system has no room for is one ``fatal:`` line and exit status 1,
and the same command works once there is room again.

The queue directory is a real 4 MiB tmpfs, filled to the last byte while serve runs.
"""

from __future__ import annotations

from tests.faults.conftest import NEEDS_TMPFS, fill, integrity_ok, send, trimail_cmd

pytestmark = NEEDS_TMPFS


def test_queue_delete_on_a_full_file_system_says_so_in_one_line_and_works_once_there_is_room(
        daemon, small_queue) -> None:
    served = daemon(master_service_disable="qmgr", queue_directory=str(small_queue), message_size_limit="100000")
    queue_ids = [send(served.port, [f"r{n}@example.com"]) for n in range(2)]
    filler = fill(small_queue, leave=0)

    full = trimail_cmd("queue", "delete", queue_ids[0], "-c", str(served.config_path))
    assert full.returncode == 1, (full.stdout, full.stderr)
    assert "Traceback" not in full.stderr, full.stderr
    assert full.stderr.startswith("trimail: fatal: queue file system full"), full.stderr
    assert full.stderr.count("\n") == 1, full.stderr

    filler.unlink()
    deleted = trimail_cmd("queue", "delete", queue_ids[0], "-c", str(served.config_path))
    assert deleted.returncode == 0, deleted.stderr
    listed = trimail_cmd("queue", "list", "--json", "-c", str(served.config_path))
    assert queue_ids[0] not in listed.stdout and queue_ids[1] in listed.stdout, listed.stdout
    assert integrity_ok(small_queue) == "ok"

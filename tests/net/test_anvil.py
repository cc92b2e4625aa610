"""trimail.anvil: stress from a shortage of descriptors (EMFILE at accept), with
its hysteresis: on at once, off once this process holds under half the sessions
it held when it ran out (and the session total is low)."""

from __future__ import annotations

from trimail import config as configuration
from trimail.anvil import Anvil


def test_running_out_of_descriptors_is_stress_until_half_the_sessions_are_gone() -> None:
    anvil = Anvil(configuration.load(None, ["smtpd_process_limit=1000", "smtpd_stress_threshold=80"]))
    for n in range(10):
        assert anvil.opened(f"192.0.2.{n}") is None  # far below 800 sessions: no stress
    assert anvil.out_of_descriptors() is True
    assert anvil.stress and anvil.out_of_descriptors() is None  # on already: said once
    for n in range(5):
        assert anvil.closed(f"192.0.2.{n}") is None  # 5 left: not under half of 10 yet
    assert anvil.stress
    assert anvil.closed("192.0.2.5") is False  # 4 left
    assert not anvil.stress and anvil.short_at == 0


def test_without_a_shortage_stress_follows_the_session_total_only() -> None:
    anvil = Anvil(configuration.load(None, ["smtpd_process_limit=10", "smtpd_stress_threshold=80"]))
    changes = [anvil.opened(f"192.0.2.{n}") for n in range(8)]
    assert changes[-1] is True and changes[:-1] == [None] * 7
    changes = [anvil.closed(f"192.0.2.{n}") for n in range(8)]
    assert changes == [None, None, None, None, False, None, None, None]  # under 4 (half of 8): off


def test_running_out_of_descriptors_without_a_session_is_no_stress() -> None:
    """Nothing to cut: stress went on at each retry of the accept and off at once."""
    anvil = Anvil(configuration.load(None, ["smtpd_process_limit=1000", "smtpd_stress_threshold=80"]))
    assert anvil.out_of_descriptors() is None
    assert not anvil.stress and anvil.restate() is None

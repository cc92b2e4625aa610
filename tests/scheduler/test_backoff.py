import random

from hypothesis import given
from hypothesis import strategies as st

from trimail.scheduler.backoff import retry_delay


def test_backoff_doubles_from_minimal_to_maximal():
    rand = random.Random(1)
    delays = [retry_delay(n, 300, 4000, rand) for n in range(1, 8)]
    assert 270 <= delays[0] <= 330
    assert 540 <= delays[1] <= 660
    assert 1080 <= delays[2] <= 1320
    assert all(3600 <= d <= 4400 for d in delays[4:])


@given(attempts=st.integers(min_value=0, max_value=10_000), minimal=st.floats(1, 1e4), factor=st.floats(1, 100))
def test_backoff_stays_within_bounds(attempts, minimal, factor):
    maximal = minimal * factor
    delay = retry_delay(attempts, minimal, maximal)
    assert minimal * 0.9 <= delay <= maximal * 1.1

import random

from hypothesis import given
from hypothesis import strategies as st

from trimail.scheduler.backoff import retry_delay


class Fixed(random.Random):
    """A random source whose uniform() always returns one end of the range."""

    def __init__(self, end: str):
        super().__init__(0)
        self.end = end

    def uniform(self, a: float, b: float) -> float:
        return a if self.end == "low" else b


def test_backoff_doubles_from_minimal_to_maximal():
    rand = random.Random(1)
    delays = [retry_delay(n, 300, 4000, rand) for n in range(1, 8)]
    assert 300 <= delays[0] <= 330
    assert 540 <= delays[1] <= 660
    assert 1080 <= delays[2] <= 1320
    assert all(3600 <= d <= 4000 for d in delays[4:])


def test_jitter_never_retries_before_minimal_nor_after_maximal_backoff_time():
    assert retry_delay(1, 300, 4000, Fixed("low")) == 300  # 270 before the fix
    assert retry_delay(2, 300, 4000, Fixed("low")) == 540  # jitter still spreads later retries
    assert retry_delay(10, 300, 4000, Fixed("high")) == 4000  # 4400 before the fix
    assert retry_delay(10, 300, 4000, Fixed("low")) == 3600


def test_minimal_above_maximal_gives_minimal_as_postfix_does():
    assert retry_delay(3, 500, 100, Fixed("low")) == retry_delay(3, 500, 100, Fixed("high")) == 500


@given(attempts=st.integers(min_value=-5, max_value=10_000), minimal=st.floats(1, 1e6),
       factor=st.floats(1, 1000), draw=st.floats(0, 1))
def test_backoff_stays_within_minimal_and_maximal(attempts, minimal, factor, draw):
    maximal = minimal * factor

    class Drawn(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return a + (b - a) * draw

    delay = retry_delay(attempts, minimal, maximal, Drawn(0))
    assert minimal <= delay <= maximal


@given(attempts=st.integers(min_value=1, max_value=200), seed=st.integers(0, 2**32))
def test_backoff_with_the_real_random_source_stays_within_bounds(attempts, seed):
    delay = retry_delay(attempts, 300, 4000, random.Random(seed))
    assert 300 <= delay <= 4000

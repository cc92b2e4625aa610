"""The files generated from the parameter registry are committed up to date."""

from __future__ import annotations

import pytest

from trimail.config import generate


@pytest.mark.parametrize("relative", sorted(generate.GENERATED))
def test_generated_file_is_current(relative):
    committed = (generate.ROOT / relative).read_text(encoding="utf-8")
    assert committed == generate.GENERATED[relative](), f"run: python -m trimail.config.generate ({relative})"


def test_parameter_table_has_a_row_per_parameter():
    from trimail.config.registry import PARAMETERS

    table = generate.parameter_table()
    for name, param in PARAMETERS.items():
        assert f"| `{name}` |" in table and f"| {param.origin} |" in table

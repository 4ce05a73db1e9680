"""statelesslb-demo refuses what it cannot run before it starts anything."""

from __future__ import annotations

import pytest

from statelesslb.sandbox import demo


@pytest.mark.parametrize("value", ["0", "-3", "35537", "ten", "1.5"])
def test_connection_counts_it_cannot_open_are_usage_errors(value, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        demo.main(["--connections", value])
    assert exit_.value.code == 2
    assert "--connections" in capsys.readouterr().err


@pytest.mark.parametrize("value, count", [("1", 1), ("35536", 35536)])
def test_connection_count_bounds(value, count) -> None:
    assert demo.connection_count(value) == count
    assert demo.FIRST_SPORT + count - 1 <= 65535     # one client source port each

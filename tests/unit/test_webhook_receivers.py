"""The webhook backlog's receiver label stays bounded: the top N hosts by name, the rest as "other"."""

from __future__ import annotations

from api.services.fleet import OTHER_RECEIVERS, _by_receiver


def test_the_top_receivers_are_named_and_the_rest_summed_as_other() -> None:
    rows = [(f"host{i}.example", i + 1, float(10 * i)) for i in range(12)]  # host11 has the most waiting
    backlog, ages = _by_receiver(rows, top=10)
    assert len(backlog) == 11 and set(backlog) == set(ages)
    assert "host0.example" not in backlog and "host1.example" not in backlog and "host11.example" in backlog
    assert backlog[OTHER_RECEIVERS] == 1 + 2 and ages[OTHER_RECEIVERS] == 10.0  # the two smallest, the older age
    assert sum(backlog.values()) == sum(count for _, count, _ in rows)


def test_other_is_always_there_and_never_a_host_of_that_name() -> None:
    assert _by_receiver([], top=10) == ({OTHER_RECEIVERS: 0}, {OTHER_RECEIVERS: 0.0})
    backlog, _ = _by_receiver([("other", 5, 1.0), (None, 2, 3.0), ("a.example", 1, 2.0)], top=10)
    assert backlog == {OTHER_RECEIVERS: 7, "a.example": 1}

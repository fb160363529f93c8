"""Pool decisions are pure functions of a snapshot and `now`."""

from __future__ import annotations

from sidecar.pool import ConnView, choose, idle


def _conn(index: int, active: int, *, can_open: bool = True, last: float = 0.0) -> ConnView:
    return ConnView(index, can_open, active, last)


def test_streams_pack_onto_the_busiest_connection_with_room() -> None:
    conns = [_conn(0, 3), _conn(1, 40), _conn(2, 100, can_open=False)]
    assert choose(conns, waiting=0, connecting=0, max_streams=100) == ("use", 1)


def test_a_new_connection_is_dialled_only_when_every_one_is_saturated() -> None:
    full = [_conn(0, 100, can_open=False)]
    assert choose(full, waiting=0, connecting=0, max_streams=100) == ("dial", 0)
    assert choose([], waiting=0, connecting=0, max_streams=100) == ("dial", 0)


def test_streams_wait_for_a_dial_in_flight_until_it_cannot_absorb_them() -> None:
    assert choose([], waiting=1, connecting=1, max_streams=100) == ("wait", 0)
    assert choose([], waiting=99, connecting=1, max_streams=100) == ("wait", 0)
    assert choose([], waiting=100, connecting=1, max_streams=100) == ("dial", 0)


def test_a_thousand_streams_need_ceil_n_over_max_dials() -> None:
    conns: list[ConnView] = []
    dials = 0
    for _ in range(1000):
        action, index = choose(conns, 0, 0, 100)
        if action == "dial":
            dials += 1
            conns.append(_conn(len(conns), 0))
            index = len(conns) - 1
        view = conns[index]
        conns[index] = _conn(index, view.active + 1, can_open=view.active + 1 < 100)
    assert dials == 10


def test_only_connections_without_streams_past_the_idle_timeout_are_closed() -> None:
    conns = [_conn(0, 0, last=0.0), _conn(1, 2, last=0.0), _conn(2, 0, last=55.0)]
    assert idle(conns, now=60.0, idle_timeout=60.0) == [0]

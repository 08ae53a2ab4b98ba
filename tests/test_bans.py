"""The ban list: bans grow with repeated failures, expire, and are forgotten on success."""

from __future__ import annotations

import pytest

from swarm.coordinator.bans import BanList
from swarm.errors import ConfigError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bans_double_up_to_the_limit_and_expire() -> None:
    clock = Clock()
    bans = BanList(base=2.0, limit=10.0, clock=clock)
    assert [bans.ban("a") for _ in range(5)] == [2.0, 4.0, 8.0, 10.0, 10.0]
    assert bans.banned() == {"a"}
    clock.now += 9.9
    assert bans.banned() == {"a"}
    clock.now += 0.2
    assert bans.banned() == frozenset()


def test_success_forgives_and_peers_are_independent() -> None:
    clock = Clock()
    bans = BanList(base=1.0, limit=60.0, clock=clock)
    bans.ban("a")
    bans.ban("a")
    bans.ban("b")
    assert bans.banned() == {"a", "b"}
    bans.forgive("a")
    assert bans.banned() == {"b"}
    assert bans.ban("a") == 1.0  # starts over


def test_bad_settings_are_refused_with_the_numbers() -> None:
    with pytest.raises(ConfigError, match=r"base=5\.0, limit=1\.0"):
        BanList(base=5.0, limit=1.0)

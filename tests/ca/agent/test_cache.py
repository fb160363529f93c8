"""The sans-I/O SVID cache and rotation schedule: ``now`` and the RNG are passed in."""

from __future__ import annotations

import datetime as dt
import random

import pytest

from ca import KeyAlgorithm, generate_private_key
from ca.agent.backoff import Backoff
from ca.agent.cache import JwtCache, SvidCache, rotation_time
from ca.api import JwtSvidToken
from ca.spiffeid import SpiffeId
from tests.ca.agent.conftest import WEB, LiveCa, entry

T0 = dt.datetime(2026, 11, 26, 22, 0, tzinfo=dt.UTC)


def _issue(ca: LiveCa, cache: SvidCache, entry_id: str, now: dt.datetime, ttl: float) -> None:
    e = cache.entries[entry_id]
    key = generate_private_key(KeyAlgorithm.P256)
    svid = ca.intermediate.issue_x509_svid(
        e.spiffe_id, key.public_key(), now=now, ttl=dt.timedelta(seconds=ttl)
    )
    cache.store(entry_id, svid.chain, key, now=now)


def test_rotation_is_at_half_life_within_the_jitter_band() -> None:
    rng = random.Random(7)
    lifetime = dt.timedelta(hours=1)
    times = [rotation_time(T0, T0 + lifetime, rng, 0.1) for _ in range(500)]
    assert all(T0 + lifetime * 0.4 <= t <= T0 + lifetime * 0.6 for t in times)
    # Jitter actually spreads a herd: 500 SVIDs issued together do not rotate together.
    assert len({t.replace(microsecond=0) for t in times}) > 100


def test_rotation_without_jitter_is_exactly_half_life() -> None:
    assert rotation_time(T0, T0 + dt.timedelta(hours=2), random.Random(), 0) == T0 + dt.timedelta(
        hours=1
    )


def test_a_new_entry_is_due_and_a_fresh_svid_is_not(live_ca: LiveCa) -> None:
    cache = SvidCache(random.Random(1))
    assert cache.set_entries([entry(entry_id="web")])
    assert [e.entry_id for e in cache.due(T0)] == ["web"]
    _issue(live_ca, cache, "web", T0, 3600)
    assert cache.due(T0 + dt.timedelta(minutes=10)) == []
    assert [e.entry_id for e in cache.due(T0 + dt.timedelta(minutes=37))] == ["web"]


def test_every_change_bumps_the_version_and_nothing_else_does(live_ca: LiveCa) -> None:
    cache = SvidCache()
    v0 = cache.version
    cache.set_entries([entry(entry_id="web")])
    v1 = cache.version
    assert v1 > v0
    assert not cache.set_entries([entry(entry_id="web")])  # same entries: no change
    assert cache.version == v1
    _issue(live_ca, cache, "web", T0, 3600)
    assert cache.version > v1
    v2 = cache.version
    assert cache.set_bundle(live_ca.bundle)
    assert not cache.set_bundle(live_ca.bundle)
    assert cache.version == v2 + 1


def test_deleting_an_entry_stops_serving_its_svid_at_once(live_ca: LiveCa) -> None:
    cache = SvidCache()
    cache.set_entries([entry(entry_id="web")])
    _issue(live_ca, cache, "web", T0, 3600)
    cache.set_entries([])
    assert cache.svids == {}


def test_changing_an_entrys_spiffe_id_makes_it_due_for_reissue(live_ca: LiveCa) -> None:
    cache = SvidCache()
    cache.set_entries([entry(entry_id="web")])
    _issue(live_ca, cache, "web", T0, 3600)
    cache.set_entries([entry("spiffe://example.org/ns/default/sa/api", entry_id="web")])
    assert [e.entry_id for e in cache.due(T0)] == ["web"]
    # ... while it keeps serving the old SVID until the new one arrives.
    assert "web" in cache.svids


def test_selector_only_changes_keep_the_svid_but_apply_the_new_selectors(live_ca: LiveCa) -> None:
    cache = SvidCache()
    cache.set_entries([entry(entry_id="web")])
    _issue(live_ca, cache, "web", T0, 3600)
    changed = entry(selectors=["unix:uid:4242"], entry_id="web")
    cache.set_entries([changed])
    assert cache.due(T0) == []
    assert cache.svids["web"].entry == changed


def test_expired_svids_are_dropped_and_never_served(live_ca: LiveCa) -> None:
    cache = SvidCache()
    cache.set_entries([entry(entry_id="web")])
    _issue(live_ca, cache, "web", T0, 60)
    assert cache.expire(T0 + dt.timedelta(seconds=59)) == 0
    assert cache.expire(T0 + dt.timedelta(seconds=60)) == 1
    assert cache.svids == {}


def test_next_wakeup_is_the_earliest_rotation(live_ca: LiveCa) -> None:
    cache = SvidCache(random.Random(3), jitter=0)
    cache.set_entries([entry(entry_id="a"), entry("spiffe://example.org/b", entry_id="b")])
    assert cache.next_wakeup(T0) == T0  # both due now
    _issue(live_ca, cache, "a", T0, 600)
    _issue(live_ca, cache, "b", T0, 60)
    assert cache.next_wakeup(T0) == T0 + dt.timedelta(seconds=30)
    assert cache.nearest_expiry() == T0 + dt.timedelta(seconds=60)


def test_jwt_svids_are_reused_until_half_their_lifetime() -> None:
    cache = JwtCache()
    token = JwtSvidToken(SpiffeId(WEB), "t", T0 + dt.timedelta(minutes=5))
    cache.put("web", ["b", "a"], token, T0)
    assert cache.get("web", ["a", "b"], T0 + dt.timedelta(minutes=2)) is token
    assert cache.get("web", ["a"], T0) is None  # another audience set
    assert cache.get("web", ["a", "b"], T0 + dt.timedelta(minutes=3)) is None


def test_the_jwt_cache_is_bounded() -> None:
    cache = JwtCache(max_size=3)
    for i in range(10):
        cache.put("web", [f"aud{i}"], JwtSvidToken(SpiffeId(WEB), "t", T0 + dt.timedelta(1)), T0)
    assert len(cache) == 3


def test_jitter_outside_its_range_is_refused() -> None:
    with pytest.raises(ValueError, match="jitter"):
        SvidCache(jitter=0.5)


def test_backoff_grows_exponentially_but_never_past_its_cap() -> None:
    backoff = Backoff(base=0.5, cap=4.0, rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(50)]
    assert all(0 < d <= 4.0 for d in delays)
    assert max(delays[:2]) <= 1.0
    backoff.reset()
    assert backoff.next_delay() <= 0.5

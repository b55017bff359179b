"""Verifier.settle_day keeps the last day's bounds (issue 19): its answer must be the zone
conversion's for every instant, across midnights and DST changes, in any call order."""
import random
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from tracecode.server.verifier import RulesSettings, Verifier


def _direct(tz, at_ms):
    d = datetime.fromtimestamp(at_ms / 1000, tz)
    return d.year * 10000 + d.month * 100 + d.day


@pytest.mark.parametrize("zone", ["Asia/Shanghai", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe",
                                  "America/Havana", "Pacific/Chatham", "UTC"])
def test_settle_day_is_the_zone_conversion(zone):
    v = Verifier(store=None, rules=RulesSettings(timezone=zone))
    tz = ZoneInfo(zone)
    rnd = random.Random(zone)
    # Instants around every local midnight and DST change of two years, in shuffled and in
    # sorted order (the cache is filled by one day and then asked about its neighbours).
    points = []
    for day in range(730):
        base = 1735689600000 + day * 86_400_000
        for _ in range(6):
            points.append(base + rnd.randrange(-3 * 3_600_000, 27 * 3_600_000))
        for edge in (-1, 0, 1):
            local_midnight = int(datetime(2025, 1, 1, tzinfo=tz).timestamp() * 1000) + day * 86_400_000
            points.append(local_midnight + edge)
    for order in (sorted(points), points):
        for at in order:
            assert v.settle_day(at) == _direct(tz, at), (zone, at)


def test_settle_day_at_exact_bounds():
    v = Verifier(store=None, rules=RulesSettings(timezone="Asia/Shanghai"))
    tz = ZoneInfo("Asia/Shanghai")
    midnight = int(datetime(2026, 12, 1, tzinfo=tz).timestamp() * 1000)
    assert v.settle_day(midnight + 5000) == 20261201
    assert v.settle_day(midnight - 1) == 20261130
    assert v.settle_day(midnight) == 20261201
    assert v.settle_day(midnight + 86_400_000 - 1) == 20261201
    assert v.settle_day(midnight + 86_400_000) == 20261202

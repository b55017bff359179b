"""Property test over real gRPC and Redis: any interleaving of dispenses (random sites, split or
whole lines, either policy) and returns (whole or partial, repeated) keeps a pack's units used
within [0, pack_units] and equal to the units accepted minus the units returned, and every verdict
matches a small reference model of the split-pack rules written from the spec."""
from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracecode.clients.pos import line

from factories import cn20, issuance, load
from helpers import verdicts

P = "8123456"
SITES = ("PROP-A", "PROP-B", "PROP-C")


@dataclass
class Model:
    """The spec's split-pack rules for one issued, active, unexpired pack billed correctly."""
    pack: int
    used: int = 0
    first_site: str = ""
    settlements: list = field(default_factory=list)  # [site, sid, [accepted per line], set(returned)]

    def dispense(self, site: str, units: list[int], all_or_nothing: bool) -> tuple[list[str], list[int]]:
        used, first = self.used, self.first_site
        seen, split_only, asked = False, True, 0
        out, accepted = [], []
        for u in units:
            want = u or self.pack
            whole = u in (0, self.pack)
            if seen and not (u > 0 and split_only and asked + u <= self.pack):
                v = "DUPLICATE_IN_REQUEST"
            elif used > 0 and (first != site or (whole and used >= self.pack)):
                v = "DUPLICATE"
            elif want > self.pack - used:
                v = "QUANTITY_EXCEEDED"
            else:
                v = "OK"
                if used == 0:
                    first = site
                used += want
            seen, split_only, asked = True, split_only and u > 0, asked + u
            out.append(v)
            accepted.append(want if v == "OK" else 0)
        if all_or_nothing and any(v != "OK" for v in out):
            accepted = [0] * len(units)
        else:
            self.used, self.first_site = used, first
        return out, accepted

    def reverse(self, k: int, indexes: list[int] | None) -> list[tuple[int, int, bool]]:
        site, sid, accepted, returned = self.settlements[k]
        wanted = sorted(set(indexes)) if indexes else [i for i, a in enumerate(accepted) if a > 0]
        out = []
        for i in wanted:
            already = i in returned
            if not already and accepted[i] > 0:
                self.used -= accepted[i]
                if self.used == 0:
                    self.first_site = ""
                returned.add(i)
            out.append((i, accepted[i] if i in returned else 0, already))
        return out

    def balance(self) -> int:
        return sum(a for _, _, acc, ret in self.settlements for i, a in enumerate(acc) if i not in ret)


dispense_op = st.tuples(st.just("dispense"), st.sampled_from(SITES),
                        st.lists(st.integers(0, 6), min_size=1, max_size=3), st.booleans())
reverse_op = st.tuples(st.just("reverse"), st.integers(0, 1000),
                       st.one_of(st.none(), st.lists(st.integers(0, 2), min_size=1, max_size=3)))


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(pack=st.integers(1, 5), ops=st.lists(st.one_of(dispense_op, reverse_op), min_size=1, max_size=12))
def test_units_used_always_equals_accepted_minus_returned(pos, admin, pack, ops):
    code = cn20()  # a fresh pack per example: examples never see each other's state
    load(admin, issuance(code, P, pack_units=pack))
    model = Model(pack)
    for step, op in enumerate(ops):
        if op[0] == "dispense":
            _, site, units, aon = op
            sid = f"{code}-{step}"
            want_verdicts, want_accepted = model.dispense(site, units, aon)
            resp = pos.verify(site, [line(code, P, u) for u in units], settlement_id=sid,
                              all_or_nothing=aon)
            assert verdicts(resp) == want_verdicts, (step, op)
            assert [r.units_accepted for r in resp.results] == want_accepted, (step, op)
            model.settlements.append([site, sid, want_accepted, set()])
        else:
            if not model.settlements:
                continue
            _, pick, indexes = op
            k = pick % len(model.settlements)
            site, sid, accepted, _ = model.settlements[k]
            indexes = [i for i in indexes or () if i < len(accepted)] or None
            want = model.reverse(k, indexes)
            resp = pos.reverse(site, sid, indexes or [])
            got = [(ln.line_index, ln.units_returned, ln.already_reversed) for ln in resp.lines]
            assert got == want, (step, op)
        hist = pos.history(code)
        assert 0 <= hist.units_used <= pack
        assert hist.units_used == model.used == model.balance(), (step, op)
        assert hist.first_dispense.first_site_id == model.first_site, (step, op)

"""Each model of leads.md over a generated history with its pattern planted and near-miss decoys
beside it: every planted subject is found by its model and no decoy is; both engines (DuckDB,
and Spark in local mode) give byte-identical leads; lead ids are stable across runs, engines
and more data; no raw insured id reaches any output.
"""
from __future__ import annotations

import csv
import os
from datetime import datetime, timedelta

import pyarrow.parquet as pq
import pytest

from tracecode.leads import synth
from tracecode.leads.assemble import lead_id
from tracecode.leads.inputs import Pseudonyms
from tracecode.leads.run import Options, run
from tracecode.server.pseudonym import Pseudonymizer, generate_key_file

T0 = datetime(2024, 4, 1, 9, 0, tzinfo=synth.CST)
PRODUCT, OTHER = "8300001", "8300002"


class Plant:
    """A small history written by hand: sales of fresh or earlier packs at sites and times."""

    def __init__(self):
        self.codes = synth.Codes(None)
        self.issuance, self.rows, self.sites = [], [], []
        self.n = 0

    def pack(self, product: str = PRODUCT, units: int = 1) -> str:
        code = self.codes.cn20(product)
        self.issuance.append({"code": code, "product_id": product, "pack_units": str(units) if units > 1 else ""})
        return code

    def sale(self, site: str, when: datetime, codes: list[str], person: str = "", billed: str = PRODUCT,
             units: str = "") -> None:
        self.n += 1
        for ln, code in enumerate(codes, 1):
            self.rows.append({"site_id": site, "settlement_id": f"P{self.n:06d}", "settled_at": when.isoformat(),
                              "line_no": str(ln), "code": code, "product_id": billed, "units": units,
                              "insured_id": person, "amount": "10.50"})

    def resell(self, first: str, later: str, when: datetime, person: str = "", billed: str = PRODUCT) -> None:
        code = self.pack()
        self.sale(first, when, [code], person)
        self.sale(later, when + timedelta(days=2), [code], "", billed)


RAW = {name: f"11010119800101{n:03d}x" for n, name in enumerate(
    ["P1", "P2", "S1", "S2", "S3", "S4", "S5", "S6", "BG"])}


def planted() -> tuple[Plant, dict[str, set[str]]]:
    p = Plant()
    t = T0
    # Background: 30 registered pharmacies of one region, 100 lines each, 0-3 unknown codes.
    for i in range(30):
        site = f"BG{i:02d}"
        p.sites.append({"site_id": site, "site_kind": "PHARMACY", "region": "R1", "name": site})
        for k in range(100):
            code = p.pack() if k >= i % 4 else p.codes.cn20(PRODUCT)  # unknown: never issued
            p.sale(site, t + timedelta(minutes=k), [code], RAW["BG"] if i < 2 and k % 50 == 0 else "")
    for site, unknown, total in (("A1", 30, 100), ("A2", 9, 100), ("A3", 10, 200)):
        p.sites.append({"site_id": site, "site_kind": "PHARMACY", "region": "R1", "name": site})
        for k in range(total):
            p.sale(site, t + timedelta(minutes=k), [p.codes.cn20(PRODUCT) if k < unknown else p.pack()])
    t += timedelta(days=1)
    # RESALE_BUYER: B1 sells two packs first dispensed elsewhere. Decoys: a whole pack sold twice
    # at its own site (D1), a split pack continued at its own site (D2).
    p.resell("BG01", "B1", t)
    p.resell("BG02", "B1", t + timedelta(hours=1))
    d = p.pack()
    p.sale("D1", t, [d])
    p.sale("D1", t + timedelta(days=1), [d])
    s = p.pack(units=10)
    p.sale("D2", t, [s], units="3")
    p.sale("D2", t + timedelta(days=1), [s], units="4")
    # RESALE_SOURCE: two of P1's packs sold again at C9; decoy P2 with one.
    p.resell("BG03", "C9", t, RAW["P1"])
    p.resell("BG04", "C9", t + timedelta(hours=2), RAW["P1"])
    p.resell("BG05", "Q9", t, RAW["P2"])
    # RING R1 -> R2 -> R3 -> R1; decoys: a chain K1 -> K2 -> K3, a two-site cycle X1 <-> X2.
    for a, b in (("R1", "R2"), ("R2", "R3"), ("R3", "R1"), ("K1", "K2"), ("K2", "K3"), ("X1", "X2"), ("X2", "X1")):
        p.resell(a, b, t)
        t += timedelta(minutes=5)
    for site in ("R1", "R2", "R3"):
        p.sites.append({"site_id": site, "site_kind": "PHARMACY", "region": "R9", "name": site})
    # STOCKPILING: S1 six packs at three sites in ten days; S5 the same with its last pack at
    # exactly 30 x 24 h (inclusive). Decoys: two sites (S2), no 30-day window with six (S3), two
    # products (S4), one second past the window (S6).
    def spree(person, sites, offsets, products=None):
        for k, off in enumerate(offsets):
            prod = (products or [PRODUCT] * len(offsets))[k]
            p.sale(sites[k % len(sites)], t + off, [p.pack(prod)], person, billed=prod)
    days = [timedelta(days=d) for d in (0, 2, 4, 6, 8, 10)]
    spree(RAW["S1"], ["G1", "G2", "G3"], days)
    spree(RAW["S2"], ["G1", "G2"], days)
    spree(RAW["S3"], ["G1", "G2", "G3"], [timedelta(days=d) for d in (0, 1, 2, 3, 4, 35)])
    spree(RAW["S4"], ["G1", "G2", "G3"], days, [PRODUCT, OTHER] * 3)
    edge = [timedelta(days=d) for d in (0, 1, 2, 3, 4)]
    spree(RAW["S5"], ["G1", "G2", "G3"], edge + [timedelta(hours=720)])
    spree(RAW["S6"], ["G1", "G2", "G3"], edge + [timedelta(hours=720, seconds=1)])
    # SWAP: W1 bills three packs as another product; decoys: W2 only two, W3 three resold packs
    # billed wrongly (DUPLICATE wins by precedence).
    for site, n in (("W1", 3), ("W2", 2)):
        for _ in range(n):
            p.sale(site, t, [p.pack()], billed=OTHER)
    for _ in range(3):
        p.resell("BG06", "W3", t, billed=OTHER)
    p.rows.sort(key=lambda r: r["settled_at"])  # one file in settled_at order
    expected = {
        "RESALE_BUYER": {"B1", "C9", "Q9", "R1", "R2", "R3", "K2", "K3", "X1", "X2", "W3"},
        "RESALE_SOURCE": {"P1"},
        "RING": {"R1+R2+R3"},
        "STOCKPILING": {"S1", "S5"},
        "SWAP": {"W1"},
        "ABNORMAL_SITE": {"A1"},
    }
    return p, expected


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("planted")
    p, expected = planted()
    key = str(d / "pseudonym.key")
    generate_key_file(key)
    files = {
        "issuance": synth.write_csv(str(d / "issuance.csv"), p.issuance, ["code", "product_id", "pack_units"]),
        "settlements": synth.write_csv(str(d / "settlements.csv"), p.rows, synth.SETTLEMENT_COLUMNS),
        "sites": synth.write_csv(str(d / "sites.csv"), p.sites, ["site_id", "site_kind", "region", "name"]),
    }
    return d, files, expected, Pseudonymizer.from_file(key)


def _run(d, files, pz, out: str, engine: str = "duckdb", extra: list[str] = ()) -> str:
    out = str(d / out)
    run(Options(files=[files["settlements"], *extra], issuance=[files["issuance"]], sites=files["sites"], out=out,
                engine=engine, spark_master="local[1]", pseudonyms=Pseudonyms(pz), progress=False))
    return out


def _leads(out: str) -> list[dict]:
    with open(os.path.join(out, "leads.csv"), newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def duck(dataset):
    d, files, _, pz = dataset
    return _run(d, files, pz, "duck")


def test_each_model_finds_its_planted_subjects_and_no_decoy(dataset, duck):
    _, _, expected, pz = dataset
    leads = _leads(duck)
    found = {m: {ld["subject_id"] for ld in leads if ld["model"] == m} for m in expected}
    persons = {pz(raw): name for name, raw in RAW.items()}
    named = {m: {persons.get(s, s) for s in subjects} for m, subjects in found.items()}
    assert named == expected
    ring = next(ld for ld in leads if ld["model"] == "RING")
    assert ring["subject_kind"] == "RING" and ring["region"] == "R9" and ring["packs"] == "3"
    # Ids as leads.md says: a function of model, version and subject.
    for ld in leads:
        assert ld["lead_id"] == lead_id(ld["model"], int(ld["model_version"]), ld["subject_id"])
    b1 = next(ld for ld in leads if ld["model"] == "RESALE_BUYER" and ld["subject_id"] == "B1")
    assert (b1["packs"], b1["lines"], b1["amount"], b1["risk"]) == ("2", "4", "21.00", "LOW")
    s5 = next(ld for ld in leads if ld["model"] == "STOCKPILING" and persons.get(ld["subject_id"]) == "S5")
    span = datetime.fromisoformat(s5["window_end"]) - datetime.fromisoformat(s5["window_start"])
    assert span == timedelta(hours=720) and s5["packs"] == "6"


def test_evidence_names_the_first_and_later_sales(duck):
    with open(os.path.join(duck, "evidence.csv"), newline="", encoding="utf-8") as fh:
        ev = list(csv.DictReader(fh))
    leads = {ld["lead_id"]: ld for ld in _leads(duck)}
    assert {e["lead_id"] for e in ev} == set(leads)
    b1 = [e for e in ev if leads[e["lead_id"]]["subject_id"] == "B1"]
    assert sorted(e["role"] for e in b1) == ["first", "first", "later", "later"]
    assert {e["site_id"] for e in b1 if e["role"] == "first"} == {"BG01", "BG02"}
    swap = [e for e in ev if leads[e["lead_id"]]["model"] == "SWAP"]
    assert len(swap) == 3 and {e["role"] for e in swap} == {"line"} and {e["product_id"] for e in swap} == {OTHER}
    # Parquet carries the same rows as CSV.
    assert pq.read_table(os.path.join(duck, "evidence.parquet")).num_rows == len(ev)
    assert pq.read_table(os.path.join(duck, "leads.parquet")).column("lead_id").to_pylist() == list(leads)
    assert os.path.getsize(os.path.join(duck, "network.png")) > 10_000


def test_running_twice_gives_byte_identical_leads(dataset, duck):
    d, files, _, pz = dataset
    again = _run(d, files, pz, "duck-again")
    for name in ("leads.csv", "evidence.csv", "leads.parquet", "evidence.parquet", "errors.csv"):
        with open(os.path.join(duck, name), "rb") as a, open(os.path.join(again, name), "rb") as b:
            assert a.read() == b.read(), name


def test_lead_ids_stay_when_more_data_comes(dataset, duck):
    d, files, _, pz = dataset
    more = Plant()
    more.codes.n = 10_000_000
    later = T0 + timedelta(days=90)
    more.sale("B1", later, [more.pack()])
    extra = synth.write_csv(str(d / "more.csv"), more.rows, synth.SETTLEMENT_COLUMNS)
    with open(files["issuance"], "a", encoding="utf-8") as fh:  # its pack issued too
        fh.write(f"{more.issuance[0]['code']},{PRODUCT},\n")
    out = _run(d, files, pz, "more", extra=[extra])
    before = {(ld["model"], ld["subject_id"]): ld["lead_id"] for ld in _leads(duck)}
    after = {(ld["model"], ld["subject_id"]): ld["lead_id"] for ld in _leads(out)}
    assert before == after


def test_no_raw_insured_id_in_any_output(dataset, duck):
    for name in os.listdir(duck):
        with open(os.path.join(duck, name), "rb") as fh:
            data = fh.read()
        for raw in RAW.values():
            assert raw.encode() not in data and raw.upper().encode() not in data, (name, raw)
    with open(os.path.join(duck, "evidence.csv"), newline="", encoding="utf-8") as fh:
        people = {e["insured_id"] for e in csv.DictReader(fh)} - {""}
    assert people and all(Pseudonymizer.looks_like_pseudonym(p) for p in people)


def test_raw_ids_without_a_key_are_refused(dataset, tmp_path):
    _, files, _, _ = dataset
    with pytest.raises(ValueError, match="pseudonym-key"):
        run(Options(files=[files["settlements"]], issuance=[files["issuance"]], out=str(tmp_path / "o"),
                    progress=False))


def test_spark_gives_the_same_leads_as_duckdb(dataset, duck):
    d, files, _, pz = dataset
    spark = _run(d, files, pz, "spark", engine="spark")
    for name in ("leads.csv", "evidence.csv", "errors.csv"):
        with open(os.path.join(duck, name), "rb") as a, open(os.path.join(spark, name), "rb") as b:
            assert a.read() == b.read(), name

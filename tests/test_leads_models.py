"""Each model of leads.md over a generated history with its pattern planted and near-miss decoys
beside it: every planted subject is found by its model and no decoy is; both engines (DuckDB,
and Spark in local mode) give byte-identical leads; lead ids are stable across runs, engines
and more data; no raw insured id reaches any output.
"""
from __future__ import annotations

import csv
import os
import re
from datetime import datetime, timedelta

import pyarrow.parquet as pq
import pytest

from tracecode.leads import synth
from tracecode.leads.assemble import MODEL_ORDER as MODELS
from tracecode.leads.assemble import lead_id
from tracecode.leads.config import load as load_config
from tracecode.leads.inputs import Pseudonyms
from tracecode.leads.run import Options, run
from tracecode.rules.insured import resident_check_char
from tracecode.rules.pseudonym import Pseudonymizer, generate_key_file

T0 = datetime(2024, 4, 1, 9, 0, tzinfo=synth.CST)
PRODUCT, OTHER = "8300001", "8300002"


class Plant:
    """A small history written by hand: sales of fresh or earlier packs at sites and times."""

    def __init__(self):
        self.codes = synth.Codes(None)
        self.issuance, self.rows, self.sites = [], [], []
        self.receipts: list[list[dict]] = [[], []]  # two delivery files
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


# Valid resident ids (GB 11643 check character), typed with a lower-case check character where
# it is X, as at a counter: the engine normalises before it pseudonymises.
RAW = {name: f"11010119800101{n:03d}" + resident_check_char(f"11010119800101{n:03d}").lower() for n, name in
       enumerate(["P1", "P2", "S1", "S2", "S3", "S4", "S5", "S6", "BG"])}


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
    # UNRECEIVED: U1 takes two packs into stock through the receiving check and sells them, then
    # sells three it never received. Decoys: U2 sells five it received, three in one delivery
    # file and two in a second; U3 never uses the receiving check (not judged).
    def received(site, file, packs, when):
        for k, code in enumerate(packs):
            p.receipts[file].append({"site_id": site, "code": code, "delivery_id": f"DN-{site}-{file}",
                                     "received_at": (when + timedelta(minutes=k)).isoformat()})
    got = [p.pack() for _ in range(2)]
    received("U1", 0, got, t - timedelta(hours=3))
    p.sale("U1", t, got)
    p.sale("U1", t + timedelta(hours=1), [p.pack() for _ in range(3)])
    got = [p.pack() for _ in range(5)]
    received("U2", 0, got[:3], t - timedelta(hours=3))
    received("U2", 1, got[3:], t - timedelta(hours=2))
    p.sale("U2", t, got)
    p.sale("U3", t, [p.pack() for _ in range(4)])
    p.rows.sort(key=lambda r: r["settled_at"])  # one file in settled_at order
    expected = {
        "RESALE_BUYER": {"B1", "C9", "Q9", "R1", "R2", "R3", "K2", "K3", "X1", "X2", "W3"},
        "RESALE_SOURCE": {"P1"},
        "RING": {"R1+R2+R3"},
        "STOCKPILING": {"S1", "S5"},
        "SWAP": {"W1"},
        "UNRECEIVED": {"U1"},
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
        "receipts": [synth.write_csv(str(d / f"receipts-{n}.csv"), rows, ["site_id", "code", "delivery_id", "received_at"])
                     for n, rows in enumerate(p.receipts)],
    }
    return d, files, expected, Pseudonymizer.from_file(key)


def _run(d, files, pz, out: str, engine: str = "duckdb", extra: list[str] = ()) -> str:
    out = str(d / out)
    run(Options(files=[files["settlements"], *extra], issuance=[files["issuance"]], sites=files["sites"], out=out,
                receipts=files["receipts"], engine=engine, spark_master="local[1]", pseudonyms=Pseudonyms(pz),
                progress=False))
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


@pytest.mark.parametrize("engine", ["duckdb", "spark"])
def test_raw_ids_without_a_key_are_refused(dataset, tmp_path, engine):
    """On Spark the file is read on an executor: the refusal comes back to the driver as the same
    ValueError, and nothing is written."""
    _, files, _, _ = dataset
    with pytest.raises(ValueError, match="pseudonym-key"):
        run(Options(files=[files["settlements"]], issuance=[files["issuance"]], out=str(tmp_path / "o"),
                    engine=engine, spark_master="local[1]", progress=False))
    assert not os.path.exists(tmp_path / "o")


def test_spark_gives_the_same_leads_as_duckdb(dataset, duck):
    d, files, _, pz = dataset
    spark = _run(d, files, pz, "spark", engine="spark")
    for name in ("leads.csv", "evidence.csv", "errors.csv"):
        with open(os.path.join(duck, name), "rb") as a, open(os.path.join(spark, name), "rb") as b:
            assert a.read() == b.read(), name


# --- issue 27: Chinese summaries, model status ------------------------------------------------

_CJK = re.compile(r"[\u4e00-\u9fff]")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def test_summaries_are_chinese_with_the_english_beside(duck):
    leads = _leads(duck)
    assert {ld["model"] for ld in leads} == set(MODELS)  # every model's templates are exercised
    for ld in leads:
        zh, en = ld["summary"], ld["summary_en"]
        assert _CJK.search(zh) and "{" not in zh and "}" not in zh, zh
        assert en.isascii() or "串换" in en, en  # SWAP names the practice in Chinese on purpose
        # The two sentences state the same figures (in each language's order).
        assert sorted(_NUMBER.findall(zh)) == sorted(_NUMBER.findall(en)), (zh, en)
        assert ld["subject_id"] in zh or ld["subject_kind"] == "RING"
    b1 = next(ld for ld in leads if ld["model"] == "RESALE_BUYER" and ld["subject_id"] == "B1")
    assert b1["summary"].endswith("医保基金重复支付：21.00 元。") and b1["summary_en"].endswith("the fund paid 21.00 yuan a second time.")
    # The Parquet file carries both columns and the status too.
    t = pq.read_table(os.path.join(duck, "leads.parquet"))
    assert t.column_names[-3:] == ["summary", "summary_en", "model_status"]
    assert t.column("summary").to_pylist() == [ld["summary"] for ld in leads]


def test_a_pilot_is_marked_and_a_retired_model_writes_nothing(dataset, duck, tmp_path):
    d, files, _, pz = dataset
    toml = tmp_path / "models.toml"
    toml.write_text('[SWAP]\nstatus = "PILOT"\n\n[RING]\nstatus = "RETIRED"\n', encoding="utf-8")
    out = str(tmp_path / "status")
    run(Options(files=[files["settlements"]], issuance=[files["issuance"]], sites=files["sites"], out=out,
                receipts=files["receipts"], pseudonyms=Pseudonyms(pz), progress=False, config=load_config(str(toml))))
    leads, before = _leads(out), _leads(duck)
    assert {ld["model_status"] for ld in before} == {"PRODUCTION"}
    assert not [ld for ld in leads if ld["model"] == "RING"]
    assert {ld["model_status"] for ld in leads if ld["model"] == "SWAP"} == {"PILOT"}
    assert {ld["model_status"] for ld in leads if ld["model"] != "SWAP"} == {"PRODUCTION"}
    # Nothing else changes: the same leads (ids, figures, summaries) but RING's.
    strip = [{k: v for k, v in ld.items() if k != "model_status"} for ld in before if ld["model"] != "RING"]
    assert [{k: v for k, v in ld.items() if k != "model_status"} for ld in leads] == strip
    with open(os.path.join(out, "evidence.csv"), newline="", encoding="utf-8") as fh:
        ev_ids = {e["lead_id"] for e in csv.DictReader(fh)}
    assert ev_ids == {ld["lead_id"] for ld in leads}


def test_an_unknown_status_is_refused_by_name(tmp_path):
    toml = tmp_path / "bad.toml"
    toml.write_text('[SWAP]\nstatus = "TRIAL"\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"model SWAP status 'TRIAL' \(known: PILOT, PRODUCTION, RETIRED\)"):
        load_config(str(toml))


def test_unreceived_needs_receipts_counts_a_receipt_after_the_sale_and_reports_bad_rows(dataset, tmp_path):
    d, files, _, pz = dataset
    # Without receipts no site is judged: the model writes nothing.
    out = str(tmp_path / "no-receipts")
    run(Options(files=[files["settlements"]], issuance=[files["issuance"]], out=out, pseudonyms=Pseudonyms(pz),
                progress=False))
    assert not [ld for ld in _leads(out) if ld["model"] == "UNRECEIVED"]
    # U2's second delivery file dated after its sales: those two packs were sold before they were
    # received, so U2 has 2 unreceived packs (under the threshold of 3); with min_packs = 2 it is
    # found. A bad row of a receipts file is reported by file, line and field.
    with open(files["receipts"][1], encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    late = tmp_path / "late.csv"
    with open(late, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, ["site_id", "code", "delivery_id", "received_at"])
        w.writeheader()
        for r in rows:
            w.writerow({**r, "received_at": (datetime.fromisoformat(r["received_at"]) + timedelta(days=9)).isoformat()})
        w.writerow({"site_id": "U2", "code": "x", "delivery_id": "D", "received_at": ""})
        w.writerow({"site_id": "U2", "code": rows[0]["code"], "delivery_id": "D", "received_at": "yesterday"})
    (tmp_path / "m.toml").write_text("[UNRECEIVED]\nmin_packs = 2\n", encoding="utf-8")
    out = str(tmp_path / "late")
    run(Options(files=[files["settlements"]], issuance=[files["issuance"]], out=out, pseudonyms=Pseudonyms(pz),
                receipts=[files["receipts"][0], str(late)], progress=False,
                config=load_config(str(tmp_path / "m.toml"))))
    got = {ld["subject_id"]: ld for ld in _leads(out) if ld["model"] == "UNRECEIVED"}
    assert set(got) == {"U1", "U2"} and got["U2"]["packs"] == "2" and got["U1"]["packs"] == "3"
    assert "无本机构入库核验记录" in got["U2"]["summary"]
    with open(os.path.join(out, "errors.csv"), newline="", encoding="utf-8") as fh:
        errs = {(e["line"], e["field"]) for e in csv.DictReader(fh) if e["file"] == str(late)}
    assert errs == {(str(len(rows) + 2), "code"), (str(len(rows) + 3), "received_at")}

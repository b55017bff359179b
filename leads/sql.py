"""The one definition of every step, in SQL (DuckDB's dialect; SQLGlot writes it for Spark).

Each step is (table name, SELECT): an engine materialises the SELECT under the name. The steps
are REPLAY's rules (docs/verification.md, verify.lua, clients/reverify.py) restated over whole
columns, then the models of leads.md. Ordering words used below:

    pos   a row's position in its file          inst  its settlement (adjacent rows, one id)
    li    a line's index in its settlement, by line_no (the order REPLAY sends lines in)
          (inst and li come with the staged lines: inputs._settlement_index, in file order)
    seq   a settlement's turn in REPLAY: files merged by settled_at as heapq.merge merges them,
          i.e. sorted by (running max of settled_at within the file, file index, position)
    ord   a line's turn: seq * 1,000,000 + li

Kept portable on purpose: no named WINDOW clauses, no string_agg, no dialect-only functions;
`min_by` and friends are mapped by SQLGlot.
"""
from __future__ import annotations

from dataclasses import dataclass

from tracecode.rules.settlement import MAX_TIME_MS  # settlements from 1970 to 2100, as the server's
from tracecode.rules.verdicts import PACK_FLAGS, PRECEDENCE, sql_in

ORD_STRIDE = 1_000_000


@dataclass(frozen=True)
class Step:
    name: str
    select: str
    # An engine may keep the step as a view instead of a table (DuckDB does): a step that only
    # adds cheap columns to one table, read by a few later steps, costs a full copy of that
    # table when materialised and little when its SELECT is run again by each reader.
    view: bool = False


# verify.lua's checks for a line `j` of a pack `p` sold whole (VERDICTS), each the condition under
# which it fails, as the script sets its flags: the verdict is the first failing check in
# rules.verdicts.PRECEDENCE (verdict_case renders the CASE in that order; a MALFORMED scan is
# decided first, as before Redis). The split-pack pass (splitpack.py) walks the same order.
FAST_CHECKS = {
    "DUPLICATE_IN_REQUEST": "j.f_dir",
    "UNKNOWN": "j.f_unknown",
    "BLOCKED": "j.f_blocked",
    # Used at another site, or a whole-pack line on a used-up pack at its own site.
    "DUPLICATE": "(p.first_ok IS NOT NULL AND j.ord > p.first_ok AND (j.site_id <> p.first_site OR j.whole))",
    "PRODUCT_MISMATCH": "j.pm",
    "EXPIRED": "j.ex",
    # More than remains: anything after the first dispense (the pack is used up), or more than
    # the pack holds.
    "QUANTITY_EXCEEDED": "((p.first_ok IS NOT NULL AND j.ord > p.first_ok) OR j.units > j.n)",
}
if set(FAST_CHECKS) != set(PRECEDENCE) - {"MALFORMED"}:  # a new verdict needs its check here
    raise RuntimeError(f"leads/sql.py FAST_CHECKS {sorted(FAST_CHECKS)} != rules.verdicts.PRECEDENCE")


def verdict_case(checks: dict[str, str]) -> str:
    """The verdict CASE: MALFORMED first, then each check in PRECEDENCE order, else OK."""
    whens = "\n            ".join(f"WHEN {checks[v]} THEN '{v}'" for v in PRECEDENCE if v != "MALFORMED")
    return f"CASE WHEN j.f_malformed THEN 'MALFORMED'\n            {whens}\n            ELSE 'OK' END"


def verdict_steps(max_lines: int, seq0: int = 0, history: bool = False) -> list[Step]:
    """seq0: settlements before this run (an incremental run continues the saved history's
    turns); history: judge against a saved state's settlements and packs (state.py)."""
    steps = [
        # A settlement's time is its first row's; REPLAY's turn follows heapq.merge of the files.
        Step("s1", """
SELECT file_index, inst, MIN(pos) AS first_pos, MIN_BY(site_id, pos) AS site_id,
       MIN_BY(settlement_id, pos) AS settlement_id, MIN_BY(at_ms, pos) AS at_ms, MIN_BY(day, pos) AS day,
       COUNT(*) AS n_lines, MAX(CASE WHEN row_bad THEN 1 ELSE 0 END) AS any_bad
FROM lines GROUP BY file_index, inst"""),
        Step("s2", f"""
SELECT *, ROW_NUMBER() OVER (ORDER BY pmax, file_index, first_pos) + {seq0} AS seq,
       CASE WHEN any_bad = 1 OR n_lines > {max_lines} OR at_ms < 0 OR at_ms >= {MAX_TIME_MS}
            THEN 1 ELSE 0 END AS bad
FROM (SELECT *, MAX(at_ms) OVER (PARTITION BY file_index ORDER BY first_pos
                                 ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS pmax
      FROM s1) s"""),
        # The first valid use of a (site, settlement id) is judged; a later one with the same body
        # is REPLAY's idempotent replay (same answers), with another body a conflict (rejected).
        Step("s3", """
SELECT *, MIN(CASE WHEN bad = 0 THEN seq END) OVER (PARTITION BY site_id, settlement_id) AS first_seq
FROM s2"""),
        Step("same_lines", """
SELECT sa.seq, COUNT(*) AS matched
FROM s3 sa
JOIN lines a ON a.file_index = sa.file_index AND a.inst = sa.inst
JOIN s3 sf ON sf.site_id = sa.site_id AND sf.settlement_id = sa.settlement_id AND sf.seq = sa.first_seq
JOIN lines b ON b.file_index = sf.file_index AND b.inst = sf.inst AND b.li = a.li
WHERE sa.bad = 0 AND sa.seq > sa.first_seq
  AND a.code = b.code AND a.product_id = b.product_id AND a.units = b.units
GROUP BY sa.seq"""),
        Step("settlements", """
SELECT s.file_index, s.inst, s.seq, s.site_id, s.settlement_id, s.at_ms, s.day, s.n_lines, s.first_seq,
       CASE WHEN s.bad = 1 THEN 'E'
            WHEN s.seq = s.first_seq THEN 'J'
            WHEN s.at_ms = f.at_ms AND s.n_lines = f.n_lines AND COALESCE(m.matched, 0) = s.n_lines THEN 'R'
            ELSE 'C' END AS kind
FROM s3 s
LEFT JOIN s3 f ON f.seq = s.first_seq
LEFT JOIN same_lines m ON m.seq = s.seq"""),
        # Judged lines with their issuance record and the conditions that do not depend on state.
        Step("jl", f"""
SELECT l.file_index, l.pos, l.li, s.seq, CAST(s.seq AS BIGINT) * {ORD_STRIDE} + l.li AS ord, s.site_id,
       s.settlement_id, s.at_ms, s.day, l.line_no, l.ckey, l.product_id, l.units, l.insured,
       l.amount_fen, i.product_id AS issued, i.pack_units AS n, i.expiry AS e, i.status AS st
FROM lines l
JOIN settlements s ON s.file_index = l.file_index AND s.inst = l.inst AND s.kind = 'J'
LEFT JOIN issuance i ON i.ckey = l.ckey AND l.ckey <> ''"""),
        # verify.lua's per-line conditions. DUPLICATE_IN_REQUEST: the code is on an earlier line of
        # the settlement, unless all its lines so far are split lines adding up within the pack.
        # Only codes on two or more lines of one settlement need the window (few do).
        Step("repeats", """
SELECT seq, ckey FROM jl WHERE ckey <> '' GROUP BY seq, ckey HAVING COUNT(*) > 1"""),
        Step("before", """
SELECT ord,
       COUNT(*) OVER (PARTITION BY seq, ckey ORDER BY li
                      ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS n_before,
       MIN(CASE WHEN units > 0 THEN 1 ELSE 0 END) OVER (PARTITION BY seq, ckey ORDER BY li
                      ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS split_before,
       SUM(units) OVER (PARTITION BY seq, ckey ORDER BY li
                      ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS asked_before
FROM (SELECT j.ord, j.seq, j.ckey, j.li, j.units FROM jl j
      JOIN repeats r ON r.seq = j.seq AND r.ckey = j.ckey) x"""),
        Step("jl2", view=True, select="""
SELECT j.*,
       j.ckey = '' AS f_malformed,
       COALESCE(b.n_before, 0) > 0
           AND NOT (j.issued IS NOT NULL AND j.units > 0 AND b.split_before = 1
                    AND b.asked_before + j.units <= j.n) AS f_dir,
       j.ckey <> '' AND j.issued IS NULL AS f_unknown,
       COALESCE(j.st <> 'ACTIVE', FALSE) AS f_blocked,
       COALESCE(j.product_id <> j.issued, FALSE) AS pm,
       COALESCE(j.e > 0 AND j.e < j.day, FALSE) AS ex,
       COALESCE(j.units = 0 OR j.units = j.n, FALSE) AS whole
FROM jl j LEFT JOIN before b ON b.ord = j.ord"""),
        # Per pack: whether any line splits it (then the sequential pass judges it, splitpack.py),
        # and otherwise its first dispense: the first whole-pack line that passes every check.
        Step("packs", """
SELECT ckey, MAX(CASE WHEN units > 0 AND units < n THEN 1 ELSE 0 END) AS split,
       MIN(ord) FILTER (WHERE NOT (f_dir OR f_blocked OR pm OR ex) AND whole) AS first_ok,
       MIN_BY(site_id, ord) FILTER (WHERE NOT (f_dir OR f_blocked OR pm OR ex) AND whole) AS first_site,
       MAX(n) AS n
FROM jl2 WHERE issued IS NOT NULL GROUP BY ckey"""),
    ]
    return _with_history(steps) if history else steps


def _hex_value(h: str, start: int, digits: int = 7) -> str:
    """The number the hex digits start..start+digits-1 of h spell, in SQL both dialects read
    (md5 gives the same lowercase hex in DuckDB and Spark)."""
    return " + ".join(f"(INSTR('0123456789abcdef', SUBSTR({h}, {start + k}, 1)) - 1) * {16 ** (digits - 1 - k)}"
                      for k in range(digits))


def settlement_fp(settlements: str, where: str) -> str:
    """Per settlement (seq) a fingerprint of its body, for a saved state: two sums over its lines
    of 28-bit numbers from md5(li | code | product | units). Equal bodies give equal sums; REPLAY's
    replay check (same time, line count and lines) then reads (at_ms, n_lines, fp1, fp2)."""
    body = ("md5(CAST(l.li AS VARCHAR) || '|' || COALESCE(l.code, '') || '|' || COALESCE(l.product_id, '') || '|' "
            "|| COALESCE(CAST(l.units AS VARCHAR), ''))")
    return f"""
SELECT seq, CAST(SUM({_hex_value('h', 1)}) AS BIGINT) AS fp1, CAST(SUM({_hex_value('h', 8)}) AS BIGINT) AS fp2
FROM (SELECT s.seq, {body} AS h
      FROM {settlements} JOIN lines l ON l.file_index = s.file_index AND l.inst = s.inst
      WHERE {where}) x
GROUP BY seq"""


def _with_history(steps: list[Step]) -> list[Step]:
    """The verdict steps of an incremental run (state.py): a (site, settlement id) first used in the
    saved history makes this use a replay (same body) or a conflict; a pack first dispensed in the
    history keeps that first dispense, and one partly used there is judged by the sequential pass
    from the units it has left. h_settled, h_firsts and h_used are the state's tables."""
    out = []
    for st in steps:
        if st.name == "settlements":
            out.append(Step("hit_fp", settlement_fp(
                "s3 s JOIN h_settled h ON h.site_id = s.site_id AND h.settlement_id = s.settlement_id", "s.bad = 0")))
            out.append(Step("settlements", """
SELECT s.file_index, s.inst, s.seq, s.site_id, s.settlement_id, s.at_ms, s.day, s.n_lines, s.first_seq,
       CASE WHEN s.bad = 1 THEN 'E'
            WHEN h.site_id IS NOT NULL THEN
                 CASE WHEN s.at_ms = h.at_ms AND s.n_lines = h.n_lines AND x.fp1 = h.fp1 AND x.fp2 = h.fp2
                      THEN 'R' ELSE 'C' END
            WHEN s.seq = s.first_seq THEN 'J'
            WHEN s.at_ms = f.at_ms AND s.n_lines = f.n_lines AND COALESCE(m.matched, 0) = s.n_lines THEN 'R'
            ELSE 'C' END AS kind
FROM s3 s
LEFT JOIN s3 f ON f.seq = s.first_seq
LEFT JOIN same_lines m ON m.seq = s.seq
LEFT JOIN h_settled h ON h.site_id = s.site_id AND h.settlement_id = s.settlement_id
LEFT JOIN hit_fp x ON x.seq = s.seq"""))
        elif st.name == "packs":
            out.append(Step("packs_new", st.select))
            # used0/site0/ford0: the pack's state before this run, for the sequential pass.
            out.append(Step("packs", """
SELECT p.ckey,
       CASE WHEN f.ckey IS NULL THEN p.split WHEN u.used IS NOT NULL AND u.used < p.n THEN 1 ELSE 0 END AS split,
       COALESCE(f.ord, p.first_ok) AS first_ok, COALESCE(f.site_id, p.first_site) AS first_site,
       CASE WHEN f.ckey IS NULL THEN 0 ELSE COALESCE(u.used, p.n) END AS used0,
       f.site_id AS site0, f.ord AS ford0
FROM packs_new p
LEFT JOIN h_firsts f ON f.ckey = p.ckey
LEFT JOIN (SELECT ckey, MAX(used) AS used FROM h_used WHERE ckey IN (SELECT ckey FROM packs_new)
           GROUP BY ckey) u ON u.ckey = p.ckey"""))
        else:
            out.append(st)
    return out


# The lines of split packs, for the sequential pass (fetched, judged in Python, registered back
# as `split_v`).
SPLIT_LINES = """
SELECT j.ord, j.ckey, j.site_id, j.units, j.n, j.f_dir, j.f_unknown, j.f_blocked, j.pm, j.ex, j.whole
FROM jl2 j JOIN packs p ON p.ckey = j.ckey WHERE p.split = 1 ORDER BY j.ckey, j.ord"""
# The same with each pack's state before an incremental run (used0, site0, ford0).
SPLIT_LINES_HISTORY = SPLIT_LINES.replace("j.whole\n", "j.whole, p.used0, p.site0, p.ford0\n")

# Every judged line's verdict: whole-pack codes by the checks of FAST_CHECKS in PRECEDENCE order,
# lines of split packs by the sequential pass (split_v has every one of them). One pass over jl2
# (a separate table of the fast verdicts joined back by `ord` cost a copy and a join of every line).
VERDICTS = Step("verdicts", f"""
SELECT j.ord, j.seq, j.li, j.file_index, j.pos, j.site_id, j.settlement_id, j.at_ms, j.line_no,
       j.ckey, j.product_id, j.issued, j.units, j.insured, j.amount_fen,
       CASE WHEN COALESCE(p.split, 0) = 0 THEN {verdict_case(FAST_CHECKS)} ELSE v.verdict END AS verdict,
       CASE WHEN COALESCE(p.split, 0) = 0 THEN p.first_ok ELSE v.first_ord END AS first_ord
FROM jl2 j
LEFT JOIN packs p ON p.ckey = j.ckey
LEFT JOIN split_v v ON v.ord = j.ord AND p.split = 1""")

# Every line REPLAY answers, in REPLAY's order: judged ones, and replays with the answers of
# the settlement they repeat. With the first dispense of a DUPLICATE (REPLAY's evidence).
ALL_LINES = """
SELECT x.file_index, x.line, x.seq, x.li, x.site_id, x.settlement_id, x.line_no, x.code, x.verdict,
       x.ckey, f.site_id AS first_site_id, f.settlement_id AS first_settlement_id, f.at_ms AS first_at_ms
FROM (SELECT v.file_index, l.line, v.seq, v.li, v.site_id, v.settlement_id, v.line_no, l.code, v.verdict,
             v.ckey, v.first_ord
      FROM verdicts v JOIN lines l ON l.file_index = v.file_index AND l.pos = v.pos
      UNION ALL
      SELECT l.file_index, l.line, s.seq, l.li, s.site_id, s.settlement_id, l.line_no, l.code, v.verdict,
             v.ckey, v.first_ord
      FROM lines l
      JOIN settlements s ON s.file_index = l.file_index AND s.inst = l.inst AND s.kind = 'R'
      JOIN verdicts v ON v.seq = s.first_seq AND v.li = l.li) x
LEFT JOIN verdicts f ON f.ord = x.first_ord AND x.verdict = 'DUPLICATE'
ORDER BY x.seq, x.li"""

# Rows that got a verdict, per file: lines of judged settlements and of their replays.
JUDGED_ROWS = """
SELECT l.file_index, COUNT(*) AS n
FROM lines l JOIN settlements s ON s.file_index = l.file_index AND s.inst = l.inst AND s.kind IN ('J', 'R')
GROUP BY l.file_index ORDER BY l.file_index"""

# Rows of settlements REPLAY rejects as a whole (validation, or a settlement id reused with
# other lines): each row goes to the errors file.
REJECTED = """
SELECT l.file_index, l.line, l.li, s.kind, s.seq, l.site_id, l.settlement_id, s.at_ms, l.code, l.product_id, l.units
FROM lines l JOIN settlements s ON s.file_index = l.file_index AND s.inst = l.inst AND s.kind IN ('E', 'C')
ORDER BY s.seq, l.li"""


def model_steps(models, since_ms: int | None = None) -> list[Step]:
    """The models' SQL (leads.md, Precise rules). ABNORMAL_SITE's peer statistics and RING's
    strongly connected components run in Python over the small tables these produce.

    since_ms (an incremental run, state.py): `verdicts` holds this run's lines and the saved
    history's lines the models still need; STOCKPILING's windows are opened again only for the
    (person, product) pairs this run's lines touch (`touched`), at lines from since_ms on (the
    windows saved before: h_closed keeps their figures, h_stock_ev their lines); the site rates
    add this run's lines to h_rates."""
    buyer, source, stock, swap, unrec = (models[m].params for m in ("RESALE_BUYER", "RESALE_SOURCE", "STOCKPILING",
                                                                     "SWAP", "UNRECEIVED"))
    window_ms = int(stock["window_hours"] * 3_600_000)
    flagged = sql_in(PACK_FLAGS)
    ok = "verdicts" if since_ms is None else (
        f"(SELECT v.* FROM verdicts v JOIN touched t ON t.insured = v.insured AND t.issued = v.issued "
        f"WHERE v.at_ms >= {int(since_ms)})")
    steps = [
        # A resold pack: a DUPLICATE at a site other than the pack's first dispense.
        Step("resale", """
SELECT d.ord AS later_ord, d.first_ord, d.site_id AS later_site, f.site_id AS first_site, d.ckey,
       f.insured AS first_insured
FROM verdicts d JOIN verdicts f ON f.ord = d.first_ord
WHERE d.verdict = 'DUPLICATE' AND d.site_id <> f.site_id"""),
        Step("m_buyer", f"""
SELECT later_site AS subject, COUNT(DISTINCT ckey) AS packs_resold, COUNT(DISTINCT first_site) AS other_sites
FROM resale GROUP BY later_site HAVING COUNT(DISTINCT ckey) >= {buyer['min_packs']}"""),
        Step("m_source", f"""
SELECT first_insured AS subject, COUNT(DISTINCT ckey) AS packs_resold, COUNT(DISTINCT later_site) AS other_sites
FROM resale WHERE first_insured <> ''
GROUP BY first_insured HAVING COUNT(DISTINCT ckey) >= {source['min_packs']}"""),
        Step("edges", """
SELECT first_site, later_site, COUNT(DISTINCT ckey) AS packs FROM resale GROUP BY first_site, later_site"""),
        Step("ok_person", f"""
SELECT o.ord, o.insured, o.issued, o.at_ms, o.site_id, o.ckey
FROM {ok} o
JOIN (SELECT v.insured, v.issued FROM {ok} v
      JOIN (SELECT insured, issued FROM {ok} x WHERE verdict = 'OK' AND insured <> ''
            GROUP BY insured, issued HAVING COUNT(*) >= {stock['min_packs']}) c
        ON c.insured = v.insured AND c.issued = v.issued
      WHERE v.verdict = 'OK'
      GROUP BY v.insured, v.issued
      HAVING COUNT(DISTINCT v.ckey) >= {stock['min_packs']} AND COUNT(DISTINCT v.site_id) >= {stock['min_sites']}) g
  ON g.insured = o.insured AND g.issued = o.issued
WHERE o.verdict = 'OK'"""),
        # Windows of 30 x 24 h starting at each OK line (both ends inclusive): any window holding a
        # set of lines can be moved to start at the earliest of them.
        Step("m_stock_win", f"""
SELECT a.ord AS a_ord, a.insured, a.issued, a.at_ms AS a_at, COUNT(DISTINCT b.ckey) AS packs,
       COUNT(DISTINCT b.site_id) AS sites
FROM ok_person a JOIN ok_person b
  ON b.insured = a.insured AND b.issued = a.issued AND b.at_ms >= a.at_ms AND b.at_ms <= a.at_ms + {window_ms}
GROUP BY a.ord, a.insured, a.issued, a.at_ms
HAVING COUNT(DISTINCT b.ckey) >= {stock['min_packs']} AND COUNT(DISTINCT b.site_id) >= {stock['min_sites']}"""),
        Step("m_stock", """
SELECT insured AS subject, MAX(packs) AS best_packs, MAX(sites) AS best_sites,
       COUNT(DISTINCT issued) AS n_products, MIN(issued) AS a_product
FROM m_stock_win GROUP BY insured"""),
        Step("m_swap", f"""
SELECT site_id AS subject, COUNT(*) AS mismatched FROM verdicts WHERE verdict = 'PRODUCT_MISMATCH'
GROUP BY site_id HAVING COUNT(*) >= {swap['min_lines']}"""),
        # UNRECEIVED: OK lines at a site of packs that site had not received by then (a receipt
        # after the sale does not cover it). `receipts` is empty without --receipts: no leads.
        Step("r_first", """
SELECT site_id, ckey, MIN(received_ms) AS received_ms FROM receipts GROUP BY site_id, ckey"""),
        Step("unreceived", f"""
SELECT v.ord, v.site_id, v.ckey
FROM verdicts v LEFT JOIN r_first r ON r.site_id = v.site_id AND r.ckey = v.ckey
WHERE v.verdict = 'OK' AND (r.received_ms IS NULL OR r.received_ms > v.at_ms)
  AND ({0 if unrec['receiving_sites_only'] else 1} = 1 OR v.site_id IN (SELECT site_id FROM r_first))"""),
        Step("m_unreceived", f"""
SELECT site_id AS subject, COUNT(DISTINCT ckey) AS packs FROM unreceived
GROUP BY site_id HAVING COUNT(DISTINCT ckey) >= {unrec['min_packs']}"""),
        Step("site_rates", f"""
SELECT site_id, COUNT(*) AS total, CAST(SUM(CASE WHEN verdict IN {flagged} THEN 1 ELSE 0 END) AS BIGINT) AS flagged
FROM verdicts GROUP BY site_id"""),
    ]
    if since_ms is None:
        return steps
    history = {
        "m_stock": """
SELECT insured AS subject, MAX(packs) AS best_packs, MAX(sites) AS best_sites,
       COUNT(DISTINCT issued) AS n_products, MIN(issued) AS a_product
FROM (SELECT insured, issued, packs, sites FROM m_stock_win
      UNION ALL SELECT insured, issued, packs, sites FROM h_closed) w
GROUP BY insured""",
        "site_rates": f"""
SELECT site_id, CAST(SUM(total) AS BIGINT) AS total, CAST(SUM(flagged) AS BIGINT) AS flagged
FROM (SELECT site_id, COUNT(*) AS total, SUM(CASE WHEN verdict IN {flagged} THEN 1 ELSE 0 END) AS flagged
      FROM v_new GROUP BY site_id
      UNION ALL SELECT site_id, total, flagged FROM h_rates) r
GROUP BY site_id"""}
    return [Step(st.name, history.get(st.name, st.select)) for st in steps]


def evidence_select(models, history: bool = False) -> str:
    """Every model's evidence as (model, subject_id, role, ord), one row per lead and line (with
    history: also the lines of the saved state's STOCKPILING windows, h_stock_ev)."""
    stock = models["STOCKPILING"].params
    window_ms = int(stock["window_hours"] * 3_600_000)
    flagged = sql_in(PACK_FLAGS)
    closed = "\n  UNION ALL\n  SELECT 'STOCKPILING', insured, 'line', ord FROM h_stock_ev" if history else ""
    return f"""
SELECT DISTINCT model, subject_id, role, ord FROM (
  SELECT 'RESALE_BUYER' AS model, r.later_site AS subject_id, 'first' AS role, r.first_ord AS ord
  FROM resale r JOIN m_buyer m ON m.subject = r.later_site
  UNION ALL
  SELECT 'RESALE_BUYER', r.later_site, 'later', r.later_ord FROM resale r JOIN m_buyer m ON m.subject = r.later_site
  UNION ALL
  SELECT 'RESALE_SOURCE', r.first_insured, 'first', r.first_ord FROM resale r JOIN m_source m ON m.subject = r.first_insured
  UNION ALL
  SELECT 'RESALE_SOURCE', r.first_insured, 'later', r.later_ord FROM resale r JOIN m_source m ON m.subject = r.first_insured
  UNION ALL
  SELECT 'RING', a.ring, 'first', r.first_ord
  FROM resale r JOIN rings a ON a.site_id = r.first_site JOIN rings b ON b.site_id = r.later_site AND b.ring = a.ring
  UNION ALL
  SELECT 'RING', a.ring, 'later', r.later_ord
  FROM resale r JOIN rings a ON a.site_id = r.first_site JOIN rings b ON b.site_id = r.later_site AND b.ring = a.ring
  UNION ALL
  SELECT 'STOCKPILING', w.insured, 'line', b.ord
  FROM m_stock_win w JOIN ok_person b
    ON b.insured = w.insured AND b.issued = w.issued AND b.at_ms >= w.a_at AND b.at_ms <= w.a_at + {window_ms}
  UNION ALL
  SELECT 'SWAP', v.site_id, 'line', v.ord FROM verdicts v JOIN m_swap m ON m.subject = v.site_id
  WHERE v.verdict = 'PRODUCT_MISMATCH'
  UNION ALL
  SELECT 'UNRECEIVED', u.site_id, 'line', u.ord FROM unreceived u JOIN m_unreceived m ON m.subject = u.site_id
  UNION ALL
  SELECT 'ABNORMAL_SITE', v.site_id, 'line', v.ord FROM verdicts v JOIN abnormal a ON a.site_id = v.site_id
  WHERE v.verdict IN {flagged}{closed}
) e"""


EVIDENCE_LINES = """
SELECT e.model, e.subject_id, e.role, e.ord, v.site_id, v.settlement_id, v.line_no, v.at_ms, v.ckey,
       v.product_id, v.insured, v.amount_fen
FROM evidence_keys e JOIN verdicts v ON v.ord = e.ord
ORDER BY e.model, e.subject_id, v.at_ms, e.ord, e.role"""

# Issuance as `tracecode load` leaves it in Redis (server/store/lua/issue.lua): the first record of a
# code fixes its product; later records for that product update the other fields (a status only
# when given); records for another product are conflicts and change nothing.
ISSUANCE_STEPS = [
    # One pass over all records; a code with one record (nearly all) is that record.
    Step("iss_agg", """
SELECT ckey, COUNT(*) AS n, MIN_BY(product_id, ord) AS product_id, MIN_BY(pack_units, ord) AS pack_units,
       MIN_BY(expiry, ord) AS expiry, MIN_BY(status, ord) AS status
FROM issuance_rows GROUP BY ckey"""),
    Step("iss_multi", """
SELECT r.* FROM issuance_rows r JOIN iss_agg a ON a.ckey = r.ckey AND a.n > 1"""),
    Step("issuance", """
SELECT ckey, product_id, pack_units, expiry, CASE WHEN status <> '' THEN status ELSE 'ACTIVE' END AS status
FROM iss_agg WHERE n = 1
UNION ALL
SELECT r.ckey, MAX_BY(r.product_id, r.ord) AS product_id, MAX_BY(r.pack_units, r.ord) AS pack_units,
       MAX_BY(r.expiry, r.ord) AS expiry,
       COALESCE(MAX_BY(r.status, r.ord) FILTER (WHERE r.status <> ''), 'ACTIVE') AS status
FROM iss_multi r JOIN iss_agg f ON f.ckey = r.ckey AND f.n > 1 AND f.product_id = r.product_id
GROUP BY r.ckey"""),
]

ISSUANCE_CONFLICTS = """
SELECT r.file_index, r.line FROM iss_multi r JOIN iss_agg f ON f.ckey = r.ckey
WHERE r.product_id <> f.product_id ORDER BY r.ord"""

"""Data shared by both codec twins (the Cython `_codec` and the pure-Python `fallback`).

Everything that describes the code formats lives here as data, so the two implementations cannot
drift apart on *what* is accepted; they only differ in *how fast* they walk a scan. The compiled
module turns these tables into C arrays once, at import.

Reason texts are templates here too: both twins format the same template with the same fields, so
"identical reason strings" is a property of the data, not of two hand-kept copies.
"""

# --- result kinds (the API contract) ------------------------------------------------------------
KIND_MALFORMED = 0
KIND_CN20 = 1
KIND_GS1 = 2

# --- characters -----------------------------------------------------------------------------------
GS = "\x1d"  # ASCII 29, how a scanner transmits FNC1 between GS1 fields

# GS1 General Specifications, figure 7.11-1 ("character set 82"): what AI 10/21/... may contain.
CHARSET82 = (
    "!\"%&'()*+,-./0123456789:;<=>?ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz"
)
assert len(CHARSET82) == 82

# What a keyboard-wedge scanner or an input method wraps around a scan. U+3000 (ideographic
# space) is first normalised to " " by the full-width rule; NBSP and the BOM come from copy/paste.
STRIP_CHARS = " \t\n\r\v\f\u00a0\ufeff"

# Full-width forms of printable ASCII (U+FF01..U+FF5E) map to ASCII by subtracting this offset;
# a Chinese IME in full-width mode produces them for digits, letters and punctuation alike.
FULLWIDTH_FIRST = 0xFF01
FULLWIDTH_LAST = 0xFF5E
FULLWIDTH_OFFSET = 0xFEE0
IDEOGRAPHIC_SPACE = 0x3000

# --- AIM symbology identifiers ----------------------------------------------------------------
# What follows the identifier: a Chinese 20-digit code only, a plain 2D payload (20-digit code or
# a URL), or GS1 data (element string; the parenthesised form is tolerated too).
AIM_CN20 = 1
AIM_PLAIN2D = 2
AIM_GS1 = 3
AIM_IDENTIFIERS = {
    "]C0": AIM_CN20,  # Code 128, no FNC1: the 1D barcode under a Chinese code
    "]d1": AIM_PLAIN2D,  # DataMatrix ECC 200, non-GS1
    "]Q1": AIM_PLAIN2D,  # QR Code model 2, non-GS1
    "]d2": AIM_GS1,  # GS1 DataMatrix
    "]Q3": AIM_GS1,  # GS1 QR Code
    "]C1": AIM_GS1,  # GS1-128
    "]e0": AIM_GS1,  # GS1 DataBar
}

# --- 20-digit Chinese code --------------------------------------------------------------------
CN20_LENGTH = 20
CN20_PRODUCT = slice(0, 7)  # 药品标识码
CN20_SERIAL = slice(7, 16)  # single-pack serial
CN20_DEFAULT_PREFIXES = "8"

# --- GS1 application identifiers ----------------------------------------------------------------
# Content kinds of an AI value.
K_DIGITS = 0  # numeric
K_SET82 = 1  # GS1 character set 82
K_DATE = 2  # YYMMDD, DD 00 = day not given (GS1 Gen Specs 7.12)
K_CHECKED = 3  # numeric, last digit a GS1 mod-10 check digit


# Two-digit AI prefixes whose AIs have a predefined length and so are never followed by FNC1
# (GS1 Gen Specs figure 7.8.5-2). Value: length of the data after the AI. 03/04/14/18/19 are
# reserved: they are in the figure but no AI uses them yet, so they are "unknown" below.
PREDEFINED_LENGTH = {
    "00": 18, "01": 14, "02": 14, "03": 14, "04": 16,
    "11": 6, "12": 6, "13": 6, "14": 6, "15": 6, "16": 6, "17": 6, "18": 6, "19": 6,
    "20": 2,
    "31": 6, "32": 6, "33": 6, "34": 6, "35": 6, "36": 6,
    "41": 13,
}  # fmt: skip

# How many digits an AI starting with a given two-digit prefix has. Only used to *name* an AI
# the table below does not know (so the reason says "unknown AI 8030", not "unknown AI 80").
AI_LENGTH_BY_PREFIX = {"23": 3, "24": 3, "25": 3, "31": 4, "32": 4, "33": 4, "34": 4, "35": 4,
                       "36": 4, "39": 4, "40": 3, "41": 3, "42": 3, "43": 4, "70": 4, "71": 3,
                       "72": 4, "80": 4, "81": 4, "82": 4}  # fmt: skip
AI_LENGTH_DEFAULT = 2


def _build_ai_table():
    """AI -> (min_len, max_len, kind). Fixed length is min_len == max_len.

    The AIs a medicine pack, a case or a pallet can carry. Composite values (e.g. 8003 N14+X..16)
    are checked as set 82 with their total lengths: the codec only needs to delimit and sanity-check
    them, the pack identity is 01 + 21.
    """
    t = {
        "00": (18, 18, K_CHECKED),  # SSCC
        "01": (14, 14, K_CHECKED),  # GTIN
        "02": (14, 14, K_CHECKED),  # GTIN of contained items
        "10": (1, 20, K_SET82),  # batch / lot
        "11": (6, 6, K_DATE),  # production date
        "12": (6, 6, K_DATE),  # due date
        "13": (6, 6, K_DATE),  # packaging date
        "15": (6, 6, K_DATE),  # best before
        "16": (6, 6, K_DATE),  # sell by
        "17": (6, 6, K_DATE),  # expiry
        "20": (2, 2, K_DIGITS),  # variant
        "21": (1, 20, K_SET82),  # serial number
        "22": (1, 20, K_SET82),  # consumer product variant
        "235": (1, 28, K_SET82),  # third-party controlled serial extension
        "240": (1, 30, K_SET82),  # additional product id
        "241": (1, 30, K_SET82),  # customer part number
        "242": (1, 6, K_DIGITS),  # made-to-order variation
        "243": (1, 20, K_SET82),  # packaging component number
        "250": (1, 30, K_SET82),  # secondary serial
        "251": (1, 30, K_SET82),  # reference to source entity
        "253": (13, 30, K_SET82),  # GDTI
        "254": (1, 20, K_SET82),  # GLN extension
        "255": (13, 25, K_DIGITS),  # GCN
        "30": (1, 8, K_DIGITS),  # variable count
        "37": (1, 8, K_DIGITS),  # count of trade items
        "400": (1, 30, K_SET82),  # customer's order number
        "401": (1, 30, K_SET82),  # GINC
        "402": (17, 17, K_DIGITS),  # GSIN
        "403": (1, 30, K_SET82),  # routing code
        "420": (1, 20, K_SET82),  # ship-to postal code
        "421": (4, 12, K_SET82),  # ship-to postal code with country
        "422": (3, 3, K_DIGITS),  # country of origin
        "423": (4, 15, K_DIGITS),  # countries of initial processing
        "424": (3, 3, K_DIGITS),  # country of processing
        "425": (3, 15, K_DIGITS),  # countries of disassembly
        "426": (3, 3, K_DIGITS),  # country of full process chain
        "427": (1, 3, K_SET82),  # country subdivision of origin
        "7001": (13, 13, K_DIGITS),  # NATO stock number
        "7002": (1, 30, K_SET82),  # meat carcass classification
        "7003": (10, 10, K_DIGITS),  # expiration date and time
        "7004": (1, 4, K_DIGITS),  # active potency
        "7005": (1, 12, K_SET82),  # catch area
        "7006": (6, 6, K_DATE),  # first freeze date
        "7007": (6, 12, K_DIGITS),  # harvest date (range)
        "7008": (1, 3, K_SET82),  # aquatic species
        "7009": (1, 10, K_SET82),  # fishing gear type
        "7010": (1, 2, K_SET82),  # production method
        "7020": (1, 20, K_SET82),  # refurbishment lot
        "7021": (1, 20, K_SET82),  # functional status
        "7022": (1, 20, K_SET82),  # revision status
        "7023": (1, 30, K_SET82),  # GIAI of an assembly
        "7240": (1, 20, K_SET82),  # protocol id
        "8001": (14, 14, K_DIGITS),  # roll products
        "8002": (1, 20, K_SET82),  # cellular mobile phone id
        "8003": (14, 30, K_SET82),  # GRAI
        "8004": (1, 30, K_SET82),  # GIAI
        "8005": (6, 6, K_DIGITS),  # price per unit
        "8006": (18, 18, K_DIGITS),  # ITIP
        "8007": (1, 34, K_SET82),  # IBAN
        "8008": (8, 12, K_DIGITS),  # date and time of production
        "8009": (1, 50, K_SET82),  # optically readable sensor indicator
        "8010": (1, 30, K_SET82),  # CPID
        "8011": (1, 12, K_DIGITS),  # CPID serial
        "8012": (1, 20, K_SET82),  # software version
        "8013": (1, 25, K_SET82),  # GMN
        "8017": (18, 18, K_CHECKED),  # GSRN provider
        "8018": (18, 18, K_CHECKED),  # GSRN recipient
        "8019": (1, 10, K_DIGITS),  # SRIN
        "8020": (1, 25, K_SET82),  # payment slip reference
        "8026": (18, 18, K_DIGITS),  # ITIP of contained items
        "8200": (1, 70, K_SET82),  # extended packaging URL
        "90": (1, 30, K_SET82),  # mutually agreed
        "03": (14, 14, K_CHECKED),  # GTIN of a made-to-order item
        "4307": (2, 2, K_SET82),  # ship-to country code
        "4309": (20, 20, K_DIGITS),  # ship-to geo location
        "4317": (2, 2, K_SET82),  # return-to country code
        "4318": (1, 20, K_SET82),  # return-to postal code
        "4320": (1, 35, K_SET82),  # service code description
        "4321": (1, 1, K_DIGITS),  # dangerous goods flag
        "4322": (1, 1, K_DIGITS),  # authority to leave
        "4323": (1, 1, K_DIGITS),  # signature required
        "4324": (10, 10, K_DIGITS),  # not before delivery date time
        "4325": (10, 10, K_DIGITS),  # not after delivery date time
        "4326": (6, 6, K_DATE),  # release date
        "7011": (6, 10, K_DIGITS),  # test by date [time]
        "7040": (4, 4, K_SET82),  # GS1 UIC with extension and importer index
        "7041": (1, 4, K_SET82),  # UN/CEFACT freight unit type
        "7241": (2, 2, K_DIGITS),  # AIDC media type
        "7242": (1, 25, K_SET82),  # version control number
        "7250": (8, 8, K_DIGITS),  # date of birth YYYYMMDD
        "7251": (12, 12, K_DIGITS),  # date and time of birth
        "7252": (1, 1, K_DIGITS),  # biological sex
        "7253": (1, 40, K_SET82),  # family name
        "7254": (1, 40, K_SET82),  # given name
        "7255": (1, 10, K_SET82),  # name suffix
        "7256": (1, 90, K_SET82),  # full name
        "7257": (1, 70, K_SET82),  # address
        "7258": (3, 3, K_SET82),  # baby birth sequence
        "7259": (1, 40, K_SET82),  # baby of family name
        "8014": (1, 25, K_SET82),  # HIDRI
        "8040": (15, 15, K_DIGITS),  # IMEI
        "8041": (15, 15, K_DIGITS),  # IMEI 2
        "8042": (32, 32, K_DIGITS),  # eSIM number
        "8043": (18, 20, K_DIGITS),  # physical SIM number
        "8110": (1, 70, K_SET82),  # coupon code (North America)
        "8111": (4, 4, K_DIGITS),  # coupon loyalty points
        "8112": (1, 70, K_SET82),  # positive offer file coupon code
    }
    for ai, hi in ((4300, 35), (4301, 35), (4302, 70), (4303, 70), (4304, 70), (4305, 70),
                   (4306, 70), (4308, 30), (4310, 35), (4311, 35), (4312, 70), (4313, 70),
                   (4314, 70), (4315, 70), (4316, 70), (4319, 30)):  # fmt: skip
        t[str(ai)] = (1, hi, K_SET82)  # ship-to / return-to address lines
    for ai in range(4330, 4334):  # temperatures: six digits and an optional '-'
        t[str(ai)] = (6, 7, K_SET82)
    for ai in range(7230, 7240):  # certification reference: scheme (2) + reference
        t[str(ai)] = (3, 30, K_SET82)
    for ai in range(710, 718):  # national healthcare reimbursement numbers (DE FR ES BR PT US IT CR)
        t[str(ai)] = (1, 20, K_SET82)
    for ai in range(410, 418):  # GLNs: ship to, bill to, purchased from, ...
        t[str(ai)] = (13, 13, K_CHECKED)
    for ai in range(7030, 7040):  # approval number of processor, with ISO country code
        t[str(ai)] = (4, 30, K_SET82)
    for ai in range(91, 100):  # company internal information
        t[str(ai)] = (1, 90, K_SET82)
    # Trade measures 310n-369n: six digits, n (0-5) = implied decimal point position.
    for base in [*range(310, 317), *range(320, 330), *range(330, 338), *range(340, 358),
                 *range(360, 370)]:  # fmt: skip
        for n in range(6):
            t[f"{base}{n}"] = (6, 6, K_DIGITS)
    for base, lo, hi, count in ((390, 1, 15, 10), (391, 4, 18, 10), (392, 1, 15, 10),
                                (393, 4, 18, 10), (394, 4, 4, 4), (395, 6, 6, 6)):  # fmt: skip
        for n in range(count):
            t[f"{base}{n}"] = (lo, hi, K_DIGITS)
    return t


AI_TABLE = _build_ai_table()

# Sanity of the data itself: an AI under a predefined prefix must have exactly that fixed length
# (the parser takes that many characters without looking for a separator), and no AI may be a
# prefix of another (the parser tries 2, 3 then 4 digits and takes the first hit).
for _ai, (_lo, _hi, _k) in AI_TABLE.items():
    assert 2 <= len(_ai) <= 4 and _ai.isdigit() and 1 <= _lo <= _hi, _ai
    if _ai[:2] in PREDEFINED_LENGTH:
        assert _lo == _hi == PREDEFINED_LENGTH[_ai[:2]], _ai
    for _n in range(2, len(_ai)):
        assert _ai[:_n] not in AI_TABLE, (_ai, _ai[:_n])
del _ai, _lo, _hi, _k

# Elements kept for the result; all others are validated and dropped.
AI_GTIN = "01"
AI_SERIAL = "21"
AI_BATCH = "10"
AI_EXPIRY = "17"

# Label used in a check-digit reason ("GTIN check digit: expected 2, got 7").
CHECK_LABELS = {"01": "GTIN", "02": "GTIN"}

# At most this many elements in one GS1 scan: bounds the compiled parser's field array and the
# work per scan. A real pack carries 4-6.
MAX_ELEMENTS = 64

# --- GS1 Digital Link ---------------------------------------------------------------------------
DL_PRIMARY = "01"
DL_QUALIFIERS = ("22", "10", "21")  # the standard's qualifier order for a GTIN (order not enforced)
DL_GTIN_LENGTHS = (8, 12, 13, 14)
URL_SCHEMES = ("http://", "https://")  # compared case-insensitively
# Around a 20-digit code in a verification URL: it must be a whole path segment or query value.
URL_CODE_BEFORE = "/=?&"
URL_CODE_AFTER = "/?&#;"

# --- reasons ------------------------------------------------------------------------------------
# {ch} is rendered by `show_char`: 'x' for printable ASCII, U+XXXX otherwise. Positions are
# 1-based: {pos} of an AI or a '%' counts in the scan after stripping surrounding whitespace
# (symbology identifier included); {pos} inside a value counts in that value.
R_TOO_LONG = "scan: {n} characters exceeds maximum {max}"
R_EMPTY = "empty scan"
R_NOT_ASCII = "scan: character {ch} at position {pos} is not ASCII"
R_AIM_INCOMPLETE = "incomplete symbology identifier"
R_AIM_UNSUPPORTED = "unsupported symbology identifier {aim}"
R_AIM_UNSUPPORTED_ANON = "unsupported symbology identifier at position 1"
R_AIM_EMPTY = "empty scan after symbology identifier {aim}"

R_CN_CHAR = "20-digit code: character {ch} at position {pos} is not a digit"
R_CN_LEN = "20-digit code: {n} digits"
R_CN_PREFIX = "20-digit code: leading digit {d} not admitted (admitted: {admitted})"

R_URL_NONE = "URL: no 20-digit code and no GS1 Digital Link path"
R_URL_MANY = "URL: {n} 20-digit codes, ambiguous"
R_DL_PAIRS = "Digital Link: path after /01/ is not AI/value pairs (22, 10, 21)"
R_DL_GTIN_LEN = "Digital Link: GTIN has {n} digits (8, 12, 13 or 14 expected)"
R_DL_PERCENT = "Digital Link: bad percent-encoding at position {pos}"
R_DL_QUERY_AI = "Digital Link: unknown AI {ai} in query at position {pos}"

R_GS1_EXPECT_AI = "GS1: expected an AI at position {pos}, got {ch}"
R_GS1_INCOMPLETE_AI = "GS1: incomplete AI at position {pos}"
R_GS1_UNKNOWN_AI = "GS1: unknown AI {ai} at position {pos}"
R_GS1_EXPECT_PAREN = "GS1: expected '(' at position {pos}, got {ch}"
R_GS1_BAD_GROUP = "GS1: malformed AI in parentheses at position {pos}"
R_GS1_DUPLICATE = "GS1: AI {ai} appears twice with different values"
R_GS1_TOO_MANY = "GS1: more than {max} elements"
R_GS1_NO_GTIN = "GS1: no GTIN (AI 01)"
R_GS1_NO_SERIAL = "GS1: not serialised (no AI 21)"

R_AI_FIXED_LEN = "AI {ai}: {n} characters, expected {exp}"
R_AI_EMPTY = "AI {ai}: empty value"
R_AI_MAX_LEN = "AI {ai}: {n} characters, maximum {max}"
R_AI_MIN_LEN = "AI {ai}: {n} characters, minimum {min}"
R_AI_DIGIT = "AI {ai}: character {ch} at position {pos} is not a digit"
R_AI_SET82 = "AI {ai}: character {ch} at position {pos} not in set 82"
R_AI_CHECK = "{label} check digit: expected {exp}, got {got}"
R_AI_MONTH = "AI {ai}: month {mm} not valid in date {value}"
R_AI_DAY = "AI {ai}: day {dd} not valid for {yyyy}-{mm} in date {value}"


def show_char(code_point):
    """How a reason names one character: quoted if printable ASCII, else its code point."""
    if 0x20 <= code_point < 0x7F:
        return "'" + chr(code_point) + "'"
    return "U+%04X" % code_point


def check_label(ai):
    return CHECK_LABELS.get(ai, "AI " + ai)

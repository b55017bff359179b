# Signatures of the compiled codec (_codec.pyx); fallback.py has the same, in pure Python.
from typing import Iterable, Optional, Tuple

from .profile import Profile

# (kind, key, product, serial, batch, expiry, reason): read it with tracecode.codec's indexes.
_Parsed = Tuple[int, str, str, str, str, int, str]

def parse(raw: str, profile: Optional[Profile] = ...) -> _Parsed: ...
def parse_many(raws: Iterable[str], profile: Optional[Profile] = ...) -> list[_Parsed]: ...
def gtin_check_digit(digits: str) -> int: ...

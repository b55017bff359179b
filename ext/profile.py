"""Scanner profile: how one site's scanners deliver codes, and which codes it admits.

Immutable and hashable so the server can build one per configuration and pass it on every call;
the compiled codec caches its C view of the last profile it saw (by identity), so reusing one
instance is what makes passing it cheap.
"""
import datetime
from dataclasses import dataclass, field

from .tables import CN20_DEFAULT_PREFIXES


@dataclass(frozen=True, slots=True)
class Profile:
    """Scanner profile / codec configuration.

    gs_substitutes: strings a scanner sends instead of ASCII 29 (FNC1), e.g. ("|",) or ("<GS>",).
        Non-empty ASCII strings without digits (a digit could be read as part of an AI).
    cn_prefixes: leading digits admitted for the 20-digit Chinese code ("" = any digit).
    ref_date: date the GS1 YY sliding window is computed against; None = today (local clock),
        looked up at each call so a long-running server crosses New Year correctly.
    max_length: longest raw scan accepted, in characters (before stripping).
    """

    gs_substitutes: tuple = ()
    cn_prefixes: str = CN20_DEFAULT_PREFIXES
    ref_date: datetime.date | None = None
    max_length: int = 512
    # The separators in the order the parser tries them (GS first: it is what most scanners send).
    separators: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        subs = self.gs_substitutes
        if isinstance(subs, str):
            # A lone string would silently become one substitute per character.
            raise TypeError("gs_substitutes must be a tuple of strings, e.g. ('|',)")
        subs = tuple(subs)
        for s in subs:
            if not isinstance(s, str) or not s:
                raise ValueError(f"gs_substitutes: {s!r} is not a non-empty string")
            if not s.isascii() or any(c.isdigit() for c in s):
                raise ValueError(f"gs_substitutes: {s!r} must be ASCII without digits")
        object.__setattr__(self, "gs_substitutes", subs)
        prefixes = self.cn_prefixes
        if not isinstance(prefixes, str) or not all(c in "0123456789" for c in prefixes):
            raise ValueError(f"cn_prefixes: {prefixes!r} must be a string of ASCII digits")
        # Sorted and de-duplicated so equal configurations compare, hash and read the same.
        object.__setattr__(self, "cn_prefixes", "".join(sorted(set(prefixes))))
        if self.ref_date is not None and not isinstance(self.ref_date, datetime.date):
            raise TypeError("ref_date must be a datetime.date or None")
        if isinstance(self.ref_date, datetime.datetime):
            object.__setattr__(self, "ref_date", self.ref_date.date())
        if not isinstance(self.max_length, int) or isinstance(self.max_length, bool):
            raise TypeError("max_length must be an int")
        if not 1 <= self.max_length <= 1 << 20:
            raise ValueError("max_length must be between 1 and 1048576")
        object.__setattr__(self, "separators", ("\x1d", *subs))

    def ref_year(self):
        """Year the GS1 century window is centred on."""
        if self.ref_date is not None:
            return self.ref_date.year
        return datetime.date.today().year


DEFAULT_PROFILE = Profile()

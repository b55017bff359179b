"""Domain errors, in one registry: each error class declares the gRPC status it is answered with
(by name, so this module needs no grpc) and, where a Lua script raises it, its script error code
(the `TC...` prefix of the script's error reply). The store turns script errors into these
classes through `from_script_error`; the API maps them to statuses through `status_of`; neither
has a chain of ifs (asyncpg keeps its SQLSTATE-to-exception map the same way).

May import: the standard library only.
"""
from __future__ import annotations

from typing import ClassVar


class TracecodeError(Exception):
    """Base of every domain error. `status`: the gRPC status name it is answered with."""
    status: ClassVar[str] = "INTERNAL"
    script_code: ClassVar[str | None] = None  # e.g. "TCCONFLICT", when a Lua script raises it

    @classmethod
    def from_script(cls, detail: str) -> "TracecodeError":
        """The error a script reply `<CODE> <detail>` stands for (subclasses with arguments parse
        them from detail)."""
        return cls(detail)


class InvalidRequest(TracecodeError):
    """The request is wrong as a whole or in named fields: [(field path, description), ...]."""
    status = "INVALID_ARGUMENT"

    def __init__(self, violations: list[tuple[str, str]]):
        super().__init__("; ".join(f"{f}: {d}" for f, d in violations))
        self.violations = violations


class PermissionDenied(TracecodeError):
    status = "PERMISSION_DENIED"


class StoreError(TracecodeError):
    """Base of the errors the store raises."""


class StoreUnavailable(StoreError):
    """Redis cannot be reached or did not answer in time: retryable, nothing was half-applied."""
    status = "UNAVAILABLE"


class SettlementConflict(StoreError):
    """The settlement id was already used with a different request body."""
    status = "ALREADY_EXISTS"
    script_code = "TCCONFLICT"


class NotFound(StoreError):
    status = "NOT_FOUND"


class SettlementNotFound(NotFound):
    script_code = "TCNOTFOUND"


class ReturnWindowClosed(StoreError):
    status = "FAILED_PRECONDITION"
    script_code = "TCWINDOW"

    def __init__(self, age_ms: int):
        super().__init__(f"return window closed: settlement is {age_ms / 86_400_000:.1f} days old")
        self.age_ms = age_ms

    @classmethod
    def from_script(cls, detail: str) -> "ReturnWindowClosed":
        return cls(int(detail.split()[0]))


class BadLineIndex(StoreError):
    status = "INVALID_ARGUMENT"
    script_code = "TCBADLINE"

    def __init__(self, index: int):
        super().__init__(f"line index {index} is not in the settlement")
        self.index = index
        self.violations = [("line_indexes", str(self))]

    @classmethod
    def from_script(cls, detail: str) -> "BadLineIndex":
        return cls(int(detail.split()[0]))


class PackPruned(StoreError):
    """A return names a line whose pack's state was pruned (it expired past the return window,
    `tracecode prune-expired`): there is nothing to give units back to, so the return is refused
    as a whole and nothing is written."""
    status = "FAILED_PRECONDITION"
    script_code = "TCPRUNED"

    def __init__(self, index: int, code: str = ""):
        super().__init__(f"line {index}: the pack {code} has no state any more (expired and pruned); "
                         "it cannot be returned")
        self.index, self.code = index, code

    @classmethod
    def from_script(cls, detail: str) -> "PackPruned":
        index, _, code = detail.partition(" ")
        return cls(int(index), code.strip())


class DataSetMismatch(StoreError):
    """The data set in Redis was written with other settings than this process's (layout version,
    BUCKETS, code_buckets, pseudonym key), or carries no marker where one is required
    (store/marker.py): nothing is read or written until they agree."""
    status = "FAILED_PRECONDITION"


class Sanctioned(StoreError):
    """A settlement refused because a sanction binds its site or its insured person. `notices`:
    the binding sanctions (sanctions.Notice), the one that names the refusal first; from a script
    (lua/gate.lua) the entries come as json in `entries_json` and the sanction service decodes
    them (this module imports nothing of tracecode). `text`: the pharmacist's message."""
    status = "FAILED_PRECONDITION"
    script_code = "TCSANCTION"

    def __init__(self, notices: list, entries_json: str = ""):
        super().__init__("settlement refused: a sanction binds the site or the insured person")
        self.notices, self.entries_json, self.text = notices, entries_json, ""

    @classmethod
    def from_script(cls, detail: str) -> "Sanctioned":
        return cls([], detail)


class LiveRuleRefused(StoreError):
    """A settlement refused by a live rule configured to refuse (rules/live.py, live = "REFUSE"):
    nothing was marked. `notice`: the rule's figures as the script reports them (model m,
    version v, packs k, sites s, product g, window hours w); `text`: the pharmacist's message."""
    status = "FAILED_PRECONDITION"
    script_code = "TCLIVE"

    def __init__(self, notice: dict, text: str = ""):
        super().__init__(text or f"settlement refused by live rule {notice.get('m', '')}")
        self.notice, self.text = notice, text

    @classmethod
    def from_script(cls, detail: str) -> "LiveRuleRefused":
        import json
        return cls(json.loads(detail))


class SanctionViewStale(StoreError):
    """The server's view of the sanctions is older than its freshness bound (cluster): it cannot
    tell whether a sanction binds, so it settles nothing until the view is fresh (retry)."""
    status = "UNAVAILABLE"


def _registry() -> dict[str, type[TracecodeError]]:
    found: dict[str, type[TracecodeError]] = {}
    todo: list[type[TracecodeError]] = [TracecodeError]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.script_code:
            found[cls.script_code] = cls
    return found


# Script error code -> error class, every class that declares one.
BY_SCRIPT_CODE = _registry()


def from_script_error(message: str) -> TracecodeError | None:
    """The domain error of a script's error reply ('TCCONFLICT detail ...'), None for any other."""
    code, _, detail = message.partition(" ")
    cls = BY_SCRIPT_CODE.get(code)
    return cls.from_script(detail) if cls else None


def status_of(error: BaseException) -> str | None:
    """The gRPC status name a domain error is answered with; None for anything else (a bug)."""
    return error.status if isinstance(error, TracecodeError) else None


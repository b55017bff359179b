"""Domain errors. Each maps to exactly one gRPC status in servicer._guarded."""


class InvalidRequest(Exception):
    """The request is wrong as a whole or in named fields: [(field path, description), ...]."""

    def __init__(self, violations: list[tuple[str, str]]):
        super().__init__("; ".join(f"{f}: {d}" for f, d in violations))
        self.violations = violations


class PermissionDenied(Exception):
    pass


class StoreError(Exception):
    """Base of the errors the store raises."""


class StoreUnavailable(StoreError):
    """Redis cannot be reached or did not answer in time: retryable, nothing was half-applied."""


class SettlementConflict(StoreError):
    """The settlement id was already used with a different request body."""


class NotFound(StoreError):
    pass


class SettlementNotFound(NotFound):
    pass


class ReturnWindowClosed(StoreError):
    def __init__(self, age_ms: int):
        super().__init__(f"settlement is {age_ms / 86_400_000:.1f} days old")
        self.age_ms = age_ms


class BadLineIndex(StoreError):
    def __init__(self, index: int):
        super().__init__(f"line index {index} is not in the settlement")
        self.index = index


class Sanctioned(StoreError):
    """A settlement refused because a sanction binds its site or its insured person; `notices`
    are the binding sanctions (sanctions.Notice), the one that names the refusal first."""

    def __init__(self, notices: list):
        super().__init__(f"{notices[0].reason}: sanction {notices[0].sanction_id}")
        self.notices = notices


class SanctionViewStale(StoreError):
    """The server's view of the sanctions is older than its freshness bound (cluster): it cannot
    tell whether a sanction binds, so it settles nothing until the view is fresh (retry)."""

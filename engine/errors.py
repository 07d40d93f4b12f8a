"""The domain's exceptions, and the problem+json each one becomes.

    GuichetError                   every refusal the engine answers on purpose
    ├── ValidationFailed           400 validation-error (carries errors=[{field, message}])
    ├── Unauthorized               401 unauthorized
    ├── PowInvalid                 403 pow-invalid
    ├── NotFound                   404 not-found
    ├── SlotFull                   409 slot-full
    ├── NotOpen                    409 not-open
    ├── IdentityAlreadyBooked      409 identity-already-booked
    ├── HoldConfirming             409 hold-confirming (a confirm of this hold is under way)
    ├── CancelledOtherwise         409 cancelled-otherwise (cancelled before, not as asked)
    ├── ChallengeExpired           410 challenge-expired
    │   └── ChallengeSpent         the same, said of a challenge spent before
    ├── HoldExpired                410 hold-expired
    ├── PayloadTooLarge            413 payload-too-large
    ├── NotAcceptable              406 not-acceptable
    ├── RateLimited                429 rate-limited (carries retry_after)
    └── Overloaded                 503 overloaded (carries retry_after)
        └── StoreUnavailable       a backing store did not answer in time, or cannot serve now
            └── SchemaBehind       PostgreSQL lacks a migration this engine needs

Lower layers (redis-py, asyncpg) never leak past ``engine.inventory`` and ``engine.store``:
their errors are mapped there, in one place each, to StoreUnavailable or to one of the above.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any, ClassVar


class GuichetError(Exception):
    name: ClassVar[str] = "internal-error"
    status: ClassVar[int] = 500
    title: ClassVar[str] = "Internal error"

    def __init__(self, detail: str = "", **extra: Any) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.extra = extra

    def problem(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": f"/problems/{self.name}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        body.update(self.extra)
        return body


class ValidationFailed(GuichetError):
    name, status, title = "validation-error", 400, "The request is not valid"

    def __init__(self, errors: list[dict[str, str]], detail: str = "") -> None:
        super().__init__(detail or _summary(errors))
        self.extra = {"errors": errors}


_DETAILED = 3  # errors spelled out in a validation error's detail; all are in ``errors``


def _summary(errors: list[dict[str, str]]) -> str:
    """The first few errors, for a person reading the detail: a release of 120 slots with
    one mistake repeated made a detail of 120 sentences."""
    text = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:_DETAILED])
    if len(errors) > _DETAILED:
        text += f"; and {len(errors) - _DETAILED} more (see errors)"
    return text


class Unauthorized(GuichetError):
    name, status, title = "unauthorized", 401, "Missing or wrong bearer token"


class PowInvalid(GuichetError):
    name, status, title = "pow-invalid", 403, "The proof of work is not valid"


class NotFound(GuichetError):
    name, status, title = "not-found", 404, "No such resource"


class NotAcceptable(GuichetError):
    name, status, title = "not-acceptable", 406, "No acceptable representation"


class SlotFull(GuichetError):
    name, status, title = "slot-full", 409, "No free place left on this slot"


class NotOpen(GuichetError):
    """``retry_after``: the seconds until the window opens, when that is all it waits for
    (sent as ``Retry-After`` too)."""

    name, status, title = "not-open", 409, "Outside the booking window"

    def __init__(self, detail: str = "", retry_after: int | None = None) -> None:
        super().__init__(detail, **({} if retry_after is None else {"retry_after": retry_after}))

    @classmethod
    def until(cls, moment: datetime, now: datetime, detail: str) -> NotOpen:
        """Not open before ``moment``: come back then."""
        return cls(detail, retry_after=max(1, math.ceil((moment - now).total_seconds())))


class IdentityAlreadyBooked(GuichetError):
    name, status, title = (
        "identity-already-booked",
        409,
        "This person already has an active booking for this procedure",
    )


class HoldConfirming(GuichetError):
    name, status, title = "hold-confirming", 409, "A confirmation of this hold is under way"


class HoldConfirmed(GuichetError):
    """A hold given back once it was booked: the confirm, sent again, answers the booking."""

    name, status, title = "hold-confirmed", 409, "This hold was confirmed"


class PreconditionFailed(GuichetError):
    """``If-Match`` named none of the release's current ETag: it changed since it was read
    (another agent's change, a withdrawing cancel)."""

    name, status, title = "precondition-failed", 412, "The release changed since it was read"


class CancelledOtherwise(GuichetError):
    name, status, title = (
        "cancelled-otherwise",
        409,
        "This booking was already cancelled, not as this request asks",
    )


class ChallengeExpired(GuichetError):
    name, status, title = "challenge-expired", 410, "The challenge expired or was already spent"


class ChallengeSpent(ChallengeExpired):
    def __init__(self) -> None:
        super().__init__("This challenge was already spent; ask for a new one")


class HoldExpired(GuichetError):
    name, status, title = "hold-expired", 410, "The hold expired or was released"


class PayloadTooLarge(GuichetError):
    name, status, title = "payload-too-large", 413, "The request body is too large"


class RateLimited(GuichetError):
    """``level`` names the limit: address, net, net48, session, identity, hold, email,
    unspent, holds, lookup, lookup-net, lookup-net48."""

    name, status, title = "rate-limited", 429, "Too many requests"

    def __init__(self, retry_after: int, detail: str = "", level: str = "address") -> None:
        super().__init__(detail, retry_after=retry_after, level=level)
        self.retry_after = retry_after


class Overloaded(GuichetError):
    name, status, title = "overloaded", 503, "The service is overloaded; try again shortly"

    def __init__(self, retry_after: int, detail: str = "", level: str = "engine") -> None:
        super().__init__(detail, retry_after=retry_after, level=level)
        self.retry_after = retry_after


class StoreUnavailable(Overloaded):
    """Redis or PostgreSQL did not answer within its timeout."""

    def __init__(self, retry_after: int, detail: str = "") -> None:
        super().__init__(retry_after, detail, level="store")


class NotCommitted(StoreUnavailable):
    """PostgreSQL refused the transaction for now and rolled it back (a deadlock, a
    serialisation failure, a read-only standby, an idle transaction ended): unlike a
    timeout, it is certain that nothing was written."""


class SchemaBehind(StoreUnavailable):
    """PostgreSQL answers, but lacks migrations, or this engine's version of a function
    (``sql/functions/``): ``guichet migrate``."""

    def __init__(self, retry_after: int, missing: list[int], functions: list[str]) -> None:
        lacks = [f"migration(s) {', '.join(map(str, missing))}"] if missing else []
        lacks += [f"function(s) {', '.join(functions)}"] if functions else []
        super().__init__(
            retry_after,
            f"PostgreSQL lacks {' and '.join(lacks)} of this engine: run `guichet migrate`",
        )
        self.missing = missing
        self.functions = functions

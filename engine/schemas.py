"""Request bodies of the HTTP API, validated strictly (unknown fields are errors).

The same models produce the request schemas of ``/openapi.json``.
"""

from __future__ import annotations

import functools
import json
import re
import typing
import zoneinfo
from collections import Counter
from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal, Protocol, TypeVar

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from engine.errors import ValidationFailed
from engine.identity import ID_NUMBER, normalise_id_number


def plausible_year(year: int) -> bool:
    """Within the years every time the engine takes lies in: any calendar renders them,
    and a day after the last still converts."""
    return 2000 <= year <= 2200


YEARS_MESSAGE = "must be between the years 2000 and 2200"


def _plausible(moment: datetime) -> datetime:
    # The local year is checked first: converting 9999-12-31T23:59Z+01:00 would overflow.
    if not plausible_year(moment.year) or not plausible_year(moment.astimezone(UTC).year):
        raise ValueError(YEARS_MESSAGE)
    return moment


_WRITTEN_OUT = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ]")


def _written_out(value: object) -> object:
    # pydantic reads a number, in a string too ("1806220800", "1806220800.5"), as seconds
    # since 1970: a tool's number where a time was meant was published as some date,
    # silently. A date written out first, then parsed as pydantic does (lax: a validator
    # before it hands the parse a Python string).
    if not isinstance(value, str) or not _WRITTEN_OUT.match(value):
        raise ValueError(
            "must be a date and time as RFC 3339 writes it (2027-01-04T09:00:00+01:00)"
        )
    return value


# Every date-time of a request: RFC 3339 text with an offset, within years any calendar
# can render.
Moment = Annotated[
    AwareDatetime, Strict(False), BeforeValidator(_written_out), AfterValidator(_plausible)
]
IDENT = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
Ident = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")]
Opaque = Annotated[str, StringConstraints(min_length=1, max_length=200)]
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]
Nonce = Annotated[str, StringConstraints(pattern=r"^[0-9a-zA-Z]{1,32}$")]
Email = Annotated[
    str,
    StringConstraints(strip_whitespace=True, max_length=254, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$"),
]

M = TypeVar("M", bound=BaseModel)


class _HasId(Protocol):
    @property
    def id(self) -> str: ...


Identified = TypeVar("Identified", bound=_HasId)


def _each_id_once(items: list[Identified], message: str) -> list[Identified]:
    if len({item.id for item in items}) != len(items):
        raise ValueError(message)
    return items


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ChallengeRequest(Body):
    release: Opaque


def _id_number(value: str) -> str:
    if not ID_NUMBER.match(normalise_id_number(value)):
        raise ValueError("must be 5 to 20 letters and digits (spaces and dashes ignored)")
    return value


IdNumber = Annotated[
    str, StringConstraints(min_length=1, max_length=40), AfterValidator(_id_number)
]


class Applicant(Body):
    family_name: Name
    given_names: Name
    birth_date: date
    id_number: IdNumber = Field(
        description="AGDREF or passport number; case, spaces and dashes are ignored"
    )
    email: Email

    @field_validator("birth_date")
    @classmethod
    def _birth_date(cls, value: date) -> date:
        if not date(1900, 1, 1) <= value <= date.today():
            raise ValueError("must be between 1900-01-01 and today")
        return value


class HoldRequest(Body):
    slot_id: Opaque
    challenge: Opaque
    nonces: list[Nonce] = Field(min_length=1, max_length=64)


class EntryRequest(Body):
    challenge: Opaque
    nonces: list[Nonce] = Field(min_length=1, max_length=64)
    applicant: Applicant


class BeaconIn(Body):
    beacon: Annotated[str, StringConstraints(min_length=1, max_length=200)] = Field(
        description="A public random value published after registration closed"
    )


class ConfirmRequest(Body):
    applicant: Applicant


class ProcedureIn(Body):
    id: Ident
    name: Name


# Zone files of the IANA database that name no place's zone.
_NOT_ZONES = frozenset({"localtime", "posixrules", "Factory"})


class SiteIn(Body):
    name: Name
    timezone: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    procedures: list[ProcedureIn] = Field(max_length=100)

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        # The zone files that are not a place's zone load too: "localtime" is each host's
        # own (workers set differently would disagree on every time), "right/" zones count
        # leap seconds, "posix/" ones repeat the others under a second name.
        if value in _NOT_ZONES or value.startswith(("posix/", "right/")):
            raise ValueError("not a place's IANA time zone, such as Europe/Paris")
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError("not a known IANA time zone") from None
        return value

    @field_validator("procedures")
    @classmethod
    def _unique(cls, value: list[ProcedureIn]) -> list[ProcedureIn]:
        return _each_id_once(value, "procedure ids must be unique")


class SlotIn(Body):
    starts_at: Moment
    duration_minutes: int = Field(ge=1, le=1440)
    capacity: int = Field(ge=0, le=10000)


class ReleaseIn(Body):
    site: Ident
    procedure: Ident
    mode: Literal["fcfs", "draw"]
    opens_at: Moment | None = None
    registration_opens_at: Moment | None = None
    registration_closes_at: Moment | None = None
    draw_at: Moment | None = None
    # A draw's: where its beacon will come from (docs/draw.md), public from publication.
    beacon_source: Annotated[str, StringConstraints(min_length=1, max_length=300)] | None = None
    slots: list[SlotIn] = Field(min_length=1, max_length=2000)

    @model_validator(mode="after")
    def _windows(self) -> ReleaseIn:
        draw = (self.registration_opens_at, self.registration_closes_at, self.draw_at)
        if self.mode == "fcfs":
            if self.opens_at is None or any(draw):
                raise ValueError("an fcfs release has opens_at and no registration or draw times")
            if self.beacon_source is not None:
                raise ValueError("only a draw release has a beacon_source")
            # (A draw may come after its own slots: it gives the places other draws of its
            # procedure carried over, docs/draw.md.)
            if self.opens_at >= max(slot.starts_at for slot in self.slots):
                raise ValueError("opens_at must come before the last slot starts")
        else:
            if self.opens_at is not None or not all(draw):
                raise ValueError(
                    "a draw release has registration_opens_at, registration_closes_at and "
                    "draw_at, and no opens_at"
                )
            ro, rc, da = draw
            assert ro and rc and da
            if not ro < rc <= da:
                raise ValueError("needs registration_opens_at < registration_closes_at <= draw_at")
        return self


class SlotCapacity(Body):
    id: Opaque
    capacity: int = Field(ge=0, le=10000)


class ReleasePatch(Body):
    opens_at: Moment | None = None
    registration_opens_at: Moment | None = None
    registration_closes_at: Moment | None = None
    draw_at: Moment | None = None
    slots: list[SlotCapacity] = Field(default_factory=list, max_length=2000)

    @field_validator("slots")
    @classmethod
    def _unique(cls, value: list[SlotCapacity]) -> list[SlotCapacity]:
        return _each_id_once(value, "each slot at most once: which capacity would it get?")


class IdentityCheck(Body):
    """The number on the document a person shows at the counter."""

    id_number: IdNumber


class StaffBookingRequest(Body):
    slot_id: Opaque
    applicant: Applicant


class StaffEntryRequest(Body):
    applicant: Applicant


def parse(model: type[M], raw: bytes) -> M:
    """Validate a JSON body; raise ValidationFailed listing every problem."""
    try:
        parsed = model.model_validate_json(raw or b"")
    except ValidationError as exc:
        raise ValidationFailed([_error(e) for e in exc.errors(include_url=False)]) from None
    # JSON can only carry a NUL inside a string as the escape \u0000.
    nul = _nul_fields(parsed.model_dump(), "") if b"\\u0000" in (raw or b"") else []
    if nul:
        raise ValidationFailed([{"field": f, "message": "must not contain NUL"} for f in nul])
    if _may_repeat_a_name(model, raw):
        repeated = _repeated_names(raw)
        if repeated:
            message = "given more than once"
            raise ValidationFailed([{"field": name, "message": message} for name in repeated])
    return parsed


def _may_repeat_a_name(model: type[BaseModel], raw: bytes) -> bool:
    """Whether an object of ``raw`` (valid JSON, of ``model``'s shape) could hold a name
    twice. Our parser keeps the last; a proxy or firewall reading the first would have seen
    another request. Unknown names are refused anyway, so only the model's own can be
    repeated, and none is if each is written at most once and no escape could spell one
    otherwise. (Counting them in a hold's body takes about 1 us, the exact second parse
    about 8 us, on a machine whose worker served a hold in about 390 us.)"""
    for name in _quoted_names(model):
        if raw.count(name) > 1:
            return True
    return b"\\" in raw


@functools.cache
def _quoted_names(model: type[BaseModel]) -> tuple[bytes, ...]:
    """Every field name a body of ``model`` can hold, at any depth, in JSON's quotes."""
    names: set[bytes] = set()
    for name, field in model.model_fields.items():
        names.add(json.dumps(name).encode())
        for inner in _models_in(field.annotation):
            names.update(_quoted_names(inner))
    return tuple(sorted(names))


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


class _Pairs(list[tuple[str, Any]]):
    """A JSON object as its parser read it: each name with its value, in order."""


def _repeated_names(raw: bytes) -> list[str]:
    """Where ``raw`` gives a name more than once in one object (``applicant.email``,
    ``slots.3.capacity``), at most ``_REPEATED_MAX`` of them."""
    repeated: dict[str, None] = {}
    # A path is its last part and its parent's path, spelled out only for a name found
    # repeated: copied whole at each item of a long list, deep ones cost seconds.
    Where = tuple[Any, str] | None

    def spelled(path: Where) -> str:
        parts = []
        while path is not None:
            path, part = path
            parts.append(part)
        return ".".join(reversed(parts))

    def walk(value: Any, path: Where) -> None:
        if len(repeated) >= _REPEATED_MAX:
            return
        if isinstance(value, _Pairs):
            twice = {name for name, n in Counter(name for name, _ in value).items() if n > 1}
            for name, inner in value:
                # A repeated name's first value is not validated: its names may be anything
                # the client wrote, of any length.
                at = (path, name[:_NAME_SHOWN])
                if name in twice:
                    repeated[spelled(at)] = None
                walk(inner, at)
        elif isinstance(value, list):
            for i, inner in enumerate(value):
                walk(inner, (path, str(i)))

    walk(json.loads(raw, object_pairs_hook=_Pairs), None)
    return list(repeated)[:_REPEATED_MAX]


_REPEATED_MAX = 10  # a staff body of 2 000 slots could repeat a name in each
_NAME_SHOWN = 64


def _nul_fields(value: Any, path: str) -> list[str]:
    """Fields holding a NUL character: PostgreSQL cannot store one in text."""
    if isinstance(value, str):
        return [path or "body"] if "\x00" in value else []
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return []
    return [f for k, v in items for f in _nul_fields(v, f"{path}.{k}" if path else str(k))]


def _error(e: Any) -> dict[str, str]:
    loc = ".".join(str(p) for p in e["loc"])
    message = e["msg"]
    if e["type"] == "json_invalid":
        return {"field": "body", "message": "not valid JSON"}
    if e["type"] == "model_type":
        return {"field": loc or "body", "message": "must be a JSON object"}
    return {"field": loc or "body", "message": message}


_MOMENT: TypeAdapter[datetime] = TypeAdapter(Moment)


def parse_moment(value: str) -> datetime:
    """An RFC 3339 time with an offset, as a query string gives it; ValueError if not."""
    return _MOMENT.validate_python(value)


def parse_ident(field: str, value: str) -> str:
    """Check an identifier taken from the path (site ids are chosen by staff)."""
    if not IDENT.fullmatch(value):
        raise ValidationFailed([{"field": field, "message": "must be 1 to 63 of a-z, 0-9 and -"}])
    return value

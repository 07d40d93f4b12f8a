"""Request bodies of the HTTP API, validated strictly (unknown fields are errors).

The same models produce the request schemas of ``/openapi.json``.
"""

from __future__ import annotations

import re
import zoneinfo
from datetime import date
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from engine.errors import ValidationFailed
from engine.identity import ID_NUMBER, normalise_id_number

Ident = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")]
Opaque = Annotated[str, StringConstraints(min_length=1, max_length=200)]
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]
Nonce = Annotated[str, StringConstraints(pattern=r"^[0-9a-zA-Z]{1,32}$")]
Email = Annotated[
    str,
    StringConstraints(strip_whitespace=True, max_length=254, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$"),
]

M = TypeVar("M", bound=BaseModel)


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ChallengeRequest(Body):
    release: Opaque


class Applicant(Body):
    family_name: Name
    given_names: Name
    birth_date: date
    id_number: Annotated[str, StringConstraints(min_length=1, max_length=40)] = Field(
        description="AGDREF or passport number; case, spaces and dashes are ignored"
    )
    email: Email

    @field_validator("id_number")
    @classmethod
    def _id_number(cls, value: str) -> str:
        if not ID_NUMBER.match(normalise_id_number(value)):
            raise ValueError("must be 5 to 20 letters and digits (spaces and dashes ignored)")
        return value

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


class ConfirmRequest(Body):
    applicant: Applicant


class ProcedureIn(Body):
    id: Ident
    name: Name


class SiteIn(Body):
    name: Name
    timezone: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    procedures: list[ProcedureIn] = Field(max_length=100)

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError("not a known IANA time zone") from None
        return value

    @field_validator("procedures")
    @classmethod
    def _unique(cls, value: list[ProcedureIn]) -> list[ProcedureIn]:
        if len({p.id for p in value}) != len(value):
            raise ValueError("procedure ids must be unique")
        return value


class SlotIn(Body):
    starts_at: AwareDatetime
    duration_minutes: int = Field(ge=1, le=1440)
    capacity: int = Field(ge=0, le=10000)


class ReleaseIn(Body):
    site: Ident
    procedure: Ident
    mode: Literal["fcfs", "draw"]
    opens_at: AwareDatetime | None = None
    registration_opens_at: AwareDatetime | None = None
    registration_closes_at: AwareDatetime | None = None
    draw_at: AwareDatetime | None = None
    slots: list[SlotIn] = Field(min_length=1, max_length=2000)

    @model_validator(mode="after")
    def _windows(self) -> ReleaseIn:
        draw = (self.registration_opens_at, self.registration_closes_at, self.draw_at)
        if self.mode == "fcfs":
            if self.opens_at is None or any(draw):
                raise ValueError("an fcfs release has opens_at and no registration or draw times")
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
    opens_at: AwareDatetime | None = None
    registration_opens_at: AwareDatetime | None = None
    registration_closes_at: AwareDatetime | None = None
    draw_at: AwareDatetime | None = None
    slots: list[SlotCapacity] = Field(default_factory=list, max_length=2000)


class StaffBookingRequest(Body):
    slot_id: Opaque
    applicant: Applicant


def parse(model: type[M], raw: bytes) -> M:
    """Validate a JSON body; raise ValidationFailed listing every problem."""
    try:
        return model.model_validate_json(raw or b"")
    except ValidationError as exc:
        raise ValidationFailed([_error(e) for e in exc.errors(include_url=False)]) from None


def _error(e: Any) -> dict[str, str]:
    loc = ".".join(str(p) for p in e["loc"])
    message = e["msg"]
    if e["type"] == "json_invalid":
        return {"field": "body", "message": "not valid JSON"}
    if e["type"] == "model_type":
        return {"field": loc or "body", "message": "must be a JSON object"}
    return {"field": loc or "body", "message": message}


def parse_ident(field: str, value: str) -> str:
    """Check an identifier taken from the path (site ids are chosen by staff)."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", value):
        raise ValidationFailed([{"field": field, "message": "must be 1 to 63 of a-z, 0-9 and -"}])
    return value

"""The applicant's identity: what is compared, what is hashed, what is kept in clear."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date

from engine.tokens import keyed_hash

_IGNORED = re.compile(r"[\s\-\u2010-\u2015\u2212]+")
ID_NUMBER = re.compile(r"^[A-Z0-9]{5,20}$")


def normalise_id_number(raw: str) -> str:
    """Upper case, without spaces or dashes: '99 12-345 678a' and '9912345678A' are one number."""
    return _IGNORED.sub("", raw).upper()


_GMAIL = frozenset({"gmail.com", "googlemail.com"})


def normalise_email(raw: str) -> str:
    """The inbox an address reaches, as far as can be told without asking: lower case,
    without a ``+tag`` (Gmail, Outlook, iCloud, Fastmail, Proton and most mail servers
    deliver ``name+anything`` to ``name``), and at Gmail without dots (it ignores them;
    googlemail.com is gmail.com). The cap on active bookings per email address counts
    inboxes: one inbox written endless ways would otherwise pass it."""
    local, _, domain = raw.strip().lower().partition("@")
    local = local.split("+", 1)[0] or local
    if domain in _GMAIL:
        local, domain = local.replace(".", "") or local, "gmail.com"
    return f"{local}@{domain}"


@dataclass(frozen=True, slots=True)
class Applicant:
    family_name: str
    given_names: str
    birth_date: date
    id_number: str
    email: str

    def fields(self) -> tuple[str, ...]:
        """Every field as sent: what a retry under an Idempotency-Key sends again."""
        return (
            self.family_name,
            self.given_names,
            self.birth_date.isoformat(),
            self.id_number,
            self.email,
        )

    def identity_hash(self, secret: bytes) -> bytes:
        """Keyed hash of the normalised document number: the uniqueness key, never reversible."""
        return document_hash(secret, self.id_number)

    def email_hash(self, secret: bytes) -> bytes:
        """Keyed hash of the inbox (``normalise_email``): the key of the email cap."""
        return keyed_hash(secret, "email", normalise_email(self.email))


def document_hash(secret: bytes, id_number: str) -> bytes:
    """The identity hash of a document number, as a booking keeps it."""
    return keyed_hash(secret, "identity", normalise_id_number(id_number))

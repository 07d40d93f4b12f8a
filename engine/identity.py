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


@dataclass(frozen=True, slots=True)
class Applicant:
    family_name: str
    given_names: str
    birth_date: date
    id_number: str
    email: str

    def identity_hash(self, secret: bytes) -> bytes:
        """Keyed hash of the normalised document number: the uniqueness key, never reversible."""
        return keyed_hash(secret, "identity", normalise_id_number(self.id_number))

    def email_hash(self, secret: bytes) -> bytes:
        return keyed_hash(secret, "email", self.email.strip().lower())

"""Every successful reply the tests receive must be the one ``/openapi.json`` documents.

``tests.api.Api`` passes each reply here, so the whole suite checks the document against
what the engine really answers: a 2xx status must be the operation's documented one, and a
JSON body must match the operation's schema (engine/replies.py), formats included, with no
field it does not name. Errors are checked by the fuzz test (tests/test_fuzz.py), against
the Problem schema.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

from jsonschema import Draft202012Validator

from engine.openapi import document
from engine.routes import ROUTES


@dataclass(frozen=True)
class _Operation:
    template: str
    pattern: re.Pattern[str]
    method: str
    responses: dict[str, Any]


@functools.cache
def _operations() -> tuple[tuple[_Operation, ...], dict[str, Any]]:
    doc = document(ROUTES)
    ops = []
    for template, methods in doc["paths"].items():
        pattern = re.compile("^" + re.sub(r"\{\w+\}", "[^/]+", template) + "$")
        for method, op in methods.items():
            ops.append(_Operation(template, pattern, method.upper(), op["responses"]))
    return tuple(ops), doc["components"]


@functools.cache
def _validator(template: str, method: str, status: str) -> Draft202012Validator | None:
    ops, components = _operations()
    op = next(o for o in ops if o.template == template and o.method == method)
    content = op.responses[status].get("content", {}).get("application/json")
    if content is None:
        return None
    schema = {"components": _closed(components), **content["schema"]}
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def _closed(schema: Any) -> Any:
    """``schema`` with every object closed to fields it does not name. The document leaves
    them open (API.md allows new fields, so clients must ignore unknown ones); the engine
    itself must send no field the document does not name."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def check_reply(method: str, path: str, status: int, content_type: str, body: Any) -> None:
    """Raise AssertionError if a 2xx reply to ``method path`` is not as documented."""
    if not 200 <= status < 300:
        return
    head = method == "HEAD"  # a GET's reply without its body (HTTP): the GET is documented
    method = "GET" if head else method
    ops, _ = _operations()
    path = path.partition("?")[0]
    op = next((o for o in ops if o.method == method and o.pattern.match(path)), None)
    assert op is not None, f"{method} {path} answered {status} but is not in /openapi.json"
    assert str(status) in op.responses, (
        f"{method} {op.template} answered {status}, not a documented status "
        f"({', '.join(op.responses)})"
    )
    if head:
        assert body in ("", None), f"HEAD {op.template} answered {status} with a body"
        return
    if status == 204:
        assert body in ("", None), f"{method} {op.template} answered 204 with a body"
        return
    documented = op.responses[str(status)].get("content")
    if documented is None:
        return  # /metrics, /openapi.json: bodies not ours to describe
    media_type = content_type.partition(";")[0].strip()
    assert media_type in documented, (
        f"{method} {op.template} answered {status} as {media_type!r}, not as "
        f"{' or '.join(documented)}"
    )
    validator = _validator(op.template, method, str(status))
    if validator is None or media_type != "application/json":
        return
    errors = sorted(validator.iter_errors(body), key=lambda e: list(e.absolute_path))
    assert not errors, f"{method} {op.template} {status}: the reply is not as documented: " + (
        "; ".join(f"{'/'.join(map(str, e.absolute_path)) or 'body'}: {e.message}" for e in errors)
    )

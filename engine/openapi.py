"""The OpenAPI 3.1 document of the API, generated from the route table and its request and reply
models."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel

from engine import __version__, replies
from engine.errors import GuichetError
from engine.routes import Route

_IDENT = {"type": "string", "pattern": "^[a-z0-9][a-z0-9-]{0,62}$"}
_PROBLEM = {
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
            },
        },
        "retry_after": {"type": "integer"},
        "level": {
            "type": "string",
            "description": "Which limit refused (429), or what could not serve (503)",
        },
    },
}
_RETRY_AFTER = {
    "Retry-After": {
        "description": "Whole seconds to wait before trying again",
        "schema": {"type": "integer", "minimum": 1},
    }
}

_NOT_OPEN_YET = {
    "Retry-After": {
        "description": "With not-open, when the window only waits for a time (an opening, "
        "registration, challenges issued before an opening): the seconds until then",
        "schema": {"type": "integer", "minimum": 1},
    }
}


def _status_of(name: str) -> int:
    for cls in _all_errors(GuichetError):
        if cls.name == name:
            return cls.status
    raise KeyError(name)


def _all_errors(cls: type[GuichetError]) -> list[type[GuichetError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out += _all_errors(sub)
    return out


def _operation(route: Route, schemas: dict[str, Any]) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": route.summary,
        "operationId": route.handler.__name__,
        "responses": {str(route.ok): {"description": "Success"}},
    }
    params = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": _IDENT if name == "site" else {"type": "string"},
        }
        for name in re.findall(r"{(\w+)}", route.path)
    ]
    if route.method == "POST" and route.path in (
        "/v1/holds",
        "/v1/admin/releases",
        "/v1/admin/bookings",
        "/v1/admin/releases/{release}/entries",
    ):
        params.append(
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "schema": {"type": "string", "minLength": 1, "maxLength": 200},
            }
        )
    if route.path == "/v1/challenges":
        params.append(
            {
                "name": "Guichet-Session",
                "in": "header",
                "required": False,
                "description": "The session token of an earlier challenge; a missing or "
                "invalid one is replaced by a new one.",
                "schema": {"type": "string"},
            }
        )
    if route.path == "/v1/admin/bookings/{reference}":
        params.append(
            {
                "name": "by",
                "in": "query",
                "required": False,
                "description": "person: for the person, as their own cancel (counts toward "
                "their caps); prefecture: a closure or an absence, counted toward none. "
                "Required with place=withdraw.",
                "schema": {"type": "string", "enum": ["person", "prefecture"], "default": "person"},
            }
        )
        params.append(
            {
                "name": "place",
                "in": "query",
                "required": False,
                "description": "return: the place goes back (online at once, or to the "
                "next draw); withdraw: the slot's capacity goes one lower with the cancel.",
                "schema": {"type": "string", "enum": ["return", "withdraw"], "default": "return"},
            }
        )
    if route.path == "/v1/admin/releases/{release}" and route.method == "PATCH":
        params.append(
            {
                "name": "If-Match",
                "in": "header",
                "required": False,
                "description": "The release's ETag as last read (GET, POST or PATCH): the "
                "change is refused with 412 if its windows or capacities changed since.",
                "schema": {"type": "string"},
            }
        )
    if route.path == "/v1/admin/fairness":
        params.append(
            {"name": "release", "in": "query", "required": False, "schema": {"type": "string"}}
        )
    if route.path == "/v1/releases":
        # Empty: no filter (handlers.list_releases).
        any_or_ident = {"type": "string", "pattern": "^([a-z0-9][a-z0-9-]{0,62})?$"}
        params += [
            {"name": n, "in": "query", "required": False, "schema": any_or_ident}
            for n in ("site", "procedure")
        ]
    if route.path == "/v1/admin/audit":
        text = {"type": "string", "pattern": "^[\\x21-\\x7e]{1,200}$"}
        params += [
            {"name": n, "in": "query", "required": False, "schema": text}
            for n in ("subject", "agent", "action")
        ]
        params += [
            {
                "name": n,
                "in": "query",
                "required": False,
                "schema": {"type": "string", "format": "date-time"},
            }
            for n in ("since", "until")
        ]
        params += [
            {
                "name": "limit",
                "in": "query",
                "required": False,
                "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
            },
            {
                "name": "before",
                "in": "query",
                "required": False,
                "schema": {"type": "integer", "minimum": 1, "maximum": 2**62},
            },
        ]
    if route.path == "/v1/admin/agenda":
        params += [
            {"name": "site", "in": "query", "required": True, "schema": _IDENT},
            {
                "name": "date",
                "in": "query",
                "required": True,
                "description": "A day of the years 2000 to 2200, as every time the engine takes",
                "schema": {"type": "string", "format": "date"},
            },
            {
                "name": "separator",
                "in": "query",
                "required": False,
                "description": "The CSV's separator: a comma (RFC 4180), or a semicolon, "
                "which a spreadsheet set to French, among others, splits on",
                "schema": {"type": "string", "enum": ["comma", "semicolon"], "default": "comma"},
            },
            {
                "name": "bom",
                "in": "query",
                "required": False,
                "description": "The CSV begins with a UTF-8 byte-order mark, which a "
                "spreadsheet needs to read its accents as UTF-8",
                "schema": {"type": "boolean", "default": False},
            },
        ]
    if params:
        op["parameters"] = params
    if route.body is not None:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _component(route.body, schemas)}},
        }
    if route.reply is not None:
        content: dict[str, Any] = {"application/json": {"schema": _component(route.reply, schemas)}}
        if route.path == "/v1/admin/agenda":
            content["text/csv"] = {"schema": {"type": "string"}}
        op["responses"][str(route.ok)]["content"] = content
        if route.reply is replies.ReleaseSaved:
            op["responses"][str(route.ok)]["headers"] = {
                "ETag": {
                    "description": "The release's windows and capacities, for If-Match",
                    "schema": {"type": "string"},
                }
            }
    if route.auth:
        op["security"] = [{"bearer": []}]
    errors = route.errors
    if route.checks_query and "validation-error" not in errors:
        errors = ("validation-error", *errors)  # a query parameter it does not take
    for name in errors:
        status = str(_status_of(name))
        entry = op["responses"].setdefault(
            status,
            {
                "description": "",
                "content": {
                    "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
                },
            },
        )
        entry["description"] = " or ".join(filter(None, [entry["description"], name]))
        if status in ("429", "503"):
            entry["headers"] = _RETRY_AFTER
        elif name == "not-open":
            entry["headers"] = _NOT_OPEN_YET
    if route.body is not None:
        op["responses"].setdefault(
            "413",
            {
                "description": "payload-too-large",
                "content": {
                    "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
                },
            },
        )
    return op


def _component(model: type[BaseModel], schemas: dict[str, Any]) -> dict[str, str]:
    """A reference to ``model``'s schema, added with the models it uses to ``schemas``."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, sub in [*schema.pop("$defs", {}).items(), (model.__name__, schema)]:
        if schemas.setdefault(name, sub) != sub:
            raise ValueError(f"two different schemas are named {name!r}")
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def query_parameters(doc: dict[str, Any], route: Route) -> frozenset[str]:
    """The query parameters ``doc`` (``document``) gives ``route``: all it takes."""
    op = doc["paths"][route.path][route.method.lower()]
    return frozenset(p["name"] for p in op.get("parameters", ()) if p["in"] == "query")


def document(routes: tuple[Route, ...]) -> dict[str, Any]:
    schemas: dict[str, Any] = {"Problem": _PROBLEM}
    paths: dict[str, Any] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, schemas)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "guichet",
            "version": __version__,
            "description": "Appointment booking for public services: API version 1.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }

"""HTTP plumbing shared by the handlers: the guard around each route, problem+json, client
address, bearer tokens, JSON bodies.

The guard turns every refusal into RFC 9457 problem+json (domain errors, aiohttp's own
HTTP errors, and anything unexpected, which becomes a 500 showing only a request id), sheds
load past ``max_in_flight`` requests, binds a request id to the logs, and counts requests.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import itertools
import json
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
)
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from aiohttp.web_request import BaseRequest
from multidict import MultiMapping

from engine import schemas
from engine.addresses import canonical, membership
from engine.errors import (
    GuichetError,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    StoreUnavailable,
    Unauthorized,
    ValidationFailed,
)
from engine.logs import log, request_id
from engine.metrics import Metrics
from engine.settings import Network

if TYPE_CHECKING:
    from engine.store import SchemaState

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PROBLEM_TYPE = "application/problem+json"


def problem_response(error: GuichetError, rid: str) -> web.Response:
    body = error.problem()
    headers = {"Content-Type": PROBLEM_TYPE, "X-Request-Id": rid}
    if isinstance(error, Overloaded) or error.status == 429 or "retry_after" in body:
        headers["Retry-After"] = str(body.get("retry_after", 1))
    return web.Response(status=error.status, body=_problem_json(body), headers=headers)


def _problem_json(body: dict[str, Any]) -> bytes:
    # Refusals under attack repeat the same few bodies (the retry_after changes each
    # second): serialising each afresh was a tenth of a refusal's cost. Only bodies of
    # strings and integers are cached (True == 1 as a key; lists are not hashable).
    # Not one that quotes kilobytes of the client's input (a made-up id in a detail): it
    # would take the cache's room from the refusals that repeat.
    if _CACHEABLE.issuperset(map(type, body.values())) and len(body.get("detail", "")) < 256:
        return _cached_problem_json(tuple(body.items()))
    return json.dumps(body).encode()


_CACHEABLE = frozenset({str, int})


@functools.lru_cache(maxsize=1024)
def _cached_problem_json(items: tuple[tuple[str, Any], ...]) -> bytes:
    # ASCII (json.dumps escapes the rest): problem+json is sent without a charset, and a
    # detail may quote the client's own input.
    return json.dumps(dict(items)).encode()


class _HttpProblem(GuichetError):
    """aiohttp's own refusals (no route, wrong method), rendered like ours."""

    def __init__(self, status: int, name: str, title: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status  # type: ignore[misc]
        self.name = name  # type: ignore[misc]
        self.title = title  # type: ignore[misc]


def _from_http(exc: web.HTTPException) -> GuichetError:
    if exc.status == 404:
        return NotFound("No such resource")
    if exc.status == 413:
        return PayloadTooLarge("The request body is over the limit")
    if exc.status == 405:
        return _HttpProblem(
            405,
            "method-not-allowed",
            "Method not allowed",
            "This resource does not accept this method",
        )
    return _HttpProblem(exc.status, "http-error", exc.reason, exc.text or exc.reason)


def answer_unreadable_requests_as_problems(metrics: Metrics) -> None:
    """Make aiohttp answer a request it cannot read as HTTP (a bad request line, a header
    over 8 KiB, a Content-Length beside a Transfer-Encoding) in problem+json, like every
    other refusal, counted in ``metrics`` under the route ``unreadable``. aiohttp answers
    those itself, before any route or middleware, in text/plain, and logs a traceback at
    ERROR for each; no hook reaches that answer (aio-libs/aiohttp#3287), so its connection
    handler's ``handle_error`` is replaced, for the whole process: an engine's process
    serves one app (tests make several: the last one's metrics count)."""

    def handle_error(
        self: RequestHandler,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        parsing = status == 400 and isinstance(exc, HttpProcessingError)
        if not parsing or request.writer.output_size:
            return _aiohttp_handle_error(self, request, status, exc, message)
        # Said in our words: aiohttp's message may quote the client's bytes.
        reason = next((r for kind, r in _UNREADABLE if isinstance(exc, kind)), _UNREADABLE_ELSE)
        rid = secrets.token_hex(8)
        request_id.set(rid)
        # Not HTTP at all is mostly scanners and TLS sent to this port: aiohttp's own level.
        level = log.debug if isinstance(exc, BadHttpMethod) else log.info
        level("request_unreadable", status=status, kind=type(exc).__name__)
        problem = _HttpProblem(status, "http-error", "The request is not valid HTTP", reason)
        metrics.answered(UNREADABLE, "other", status, 0.0)
        response = _refusal(metrics, problem, rid)
        response.force_close()  # where this request ends, and the next begins, is unknown
        return response

    RequestHandler.handle_error = handle_error  # type: ignore[method-assign]


UNREADABLE = "unreadable"  # the route label of requests that are not valid HTTP
_aiohttp_handle_error = RequestHandler.handle_error
_UNREADABLE = (  # the first that the error is an instance of
    (BadHttpMethod, "Not an HTTP request, or a method no HTTP request has"),
    (LineTooLong, "A line of the request is too long"),
    (InvalidURLError, "The request's target is not a valid path"),
    (BadStatusLine, "The request line is not valid"),
    (InvalidHeader, "A header is not valid"),
)
_UNREADABLE_ELSE = "The request's headers or framing are not valid"


# Methods counted by name; any other is "other", so that no client can make up label values.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def guard(
    metrics: Metrics, max_in_flight: int, schema: SchemaState
) -> Callable[[Handler, str, bool, bool, frozenset[str] | None], Handler]:
    """``wrap(handler, route, shed, gated, query)`` puts one route's handler behind the
    guard; ``shed`` False: never refused as overloaded (the probes, the metrics);
    ``gated``: refused while PostgreSQL's schema is behind this engine's (``schema``);
    ``query``: the query parameters the route takes, any other refused (None: not checked).

    A wrapper per route rather than an aiohttp middleware: a middleware adds two coroutine
    layers and a route lookup to every request, about 5 % of a listing (BENCHMARKS.md).
    Requests no route matches reach ``unmatched``, wrapped like the others."""
    in_flight = 0
    # Request ids: random per process, then counted (unique, and no system call each).
    prefix, counter = secrets.token_hex(5) + "-", itertools.count(1)

    def wrap(
        handler: Handler, route: str, shed: bool, gated: bool, query: frozenset[str] | None
    ) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            nonlocal in_flight
            rid = request.headers.get("X-Request-Id", "")
            if not (0 < len(rid) <= 64 and rid.isascii() and rid.isprintable()):
                rid = f"{prefix}{next(counter):x}"
            request_id.set(rid)
            started = time.perf_counter()
            in_flight += 1
            try:
                if in_flight > max_in_flight and shed:
                    raise Overloaded(1, "Too many requests in progress; try again shortly")
                if gated and schema.behind is not None:
                    raise schema.behind.with_traceback(None)
                if query is not None and request.rel_url.raw_query_string:
                    check_query(request.query, query)
                response = await handler(request)
                response.headers["X-Request-Id"] = rid
            except GuichetError as exc:
                response = _refusal(metrics, exc, rid)
            except web.HTTPException as exc:
                if exc.status < 400:
                    raise
                response = _refusal(metrics, _from_http(exc), rid)
                if "Allow" in exc.headers:
                    response.headers["Allow"] = exc.headers["Allow"]
            except Exception:
                log.exception("request_failed", route=route, method=request.method)
                response = problem_response(
                    GuichetError(f"Unexpected error; quote request id {rid}"), rid
                )
            finally:
                in_flight -= 1
            method = request.method if request.method in _METHODS else "other"
            metrics.answered(route, method, response.status, time.perf_counter() - started)
            return response

        return guarded

    return wrap


_QUERY_ERRORS_MAX = 10  # names told back in one refusal: a query string can hold hundreds


def check_query(given: MultiMapping[str], allowed: frozenset[str]) -> None:
    """Refuse a query parameter the route does not take, or one given twice: a handler
    reads the ones it knows and the first of each, so a typo (``plac=withdraw`` on a
    staff cancel) would be done on the default terms, and a filter misspelled would list
    everything, each without a word."""
    errors: list[dict[str, str]] = []
    seen: set[str] = set()
    for name, _ in given.items():  # each occurrence (iterating the keys gives each once)
        if name in seen:
            message = "given more than once" if name in allowed else None
        else:
            message = None if name in allowed else "not a parameter of this request"
        seen.add(name)
        if message and len(errors) < _QUERY_ERRORS_MAX:
            errors.append({"field": name, "message": message})
    if errors:
        raise ValidationFailed(errors)


UNMATCHED = "unmatched"  # the route label of requests no route matches


def unmatched(paths: Iterable[str]) -> Handler:
    """The handler of the catch-all route of an app serving ``paths``, added last: 405 with
    Allow where another route has this path, else 404 (what aiohttp's router answers,
    raised here so that the guard renders it). A path whose first segment no route has is
    a 404 at once: bots probing for other software must not cost a look at every route."""
    firsts = frozenset(path.split("/", 2)[1] for path in paths)
    if any(first.startswith("{") for first in firsts):
        raise ValueError("a route's first segment is variable: every path needs a look")

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.rel_url.path_safe.split("/", 2)[1] in firsts:
            allowed: set[str] = set()
            this = request.match_info.route.resource
            for resource in request.app.router.resources():
                if resource is not this:
                    allowed |= (await resource.resolve(request))[1]
            if allowed:
                raise web.HTTPMethodNotAllowed(request.method, allowed)
        raise web.HTTPNotFound()

    return handler


def _refusal(metrics: Metrics, exc: GuichetError, rid: str) -> web.Response:
    metrics.rejected(exc.name, str(exc.extra.get("level", "")))
    if isinstance(exc, StoreUnavailable):
        metrics.store_errors.inc()
        log.warning("store_unavailable", detail=exc.detail)
    return problem_response(exc, rid)


def client_address(request: web.Request, trusted: frozenset[Network]) -> str:
    """The client's address: the peer, or, behind a trusted proxy, the last address in
    X-Forwarded-For that is not one of our proxies."""
    if not trusted:
        return canonical(request.remote or "unknown")
    return _resolver(trusted)(request.remote or "unknown", request.headers.get(_XFF, ""))


_XFF = "X-Forwarded-For"
_CACHED_HEADER_MAX = 256  # bounds the cache at about 16 384 x 300 bytes


@functools.lru_cache(maxsize=4)
def _resolver(trusted: frozenset[Network]) -> Callable[[str, str], str]:
    """The cached address function for one set of proxies. Cached by (peer, header): a
    client's requests repeat them, and parsing addresses afresh was a tenth of the hold path
    (BENCHMARKS.md). Keys and values are strings only, which the garbage collector stops
    tracking: a cache of objects it must scan made its full collections take 200 ms."""

    within = membership(trusted)

    @functools.lru_cache(maxsize=16384)
    def is_trusted(address: str) -> bool:
        return within(address) is True

    def walk(peer: str, forwarded: str) -> str:
        for hop in reversed(forwarded.split(",")):
            hop = hop.strip()
            if not hop:
                continue
            inside = within(hop)
            if inside is None:
                return canonical(peer)  # not an address: the header is not trusted past here
            if not inside:
                return canonical(hop)
        return canonical(peer)

    cached_walk = functools.lru_cache(maxsize=16384)(walk)

    def resolve(peer: str, forwarded: str) -> str:
        if not is_trusted(peer):
            return canonical(peer)  # an untrusted peer's header is never read, nor cached
        if len(forwarded) > _CACHED_HEADER_MAX:
            return walk(peer, forwarded)  # a client can lengthen the header: not cached
        return cached_walk(peer, forwarded)

    return resolve


def bearer(request: web.Request) -> str:
    value = request.headers.get("Authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Missing bearer token")
    if not token.isascii():
        # Every token of ours is ASCII. Bytes that are not UTF-8 reach here as surrogates,
        # which hashing the token could not encode (a 500).
        raise Unauthorized("Malformed bearer token")
    return token.strip()


def json_bytes(data: Any) -> bytes:
    """Compact UTF-8 JSON. orjson took a fourteenth of ``json.dumps``' time for a hold's
    reply (the hold: 6 % fewer instructions), and writes no spaces after separators nor
    escapes for accented letters (the demo's 60-slot listing: 5 891 bytes, not 6 371, to a
    phone). Dates and times come out as ``isoformat`` writes them. Replies say
    ``charset=utf-8``, as they did when aiohttp encoded ``json.dumps``' text."""
    return orjson.dumps(data)


def json_response(data: Any, status: int = 200) -> web.Response:
    return json_body_response(json_bytes(data), status)


def json_body_response(body: bytes, status: int = 200) -> web.Response:
    """A reply of JSON already serialised (``json_bytes``)."""
    return web.Response(status=status, body=body, content_type="application/json", charset="utf-8")


_GZIP_MIN = 1024  # smaller bodies are sent as they are: gzip saves little on them
_GZIP_LEVEL = 6  # 120 slots: 14 171 bytes to 793, in about 0.1 ms (once per refill)
_GZIP_INLINE_MAX = 64 * 1024  # larger bodies (a draw record) are compressed in a thread


@dataclass(frozen=True, slots=True)
class Body:
    """A cached JSON reply (a listing, a draw record): its bytes, and their gzip form when
    they are large enough to be worth it. Compressed once per refill rather than per reply:
    the demo's listing is 5.9 kB, 0.46 kB gzipped, for a phone on a slow network."""

    plain: bytes
    gzipped: bytes | None

    @property
    def size(self) -> int:
        return len(self.plain) + len(self.gzipped or b"")

    @classmethod
    def of(cls, plain: bytes) -> Body:
        if len(plain) < _GZIP_MIN:
            return cls(plain, None)
        return cls(plain, gzip.compress(plain, _GZIP_LEVEL, mtime=0))


async def body_of(plain: bytes) -> Body:
    """``Body.of``, in a thread for a large body (a draw record: 7 MB for 100 000 entries).
    zlib lets go of the GIL, so the event loop keeps serving meanwhile."""
    if len(plain) <= _GZIP_INLINE_MAX:
        return Body.of(plain)
    return await asyncio.get_running_loop().run_in_executor(None, Body.of, plain)


_GZIP_HEADERS = {"Content-Encoding": "gzip", "Vary": "Accept-Encoding"}
_VARY = {"Vary": "Accept-Encoding"}


def cached_json_response(request: web.Request, body: Body) -> web.Response:
    """``body`` gzipped if the client accepts it, else as it is."""
    if body.gzipped is None:
        return json_body_response(body.plain)
    gzipped = accepts_gzip(request.headers.get("Accept-Encoding", ""))
    return web.Response(
        body=body.gzipped if gzipped else body.plain,
        content_type="application/json",
        charset="utf-8",
        headers=_GZIP_HEADERS if gzipped else _VARY,
    )


_ACCEPT_ENCODING_MAX = 256  # browsers send under 60 characters


def _weighted(header: str) -> Iterator[tuple[str, float]]:
    """The items of an ``Accept`` or ``Accept-Encoding`` header, lower-cased, each with its
    weight (``q``; 1 if absent, 0 if unreadable)."""
    for item in header.split(","):
        name, *params = item.split(";")
        weight = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        yield name.strip().lower(), weight


def preferred_type(accept: str, offered: tuple[str, ...]) -> str | None:
    """The type of ``offered`` an ``Accept`` header weighs highest (RFC 9110, section
    12.5.1): each by its most specific range (``text/csv``, then ``text/*``, then
    ``*/*``). Of equal weights, the one named more specifically wins (``text/csv, */*``
    is CSV), then the one offered first. None if the header accepts none of them."""
    weights = dict(_weighted(accept))
    best, best_rank = None, (0.0, 0)
    for media in offered:
        kind = media.split("/")[0]
        for specificity, candidate in ((2, media), (1, f"{kind}/*"), (0, "*/*")):
            if candidate in weights:
                rank = (weights[candidate], specificity)
                if rank[0] > 0 and rank > best_rank:
                    best, best_rank = media, rank
                break
    return best


def accepts_gzip(header: str) -> bool:
    """Whether an ``Accept-Encoding`` header admits gzip (RFC 9110, section 12.5.3): named
    (or as x-gzip), or covered by ``*``, with a weight above 0. A longer header than any
    browser sends gets plain JSON (always acceptable) without being read: a client must not
    make each listing cost a parse of 8 kB, nor fill the cache."""
    return len(header) <= _ACCEPT_ENCODING_MAX and _accepts_gzip(header)


@functools.lru_cache(maxsize=256)
def _accepts_gzip(header: str) -> bool:
    star = False
    for coding, weight in _weighted(header):
        if coding in ("gzip", "x-gzip"):
            return weight > 0
        if coding == "*":
            star = weight > 0
    return star


# A body not all here when its handler reads it gets this long to come. A client that sent
# it a byte at a time kept its place among the requests in progress for as long: a few
# thousand such took a worker's every place (503 to everyone else). nginx buffers bodies
# and gives up on a client silent for 10 s (deploy/nginx.conf): it passes on none of these.
BODY_READ_S = 10.0


async def read_body(request: web.Request, limit: int | None = None) -> bytes:
    """The body, within the app's ``client_max_size`` (the public limit), or within
    ``limit`` (staff's routes): read here, as aiohttp's ``read`` does, a chunk at a time,
    so that no more than the limit is ever held. A body aiohttp cannot read (a
    ``Content-Encoding`` it fails to decode, one cut short, one that does not come within
    ``BODY_READ_S``) is a 400, not a 500."""
    if request.content.is_eof():  # all here already, as most often
        return await _read_body(request, limit)
    try:
        async with asyncio.timeout(BODY_READ_S):
            return await _read_body(request, limit)
    except TimeoutError:
        message = f"not received within {BODY_READ_S:g} s"
        raise ValidationFailed([{"field": "body", "message": message}]) from None


async def _read_body(request: web.Request, limit: int | None) -> bytes:
    try:
        if limit is None:
            try:
                return await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise _too_large() from None
        if request.content_length is not None and request.content_length > limit:
            raise _too_large()
        body = bytearray()
        while chunk := await request.content.readany():
            body += chunk
            if len(body) > limit:
                raise _too_large()
        return bytes(body)
    except RequestPayloadError as exc:
        raise ValidationFailed([{"field": "body", "message": f"unreadable: {exc}"[:200]}]) from None


def _too_large() -> PayloadTooLarge:
    return PayloadTooLarge("The request body is over the limit")


async def parse_body(
    request: web.Request, model: type[schemas.M], limit: int | None = None
) -> schemas.M:
    """Read (within the size limit: the public one, or ``limit``) and validate a JSON body."""
    raw = await read_body(request, limit)
    if request.headers.get("Content-Type") and request.content_type != "application/json":
        raise ValidationFailed(
            [{"field": "body", "message": "Content-Type must be application/json"}]
        )
    return schemas.parse(model, raw)

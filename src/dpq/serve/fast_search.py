"""``POST /search`` with a JSON body, answered without FastAPI's routing, dependency solving
and request/response wrappers: under load they were most of the event loop's time per
request, and the event loop is the service's serial path (docs/RESULTS.md, "The service's
tail was the garbage collector").

:class:`JSONSearchFastPath` sits inside the service's own middleware (metrics, rate limit,
body limit, CORS: all still apply) and in front of the app. It answers what it can answer
exactly as the route would, through the same :func:`~dpq.serve.searches.answer_search`;
anything else goes on to the app untouched. A body the route would refuse before searching
(not JSON, a field out of range) is handed to the route with the body replayed; an error of
the search itself (an unknown id, a wrong vector length, a busy service) is answered by the
app's own exception handler for it. So every error keeps the one wording and status it has,
and nothing is searched twice.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.requests import Request

from dpq.serve.context import ServiceContext
from dpq.serve.json_codec import JSON_MEDIA_TYPE, FastJSONResponse, media_type, parse_json
from dpq.serve.schemas import SearchRequest
from dpq.serve.searches import answer_search

__all__ = ["JSONSearchFastPath"]

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def _is_json_post(scope: dict[str, Any], path: str) -> bool:
    """A POST to ``path`` whose Content-Type is application/json (parameters allowed)."""
    if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != path:
        return False
    for name, value in scope["headers"]:
        if name == b"content-type":
            return media_type(value.decode("latin-1")) == JSON_MEDIA_TYPE
    return False


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body; None when the client went away first."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replaying(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives ``body`` again, then whatever the client sends next."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


class JSONSearchFastPath:
    """ASGI middleware: answers ``POST /search`` with a JSON body straight from
    :func:`~dpq.serve.searches.answer_search`; everything else, and every request it would
    refuse, goes to ``app`` (the latter with its body replayed).

    Args:
        app: the FastAPI app (its exception middleware and router).
        service: the app's :class:`~dpq.serve.context.ServiceContext`.
        route: the app's ``POST /search`` route: the path answered here is its path, and it
            is put in the scope as the router would, so the request metrics name it.
        handlers: the app's exception handlers (``FastAPI.exception_handlers``: exception
            class -> handler), for errors of the search itself.
    """

    def __init__(
        self, app: Any, service: ServiceContext, route: Any, handlers: Mapping[Any, Any]
    ) -> None:
        self.app = app
        self.service = service
        self.route = route
        self.handlers = handlers

    def _handler(self, error: Exception) -> Any:
        """The app's handler of ``error``'s class or its nearest base; None when none."""
        for cls in type(error).__mro__:
            if cls in self.handlers:
                return self.handlers[cls]
        return None

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if not _is_json_post(scope, self.route.path):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        body = await _read_body(receive)
        if body is None:
            return  # nobody to answer
        try:  # pydantic's ValidationError is a ValueError
            params = SearchRequest.model_validate(parse_json(body))
        except ValueError:  # refused before any search: the route words it
            await self.app(scope, _replaying(body, receive), send)
            return
        scope["route"] = self.route
        try:
            response = FastJSONResponse(await answer_search(self.service, params, None, started))
        except Exception as error:
            handler = self._handler(error)
            if handler is None:
                raise  # a 500, as from the route
            response = handler(Request(scope, receive), error)
            if inspect.isawaitable(response):
                response = await response
        await response(scope, receive, send)

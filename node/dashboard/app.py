"""The dashboard's web application (Starlette, Jinja2 templates rendered on the server).

Pages: studies (arrivals per association, each series' decision), a study, jobs, a job's results
(summary pages, measurements, downloads), deliveries (retry, resend), health, configuration.
Live updates: the page listens to ``/events`` (server-sent events, sent when the node's database
changed) and fetches its live part again (``?fragment=1``); ``static/live.js`` does this in a few
lines of plain JavaScript. The access rules are :mod:`node.dashboard.access`.

Blocking work (SQLite reads, password hashing, image rendering) runs on the server's bounded
thread pool, never on its event loop; the reads use the dashboard's own connections.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from dataclasses import dataclass, field
from functools import wraps
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import quote, urlsplit

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from ..config import Config
from ..operations.logs import audit
from ..operations.state import NodeState
from .access import Authenticator, LoginThrottle, Session, Sessions, allowed, safe_next, token_matches
from .ids import StudyIds
from .images import summary_png
from .pages import PageData, when
from ..config import DashboardSettings

__all__ = ["Hooks", "create_app", "SESSION_COOKIE"]

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SESSION_COOKIE = "musclenode_session"
LOGIN_COOKIE = "musclenode_login"
#: Server-sent event streams at once; more get 503 and the browser's EventSource tries again.
MAX_STREAMS = 16
#: A stream ends after this long (the browser reconnects, and the session is checked again).
STREAM_SECONDS = 300.0

#: Pages with a live part (``NAME_live.html``), sent alone for ``?fragment=1``.
_LIVE = {"studies.html", "study.html", "jobs.html", "job.html", "deliveries.html", "health.html"}

_SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; connect-src 'self';"
     b" frame-ancestors 'none'; form-action 'self'; base-uri 'none'; object-src 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    # Not "no-referrer": with it, browsers send "Origin: null" on form posts.
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]


@dataclass
class Hooks:
    """What the dashboard may ask of the running node."""

    health: Callable[[], dict]
    wake_workers: Callable[[], None] = lambda: None
    wake_exporter: Callable[[], None] = lambda: None


class _SecurityHeaders:
    """ASGI middleware: the same protective headers on every response."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                names = {name for name, _ in _SECURITY_HEADERS}
                message["headers"] = [h for h in message.get("headers", []) if h[0].lower() not in names]
                message["headers"] += _SECURITY_HEADERS
            await send(message)

        await self.app(scope, receive, send_with_headers)


@dataclass
class _Refusal(Exception):
    status: int
    reason: str
    audit_reason: str = ""


@dataclass
class Dashboard:
    """The application's state: settings, sessions, reads and hooks of one node."""

    config: Config
    settings: DashboardSettings
    state: NodeState
    hooks: Hooks
    key: bytes
    clock: Callable[[], float] = time.monotonic
    sessions: Sessions = field(init=False)
    throttle: LoginThrottle = field(init=False)
    auth: Authenticator = field(init=False)
    pages: PageData = field(init=False)
    streams: int = 0

    def __post_init__(self) -> None:
        self.sessions = Sessions(self.settings.session_minutes * 60, self.settings.session_hours * 3600, self.clock)
        self.throttle = LoginThrottle(clock=self.clock)
        self.auth = Authenticator(self.settings)
        self.pages = PageData(self.config, self.settings, self.state, StudyIds(self.key), self.hooks.health)
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        self.templates.env.globals["when"] = when

    # -- sessions -------------------------------------------------------------------------------

    def session_for(self, request: Request, touch: bool) -> tuple[Session | None, bool]:
        """The request's session, and whether it was made now (from the proxy header)."""
        session = self.sessions.get(request.cookies.get(SESSION_COOKIE), touch=touch)
        if not self.settings.proxy_header:
            return session, False
        address = request.client.host if request.client else None
        user = self.auth.from_proxy(address, request.headers)
        if user is None:
            # A proxy session is good only while the proxy vouches for each request.
            return (None, False) if session is not None and session.via == "proxy" else (session, False)
        if session is not None and session.user == user.name and session.via == "proxy":
            return session, False
        session = self.sessions.create(user, "proxy")
        audit("dashboard login", user=user.name, role=user.role, via="proxy header", address=address)
        return session, True

    def set_session_cookie(self, request: Request, response: Response, session: Session) -> None:
        response.set_cookie(SESSION_COOKIE, session.id, httponly=True, samesite="strict", path="/",
                            secure=request.url.scheme == "https")

    # -- rendering ------------------------------------------------------------------------------

    def render(self, request: Request, session: Session | None, template: str, context: dict[str, Any],
               status: int = 200) -> Response:
        fragment = request.query_params.get("fragment") == "1"
        messages: list[str] = []
        if session is not None and not fragment:
            messages, session.messages = list(session.messages), []
        values = {
            "session": session, "csrf": session.csrf if session else "", "messages": messages,
            "may_retry": session is not None and allowed(session.role, "retry"),
            "may_resend": session is not None and allowed(session.role, "resend"),
            "path": request.url.path, "fragment": fragment, **context,
        }
        name = template.replace(".html", "_live.html") if fragment and template in _LIVE else template
        return self.templates.TemplateResponse(request, name, values, status_code=status)

    def refusal_page(self, request: Request, session: Session | None, refusal: _Refusal) -> Response:
        return self.render(request, session, "refused.html", {"reason": refusal.reason}, status=refusal.status)


def _client(request: Request) -> str | None:
    return request.client.host if request.client else None


def _same_origin(request: Request) -> bool:
    """A browser's POST from another site is refused even before its token is checked.

    Browsers say where a request comes from in ``Sec-Fetch-Site`` (or at least ``Origin``);
    a client that sends neither (a script) is judged by its CSRF token alone.
    """
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site == "same-origin"
    origin = request.headers.get("origin")
    if origin and origin != "null":
        return urlsplit(origin).netloc == request.headers.get("host", "")
    return True


def create_app(config: Config, settings: DashboardSettings, state: NodeState, hooks: Hooks, key: bytes,
               clock: Callable[[], float] = time.monotonic) -> Starlette:
    """The dashboard's ASGI application.

    Parameters
    ----------
    config : Config
        The node's configuration.
    settings : DashboardSettings
    state : NodeState
        Connections of the dashboard's own.
    hooks : Hooks
        Health report and wake-ups of the running node.
    key : bytes
        The key of the opaque study ids (:mod:`node.dashboard.ids`).
    clock : callable
        For session time-outs (``time.monotonic``).
    """
    board = Dashboard(config, settings, state, hooks, key, clock)

    def guarded(permission: str = "read", *, touch: bool | Callable[[Request], bool] = True,
                action: bool = False) -> Callable:
        """Wrap an endpoint ``(request, session[, form])``: login, role and, for actions, the CSRF token.

        ``touch``: whether the request counts as use of the session (live refreshes do not).
        """

        def decorate(handler: Callable[..., Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
            @wraps(handler)
            async def endpoint(request: Request) -> Response:
                session, new = board.session_for(request, touch(request) if callable(touch) else touch)
                if session is None:
                    if action or request.query_params.get("fragment") == "1" or request.url.path == "/events":
                        return PlainTextResponse("log in first\n", status_code=401)
                    return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)
                try:
                    form = None
                    if action:
                        form = await request.form()
                        if not _same_origin(request):
                            raise _Refusal(403, "This action came from another site.", "request from another site")
                        if not token_matches(session.csrf, form.get("csrf")):
                            raise _Refusal(403, "This action's form is out of date or was not made by the dashboard."
                                           " Open the page again and retry.", "missing or invalid CSRF token")
                    if not allowed(session.role, permission):
                        raise _Refusal(403, f"Your role ({session.role}) may not do this.",
                                       f"role {session.role} lacks {permission}")
                    response = await (handler(request, session, form) if action else handler(request, session))
                except _Refusal as refusal:
                    if action or refusal.audit_reason:
                        audit("dashboard action refused", user=session.user, role=session.role,
                              action=request.url.path, reason=refusal.audit_reason or refusal.reason,
                              address=_client(request))
                    response = board.refusal_page(request, session, refusal)
                if new:
                    board.set_session_cookie(request, response, session)
                return response

            return endpoint

        return decorate

    # -- login ----------------------------------------------------------------------------------

    async def login_form(request: Request) -> Response:
        session, new = board.session_for(request, touch=False)
        target = safe_next(request.query_params.get("next"))
        if session is not None:
            response: Response = RedirectResponse(target, status_code=303)
            if new:
                board.set_session_cookie(request, response, session)
            return response
        return _login_page(request, target)

    def _login_page(request: Request, target: str, error: str = "", status: int = 200) -> Response:
        nonce = secrets.token_urlsafe(24)
        response = board.render(request, None, "login.html", {"nonce": nonce, "next": target, "error": error},
                                status=status)
        response.set_cookie(LOGIN_COOKIE, nonce, httponly=True, samesite="strict", path="/login", max_age=1800,
                            secure=request.url.scheme == "https")
        return response

    async def login(request: Request) -> Response:
        form = await request.form()
        address = _client(request) or "?"
        target = safe_next(str(form.get("next") or ""))
        name = str(form.get("user") or "").strip()[:64]
        if not _same_origin(request) or not token_matches(request.cookies.get(LOGIN_COOKIE, ""), form.get("nonce")):
            audit("dashboard login refused", user=name, reason="invalid login form token", address=address)
            return _login_page(request, target, "The login form was out of date. Please try again.", 403)
        if not board.throttle.allowed(address):
            audit("dashboard login refused", user=name, reason="too many failed logins", address=address)
            return _login_page(request, target, "Too many failed logins from this address. Try again later.", 429)
        user = await run_in_threadpool(board.auth.check_password, name, str(form.get("password") or ""))
        if user is None:
            board.throttle.failed(address)
            audit("dashboard login refused", user=name, reason="wrong user name or password", address=address)
            return _login_page(request, target, "Wrong user name or password.", 401)
        board.throttle.succeeded(address)
        session = board.sessions.create(user, "password")
        audit("dashboard login", user=user.name, role=user.role, via="password", address=address)
        response = RedirectResponse(target, status_code=303)
        board.set_session_cookie(request, response, session)
        response.delete_cookie(LOGIN_COOKIE, path="/login")
        return response

    @guarded("read", action=True)
    async def logout(request: Request, session: Session, form: FormData) -> Response:
        board.sessions.end(session.id)
        audit("dashboard logout", user=session.user, address=_client(request))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    # -- pages ----------------------------------------------------------------------------------

    @guarded()
    async def home(request: Request, session: Session) -> Response:
        return RedirectResponse("/studies", status_code=303)

    def person_asked(request: Request) -> bool:
        return request.query_params.get("fragment") != "1"

    def page(template: str, gather: Callable[..., dict[str, Any]], *keys: str) -> Callable:
        """A read-only page: ``gather(*path parameters)`` on a worker thread, then the template."""

        @guarded(touch=person_asked)
        async def handler(request: Request, session: Session) -> Response:
            try:
                values = await run_in_threadpool(gather, *(request.path_params[k] for k in keys))
            except KeyError:
                raise _Refusal(404, "There is no such item (any more).") from None
            return board.render(request, session, template, values)

        return handler

    def study_values(opaque: str) -> dict[str, Any]:
        uid = board.pages.study_uid(opaque)
        if uid is None:
            raise KeyError(opaque)
        return board.pages.study(uid)

    def health_values() -> dict[str, Any]:
        return {"health": board.hooks.health()}

    def config_values() -> dict[str, Any]:
        return {"toml": board.pages.configuration()}

    # -- files ----------------------------------------------------------------------------------

    @guarded()
    async def summary_image(request: Request, session: Session) -> Response:
        found = await run_in_threadpool(board.pages.output_path, request.path_params["job"],
                                        request.path_params["output"])
        if found is None or found[1]["kind"] != "summary":
            raise _Refusal(404, "There is no such summary page.")
        try:
            png = await run_in_threadpool(summary_png, found[0])
        except (OSError, ValueError) as exc:
            log.warning("summary page of job %d cannot be shown: %s", request.path_params["job"], exc)
            raise _Refusal(500, "This summary page cannot be shown.") from None
        return Response(png, media_type="image/png")

    @guarded()
    async def result_file(request: Request, session: Session) -> Response:
        job = request.path_params["job"]
        found = await run_in_threadpool(board.pages.output_path, job, request.path_params["output"])
        if found is None:
            raise _Refusal(404, "There is no such result file.")
        path, output = found
        number = 1 + [o["id"] for o in await run_in_threadpool(board.state.exports.outputs, job)
                      if o["kind"] == output["kind"]].index(output["id"])
        data = await run_in_threadpool(path.read_bytes)
        audit("dashboard download", user=session.user, job=job, kind=output["kind"], address=_client(request))
        return Response(data, media_type="application/dicom", headers={
            "Content-Disposition": f'attachment; filename="job-{job}-{output["kind"]}-{number}.dcm"'})

    @guarded()
    async def measurements(request: Request, session: Session) -> Response:
        job = request.path_params["job"]
        try:
            text = await run_in_threadpool(board.pages.measurements_csv, job)
        except KeyError:
            text = None
        if text is None:
            raise _Refusal(404, "This job has no measurement rows.")
        audit("dashboard download", user=session.user, job=job, kind="measurements", address=_client(request))
        return Response(text, media_type="text/csv", headers={
            "Content-Disposition": f'attachment; filename="job-{job}-measurements.csv"'})

    # -- actions --------------------------------------------------------------------------------

    def _job_number(form: FormData, key: str = "job") -> int:
        try:
            return int(str(form.get(key) or ""))
        except ValueError:
            raise _Refusal(400, "No job was given.") from None

    @guarded("retry", action=True)
    async def retry_job(request: Request, session: Session, form: FormData) -> Response:
        job = request.path_params["job"]
        try:
            await run_in_threadpool(board.state.retry_job, job)
        except (KeyError, ValueError) as exc:
            session.messages.append(f"Not retried: {exc.args[0]}")
        else:
            board.hooks.wake_workers()
            audit("dashboard retry job", user=session.user, role=session.role, job=job, address=_client(request))
            session.messages.append(f"Job {job} queued again.")
        return RedirectResponse(f"/jobs/{job}", status_code=303)

    @guarded("retry", action=True)
    async def send_now(request: Request, session: Session, form: FormData) -> Response:
        destination = str(form.get("destination") or "")
        job = _job_number(form) if form.get("job") else None
        known = await run_in_threadpool(board.state.exports.destination_counts)
        if destination not in known:
            raise _Refusal(400, "There are no deliveries to that destination.")
        count = await run_in_threadpool(board.state.send_now, destination, job)
        board.hooks.wake_exporter()
        audit("dashboard retry deliveries", user=session.user, role=session.role, destination=destination, job=job,
              deliveries=count, address=_client(request))
        what = f"of job {job} " if job is not None else ""
        session.messages.append(f"{count} pending deliveries {what}to {destination} are being tried now.")
        back = str(form.get("back") or "")
        return RedirectResponse(back if re.fullmatch(r"/jobs/\d+", back) else "/deliveries", status_code=303)

    @guarded("resend", action=True)
    async def resend(request: Request, session: Session, form: FormData) -> Response:
        job = _job_number(form)
        destination = str(form.get("destination") or "")
        choices = [c["value"] for c in await run_in_threadpool(board.pages.resend_choices, job)]
        if destination not in choices:
            raise _Refusal(400, "Results can be resent only to a configured destination or one they went to.")
        try:
            count, target = await run_in_threadpool(board.state.resend, job, destination)
        except (KeyError, ValueError) as exc:
            session.messages.append(f"Not resent: {exc.args[0]}")
        else:
            board.hooks.wake_exporter()
            audit("dashboard resend", user=session.user, role=session.role, job=job, destination=target.name,
                  files=count, address=_client(request))
            session.messages.append(f"{count} results of job {job} queued for {target.name}.")
        return RedirectResponse(f"/jobs/{job}", status_code=303)

    # -- live updates ---------------------------------------------------------------------------

    @guarded(touch=False)
    async def events(request: Request, session: Session) -> Response:
        if board.streams >= MAX_STREAMS:
            return PlainTextResponse("too many live pages open\n", status_code=503)

        async def stream():
            board.streams += 1
            loop = asyncio.get_running_loop()
            try:
                last = await run_in_threadpool(board.state.index.data_version)
                yield "retry: 3000\n\n"
                started, quiet = loop.time(), 0
                while loop.time() - started < STREAM_SECONDS:
                    await asyncio.sleep(1.0)
                    if board.sessions.get(session.id, touch=False) is None:
                        yield "event: expired\ndata: session ended\n\n"
                        return
                    version = await run_in_threadpool(board.state.index.data_version)
                    if version != last:
                        last, quiet = version, 0
                        yield f"event: change\ndata: {version}\n\n"
                    else:
                        quiet += 1
                        if quiet >= 15:
                            quiet = 0
                            yield ": still here\n\n"
            finally:
                board.streams -= 1

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"X-Accel-Buffering": "no"})

    routes = [
        Route("/", home),
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/studies", page("studies.html", board.pages.studies)),
        Route("/studies/{study:str}", page("study.html", study_values, "study")),
        Route("/jobs", page("jobs.html", board.pages.jobs)),
        Route("/jobs/{job:int}", page("job.html", board.pages.job, "job")),
        Route("/jobs/{job:int}/summary/{output:int}.png", summary_image),
        Route("/jobs/{job:int}/files/{output:int}", result_file),
        Route("/jobs/{job:int}/measurements.csv", measurements),
        Route("/jobs/{job:int}/retry", retry_job, methods=["POST"]),
        Route("/deliveries", page("deliveries.html", board.pages.deliveries)),
        Route("/deliveries/send-now", send_now, methods=["POST"]),
        Route("/deliveries/resend", resend, methods=["POST"]),
        Route("/health", page("health.html", health_values)),
        Route("/config", page("config.html", config_values)),
        Route("/events", events),
        Mount("/static", app=StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    app = Starlette(routes=routes)
    app.state.dashboard = board
    app.add_middleware(_SecurityHeaders)
    return app

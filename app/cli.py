"""Command-line client of the service: sign in or sign up, generate images with live progress,
list and delete jobs, see the day's usage, sign out.

    python -m app.cli [--base-url URL] login --email E [--password P | --password-stdin]
    python -m app.cli [--base-url URL] register --email E --full-name N [--password P | --password-stdin]
    python -m app.cli [--base-url URL] generate "prompt" [-n 4] [--seed S] [--out DIR]
    python -m app.cli [--base-url URL] jobs [--limit N]
    python -m app.cli [--base-url URL] delete JOB_ID
    python -m app.cli [--base-url URL] usage
    python -m app.cli [--base-url URL] logout

`--base-url` defaults to $MYFLIX_URL, else http://localhost:8000. The session (access and
refresh token) is kept in $MYFLIX_TOKEN_FILE, else $XDG_CONFIG_HOME/myflix/token.json
(~/.config/myflix/token.json). An access token the service refuses (it lives 15 minutes) is
renewed once with the refresh token, the rotated pair saved, and the request sent again.

Exit codes: 0 success; 1 the job did not fully succeed, or the service refused a request (a job
to delete that is not there, sign-up disabled, an email already registered, the day's quota
used up);
2 a usage or sign-in problem (a wrong password, a weak one, too many failed sign-ins, no session
or an ended or expired one); 3 the service is unreachable (after retries, while following
a job); 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import getpass
import json
import os
import sys
from collections.abc import Callable, Generator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from httpx_sse import ServerSentEvent, connect_sse
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn
from rich.progress_bar import ProgressBar
from tenacity import RetryCallState, Retrying, retry_if_exception_type

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
DEFAULT_BASE_URL = "http://localhost:8000"
LOGIN_HINT = "run `python -m app.cli login`"
# A stream sends at least a keepalive every SSE_KEEPALIVE_SECONDS (15 by default).
TIMEOUT = httpx.Timeout(30.0, read=60.0)
PAGE_SIZE = 100  # the service's largest page of jobs
EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
FINISHED = ("succeeded", "failed", "canceled")

T = TypeVar("T")


class CliError(Exception):
    """A message for stderr, with the exit code that goes with it."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class SessionEndedError(CliError):
    """The service refused the saved refresh token: signed out, ended, or expired."""

    def __init__(self) -> None:
        super().__init__(f"the session has ended or expired: {LOGIN_HINT}", EXIT_USAGE)


class SessionExpiredError(CliError):
    """The saved session is past its end (its refresh token's, if it has one)."""

    def __init__(self) -> None:
        super().__init__(f"the session has expired: {LOGIN_HINT}", EXIT_USAGE)


class _Retry(Exception):
    """The service is briefly away (restarting, shutting down): try again after a pause."""


# Session --------------------------------------------------------------------------------

Session = dict[str, str]


def token_path() -> Path:
    if explicit := os.environ.get("MYFLIX_TOKEN_FILE"):
        return Path(explicit)
    config_home = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config_home) / "myflix" / "token.json"


def save_session(session: Session) -> Path:
    """Write the session readable by the user alone (0600, in a 0700 directory if new). It is
    written beside and then renamed over the old one: another CLI reading it meanwhile sees the
    old session or the new one, never half of one."""
    path = token_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as file:
            os.fchmod(fd, 0o600)  # a file left over from a crash keeps its old mode otherwise
            json.dump(session, file)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path


def new_session(base_url: str, email: str, issued: dict[str, Any]) -> Session:
    """The session to save from a token answer (login, register, refresh)."""
    now = datetime.now(UTC)
    session = {
        "base_url": base_url,
        "email": email,
        "access_token": issued["access_token"],
        "expires_at": (now + timedelta(seconds=issued["expires_in"])).isoformat(),
    }
    if issued.get("refresh_token"):
        session["refresh_token"] = issued["refresh_token"]
        session["refresh_expires_at"] = (now + timedelta(seconds=issued["refresh_expires_in"])).isoformat()
    return session


def read_session() -> Session | None:
    """The saved session as it is on disk, or None if there is none (or it is unreadable)."""
    try:
        session = json.loads(token_path().read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(session, dict) or not all(isinstance(value, str) for value in session.values()):
        return None
    if not all(key in session for key in ("base_url", "access_token", "expires_at")):
        return None
    return session


def session_expires_at(session: Session) -> datetime:
    """When the session can no longer be used: its refresh token's end, if it has one."""
    return datetime.fromisoformat(session.get("refresh_expires_at") or session["expires_at"])


def load_session(base_url: str, command: str = "login") -> Session:
    session = read_session()
    if session is None:
        raise CliError(f"not signed in: {LOGIN_HINT}", EXIT_USAGE)
    stored_url = session["base_url"]
    if stored_url != base_url:
        # Sign in there, or (`logout`) sign out where the session is.
        hint = f"run `python -m app.cli --base-url {base_url if command == 'login' else stored_url} {command}`"
        raise CliError(f"not signed in to {base_url} (only to {stored_url}): {hint}", EXIT_USAGE)
    try:
        expired = session_expires_at(session) <= datetime.now(UTC)
    except (ValueError, TypeError):
        raise CliError(f"not signed in: {LOGIN_HINT}", EXIT_USAGE) from None
    if expired:
        raise SessionExpiredError
    return session


@contextlib.contextmanager
def session_lock() -> Iterator[None]:
    """Held while the session is renewed, by every CLI of this user: a refresh token is good
    for one refresh, and the service ends the whole session when one is sent twice."""
    path = token_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path.with_name(f"{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class SessionAuth(httpx.Auth):
    """The saved session's bearer token. On a 401, with a refresh token saved, the session is
    renewed once (POST /api/auth/refresh), the rotated pair saved, and the request sent again."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self.session['access_token']}"
        response = yield request
        if response.status_code != 401 or "refresh_token" not in self.session:
            return
        self.renew()
        request.headers["Authorization"] = f"Bearer {self.session['access_token']}"
        yield request

    def renew(self) -> None:
        with session_lock():
            saved = read_session()
            if (
                saved is not None
                and (saved["base_url"], saved.get("email")) == (self.session["base_url"], self.session.get("email"))
                and saved.get("refresh_token") not in (None, self.session["refresh_token"])
            ):
                self.session = saved  # another CLI renewed it meanwhile: its pair is the live one
                return
            base_url = self.session["base_url"]
            # A TransportError goes up as it is: `call` says the service is unreachable, a
            # job's stream reconnects.
            response = httpx.post(
                f"{base_url}/api/auth/refresh", json={"refresh_token": self.session["refresh_token"]}, timeout=TIMEOUT
            )
            if response.status_code in (400, 401, 403, 422):
                raise SessionEndedError
            ensure_ok(fail_if_unavailable(response))
            self.session = new_session(base_url, self.session.get("email", ""), response.json())
            save_session(self.session)


# HTTP -----------------------------------------------------------------------------------


def open_client(base_url: str, session: Session | None = None) -> httpx.Client:
    auth = SessionAuth(session) if session is not None else None
    return httpx.Client(base_url=base_url, auth=auth, timeout=TIMEOUT)


def call(client: httpx.Client, method: str, path: str, **kwargs: Any) -> httpx.Response:
    try:
        return client.request(method, path, **kwargs)
    except httpx.TransportError as exc:
        raise CliError(f"cannot reach the service at {client.base_url}: {exc}", EXIT_UNREACHABLE) from None
    except _Retry as exc:  # renewing the session met a service that is shutting down
        raise CliError(f"503 Service Unavailable: {exc}", EXIT_FAILED) from None


def ensure_ok(response: httpx.Response) -> httpx.Response:
    """The response if it succeeded; otherwise a CliError with the service's reason."""
    if response.is_success:
        return response
    response.read()  # a streamed response has no body yet
    if response.status_code == 401:
        raise CliError(f"the service refused the stored token: {LOGIN_HINT}", EXIT_USAGE)
    code = EXIT_USAGE if response.status_code in (413, 422) else EXIT_FAILED
    raise CliError(
        f"{response.status_code} {response.reason_phrase}: {error_detail(response)}{retry_after(response)}", code
    )


def retry_after(response: httpx.Response) -> str:
    """How long the service asks to wait, if it does (a 429, a 503)."""
    retry_after = response.headers.get("retry-after")
    return f" (Retry-After: {retry_after} s)" if retry_after else ""


def error_detail(response: httpx.Response) -> str:
    try:
        detail = response.json()["detail"]
    except (ValueError, KeyError, TypeError):
        return response.text
    if isinstance(detail, list):  # 422: [{"loc", "msg", ...}, ...]
        return "; ".join(f"{item['loc'][-1]}: {item['msg']}" for item in detail)
    return str(detail)


def fail_if_unavailable(response: httpx.Response) -> httpx.Response:
    if response.status_code == 503:
        raise _Retry("the service is shutting down")
    return response


# Server-Sent Events ---------------------------------------------------------------------


def event_number(event: ServerSentEvent) -> int | None:
    """The event's place in the job's stream, for ordering, from its id: `7`, or the Redis
    stream entry id `7-0` of a scaled-out service. As the SSE standard has it, an event sent
    without an id (a keepalive) carries the last one on."""
    head = event.id.split("-", 1)[0]
    return int(head) if head.isascii() and head.isdigit() else None


# Progress views ---------------------------------------------------------------------------


class PlainView:
    """One line per applied event, for pipes and logs: no control codes."""

    def __enter__(self) -> PlainView:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass

    def show(self, event_id: int, index: int, status: str, text: str) -> None:
        print(f"[{event_id}] image {index}: {text}", flush=True)

    def notice(self, text: str) -> None:
        print(text, flush=True)


class _ImageBar(BarColumn):
    """Empty while queued, pulsing while running, full once finished: red if not done."""

    def render(self, task: Task) -> ProgressBar:
        bar = super().render(task)
        bar.pulse = task.fields["status"] == "running"
        if task.fields["status"] in ("failed", "canceled"):
            bar.finished_style = "red"
        return bar


class RichView:
    """A live progress bar per image, for a terminal."""

    def __init__(self, num_images: int) -> None:
        columns: list[ProgressColumn] = [
            TextColumn("image {task.fields[index]}"),
            _ImageBar(),
            TextColumn("{task.description}", markup=False),
        ]
        self.progress = Progress(*columns)
        self.tasks = [
            self.progress.add_task("waiting", total=1, index=index, status="waiting") for index in range(num_images)
        ]

    def __enter__(self) -> RichView:
        self.progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.progress.stop()

    def show(self, event_id: int, index: int, status: str, text: str) -> None:
        completed = 1 if status in FINISHED else 0
        self.progress.update(self.tasks[index], description=text, status=status, completed=completed)

    def notice(self, text: str) -> None:
        self.progress.console.print(text, markup=False, highlight=False)


def describe(data: dict[str, Any], saved: Path | None) -> str:
    """An image's state, for people: queued (with its place), running, done, failed: why."""
    status = data["status"]
    if status == "queued" and data.get("queue_position"):
        return f"queued (#{data['queue_position']} in the queue)"
    if status == "succeeded":
        return f"done → {saved}"
    if status == "failed":
        return f"failed: {data.get('error')}"
    return str(status)


# Following a job -----------------------------------------------------------------------


# Pauses between attempts to reach the service: 0.1 s, doubling up to 2 s, for 30 attempts in
# a row without progress (about a minute); then the service counts as unreachable.
RECONNECT_ATTEMPTS = 30
RECONNECT_FIRST_SECONDS = 0.1
RECONNECT_CAP_SECONDS = 2.0


class JobRun:
    """Follows one job's events across dropped connections and restarts, applying each event
    once and in order (a reconnect sends Last-Event-ID), and saves each image as it succeeds."""

    def __init__(
        self, client: httpx.Client, downloads: httpx.Client, job_id: str, out_dir: Path, view: PlainView | RichView
    ) -> None:
        self.client, self.downloads, self.job_id, self.out_dir, self.view = client, downloads, job_id, out_dir, view
        self.failures_in_a_row = 0  # attempts that failed since the last event applied
        self.last_id: str | None = None
        self.last_number = 0
        self.saved: dict[int, Path] = {}

    def follow(self) -> ServerSentEvent:
        """Apply the job's events until `done` or `error`, which is returned."""
        return self._retrying(self._read_stream)

    def _retrying(self, attempt: Callable[[], T]) -> T:
        retrying = Retrying(
            retry=retry_if_exception_type((httpx.TransportError, _Retry)),
            stop=self._gave_up,
            wait=lambda _: min(RECONNECT_CAP_SECONDS, RECONNECT_FIRST_SECONDS * 2 ** (self.failures_in_a_row - 1)),
            before_sleep=self._notice,
            reraise=True,
        )
        try:
            return retrying(attempt)
        except (httpx.TransportError, _Retry) as exc:
            raise CliError(
                f"the service is unreachable after {RECONNECT_ATTEMPTS} attempts: {_reason(exc)}", EXIT_UNREACHABLE
            ) from None

    def _gave_up(self, state: RetryCallState) -> bool:
        self.failures_in_a_row += 1
        return self.failures_in_a_row > RECONNECT_ATTEMPTS

    def _notice(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        delay = state.upcoming_sleep
        self.view.notice(
            f"connection lost ({_reason(exc)}); reconnecting in {delay:.1f} s "
            f"({self.failures_in_a_row}/{RECONNECT_ATTEMPTS})"
        )

    def _read_stream(self) -> ServerSentEvent:
        headers = {"Last-Event-ID": self.last_id} if self.last_id else {}
        with connect_sse(self.client, "GET", f"/api/generate/{self.job_id}/stream", headers=headers) as stream:
            ensure_ok(fail_if_unavailable(stream.response))
            for event in stream.iter_sse():
                number = event_number(event)
                if number is None or number <= self.last_number:
                    continue  # a keepalive, or an event applied before the reconnect
                if event.event in ("done", "error"):
                    return event
                self._apply(event, number)
                self.last_id, self.last_number = event.id, number
                self.failures_in_a_row = 0
        raise _Retry("the stream ended before the job did")

    def _apply(self, event: ServerSentEvent, number: int) -> None:
        if event.event != "progress":
            return
        data = event.json()
        saved = self._save(data["index"], data["url"]) if data["status"] == "succeeded" else None
        self.view.show(number, data["index"], data["status"], describe(data, saved))

    def _save(self, index: int, url: str) -> Path:
        response = self._retrying(lambda: ensure_ok(fail_if_unavailable(self.downloads.get(url))))
        content_type = response.headers.get("content-type", "").partition(";")[0].strip()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"{self.job_id}-{index}.{EXTENSIONS.get(content_type, 'bin')}"
        path.write_bytes(response.content)
        self.saved[index] = path
        return path


def _reason(exc: BaseException | None) -> str:
    return (str(exc) or type(exc).__name__) if exc is not None else "unknown"


def seconds(ms: float | None) -> str:
    return "-" if ms is None else f"{ms / 1000:.2f} s"


def report(end: ServerSentEvent, saved: dict[int, Path]) -> int:
    """Print how the job ended; the exit code: 0 only if every image succeeded."""
    data = end.json()
    if end.event == "error":
        print(f"job {data['job_id']} ended with an error: {data['message']}", file=sys.stderr)
        return EXIT_FAILED
    images = data["images"]
    print(f"job {data['job_id']} {data['status']}: {len(saved)} of {len(images)} images saved")
    print(f"TTFI: {seconds(data['ttfi_ms'])}   batch time: {seconds(data['total_ms'])}")
    for _, path in sorted(saved.items()):
        print(f"  {path}")
    for image in images:
        if image["status"] != "succeeded":
            reason = f": {image['error']}" if image["error"] else ""
            print(f"image {image['index']} {image['status']}{reason}", file=sys.stderr)
    return EXIT_OK if data["status"] == "succeeded" else EXIT_FAILED


# Commands -------------------------------------------------------------------------------


def read_password(args: argparse.Namespace) -> str:
    if args.password is not None:
        return str(args.password)
    if args.password_stdin:
        line = sys.stdin.readline()
        if not line:
            raise CliError("no password on stdin", EXIT_USAGE)
        return line.removesuffix("\n").removesuffix("\r")
    return getpass.getpass("Password: ")


def read_new_password(args: argparse.Namespace) -> str:
    """A new account's password: asked twice when it is typed in."""
    if args.password is not None or args.password_stdin:
        return read_password(args)
    password = getpass.getpass("Password: ")
    if getpass.getpass("Repeat the password: ") != password:
        raise CliError("the passwords differ", EXIT_USAGE)
    return password


def cmd_login(args: argparse.Namespace) -> int:
    password = read_password(args)
    with open_client(args.base_url) as client:
        response = call(client, "POST", "/api/auth/login", json={"email": args.email, "password": password})
        # A sign-in problem, like a missing or expired session: exit code 2.
        if response.status_code == 401:
            raise CliError("login failed: incorrect email or password", EXIT_USAGE)
        if response.status_code == 403:  # the account is disabled
            raise CliError(f"login failed: {error_detail(response)}", EXIT_USAGE)
        if response.status_code == 429:
            raise CliError(
                f"login failed: 429 Too Many Requests: {error_detail(response)}{retry_after(response)}", EXIT_USAGE
            )
        return signed_in(args.base_url, client, ensure_ok(response).json(), "Signed in to")


def cmd_register(args: argparse.Namespace) -> int:
    password = read_new_password(args)
    body = {"email": args.email, "password": password, "full_name": args.full_name}
    with open_client(args.base_url) as client:
        response = call(client, "POST", "/api/auth/register", json=body)
        if response.status_code == 403:
            raise CliError(f"sign-up refused: {error_detail(response)}", EXIT_FAILED)
        if response.status_code == 409:
            raise CliError(f"sign-up refused: {error_detail(response)}; sign in with `login`", EXIT_FAILED)
        if response.status_code == 429:
            raise CliError(
                f"sign-up failed: 429 Too Many Requests: {error_detail(response)}{retry_after(response)}", EXIT_USAGE
            )
        return signed_in(args.base_url, client, ensure_ok(response).json(), "Registered and signed in to")


def signed_in(base_url: str, client: httpx.Client, issued: dict[str, Any], done: str) -> int:
    """Save the session of a token answer (login, register) and say whose it is."""
    client.headers["Authorization"] = f"Bearer {issued['access_token']}"
    user = ensure_ok(call(client, "GET", "/api/auth/me")).json()
    session = new_session(base_url, user["email"], issued)
    path = save_session(session)
    print(f"{done} {base_url} as {user['full_name']} <{user['email']}>")
    until = session_expires_at(session).astimezone()
    renewed = " (its access token is renewed as needed)" if "refresh_token" in session else ""
    print(f"Session kept in {path} until {until:%Y-%m-%d %H:%M}{renewed}")
    return EXIT_OK


def cmd_logout(args: argparse.Namespace) -> int:
    """End the session at the service, then forget it here, whatever the service answered."""
    path = token_path()
    if read_session() is None:
        path.unlink(missing_ok=True)  # an unreadable file is no session either
        print("not signed in: nothing to sign out of")
        return EXIT_OK
    try:
        session = load_session(args.base_url, "logout")
    except SessionExpiredError:
        path.unlink(missing_ok=True)
        print(f"the session had expired already; {path} deleted")
        return EXIT_OK
    try:
        with open_client(args.base_url, session) as client:
            response = call(client, "POST", "/api/auth/logout")
    except SessionEndedError:
        response = None
    except CliError as error:
        path.unlink(missing_ok=True)
        until = session_expires_at(session).astimezone()
        raise CliError(
            f"{error}; {path} deleted, but the session stays valid at the service until {until:%Y-%m-%d %H:%M}",
            error.code,
        ) from None
    path.unlink(missing_ok=True)
    if response is None or response.status_code == 401:
        print(f"the service had ended this session already; {path} deleted")
        return EXIT_OK
    if not response.is_success:
        raise CliError(
            f"{response.status_code} {response.reason_phrase}: {error_detail(response)}; {path} deleted", EXIT_FAILED
        )
    print(f"Signed out of {args.base_url}; {path} deleted")
    return EXIT_OK


def cmd_usage(args: argparse.Namespace) -> int:
    session = load_session(args.base_url)
    with open_client(args.base_url, session) as client:
        usage = ensure_ok(call(client, "GET", "/api/usage")).json()
    resets_at = datetime.fromisoformat(usage["resets_at"]).astimezone()
    print(f"images today: {usage['images_today']}")
    if usage["quota"] is None:
        print("quota: unlimited")
    else:
        print(f"quota: {usage['quota']} a day, {usage['remaining']} left")
    print(f"resets at: {resets_at:%Y-%m-%d %H:%M %Z}")
    return EXIT_OK


def cmd_generate(args: argparse.Namespace) -> int:
    session = load_session(args.base_url)
    body = {"prompt": args.prompt, "num_images": args.num_images}
    if args.seed is not None:
        body["seed"] = args.seed
    with open_client(args.base_url, session) as client, httpx.Client(timeout=TIMEOUT) as downloads:
        job_id = ensure_ok(call(client, "POST", "/api/generate/", json=body)).json()["job_id"]
        out_dir = args.out or Path(f"myflix-{job_id}")
        print(f"job {job_id}: {args.num_images} image(s), saved into {out_dir}", flush=True)
        view = RichView(args.num_images) if sys.stdout.isatty() else PlainView()
        run = JobRun(client, downloads, job_id, out_dir, view)
        try:
            with view:
                end = run.follow()
        except KeyboardInterrupt:
            print(f"\ninterrupted; job {job_id} goes on at the service: see `python -m app.cli jobs`", file=sys.stderr)
            return EXIT_INTERRUPTED
    return report(end, run.saved)


def cmd_jobs(args: argparse.Namespace) -> int:
    session = load_session(args.base_url)
    with open_client(args.base_url, session) as client:
        jobs = fetch_jobs(client, args.limit)
    for job in jobs:
        print(job_line(job))
    if not jobs:
        print("no jobs yet")
    return EXIT_OK


def fetch_jobs(client: httpx.Client, limit: int) -> list[dict[str, Any]]:
    """The newest `limit` jobs, following `next_cursor` as far as needed."""
    jobs: list[dict[str, Any]] = []
    cursor: dict[str, str] = {}
    while len(jobs) < limit:
        params = {"limit": min(limit - len(jobs), PAGE_SIZE), **cursor}
        page = ensure_ok(call(client, "GET", "/api/generate/", params=params)).json()
        jobs += page["jobs"]
        if not page["next_cursor"]:
            break
        cursor = {"cursor": page["next_cursor"]}
    return jobs[:limit]


def cmd_delete(args: argparse.Namespace) -> int:
    session = load_session(args.base_url)
    with open_client(args.base_url, session) as client:
        # Cancels the job first if it is still running; 204 once it is gone.
        response = call(client, "DELETE", f"/api/generate/{quote(args.job_id, safe='')}")
        if response.status_code == 404:
            raise CliError(
                f"job {args.job_id} not found: it was deleted already, or it is not one of yours", EXIT_FAILED
            )
        ensure_ok(response)
    print(f"job {args.job_id} deleted")
    return EXIT_OK


def job_line(job: dict[str, Any], prompt_width: int = 50) -> str:
    created = datetime.fromisoformat(job["created_at"]).astimezone()
    prompt = " ".join(job["prompt"].split())
    if len(prompt) > prompt_width:
        prompt = prompt[: prompt_width - 1] + "…"
    return (
        f"{created:%Y-%m-%d %H:%M:%S}  {job['job_id']}  {job['status']:<9}  {job['num_images']} img"
        f"  TTFI {seconds(job['ttfi_ms']):>7}  batch {seconds(job['total_ms']):>7}  {prompt}"
    )


# Command line ---------------------------------------------------------------------------


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def job_id(text: str) -> str:
    if not text.strip(".") or "/" in text:  # "", ".", ".." would name another path
        raise argparse.ArgumentTypeError(f"not a job id: {text!r}")
    return text


def add_password_options(command: argparse.ArgumentParser, rules: str = "") -> None:
    password = command.add_mutually_exclusive_group()
    password.add_argument("--password", help=f"{rules}asked for when neither this nor --password-stdin is given")
    password.add_argument(
        "--password-stdin", action="store_true", help="read the password from the first line of stdin"
    )


def build_parser() -> argparse.ArgumentParser:
    base_url_help = f"the service (default: $MYFLIX_URL, else {DEFAULT_BASE_URL})"
    # --base-url is accepted before or after the command; after it, it has no default of its own.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--base-url", default=argparse.SUPPRESS, help=base_url_help)
    parser = argparse.ArgumentParser(prog="python -m app.cli", description="MyFlix image generation client.")
    parser.add_argument("--base-url", default=os.environ.get("MYFLIX_URL") or DEFAULT_BASE_URL, help=base_url_help)
    commands = parser.add_subparsers(title="commands", required=True)

    login = commands.add_parser("login", parents=[common], help="sign in and keep the session")
    login.add_argument("--email", required=True)
    add_password_options(login)
    login.set_defaults(command=cmd_login)

    register = commands.add_parser(
        "register", parents=[common], help="create an account (where the service allows sign-up) and sign in"
    )
    register.add_argument("--email", required=True)
    register.add_argument("--full-name", required=True)
    add_password_options(register, "8 to 72 bytes in UTF-8, not the email; ")
    register.set_defaults(command=cmd_register)

    logout = commands.add_parser(
        "logout", parents=[common], help="end the session at the service and delete the saved one"
    )
    logout.set_defaults(command=cmd_logout)

    usage = commands.add_parser("usage", parents=[common], help="images made today, the daily quota, when it resets")
    usage.set_defaults(command=cmd_usage)

    generate = commands.add_parser("generate", parents=[common], help="generate images and save them")
    generate.add_argument("prompt")
    generate.add_argument("-n", "--num-images", type=positive_int, default=4, help="images to make (default 4)")
    generate.add_argument("--seed", type=int, help="image i uses seed + i")
    generate.add_argument("--out", type=Path, help="where to save the images (default ./myflix-<job_id>/)")
    generate.set_defaults(command=cmd_generate)

    jobs = commands.add_parser("jobs", parents=[common], help="list your jobs, newest first")
    jobs.add_argument("--limit", type=positive_int, default=20, help="jobs to list (default 20)")
    jobs.set_defaults(command=cmd_jobs)

    delete = commands.add_parser(
        "delete", parents=[common], help="delete a job: cancel it if it is running, remove its images"
    )
    delete.add_argument("job_id", metavar="JOB_ID", type=job_id, help="as `jobs` lists it, e.g. job_0123…")
    delete.set_defaults(command=cmd_delete)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.base_url = args.base_url.rstrip("/")
    command: Callable[[argparse.Namespace], int] = args.command
    try:
        return command(args)
    except CliError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

"""Command-line client of the service: sign in, generate images with live progress, list and
delete jobs.

    python -m app.cli [--base-url URL] login --email E [--password P | --password-stdin]
    python -m app.cli [--base-url URL] generate "prompt" [-n 4] [--seed S] [--out DIR]
    python -m app.cli [--base-url URL] jobs [--limit N]
    python -m app.cli [--base-url URL] delete JOB_ID

`--base-url` defaults to $MYFLIX_URL, else http://localhost:8000. The token is kept in
$MYFLIX_TOKEN_FILE, else $XDG_CONFIG_HOME/myflix/token.json (~/.config/myflix/token.json).

Exit codes: 0 success; 1 the job did not fully succeed, or the service refused a request (a job
to delete that is not there);
2 a usage or sign-in problem (a wrong password, too many failed sign-ins, no session or an
expired one); 3 the service is unreachable (after retries, while following
a job); 130 interrupted.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Callable
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


class _Retry(Exception):
    """The service is briefly away (restarting, shutting down): try again after a pause."""


# Token ----------------------------------------------------------------------------------


def token_path() -> Path:
    if explicit := os.environ.get("MYFLIX_TOKEN_FILE"):
        return Path(explicit)
    config_home = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config_home) / "myflix" / "token.json"


def save_session(session: dict[str, str]) -> Path:
    """Write the session readable by the user alone (0600, in a 0700 directory if new)."""
    path = token_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        os.fchmod(fd, 0o600)  # a file that existed keeps its old mode otherwise
        json.dump(session, file)
    return path


def load_token(base_url: str) -> str:
    try:
        session = json.loads(token_path().read_text())
        stored_url: str = session["base_url"]
        token: str = session["access_token"]
        expires_at = datetime.fromisoformat(session["expires_at"])
    except (OSError, ValueError, KeyError, TypeError):
        raise CliError(f"not signed in: {LOGIN_HINT}", EXIT_USAGE) from None
    if stored_url != base_url:
        hint = f"run `python -m app.cli --base-url {base_url} login`"
        raise CliError(f"not signed in to {base_url} (only to {stored_url}): {hint}", EXIT_USAGE)
    if expires_at <= datetime.now(UTC):
        raise CliError(f"the session has expired: {LOGIN_HINT}", EXIT_USAGE)
    return token


# HTTP -----------------------------------------------------------------------------------


def open_client(base_url: str, token: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=base_url, headers=headers, timeout=TIMEOUT)


def call(client: httpx.Client, method: str, path: str, **kwargs: Any) -> httpx.Response:
    try:
        return client.request(method, path, **kwargs)
    except httpx.TransportError as exc:
        raise CliError(f"cannot reach the service at {client.base_url}: {exc}", EXIT_UNREACHABLE) from None


def ensure_ok(response: httpx.Response) -> httpx.Response:
    """The response if it succeeded; otherwise a CliError with the service's reason."""
    if response.is_success:
        return response
    response.read()  # a streamed response has no body yet
    if response.status_code == 401:
        raise CliError(f"the service refused the stored token: {LOGIN_HINT}", EXIT_USAGE)
    code = EXIT_USAGE if response.status_code in (413, 422) else EXIT_FAILED
    raise CliError(f"{response.status_code} {response.reason_phrase}: {error_detail(response)}", code)


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


def cmd_login(args: argparse.Namespace) -> int:
    password = read_password(args)
    with open_client(args.base_url) as client:
        response = call(client, "POST", "/api/auth/login", json={"email": args.email, "password": password})
        # A sign-in problem, like a missing or expired session: exit code 2.
        if response.status_code == 401:
            raise CliError("login failed: incorrect email or password", EXIT_USAGE)
        if response.status_code == 429:
            retry_after = response.headers.get("retry-after")
            wait = f" (Retry-After: {retry_after} s)" if retry_after else ""
            raise CliError(f"login failed: 429 Too Many Requests: {error_detail(response)}{wait}", EXIT_USAGE)
        issued = ensure_ok(response).json()
        client.headers["Authorization"] = f"Bearer {issued['access_token']}"
        user = ensure_ok(call(client, "GET", "/api/auth/me")).json()
    expires_at = datetime.now(UTC) + timedelta(seconds=issued["expires_in"])
    path = save_session(
        {
            "base_url": args.base_url,
            "email": user["email"],
            "access_token": issued["access_token"],
            "expires_at": expires_at.isoformat(),
        }
    )
    print(f"Signed in to {args.base_url} as {user['full_name']} <{user['email']}>")
    print(f"Token kept in {path} until {expires_at.astimezone():%Y-%m-%d %H:%M}")
    return EXIT_OK


def cmd_generate(args: argparse.Namespace) -> int:
    token = load_token(args.base_url)
    body = {"prompt": args.prompt, "num_images": args.num_images}
    if args.seed is not None:
        body["seed"] = args.seed
    with open_client(args.base_url, token) as client, httpx.Client(timeout=TIMEOUT) as downloads:
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
    token = load_token(args.base_url)
    with open_client(args.base_url, token) as client:
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
    token = load_token(args.base_url)
    with open_client(args.base_url, token) as client:
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


def build_parser() -> argparse.ArgumentParser:
    base_url_help = f"the service (default: $MYFLIX_URL, else {DEFAULT_BASE_URL})"
    # --base-url is accepted before or after the command; after it, it has no default of its own.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--base-url", default=argparse.SUPPRESS, help=base_url_help)
    parser = argparse.ArgumentParser(prog="python -m app.cli", description="MyFlix image generation client.")
    parser.add_argument("--base-url", default=os.environ.get("MYFLIX_URL") or DEFAULT_BASE_URL, help=base_url_help)
    commands = parser.add_subparsers(title="commands", required=True)

    login = commands.add_parser("login", parents=[common], help="sign in and keep the token")
    login.add_argument("--email", required=True)
    password = login.add_mutually_exclusive_group()
    password.add_argument("--password", help="asked for when neither this nor --password-stdin is given")
    password.add_argument(
        "--password-stdin", action="store_true", help="read the password from the first line of stdin"
    )
    login.set_defaults(command=cmd_login)

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

"""Issue 13: the service under database and storage faults, tested from outside (a service
process, real HTTP, faults done to its PostgreSQL role or to the file system under DATA_DIR).

The contract: while the database refuses writes, a request that must write answers 503 with a
reason within DB_WRITE_TIMEOUT_SECONDS (never a 500, never a hang), /readyz says 503, reads
answer 200 or 503; nothing is lost, repeated or wedged: once the fault is gone the service
recovers by itself, every stream ends with `done`, every stored stream is gap-free and every
image was made once; SIGTERM still stops it in time. Image links are stable, and signed when
sent, so that a stream replayed after the links it first carried expired carries live ones.
"""

import os
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from contextlib import closing

import httpx
import pytest
from sqlalchemy.exc import SQLAlchemyError

from tests.conftest import _unavailable, create_job, login, read_stream, wait_until
from tests.fake_replicate import FakeReplicate
from tests.faults import (
    Answer,
    FollowedStream,
    PgSandbox,
    Poller,
    SwitchableFs,
    cannot_mount,
    contiguous,
    exchange,
    fill,
    follow_stream,
    killed_on_exit,
    tmpfs,
    wait_for,
)

pytestmark = pytest.mark.slow

WRITE_TIMEOUT = 2.0  # DB_WRITE_TIMEOUT_SECONDS given to the service
MARGIN = 3.0  # for the answer to travel, on two cores shared with the test and the database
WRITE_BOUND = WRITE_TIMEOUT + MARGIN


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _image_urls(events) -> list[str]:
    urls = [e.data["url"] for e in events if e.event == "progress" and e.data.get("url")]
    done = [e for e in events if e.event == "done"]
    if done:
        urls += [image["url"] for image in done[-1].data["images"] if image.get("url")]
    return urls


def _describe(answer: Answer) -> str:
    if answer.status is None:
        return f"no answer after {answer.seconds:.1f} s ({answer.error})"
    return f"{answer.status} after {answer.seconds:.1f} s: {answer.body[:200]}"


def _check_refused_write(answer: Answer, what: str) -> list[str]:
    """A write refused as the contract says: 503, a JSON `detail`, within the bound."""
    if answer.status is None or answer.seconds > WRITE_BOUND:
        bound = f"DB_WRITE_TIMEOUT_SECONDS + {MARGIN:.0f} s = {WRITE_BOUND:.0f} s"
        return [f"{what}: expected 503 within {bound}, got {_describe(answer)}"]
    if answer.status != 503:
        return [f"{what}: expected 503, got {_describe(answer)}"]
    try:
        detail = httpx.Response(503, content=answer.body).json()["detail"]
    except (ValueError, KeyError, TypeError):
        detail = None
    if not isinstance(detail, str) or not detail:
        return [f"{what}: 503 without a JSON `detail` saying why: {answer.body[:200]!r}"]
    return []


def _readyz(client: httpx.Client) -> int | None:
    try:
        return client.get("/readyz", timeout=10).status_code
    except httpx.HTTPError:
        return None


def _recovers(client: httpx.Client, token: str, base_url: str, what: str) -> list[str]:
    """After a fault: /readyz is 200 again by itself, and a new job runs to `done`."""
    problems = []
    if not wait_for(lambda: _readyz(client) == 200, timeout=20):
        problems.append(f"after {what}: /readyz still {_readyz(client)} 20 s later (the service stays wedged)")
    created = exchange(
        client,
        "POST",
        "/api/generate/",
        timeout=WRITE_BOUND + 5,
        json={"prompt": f"after {what}", "num_images": 1},
        headers=_auth(token),
    )
    if created.status != 202:
        return [*problems, f"after {what}: a new job was not accepted: {_describe(created)}"]
    job_id = httpx.Response(202, content=created.body).json()["job_id"]
    followed = follow_stream(base_url, token, job_id, deadline=time.monotonic() + 30)
    if not followed.done or followed.last.data["status"] != "succeeded":
        problems.append(f"after {what}: a new job did not run to a successful `done`: {_ending(followed)}")
    return problems


def _ending(followed: FollowedStream) -> str:
    last = followed.last
    tried = [c.status if c.error is None else f"{c.status} {c.error[:80]}" for c in followed.connections]
    if last is None:
        return f"no event at all (connections: {tried})"
    what = {key: last.data[key] for key in ("index", "status", "error", "message") if last.data.get(key) is not None}
    return f"last event id {last.id}, {last.event} {what}; connections: {tried}"


# PostgreSQL: connections cut and limited, the login revoked mid-job ----------------------


@pytest.fixture
def pg_sandbox():
    """A role and a database of this test's own (dropped afterwards), to do the faults to."""
    url = os.environ.get("TEST_DATABASE_URL")
    if not url:
        _unavailable("TEST_DATABASE_URL is not set: PostgreSQL fault test skipped")
    sandbox = PgSandbox(url, f"myflix_fault_{uuid.uuid4().hex[:10]}")
    try:
        sandbox.create()
    except (OSError, SQLAlchemyError) as exc:
        _unavailable(f"PostgreSQL at TEST_DATABASE_URL is unreachable: {exc}")
    try:
        yield sandbox
    finally:
        sandbox.drop()


JOBS = 20


class _Poster:
    """Posts jobs from a thread, one after another, while the test lets it (`quota`); follows
    each accepted job's stream on a thread of its own."""

    def __init__(self, base_url: str, token: str) -> None:
        self.base_url, self.token = base_url, token
        self.quota = 0
        self.answers: list[tuple[str, Answer]] = []  # (prompt, answer)
        self.accepted: list[tuple[str, str]] = []  # (job_id, prompt)
        self.followed: dict[str, FollowedStream] = {}
        self._followers: list[threading.Thread] = []
        self.stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "_Poster":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop.set()
        self._thread.join(timeout=30)
        for follower in self._followers:
            follower.join(timeout=30)

    def _run(self) -> None:
        with httpx.Client(base_url=self.base_url) as client:
            attempt = 0
            while not self.stop.is_set():
                if len(self.accepted) >= self.quota:
                    self.stop.wait(0.05)
                    continue
                attempt += 1
                prompt = f"fault job {attempt}"
                answer = exchange(
                    client,
                    "POST",
                    "/api/generate/",
                    timeout=WRITE_BOUND + 5,
                    headers=_auth(self.token),
                    json={"prompt": prompt, "num_images": 2, "seed": 1000 * attempt},
                )
                self.answers.append((prompt, answer))
                if answer.status == 202:
                    job_id = httpx.Response(202, content=answer.body).json()["job_id"]
                    self.followed[job_id] = FollowedStream(job_id)
                    self.accepted.append((job_id, prompt))
                    follower = threading.Thread(
                        target=follow_stream,
                        daemon=True,
                        args=(self.base_url, self.token, job_id, time.monotonic() + 600, self.stop),
                        kwargs={"into": self.followed[job_id]},
                    )
                    self._followers.append(follower)
                    follower.start()
                self.stop.wait(0.2)


def _prediction_running(fake: FakeReplicate, prompts: set[str]) -> bool:
    return any(
        p["status"] in ("starting", "processing") and p["input"]["prompt"] in prompts for p in fake.predictions.values()
    )


@pytest.mark.timeout(300)
def test_postgresql_connection_limits_and_a_revoked_login_lose_and_repeat_nothing(pg_sandbox, service_process):
    """20 jobs (2 Replicate images each) while history is read and /readyz polled: the role's
    sessions are cut and its connection limit dropped to 2, then lifted; then its login is
    revoked mid-job (sessions cut again) and given back. Nothing may be lost or repeated."""
    with FakeReplicate(latency=2.0, wait_cap=0.3) as fake:
        service = service_process(
            DATABASE_URL=pg_sandbox.service_url,
            IMAGE_PROVIDER="replicate",
            REPLICATE_API_TOKEN=fake.token,
            REPLICATE_BASE_URL=fake.base_url,
            REPLICATE_POLL_INTERVAL=0.1,
            DB_WRITE_TIMEOUT_SECONDS=WRITE_TIMEOUT,
            SSE_KEEPALIVE_SECONDS=1,
            MAX_ACTIVE_JOBS_PER_USER=100,
            SHUTDOWN_GRACE_SECONDS=2,
        )
        client = service.client()
        token = login(client)
        problems: list[str] = []
        with (
            closing(client),
            Poller(service.base_url, "GET", "/readyz", every=0.1) as readyz,
            Poller(
                service.base_url,
                "GET",
                "/api/generate/",
                every=0.05,
                timeout=20,
                params={"limit": 20},
                headers=_auth(token),
            ) as history,
            _Poster(service.base_url, token) as poster,
        ):
            poster.quota = 4
            assert wait_for(lambda: len(poster.accepted) >= 4, timeout=30), (
                f"harness: the first jobs were not accepted before any fault: {poster.answers[-3:]}"
            )

            # Fault 1: every session cut, and at most 2 connections for the whole process.
            pg_sandbox.connection_limit(2)
            pg_sandbox.terminate_sessions()
            limit_start = time.monotonic()
            poster.quota = 10
            if not wait_for(
                lambda: (
                    len(poster.accepted) >= 10
                    and time.monotonic() - limit_start >= 3
                    and len(history.between(limit_start, time.monotonic())) >= 5
                ),
                timeout=40,
            ):
                problems.append(
                    f"under a connection limit of 2: only {len(poster.accepted)} of 10 jobs accepted, "
                    f"{len(history.between(limit_start, time.monotonic()))} history reads answered in 40 s; "
                    f"last POSTs: {[_describe(a) for _, a in poster.answers[-3:]]}"
                )
            pg_sandbox.connection_limit(-1)
            limit_end = time.monotonic()

            # Fault 2: the login revoked while images are running, every session cut.
            poster.quota = 12
            prompts = lambda: {prompt for _, prompt in poster.accepted}  # noqa: E731
            assert wait_for(lambda: len(poster.accepted) >= 12 and _prediction_running(fake, prompts()), timeout=40), (
                f"harness: no image was running before the login was revoked ({len(poster.accepted)} jobs accepted)"
            )
            pg_sandbox.login(False)
            pg_sandbox.terminate_sessions()
            nologin_start = time.monotonic()
            poster.quota = JOBS
            wait_for(
                lambda: (
                    time.monotonic() - nologin_start >= WRITE_TIMEOUT + 2
                    and any(a.started >= nologin_start for _, a in poster.answers)
                    and len(readyz.between(nologin_start, time.monotonic())) >= 3
                ),
                timeout=20,
            )
            nologin_end = time.monotonic()
            pg_sandbox.login(True)
            faults_over = time.monotonic()

            wait_for(lambda: len(poster.accepted) >= JOBS, timeout=60)
            wait_for(lambda: all(f.done for f in list(poster.followed.values())), timeout=45)
            ready_after = wait_for(lambda: _readyz(client) == 200, timeout=20)
            poster.stop.set()

        accepted = dict(poster.accepted)
        # The jobs.
        if len(accepted) < JOBS:
            problems.append(f"only {len(accepted)} of {JOBS} jobs were accepted in the end")
        for job_id, followed in poster.followed.items():
            if not followed.done:
                problems.append(
                    f"the stream of {job_id} ({accepted[job_id]}) never ended with `done`: {_ending(followed)}"
                )
            elif followed.last.data["status"] != "succeeded":
                problems.append(f"{job_id} ended {followed.last.data['status']}: {followed.last.data['images']}")
            ids = [int(e.id) for e in followed.events if e.id is not None]
            if not contiguous(ids):
                problems.append(f"{job_id}: the ids read over its reconnects are not 1..n: {ids}")
            problems.extend(
                f"{job_id}: a stream ended early without `retry:` ({connection.error or 'clean end'})"
                for connection in followed.early_ends_without_retry()
            )
            bad = [c for c in followed.connections if c.status not in (200, 503, None)]
            if bad:
                problems.append(f"{job_id}: a GET of its stream answered {bad[0].status}: {bad[0].error}")
        stored: dict[str, list[int]] = {}
        for job_id, event_id in pg_sandbox.query("SELECT job_id, id FROM job_events ORDER BY job_id, id"):
            stored.setdefault(job_id, []).append(event_id)
        for job_id, followed in poster.followed.items():
            if not contiguous(stored.get(job_id, [])):
                problems.append(f"{job_id}: stored event ids are not 1..n: {stored.get(job_id)}")
            streamed = [int(e.id) for e in followed.events if e.id is not None]
            if followed.done and streamed != stored.get(job_id):
                problems.append(f"{job_id}: streamed ids {streamed} are not the stored ones {stored.get(job_id)}")
        # Every image made once: one prediction per (prompt, seed).
        creates = Counter((p["input"]["prompt"], p["input"]["seed"]) for p in fake.created())
        repeated = {key: n for key, n in creates.items() if n > 1}
        if repeated:
            problems.append(f"images made more than once (prompt, seed: creates): {repeated}")
        seeds = {prompt: 1000 * int(prompt.rsplit(" ", 1)[1]) for prompt in accepted.values()}
        missing = [(p, s + i) for p, s in seeds.items() for i in range(2) if creates[(p, s + i)] == 0]
        if missing:
            problems.append(f"images of accepted jobs never made: {missing}")
        # Readiness.
        down = readyz.between(nologin_start, nologin_end + 1)
        if not any(a.status == 503 for a in down):
            problems.append(
                f"/readyz never answered 503 while the login was revoked: {Counter(a.status for a in down)}"
            )
        if not ready_after:
            problems.append(f"/readyz is not 200 again 20 s after the faults: {_describe(readyz.answers[-1])}")
        # Reads and writes.
        wrong_reads = [a for a in history.answers if a.status not in (200, 503)]
        if wrong_reads:
            problems.append(
                f"history reads answered other than 200/503: {Counter(a.status for a in wrong_reads)}, "
                f"e.g. {_describe(wrong_reads[0])}"
            )
        for prompt, answer in poster.answers:
            if answer.status not in (202, 503) or answer.seconds > WRITE_BOUND:
                problems.append(
                    f"POST of {prompt!r} at +{answer.started - limit_start:.1f} s (faults from 0 to "
                    f"{limit_end - limit_start:.1f} s and {nologin_start - limit_start:.1f} to "
                    f"{faults_over - limit_start:.1f} s): {_describe(answer)}"
                )
        assert not problems, "\n".join(problems)


# SQLite: the database turns read-only, the disk fills up ----------------------------------


@pytest.fixture
def can_mount():
    reason = cannot_mount()
    if reason:
        _unavailable(reason)


@pytest.fixture
def can_mount_fuse():
    reason = cannot_mount(fuse=True)
    if reason:
        _unavailable(reason)


def _sqlite_service(service_process, data_dir, **env):
    return service_process(
        DATA_DIR=str(data_dir),
        DATABASE_URL="",
        IMAGE_PROVIDER="local",
        LOCAL_LATENCY_JITTER_MS=0,
        DB_WRITE_TIMEOUT_SECONDS=WRITE_TIMEOUT,
        SSE_KEEPALIVE_SECONDS=1,
        **env,
    )


def _post(client: httpx.Client, token: str, prompt: str) -> Answer:
    return exchange(
        client,
        "POST",
        "/api/generate/",
        timeout=WRITE_BOUND + 2,
        json={"prompt": prompt, "num_images": 1},
        headers=_auth(token),
    )


def _one_job_succeeds(client: httpx.Client, token: str) -> None:
    job_id = create_job(client, token, prompt="before the fault", num_images=1)
    events = read_stream(client, job_id, headers=_auth(token))
    assert events[-1].event == "done" and events[-1].data["status"] == "succeeded", (
        f"harness: the service does not work before the fault: {events[-1]}"
    )


@pytest.mark.timeout(180)
def test_sqlite_turning_read_only_answers_503_and_recovers_by_itself(can_mount_fuse, service_process, tmp_path):
    with SwitchableFs(tmp_path / "disk", tmp_path / "data") as disk:
        service = _sqlite_service(service_process, disk.mountpoint, LOCAL_LATENCY_MS=100)
        with killed_on_exit(service), service.client() as client:
            token = login(client)
            _one_job_succeeds(client, token)

            disk.read_only = True
            problems = _check_refused_write(
                _post(client, token, "while read-only"), "POST /api/generate/ while the database is read-only"
            )
            if not wait_for(lambda: _readyz(client) == 503, timeout=WRITE_BOUND):
                problems.append(f"/readyz while the database is read-only: {_readyz(client)}, expected 503")
            assert disk.refused_writes > 0, "harness: the service wrote nothing while its disk was read-only"
            # Let it try again meanwhile, if it does (a connection opened now would stay read-only).
            wait_for(lambda: disk.refused_writes >= 3, timeout=WRITE_BOUND)

            disk.read_only = False
            problems += _recovers(client, token, service.base_url, "the database is writable again")
        assert not problems, "\n".join(problems)


@pytest.mark.timeout(180)
def test_a_full_disk_answers_503_fails_the_image_it_cannot_keep_and_recovers(can_mount, service_process, tmp_path):
    latency = 1.5
    with tmpfs(tmp_path / "data", "16m") as data:
        service = _sqlite_service(service_process, data, LOCAL_LATENCY_MS=int(latency * 1000))
        with killed_on_exit(service), service.client() as client:
            token = login(client)
            _one_job_succeeds(client, token)
            # An image is being made when the disk fills: it cannot be kept.
            job_id = create_job(client, token, prompt="cannot be kept", num_images=1)
            head = read_stream(
                client,
                job_id,
                headers=_auth(token),
                stop=lambda e: e.event == "progress" and e.data["status"] == "running",
            )
            running_since = time.monotonic()
            filler = fill(data)
            problems = _check_refused_write(
                _post(client, token, "on a full disk"), "POST /api/generate/ while the disk is full"
            )
            if not wait_for(lambda: _readyz(client) == 503, timeout=WRITE_BOUND):
                problems.append(f"/readyz while the disk is full: {_readyz(client)}, expected 503")

            # Until the image has been given its time (or is seen to have finished), keep the disk full.
            def image_finished() -> bool:
                snapshot = client.get(f"/api/generate/{job_id}", headers=_auth(token), timeout=10)
                return snapshot.status_code == 200 and snapshot.json()["images"][0]["status"] != "running"

            wait_for(lambda: time.monotonic() > running_since + latency + 3 or image_finished(), timeout=latency + 5)
            assert time.monotonic() > running_since + latency, "harness: the disk was freed before the image was made"
            filler.unlink()

            rest = follow_stream(
                service.base_url, token, job_id, deadline=time.monotonic() + 30, headers={"Last-Event-ID": head[-1].id}
            )
            if not rest.done:
                problems.append(f"the job whose image could not be kept never ended with `done`: {_ending(rest)}")
            else:
                image = rest.last.data["images"][0]
                if image["status"] != "failed" or "the image store is full" not in (image["error"] or ""):
                    problems.append(
                        f"the image that could not be kept: status {image['status']!r}, error "
                        f"{image['error']!r} (expected failed, with 'the image store is full')"
                    )
            problems += _recovers(client, token, service.base_url, "space is freed")
        assert not problems, "\n".join(problems)


@pytest.mark.timeout(120)
def test_sigterm_stops_the_service_in_time_while_writes_fail(can_mount_fuse, service_process, tmp_path):
    grace = 2
    with SwitchableFs(tmp_path / "disk", tmp_path / "data") as disk:
        service = _sqlite_service(service_process, disk.mountpoint, LOCAL_LATENCY_MS=300, SHUTDOWN_GRACE_SECONDS=grace)
        with killed_on_exit(service), service.client() as client:
            token = login(client)
            job_id = create_job(client, token, prompt="interrupted", num_images=4)
            read_stream(
                client,
                job_id,
                headers=_auth(token),
                stop=lambda e: e.event == "progress" and e.data["status"] == "running",
            )
            disk.read_only = True
            # Writes are failing now: the images' results, and a new job.
            _post(client, token, "refused")
            wait_for(lambda: disk.refused_writes > 0 and _readyz(client) == 503, timeout=WRITE_BOUND)
            assert disk.refused_writes > 0, "harness: the service wrote nothing while its disk was read-only"

            service.process.send_signal(signal.SIGTERM)
            try:
                service.process.wait(timeout=grace + 5)
                stopped = True
            except subprocess.TimeoutExpired:
                stopped = False
            assert stopped, (
                f"SIGTERM did not stop the service within SHUTDOWN_GRACE_SECONDS + 5 = {grace + 5} s while its "
                f"writes failed; log tail:\n{service.log_path.read_text()[-1500:]}"
            )


# Stable links ---------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_snapshots_seconds_apart_give_identical_image_links(service_process):
    service = service_process(IMAGE_PROVIDER="local", LOCAL_LATENCY_MS=50, LOCAL_LATENCY_JITTER_MS=0)
    with service.client() as client:
        token = login(client)
        job_id = create_job(client, token, prompt="stable links", num_images=2)
        assert read_stream(client, job_id, headers=_auth(token))[-1].event == "done"

        def links() -> list[str]:
            snapshot = client.get(f"/api/generate/{job_id}", headers=_auth(token)).json()
            return [image["url"] for image in snapshot["images"]]

        first = links()
        second_now = int(time.time())
        wait_until(lambda: int(time.time()) >= second_now + 2, timeout=5, what="two second boundaries to pass")
        second = links()
        assert all(first), f"harness: the job has no links: {first}"
        assert first == second, (
            f"the image links of one job changed between two snapshots 2 s apart:\n{first}\n{second}"
        )
        for url in second:
            assert client.get(url).status_code == 200


@pytest.mark.timeout(120)
def test_a_stream_replayed_after_its_links_expired_carries_live_links(service_process):
    service = service_process(
        IMAGE_PROVIDER="local", LOCAL_LATENCY_MS=50, LOCAL_LATENCY_JITTER_MS=0, IMAGE_URL_TTL_SECONDS=2
    )
    with service.client() as client:
        token = login(client)
        job_id = create_job(client, token, prompt="links that expire", num_images=2)
        first = _image_urls(read_stream(client, job_id, headers=_auth(token)))
        assert len(first) == 4, f"harness: expected 2 progress links and 2 in done: {first}"
        wait_until(lambda: client.get(first[0]).status_code == 403, timeout=15, what="the first links to expire")

        replayed = _image_urls(read_stream(client, job_id, headers=_auth(token)))
        answers = {url: client.get(url) for url in replayed}
        stale = {
            url: r.status_code
            for url, r in answers.items()
            if r.status_code != 200 or r.headers.get("content-type") != "image/png"
        }
        assert replayed and not stale, f"a stream replayed after its links expired carries dead links: {stale}"

        # Signed when sent, for the base URL the replaying request came to.
        host = f"localhost:{service.port}"
        elsewhere = _image_urls(read_stream(client, job_id, headers={**_auth(token), "Host": host}))
        assert all(url.startswith(f"http://{host}/api/images/") for url in elsewhere), (
            f"links replayed to a request for http://{host} point elsewhere: {elsewhere}"
        )

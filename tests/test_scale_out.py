"""Scale-out: two API replicas and two worker processes over Redis and PostgreSQL.

Every test starts real processes (uvicorn replicas, `python -m app.worker`) against the
PostgreSQL of TEST_DATABASE_URL and the Redis of TEST_REDIS_URL, or, where Redis itself must
go away and come back, a redis-server of the test's own.
"""

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import redis

from app.core.config import PROJECT_ROOT
from tests.conftest import (
    TEST_JWT_SECRET,
    RedisServer,
    ServiceProcess,
    create_job,
    enqueue_work,
    login,
    parse_sse,
    postgres_url,
    query_database,
    read_stream,
    redis_url,
    wait_until,
)
from tests.fake_replicate import FakeReplicate

pytestmark = pytest.mark.slow  # every test here starts processes


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Cluster:
    """API replicas and workers sharing one PostgreSQL, one Redis (under a key prefix of
    this test's own) and one image store."""

    def __init__(self, service_process, tmp_path: Path, redis_url: str, **env: object) -> None:
        self._start = service_process
        self.prefix = f"test-{uuid.uuid4().hex[:12]}"
        self.redis_url = redis_url
        self.env = {
            "DATABASE_URL": postgres_url(),
            "REDIS_URL": redis_url,
            "REDIS_KEY_PREFIX": self.prefix,
            "IMAGE_STORE_DIR": str(tmp_path / "images"),
            "RUN_WORK_IN_API": "false",
            "WORKER_CLAIM_TIMEOUT_SECONDS": "2",
            "IMAGE_PROVIDER": "local",
            "LOCAL_LATENCY_MS": "300",
            "LOCAL_LATENCY_JITTER_MS": "0",
            **{k: str(v) for k, v in env.items()},
        }
        self.replicas: list[ServiceProcess] = []
        self.workers: list[ServiceProcess] = []

    def up(self, replicas: int = 2, workers: int = 2) -> "Cluster":
        for n in range(replicas):
            self.replicas.append(self._start(DATA_DIR=str(self._dir(f"replica-{n}")), **self.env))
        for n in range(workers):
            self.workers.append(self._start(worker=True, DATA_DIR=str(self._dir(f"worker-{n}")), **self.env))
        return self

    def _dir(self, name: str) -> Path:
        return Path(self.env["IMAGE_STORE_DIR"]).parent / name

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, decode_responses=True)

    def cleanup(self) -> None:
        # The processes first: a live one would make its keys again.
        for process in [*self.replicas, *self.workers]:
            if process.process.poll() is None:
                process.process.kill()
                process.process.wait()
        try:
            client = self.redis()
            keys = list(client.scan_iter(f"{self.prefix}:*"))
            if keys:
                client.delete(*keys)
        except redis.RedisError:
            pass


@pytest.fixture
def cluster(service_process, tmp_path) -> Iterator:
    made: list[Cluster] = []

    def make(redis_at: str | None = None, **env: object) -> Cluster:
        made.append(Cluster(service_process, tmp_path, redis_at or redis_url(), **env))
        return made[-1]

    yield make
    for each in made:
        each.cleanup()


def _busy(worker: ServiceProcess) -> bool:
    """Whether the worker is making an image now (its busy-workers gauge says so)."""
    with httpx.Client(base_url=worker.base_url, timeout=10) as monitor:
        return "\nmyflix_busy_workers 1.0" in monitor.get("/metrics").text


def _holder_of_the_image(deployment: Cluster) -> ServiceProcess:
    """The live worker making the one image in progress, once one is."""
    holders: list[ServiceProcess] = []
    wait_until(
        lambda: bool(holders.extend(w for w in deployment.workers if w.process.poll() is None and _busy(w)) or holders),
        what="a worker to take the image",
    )
    (holder,) = holders
    return holder


def _took_over(worker: ServiceProcess) -> list[str]:
    return [line for line in worker.log_path.read_text().splitlines() if "took over an image" in line]


def test_a_job_made_on_one_replica_streams_from_the_other_and_resumes_on_either(cluster):
    a, b = cluster().up().replicas
    with a.client() as on_a, b.client() as on_b:
        token = login(on_a)
        job_id = create_job(on_a, token, prompt="two replicas", num_images=4)
        # Part of the stream from A, then a reconnect to B with Last-Event-ID.
        head = read_stream(
            on_a, job_id, headers=_auth(token), stop=lambda e: e.event == "progress" and e.data["status"] == "running"
        )
        tail = read_stream(on_b, job_id, headers={**_auth(token), "Last-Event-ID": head[-1].id})
        whole = read_stream(on_b, job_id, headers=_auth(token))

    assert tail[-1].event == "done" and tail[-1].data["status"] == "succeeded"
    # The stream entry id is the SSE id; a resume has no gap and no duplicate.
    assert all(e.id == f"{n}-0" for e, n in zip(whole, range(1, len(whole) + 1), strict=False))
    assert [(e.id, e.data) for e in head + tail] == [(e.id, e.data) for e in whole]
    succeeded = [e.data["index"] for e in whole if e.event == "progress" and e.data["status"] == "succeeded"]
    assert sorted(succeeded) == [0, 1, 2, 3]
    with b.client(token) as on_b:
        for image in whole[-1].data["images"]:
            assert on_b.get(image["url"]).status_code == 200  # the image store is shared


def test_a_cancel_on_one_replica_stops_the_job_the_other_streams(cluster):
    a, b = cluster(LOCAL_LATENCY_MS=5000).up().replicas
    with a.client() as on_a, b.client() as on_b:
        token = login(on_a)
        job_id = create_job(on_a, token, prompt="stop it", num_images=2)
        wait_until(
            lambda: on_b.get(f"/api/generate/{job_id}", headers=_auth(token)).json()["status"] == "running",
            what="a worker to start the job",
        )
        started = time.monotonic()
        assert on_b.post(f"/api/generate/{job_id}/cancel", headers=_auth(token)).status_code == 202
        events = read_stream(on_a, job_id, headers=_auth(token))
    assert events[-1].event == "done" and events[-1].data["status"] == "canceled"
    assert time.monotonic() - started < 4, "the cancel waited for the images"


def test_first_images_are_not_starved_by_other_jobs_later_images(cluster):
    # Two workers of one image each: job A's four images would hold them for two rounds.
    deployment = cluster(GENERATION_MAX_WORKERS=1, LOCAL_LATENCY_MS=400).up(replicas=1)
    (api,) = deployment.replicas
    arrivals: dict[tuple[str, int], float] = {}
    with api.client() as client:
        token = login(client)
        first = create_job(client, token, prompt="first job", num_images=4)
        second = create_job(client, token, prompt="second job", num_images=4)

        def arrived(job_id: str, e) -> bool:
            if e.event == "progress" and e.data["status"] == "succeeded":
                arrivals[(job_id, e.data["index"])] = time.monotonic()
            return False

        def follow(job_id: str) -> None:
            with api.client() as own:
                read_stream(own, job_id, headers=_auth(token), stop=lambda e: arrived(job_id, e))

        readers = [threading.Thread(target=follow, args=(job_id,)) for job_id in (first, second)]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(timeout=30)
    assert len(arrivals) == 8
    second_first_image = min(t for (job_id, _), t in arrivals.items() if job_id == second)
    first_last_image = max(t for (job_id, _), t in arrivals.items() if job_id == first)
    assert second_first_image < first_last_image, "the second job's first image queued behind all of the first job"


def test_a_killed_worker_is_taken_over_and_the_prediction_reattached_not_paid_twice(cluster):
    with FakeReplicate(latency=4.0, wait_cap=0.05) as fake:
        deployment = cluster(
            IMAGE_PROVIDER="replicate",
            REPLICATE_API_TOKEN=fake.token,
            REPLICATE_BASE_URL=fake.base_url,
            REPLICATE_POLL_INTERVAL=0.05,
            GENERATION_MAX_WORKERS=1,
        ).up(replicas=1)
        (api,), workers = deployment.replicas, deployment.workers
        with api.client() as client:
            token = login(client)
            job_id = create_job(client, token, prompt="survive a worker", num_images=1)
            stored = f"SELECT count(*) FROM images WHERE job_id = '{job_id}' AND prediction_id IS NOT NULL"
            wait_until(
                lambda: query_database(deployment.env["DATABASE_URL"], stored) == [(1,)],
                what="the prediction id to be stored",
            )
            # Kill whichever worker holds the image, mid-prediction.
            holder = _holder_of_the_image(deployment)
            holder.stop(signal.SIGKILL)
            killed_at, killed_wall = time.monotonic(), datetime.now().astimezone()
            events = read_stream(client, job_id, headers=_auth(token))
        finished_after = time.monotonic() - killed_at

    assert events[-1].event == "done" and events[-1].data["status"] == "succeeded"
    assert len(fake.created()) == 1, "the other worker created a second prediction"
    succeeded = [e for e in events if e.event == "progress" and e.data["status"] == "succeeded"]
    assert len(succeeded) == 1
    # The prediction's own time (4 s) and a little: no second wait for it.
    assert finished_after < 4 + 1
    # Taken over within WORKER_CLAIM_TIMEOUT_SECONDS (2 s) of the kill, by the other worker.
    survivor = next(w for w in workers if w is not holder)
    (took_over,) = _took_over(survivor)
    # The log's times are the machine's local wall clock.
    logged_at = datetime.strptime(took_over[:23], "%Y-%m-%d %H:%M:%S,%f").astimezone()
    assert (logged_at - killed_wall).total_seconds() < 2


def test_a_worker_stopped_with_sigterm_leaves_its_images_to_the_other(cluster):
    deployment = cluster(LOCAL_LATENCY_MS=3000, GENERATION_MAX_WORKERS=1, SHUTDOWN_GRACE_SECONDS=0).up(replicas=1)
    (api,), workers = deployment.replicas, deployment.workers
    with api.client() as client:
        token = login(client)
        job_id = create_job(client, token, prompt="hand it over", num_images=1)
        wait_until(
            lambda: client.get(f"/api/generate/{job_id}", headers=_auth(token)).json()["status"] == "running",
            what="a worker to start the image",
        )
        holder = _holder_of_the_image(deployment)
        assert holder.stop(signal.SIGTERM) == 0
        events = read_stream(client, job_id, headers=_auth(token))
    assert events[-1].event == "done" and events[-1].data["status"] == "succeeded"
    survivor = next(w for w in workers if w is not holder)
    assert len(_took_over(survivor)) == 1
    assert "worker stopping" in holder.log_path.read_text()


def test_an_image_whose_every_attempt_kills_its_worker_fails_after_image_max_attempts(cluster):
    deployment = cluster(LOCAL_LATENCY_MS=5000, GENERATION_MAX_WORKERS=1, IMAGE_MAX_ATTEMPTS=2)
    deployment.up(replicas=1, workers=3)
    (api,) = deployment.replicas
    with api.client() as client:
        token = login(client)
        job_id = create_job(client, token, prompt="a crash every time", num_images=1)
        for _ in range(2):  # each worker that takes it dies of it
            _holder_of_the_image(deployment).stop(signal.SIGKILL)
        events = read_stream(client, job_id, headers=_auth(token))
        # The owner's limit counts it no more: a new job is taken.
        assert (
            client.post("/api/generate/", json={"prompt": "next", "num_images": 1}, headers=_auth(token)).status_code
            == 202
        )
    done = events[-1]
    assert done.event == "done" and done.data["status"] == "failed"
    assert "given up after 2 attempts" in done.data["images"][0]["error"]
    (survivor,) = [w for w in deployment.workers if w.process.poll() is None]
    assert len(_took_over(survivor)) == 0  # it never started the image: its attempts were spent
    with httpx.Client(base_url=survivor.base_url, timeout=10) as monitor:
        assert "\nmyflix_image_attempts_exhausted_total 1.0" in monitor.get("/metrics").text


def test_a_paused_worker_stalls_nothing_and_records_nothing_stale_when_it_wakes(cluster):
    deployment = cluster(LOCAL_LATENCY_MS=1500, GENERATION_MAX_WORKERS=1).up(replicas=1)
    (api,) = deployment.replicas
    paused, other = deployment.workers
    url = deployment.env["DATABASE_URL"]
    with api.client() as client:
        token = login(client)
        job_id = create_job(client, token, prompt="one image each", num_images=2)
        running = f"SELECT count(*) FROM images WHERE job_id = '{job_id}' AND status = 'running'"
        wait_until(lambda: query_database(url, running) == [(2,)], what="both workers to start an image")
        os.kill(paused.process.pid, signal.SIGSTOP)
        paused_at = time.monotonic()
        try:
            # Meanwhile other jobs finish, and the paused worker's image is taken over.
            later = create_job(client, token, prompt="while it sleeps", num_images=1)
            assert read_stream(client, later, headers=_auth(token))[-1].data["status"] == "succeeded"
            events = read_stream(client, job_id, headers=_auth(token))
            # Paused for twice the claim timeout (2 s) at least: past its image's own end.
            time.sleep(max(0.0, 2 * 2 - (time.monotonic() - paused_at)))
        finally:
            os.kill(paused.process.pid, signal.SIGCONT)
        wait_until(lambda: "came after it was taken over" in paused.log_path.read_text(), what="the stale result")
        again = read_stream(client, job_id, headers=_auth(token))
    assert events[-1].event == "done" and events[-1].data["status"] == "succeeded"
    assert [(e.id, e.data) for e in again] == [(e.id, e.data) for e in events], "the woken worker changed the job"
    assert len(_took_over(other)) == 1
    with httpx.Client(base_url=other.base_url, timeout=10) as monitor:
        assert "\nmyflix_image_takeovers_total 1.0" in monitor.get("/metrics").text


def test_redis_keys_lost_mid_job_strand_nothing(cluster):
    deployment = cluster(LOCAL_LATENCY_MS=800).up()
    a, b = deployment.replicas
    with a.client() as on_a, b.client() as on_b:
        token = login(on_a)
        job_id = create_job(on_a, token, prompt="forgotten by redis", num_images=4)
        seen = read_stream(
            on_b, job_id, headers=_auth(token), stop=lambda e: e.event == "progress" and e.data["status"] == "running"
        )
        store = deployment.redis()
        store.delete(*store.scan_iter(f"{deployment.prefix}:*"))  # an eviction or a FLUSHDB
        rest = _read_to_the_end(on_b, job_id, token, seen[-1].id)
        whole = _read_to_the_end(on_a, job_id, token)
    assert rest[-1].event == "done" and rest[-1].data["status"] == "succeeded"
    assert [e.id for e in seen + rest] == [e.id for e in whole], "a gap or a duplicate"


def test_work_delivered_twice_is_recorded_once(cluster):
    deployment = cluster().up(replicas=1)
    (api,) = deployment.replicas
    with api.client() as client:
        token = login(client)
        job_id = create_job(client, token, prompt="once", num_images=2)
        events = read_stream(client, job_id, headers=_auth(token))
        # The same image's work again, as a redelivery after a lost acknowledgement would be.
        url = deployment.env["DATABASE_URL"]
        enqueue_work(url, {"job": job_id, "index": 1})
        wait_until(lambda: query_database(url, "SELECT count(*) FROM pgqueuer") == [(0,)], what="the duplicate done")
        again = read_stream(client, job_id, headers=_auth(token))
    assert [(e.id, e.data) for e in again] == [(e.id, e.data) for e in events]


# Redis goes away and comes back -------------------------------------------------------------


@pytest.fixture
def own_redis(tmp_path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    yield server
    if server.process.poll() is None:
        server.kill()


def _ready(service: ServiceProcess) -> bool:
    return httpx.get(f"{service.base_url}/readyz", timeout=5).status_code == 200


def _read_to_the_end(client, job_id: str, token: str, last_event_id: str | None = None) -> list:
    """Read the stream as EventSource does: a stream that ends without `done` (Redis was
    unreachable for a moment) is reconnected with Last-Event-ID."""
    events: list = []
    deadline = time.monotonic() + 30
    while not events or events[-1].event != "done":
        assert time.monotonic() < deadline, "the stream never reached done"
        resume = (
            {"Last-Event-ID": events[-1].id} if events else ({"Last-Event-ID": last_event_id} if last_event_id else {})
        )
        events += read_stream(client, job_id, headers={**_auth(token), **resume})
    return events


def test_redis_goes_away_and_comes_back(cluster, own_redis):
    a, b = cluster(redis_at=own_redis.url, LOCAL_LATENCY_MS=1500).up().replicas
    with a.client() as on_a, b.client() as on_b:
        token = login(on_a)
        job_id = create_job(on_a, token, prompt="through an outage", num_images=4)
        lines: list[str] = []
        with on_b.stream("GET", f"/api/generate/{job_id}/stream", headers=_auth(token)) as response:
            for line in response.iter_lines():  # until the server ends the stream
                lines.append(line)
                if line.startswith("id: 6-") and own_redis.process.poll() is None:  # 4 queued, 2 running
                    own_redis.kill()
        # It ended without `done`, telling the browser to reconnect.
        assert "retry: 2000" in lines and "event: done" not in lines
        wait_until(lambda: not _ready(a), what="/readyz to turn false")
        readiness = on_a.get("/readyz").json()
        assert readiness["checks"]["redis"]["ok"] is False
        # The work queue and the jobs live in PostgreSQL: new jobs are still taken.
        during = on_a.post("/api/generate/", json={"prompt": "now?", "num_images": 1}, headers=_auth(token))
        assert during.status_code == 202, during.text

        own_redis.start()  # empty: its streams are gone
        wait_until(lambda: _ready(a) and _ready(b), timeout=15, what="the replicas to recover")
        last_seen = [line.removeprefix("id: ") for line in lines if line.startswith("id: ")][-1]
        rest = _read_to_the_end(on_b, job_id, token, last_seen)
        assert rest[-1].event == "done" and rest[-1].data["status"] == "succeeded", "the job stayed stuck"
        whole = _read_to_the_end(on_a, job_id, token)
        seen = list(parse_sse(iter(lines)))
        assert [e.id for e in seen + rest] == [e.id for e in whole], "a gap or a duplicate across the outage"
        # A client retries a 503 (it carries Retry-After): the link may still be settling.
        deadline = time.monotonic() + 15
        while (
            posted := on_b.post("/api/generate/", json={"prompt": "after", "num_images": 1}, headers=_auth(token))
        ).status_code == 503:
            assert time.monotonic() < deadline, posted.text
            wait_until(lambda: _ready(b), timeout=5, what="replica B to be ready again")
        assert posted.status_code == 202, posted.text
        after = posted.json()["job_id"]
        assert _read_to_the_end(on_a, after, token)[-1].data["status"] == "succeeded"
        assert _read_to_the_end(on_b, during.json()["job_id"], token)[-1].data["status"] == "succeeded"


# Who does the work ---------------------------------------------------------------------------


def test_api_replicas_do_the_work_themselves_by_default(cluster):
    deployment = cluster()
    del deployment.env["RUN_WORK_IN_API"]  # the default, as a deployment that never sets it
    (api,) = deployment.up(replicas=1, workers=0).replicas
    with api.client() as client:
        token = login(client)
        job_id = create_job(client, token, prompt="no workers", num_images=2)
        events = read_stream(client, job_id, headers=_auth(token))
    assert events[-1].data["status"] == "succeeded"
    assert f"image running job_id={job_id}" in api.log_path.read_text()


def test_with_run_work_in_api_false_only_workers_make_images(cluster):
    deployment = cluster(RUN_WORK_IN_API="false").up(replicas=1, workers=0)
    (api,) = deployment.replicas
    with api.client() as client:
        token = login(client)
        job_id = create_job(client, token, prompt="wait for a worker", num_images=2)
        deployment.up(replicas=0, workers=1)
        events = read_stream(client, job_id, headers=_auth(token))
    assert events[-1].data["status"] == "succeeded"
    assert f"image running job_id={job_id}" not in api.log_path.read_text()
    assert f"image running job_id={job_id}" in deployment.workers[0].log_path.read_text()


def test_scaling_out_needs_postgresql_and_a_shared_key_and_the_worker_needs_redis(tmp_path):
    from pydantic import ValidationError

    from app.core.config import Settings

    with pytest.raises(ValidationError, match="DATABASE_URL to PostgreSQL"):
        Settings(REDIS_URL="redis://127.0.0.1:6379/0", DATABASE_URL="sqlite:///x.db", DATA_DIR=tmp_path)
    # Replicas with data directories of their own cannot each make a key: they must share one.
    with pytest.raises(ValidationError, match="set JWT_SECRET_KEY"):
        Settings(REDIS_URL="redis://127.0.0.1:6379/0", DATABASE_URL="postgresql://db/x", DATA_DIR=tmp_path)
    worker = subprocess.run(
        [sys.executable, "-m", "app.worker"],
        check=False,
        env={**os.environ, "REDIS_URL": "", "DATA_DIR": str(tmp_path)},
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert worker.returncode == 2
    assert "needs REDIS_URL" in worker.stderr


def _burst_of_posts(replicas: tuple[ServiceProcess, ...], token: str, posts: int, num_images: int) -> list[int]:
    """`posts` jobs posted at once (released together by a barrier), spread over the replicas;
    the statuses they got."""
    start = threading.Barrier(posts)
    answers: list[int] = []

    def post(replica: ServiceProcess, n: int) -> None:
        with replica.client(token) as client:
            start.wait()
            body = {"prompt": f"burst {n}", "num_images": num_images}
            answers.append(client.post("/api/generate/", json=body).status_code)

    posters = [threading.Thread(target=post, args=(replicas[n % len(replicas)], n)) for n in range(posts)]
    for poster in posters:
        poster.start()
    for poster in posters:
        poster.join()
    return answers


def test_the_active_job_limit_holds_across_replicas_under_a_burst_of_posts(cluster):
    a, b = cluster(MAX_ACTIVE_JOBS_PER_USER=4, LOCAL_LATENCY_MS=5000).up(workers=0).replicas
    token = login(a.client())
    answers = _burst_of_posts((a, b), token, posts=16, num_images=1)
    assert sorted(answers) == [202] * 4 + [429] * 12, answers
    with a.client(token) as client:
        jobs = client.get("/api/generate/").json()["jobs"]
    assert len(jobs) == 4 and all(job["status"] in ("queued", "running") for job in jobs)


def test_failed_sign_ins_count_across_replicas_and_a_success_on_either_clears_them(cluster):
    a, b = cluster(LOGIN_MAX_FAILURES=3).up(workers=0).replicas
    wrong = {"email": "alice@myflix.dev", "password": "not-her-password"}
    right = {"email": "alice@myflix.dev", "password": "alice-wonderland"}
    with a.client() as on_a, b.client() as on_b:
        assert [on_a.post("/api/auth/login", json=wrong).status_code for _ in range(2)] == [401, 401]
        # Her success on the other replica forgets this client's failures everywhere.
        assert on_b.post("/api/auth/login", json=right).status_code == 200
        assert [on_a.post("/api/auth/login", json=wrong).status_code for _ in range(2)] == [401, 401]
        assert on_b.post("/api/auth/login", json=wrong).status_code == 401  # the third, wherever it lands
        for replica in (on_a, on_b):
            refused = replica.post("/api/auth/login", json=right)
            assert refused.status_code == 429, refused.text
            assert int(refused.headers["retry-after"]) >= 1


def test_a_process_whose_shared_settings_differ_refuses_to_start_and_names_them(cluster):
    deployment = cluster(MAX_IMAGES_PER_JOB=8).up(replicas=1, workers=1)
    odd = {**deployment.env, "MAX_IMAGES_PER_JOB": "4", "IMAGE_TIMEOUT_SECONDS": "30"}
    for worker in (False, True):
        with pytest.raises(RuntimeError) as refused:
            deployment._start(worker=worker, DATA_DIR=str(deployment._dir(f"odd-{worker}")), **odd)
        said = str(refused.value)
        assert "MAX_IMAGES_PER_JOB, IMAGE_TIMEOUT_SECONDS differ from the running processes" in said, said[-2000:]
        assert TEST_JWT_SECRET not in said  # digests are compared, never values
    # The same settings are welcome.
    deployment._start(DATA_DIR=str(deployment._dir("same")), **deployment.env)


def test_a_worker_serves_its_health_readiness_and_metrics_and_still_stops_gracefully(cluster):
    deployment = cluster().up(replicas=1, workers=1)
    (worker,) = deployment.workers
    with httpx.Client(base_url=worker.base_url, timeout=10) as monitor:
        assert monitor.get("/healthz").json() == {"status": "ok"}
        ready = monitor.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert {"database", "writes", "image_store", "provider", "redis", "work_queue"} == set(ready.json()["checks"])
        with deployment.replicas[0].client() as api:
            token = login(api)
            job_id = create_job(api, token, prompt="watched", num_images=2)
            assert read_stream(api, job_id, headers=_auth(token))[-1].data["status"] == "succeeded"
        metrics = monitor.get("/metrics").text
        assert 'myflix_images_total{outcome="succeeded",provider="local"} 2.0' in metrics, metrics[-2000:]
        assert "myflix_busy_workers" in metrics
        assert "\nmyflix_queue_depth 0.0" in metrics
        assert "\nmyflix_image_takeovers_total 0.0" in metrics
        assert "\nmyflix_image_attempts_exhausted_total 0.0" in metrics
    assert worker.stop(signal.SIGTERM) == 0
    assert "worker stopping" in worker.log_path.read_text()


def _sign_in(replica: ServiceProcess, email: str, password: str) -> dict:
    with replica.client() as client:
        response = client.post("/api/auth/login", json={"email": email, "password": password})
    assert response.status_code == 200, response.text
    return response.json()


def _users_command(deployment: Cluster, *args: str, password: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **deployment.env, "JWT_SECRET_KEY": TEST_JWT_SECRET, "DAILY_IMAGE_QUOTA": "0"}
    return subprocess.run(
        [sys.executable, "-m", "app.users", *args],
        check=False,
        cwd=PROJECT_ROOT,
        env=env,
        input=password,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_logout_or_a_disabled_user_takes_effect_on_every_replica_within_30_s(cluster):
    deployment = cluster().up(workers=0)
    a, b = deployment.replicas
    made = _users_command(
        deployment, "create", "ops@example.com", "--admin", "--password-stdin", password="ops-password-1\n"
    )
    assert made.returncode == 0, made.stderr
    admin = _sign_in(a, "ops@example.com", "ops-password-1")
    session = _sign_in(a, "alice@myflix.dev", "alice-wonderland")
    with b.client(session["access_token"]) as on_b:
        assert on_b.get("/api/auth/me").status_code == 200  # b has seen the session alive
    with a.client(session["access_token"]) as on_a:
        assert on_a.post("/api/auth/logout").status_code == 204
    with b.client() as on_b:
        # The refresh token is refused at once everywhere; b's memory of the access token lasts 15 s at most.
        assert on_b.post("/api/auth/refresh", json={"refresh_token": session["refresh_token"]}).status_code == 401
        ended = time.monotonic()
        wait_until(
            lambda: on_b.get("/api/auth/me", headers=_auth(session["access_token"])).status_code == 401,
            timeout=30,
            what="replica b to refuse the logged-out session's access token",
        )
        assert time.monotonic() - ended < 30
    bob = _sign_in(b, "bob@myflix.dev", "bob-builder")
    with b.client(bob["access_token"]) as on_b:
        assert on_b.get("/api/auth/me").status_code == 200
    with a.client(admin["access_token"]) as on_a:
        assert on_a.patch("/api/admin/users/bob@myflix.dev", json={"disabled": True}).status_code == 200
    with b.client(bob["access_token"]) as on_b:
        disabled = time.monotonic()
        wait_until(lambda: on_b.get("/api/auth/me").status_code == 401, timeout=30, what="b to refuse a disabled user")
        assert time.monotonic() - disabled < 30


def test_the_daily_quota_holds_across_replicas_under_a_burst_of_posts(cluster):
    a, b = cluster(DAILY_IMAGE_QUOTA=10, MAX_ACTIVE_JOBS_PER_USER=100, LOCAL_LATENCY_MS=5000).up(workers=0).replicas
    token = login(a.client())
    answers = _burst_of_posts((a, b), token, posts=16, num_images=2)
    assert sorted(answers) == [202] * 5 + [429] * 11, answers
    with b.client(token) as client:
        usage = client.get("/api/usage").json()
    assert usage["images_today"] == 10 and usage["remaining"] == 0


def test_workers_share_one_create_budget_and_spend_it_on_first_images_first(cluster):
    # The fake allows a create a second with a burst of two; the deployment spends one less.
    with FakeReplicate(latency=0.2, create_rate_per_minute=60, create_burst=2) as fake:
        deployment = cluster(
            IMAGE_PROVIDER="replicate",
            REPLICATE_API_TOKEN=fake.token,
            REPLICATE_BASE_URL=fake.base_url,
            PROVIDER_MAX_CREATES_PER_MINUTE=60,
            PROVIDER_CREATE_BURST=1,
        ).up(replicas=1, workers=2)
        (api,) = deployment.replicas
        with api.client() as client:
            token = login(client)
            jobs = [create_job(client, token, prompt=f"job {k}", num_images=2, seed=100 * k) for k in range(4)]
            for job_id in jobs:
                assert read_stream(client, job_id, _auth(token))[-1].data["status"] == "succeeded"
        assert fake.creates_throttled == 0
        seeds = [prediction["input"]["seed"] for prediction in fake.created()]
        # Each worker takes the first waiting image when the shared budget grants it a create.
        assert sorted(seed % 100 for seed in seeds[:4]) == [0, 0, 0, 0], seeds

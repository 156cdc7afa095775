"""The benchmark: how much the service adds to the provider's own latency, and how many streams
it holds. It starts everything itself (the service, the naive baseline of bench/baseline.py,
and the fake Replicate API as a process), on a provider of fixed latency L, and measures at
the client, from the POST to each event's arrival, as a browser would.

    python -m bench.run            # the full run (about 5 minutes); writes docs/benchmark.*
    python -m bench.run --quick    # fewer repetitions, for a smoke test
    python -m bench.run --only a   # scenario a alone (about 2 minutes), the others kept
    python -m bench.run --only g   # scenario g alone (about 4 minutes), the others kept

Prints a table; writes the figures as JSON and a chart as PNG.
"""

import argparse
import asyncio
import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx

from bench.processes import PROJECT_ROOT, USERS, FakeReplicateProcess, ScaledDeployment, ServerProcess, rss_mib
from bench.s3 import SeaweedS3Process
from bench.sse import Arrival, JsonPoster, stream_events

L_MS = 500
L = L_MS / 1000
A_WORKERS = 16  # image threads in scenario a (N ≤ workers), in all when scaled out
OUT_DIR = PROJECT_ROOT / "docs"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class JobTiming:
    ttfi: float  # seconds from sending the POST to the first `succeeded` event's arrival
    total: float  # seconds from sending the POST to the `done` event's arrival


async def login(base_url: str) -> str:
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
        response = await http.post("/api/auth/login", json={"email": USERS[0][0], "password": USERS[0][1]})
        response.raise_for_status()
        return response.json()["access_token"]


async def create(http: httpx.AsyncClient, token: str, num_images: int) -> str:
    response = await http.post(
        "/api/generate/",
        json={"prompt": "benchmark", "num_images": num_images},
        headers={"Authorization": f"Bearer {token}"},
    )
    response.raise_for_status()
    return response.json()["job_id"]


def ended(arrival: Arrival) -> bool:
    return arrival.name in ("done", "error")


async def timed_job(base_url: str, token: str, num_images: int, stream_from: str | None = None) -> JobTiming:
    """One job posted to `base_url` and followed there, or on the replica `stream_from`."""
    started, arrivals = await followed_job(base_url, token, num_images, stream_from)
    first = min(a.at_perf for a in arrivals if a.name == "progress" and a.data.get("status") == "succeeded")
    return JobTiming(first - started, arrivals[-1].at_perf - started)


async def followed_job(
    base_url: str, token: str, num_images: int, stream_from: str | None = None
) -> tuple[float, list[Arrival]]:
    """As `timed_job`: the time the POST was sent (perf_counter) and the job's events."""
    poster = JsonPoster(base_url, {"Authorization": f"Bearer {token}"})
    # Timed from sending the POST, as a browser with its connection open would send it: the
    # client's own TCP connects (a hundred at once in b) are not the service's time.
    await poster.connect()
    started = time.perf_counter()
    status, body = await poster.post("/api/generate/", {"prompt": "benchmark", "num_images": num_images})
    poster.close()
    if status != 202:
        raise RuntimeError(f"POST /api/generate/ answered {status}: {body}")
    job_id = body["job_id"]
    arrivals = await stream_events(
        stream_from or base_url, f"/api/generate/{job_id}/stream?access_token={token}", ended
    )
    return started, arrivals


def service_settings(provider: str, workers: int, fake: FakeReplicateProcess | None = None, **extra: str) -> dict:
    settings = {
        "IMAGE_PROVIDER": provider,
        "LOCAL_LATENCY_MS": str(L_MS),
        "LOCAL_LATENCY_JITTER_MS": "0",
        "GENERATION_MAX_WORKERS": str(workers),
        "MAX_ACTIVE_JOBS_PER_USER": "100000",
        "MAX_IMAGES_PER_JOB": "16",
        "LOGIN_MAX_FAILURES": "100000",
        # One user opens every stream here (a thousand in c), over as many connections.
        "MAX_STREAMS_PER_USER": "100000",
        "HTTP_MAX_CONNECTIONS": "10000",
        # Unlimited: b and g ask one user for 400 images, e for thousands (unknown to a service
        # without the quota, which ignores it).
        "DAILY_IMAGE_QUOTA": "0",
        # Unshaped but in g, which measures the shaping: the other scenarios measure what the
        # service adds to a provider's latency, against a fake that limits no rate (a's jobs of
        # 16 images, one after another, would otherwise wait for creates).
        "PROVIDER_MAX_CREATES_PER_MINUTE": "0",
        **extra,
    }
    if fake is not None:
        settings.update(REPLICATE_API_TOKEN=fake.token, REPLICATE_BASE_URL=fake.base_url, REPLICATE_POLL_INTERVAL="0.5")
    return settings


# Scenario a: one job at a time ----------------------------------------------------------------


def other(base_urls: list[str], i: int) -> str:
    """The replica after the i-th: with several, every job streams from one it was not posted to."""
    return base_urls[(i + 1) % len(base_urls)]


def a_row(timings: list[JobTiming]) -> dict:
    return {
        "ttfi_over_l_p50": statistics.median(t.ttfi for t in timings) / L,
        "total_over_l_p50": statistics.median(t.total for t in timings) / L,
        "ttfi_ms": [round(t.ttfi * 1000, 1) for t in timings],
        "total_ms": [round(t.total * 1000, 1) for t in timings],
    }


async def scenario_a(base_urls: list[str], repeats: int) -> dict:
    return (await scenario_a_side_by_side({"": base_urls}, repeats))[""]


async def scenario_a_side_by_side(deployments: dict[str, list[str]], repeats: int) -> dict[str, dict]:
    """Scenario a on each deployment (its replicas' URLs), their jobs taking turns (one job
    at a time in all, the first of each turn alternating), so that a comparison between them
    is not one of the machine's load at two moments."""
    tokens = {name: await login(base_urls[0]) for name, base_urls in deployments.items()}
    names = list(deployments)
    # Warm-up, as a service that has been running is: caches, and every image thread's
    # connection to the provider (a job of as many images as there are threads).
    for name, base_urls in deployments.items():
        await timed_job(base_urls[0], tokens[name], A_WORKERS, other(base_urls, 0))
    rows: dict[str, dict] = {name: {} for name in names}
    for n in (1, 4, 8, 16):
        timings: dict[str, list[JobTiming]] = {name: [] for name in names}
        for i in range(repeats):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                base_urls = deployments[name]
                timing = await timed_job(base_urls[i % len(base_urls)], tokens[name], n, other(base_urls, i))
                timings[name].append(timing)
        for name in names:
            rows[name][n] = a_row(timings[name])
    return rows


async def fake_image(fake: FakeReplicateProcess, connection: JsonPoster, started: float) -> float:
    """One image from the fake alone on `connection`: a create with `Prefer: wait` and the
    download of its output; seconds from `started` (perf_counter) to the download's end."""
    status, created = await connection.post(
        "/v1/models/black-forest-labs/flux-schnell/predictions", {"input": {"prompt": "benchmark"}}, "Prefer: wait\r\n"
    )
    if status != 201:
        raise RuntimeError(f"the fake answered {status}: {created}")
    status, _ = await connection.get(created["output"][0][len(fake.base_url) :])
    if status != 200:
        raise RuntimeError(f"the fake's output answered {status}")
    return time.perf_counter() - started


async def fake_alone(fake: FakeReplicateProcess, repeats: int) -> dict:
    """The fake Replicate API's own latency, with no service in between: N connections, open
    beforehand as the service's image threads keep theirs, each create a prediction with
    `Prefer: wait` and download its output, on the benchmark's lean client (an HTTP client's
    own CPU would be counted as the fake's). The floor under scenario a on the Replicate provider."""
    rows = {}
    for n in (1, 4, 8, 16):
        firsts, lasts = [], []
        for _ in range(repeats):
            connections = [JsonPoster(fake.base_url, {"Authorization": f"Bearer {fake.token}"}) for _ in range(n)]
            await asyncio.gather(*(connection.connect() for connection in connections))
            started = time.perf_counter()
            finished = await asyncio.gather(*(fake_image(fake, connection, started) for connection in connections))
            for connection in connections:
                connection.close()
            firsts.append(min(finished))
            lasts.append(max(finished))
        rows[n] = {"ttfi_over_l_p50": statistics.median(firsts) / L, "total_over_l_p50": statistics.median(lasts) / L}
    return rows


# Scenario b: many jobs, fewer workers --------------------------------------------------------


def ideal_round_robin(jobs: int, images: int, workers: int) -> tuple[list[float], list[float]]:
    """TTFI and batch time (in L) of each job if the service added nothing: every round, the
    workers take the next images in round-robin order and finish them exactly L later."""
    order = [(job, k) for k in range(images) for job in range(jobs)]
    finish = {item: (position // workers + 1) for position, item in enumerate(order)}
    ttfi = [finish[(job, 0)] for job in range(jobs)]
    batch = [finish[(job, images - 1)] for job in range(jobs)]
    return ttfi, batch


async def scenario_b(base_urls: list[str], jobs: int, images: int) -> dict:
    token = await login(base_urls[0])
    timings = await asyncio.gather(
        *(timed_job(base_urls[i % len(base_urls)], token, images, other(base_urls, i)) for i in range(jobs))
    )
    ttfi = [t.ttfi / L for t in timings]
    total = [t.total / L for t in timings]
    return {
        "ttfi_over_l": {"p50": percentile(ttfi, 50), "p99": percentile(ttfi, 99)},
        "total_over_l": {"p50": percentile(total, 50), "p99": percentile(total, 99)},
        "ttfi_over_l_all": sorted(ttfi),
        "total_over_l_all": sorted(total),
    }


# Scenario f (scaled out): a worker killed under a backlog ------------------------------------

TAKEOVER_CLAIM_TIMEOUT_SECONDS = 2.0


async def scenario_f(scaled: ScaledDeployment, jobs: int, images: int) -> dict:
    """`jobs` × `images` posted at once, more than the workers can start, and one worker killed
    once all its threads are busy. Takeover time: from the kill to each of its images being
    taken by the survivor (as the survivor logs it)."""
    base_urls = scaled.base_urls
    token = await login(base_urls[0])
    killed, survivor = scaled.workers

    async def follow(i: int) -> list[Arrival]:
        async with httpx.AsyncClient(base_url=base_urls[i % len(base_urls)], timeout=60) as http:
            job_id = await create(http, token, images)
        path = f"/api/generate/{job_id}/stream?access_token={token}"
        return await stream_events(other(base_urls, i), path, ended)

    followed = [asyncio.create_task(follow(i)) for i in range(jobs)]
    async with httpx.AsyncClient(base_url=killed.base_url, timeout=10) as monitor:
        while True:  # polled: the metrics are all a process tells from outside
            if "\nmyflix_busy_workers 8.0" in (await monitor.get("/metrics")).text:
                break
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.2 * L)  # their claims recorded: each image then counts as taken over
    killed_at = datetime.now().astimezone()
    killed.process.kill()
    await asyncio.gather(*followed)
    takeovers = [
        (datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").astimezone() - killed_at).total_seconds()
        for line in survivor.log_path.read_text().splitlines()
        if "took over an image" in line
    ]
    return {
        "claim_timeout_s": TAKEOVER_CLAIM_TIMEOUT_SECONDS,
        "images_taken_over": len(takeovers),
        "takeover_s": {"p50": percentile(takeovers, 50), "max": max(takeovers)} if takeovers else None,
    }


# Scenario c: a thousand subscribers -----------------------------------------------------------


async def open_streams(base_url: str, token: str, job_ids: list[str], per_job: int) -> tuple[list, float]:
    """Open per_job streams on each job; returns (the streams' tasks, the time all were open)."""
    opened = asyncio.Event()
    count = 0

    def on_open() -> None:
        nonlocal count
        count += 1
        if count == len(job_ids) * per_job:
            opened.set()

    streams = [
        asyncio.create_task(
            stream_events(base_url, f"/api/generate/{job_id}/stream?access_token={token}", ended, on_open)
        )
        for job_id in job_ids
        for _ in range(per_job)
    ]
    await opened.wait()
    return streams, time.time()


async def delivery_lags(
    base_url: str, token: str, job_ids: list[str], arrivals_per_stream: list, since: float
) -> list[float]:
    """Seconds from the provider finishing an image (the server's clock: the job's wall-clock
    accept time + the event's elapsed_ms) to the event's arrival, for events after `since`."""
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
        accepted = {}
        for job_id in job_ids:
            snapshot = (await http.get(f"/api/generate/{job_id}", headers={"Authorization": f"Bearer {token}"})).json()
            accepted[job_id] = datetime.fromisoformat(snapshot["created_at"]).timestamp()
    lags = []
    for arrivals in arrivals_per_stream:
        for arrival in arrivals:
            if arrival.name == "progress" and arrival.data["status"] == "succeeded":
                finished = accepted[arrival.data["job_id"]] + arrival.data["elapsed_ms"] / 1000
                if finished > since:
                    lags.append(arrival.at - finished)
    return lags


async def scenario_c(services: list[ServerProcess], subscribers: int) -> dict:
    """The subscribers split evenly over the replicas; RSS is the replicas' together."""
    base_url = services[0].base_url
    token = await login(base_url)

    def rss() -> float:
        return sum(rss_mib(service.pid) for service in services)

    rss_before = rss()
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
        job_ids = [await create(http, token, 4) for _ in range(10)]
    peak = deque([rss()], maxlen=1)

    async def watch_rss() -> None:
        while True:
            peak.append(max(peak[0], rss()))
            await asyncio.sleep(0.2)

    watcher = asyncio.create_task(watch_rss())
    opened = await asyncio.gather(
        *(
            open_streams(service.base_url, token, job_ids, subscribers // len(job_ids) // len(services))
            for service in services
        )
    )
    streams, all_open_at = [s for tasks, _ in opened for s in tasks], max(at for _, at in opened)
    arrivals = await asyncio.gather(*streams)
    watcher.cancel()
    lags = await delivery_lags(base_url, token, job_ids, arrivals, all_open_at)
    keepalives = sum(a.name == "keepalive" for stream in arrivals for a in stream)
    return {
        "subscribers": subscribers,
        "lag_ms": {"p50": percentile(lags, 50) * 1000, "p99": percentile(lags, 99) * 1000, "samples": len(lags)},
        "rss_mib": {"before": rss_before, "peak": peak[0], "growth": peak[0] - rss_before},
        "keepalives_delivered": keepalives,
        "all_done": all(stream and stream[-1].name == "done" for stream in arrivals),
    }


# Scenario d: logins while streams run ---------------------------------------------------------


def loop_lag_buckets(metrics_text: str) -> dict[float, float]:
    buckets = {}
    for line in metrics_text.splitlines():
        if line.startswith("myflix_event_loop_lag_seconds_bucket"):
            le = line.split('le="')[1].split('"')[0]
            buckets[math.inf if le == "+Inf" else float(le)] = float(line.rsplit(" ", 1)[1])
    return buckets


def histogram_p99(before: dict[float, float], after: dict[float, float]) -> float:
    """The 99th percentile of what was observed between two scrapes, interpolated in its bucket."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1]
    if total == 0:
        return math.nan
    target, lower, previous = 0.99 * total, 0.0, 0.0
    for bound, cumulative in zip(bounds, counts, strict=False):
        if cumulative >= target:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (target - previous) / max(cumulative - previous, 1e-9)
        lower, previous = bound, cumulative
    return lower


async def scenario_d(service: ServerProcess, streams: int, logins: int) -> dict:
    """Logins while the streams are open and images finish: the window measured is the logins'."""
    base_url = service.base_url
    token = await login(base_url)
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
        job_ids = [await create(http, token, 4) for _ in range(20)]
        tasks, all_open_at = await open_streams(base_url, token, job_ids, streams // len(job_ids))
        before = loop_lag_buckets((await http.get("/metrics")).text)

        async def one_login() -> float:
            started = time.perf_counter()
            response = await http.post("/api/auth/login", json={"email": USERS[1][0], "password": USERS[1][1]})
            response.raise_for_status()
            return time.perf_counter() - started

        login_times = await asyncio.gather(*(one_login() for _ in range(logins)))
        after = loop_lag_buckets((await http.get("/metrics")).text)
        arrivals = await asyncio.gather(*tasks)
    lags = await delivery_lags(base_url, token, job_ids, arrivals, all_open_at)
    return {
        "streams": streams,
        "logins": logins,
        "loop_lag_p99_ms": histogram_p99(before, after) * 1000,
        "login_ms": {"p50": percentile(login_times, 50) * 1000, "max": max(login_times) * 1000},
        "lag_ms": {"p50": percentile(lags, 50) * 1000, "p99": percentile(lags, 99) * 1000, "samples": len(lags)},
    }


# Scenario e: job creation rate ---------------------------------------------------------------


async def scenario_e(base_urls: list[str], seconds: float, concurrency: int) -> dict:
    token = await login(base_urls[0])
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def poster(base_url: str) -> None:
        connection = JsonPoster(base_url, {"Authorization": f"Bearer {token}"})
        try:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                status, _ = await connection.post("/api/generate/", {"prompt": "benchmark", "num_images": 1})
                if status != 202:
                    raise RuntimeError(f"POST /api/generate/ answered {status}")
                latencies.append(time.perf_counter() - started)
        finally:
            connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(poster(base_urls[i % len(base_urls)]) for i in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {
        "jobs": len(latencies),
        "jobs_per_second": len(latencies) / elapsed,
        "post_ms": {"p50": percentile(latencies, 50) * 1000, "p99": percentile(latencies, 99) * 1000},
        "concurrency": concurrency,
    }


# Scenario g: creates shaped under the provider's rate limit -------------------------------

G_PER_MINUTE = 120  # PROVIDER_MAX_CREATES_PER_MINUTE, and the fake's throttle
# PROVIDER_CREATE_BURST: the service's default, so that the figures are those of the setting
# as it ships (a larger burst only lowers the optimum; the shaping is what is measured).
G_BURST = 10
# The fake throttles with one token more than the service spends at once: a create the
# service sends on time may reach the fake a little early or late on its clock (network and
# scheduling jitter between two processes), and one token (1/rate = 0.5 s) absorbs it.
G_FAKE_BURST = G_BURST + 1
G_JOBS, G_IMAGES = 100, 4
G_RATIO_TARGET = 1.10
G_TARGETS = {"ttfi_p50_over_optimum": f"≤ {G_RATIO_TARGET:.2f} × optimum", "throttled": "0 429s"}


def g_optimum(
    jobs: int, images: int, burst: int, per_minute: float, one_image_s: float
) -> tuple[list[float], list[float], list[float]]:
    """Each job's TTFI, and batch time, in seconds under the budget if the service added
    nothing: the m-th create (m = 0, 1, …) goes at max(0, m - burst + 1) / rate after the burst
    starts, the first images first (the k-th first image is the k-th create), each image done
    `one_image_s` (the fake alone) after its create. Batch times two ways: the later images
    job by job (the lowest batch times there are, first images first), and index by index
    (every job's second image, then every third, …)."""
    rate = per_minute / 60

    def done(m: int) -> float:
        return max(0, m - burst + 1) / rate + one_image_s

    ttfi = [done(k) for k in range(jobs)]
    if images == 1:
        return ttfi, ttfi, ttfi
    by_job = [done(jobs + (images - 1) * (j + 1) - 1) for j in range(jobs)]
    by_index = [done(jobs * (images - 1) + j) for j in range(jobs)]
    return ttfi, by_job, by_index


async def fake_one_image_s(fake: FakeReplicateProcess, repeats: int) -> float:
    """The fake's own time for one image (as scenario a measures the fake alone at N = 1),
    p50, on a warm connection."""
    connection = JsonPoster(fake.base_url, {"Authorization": f"Bearer {fake.token}"})
    try:
        await connection.connect()
        await fake_image(fake, connection, time.perf_counter())  # warm-up
        times = [await fake_image(fake, connection, time.perf_counter()) for _ in range(repeats)]
    finally:
        connection.close()
    return statistics.median(times)


async def scenario_g(base_url: str, jobs: int, images: int) -> dict:
    """`jobs` × `images` posted at once (as in b) to a service that shapes its creates under
    the provider's rate limit; the figures the fake counts are added by `run_g`."""
    token = await login(base_url)
    followed = await asyncio.gather(*(followed_job(base_url, token, images) for _ in range(jobs)))
    ttfi, total, firsts, laters, failed = [], [], [], [], 0
    for started, arrivals in followed:
        progress = [a for a in arrivals if a.name == "progress"]
        done = [a for a in progress if a.data.get("status") == "succeeded"]
        failed += sum(a.data.get("status") == "failed" for a in progress) + sum(a.name == "error" for a in arrivals)
        if done:
            ttfi.append(min(a.at_perf for a in done) - started)
        total.append(arrivals[-1].at_perf - started)
        firsts += [a.at_perf for a in done if a.data["index"] == 0]
        laters += [a.at_perf for a in done if a.data["index"] > 0]
    # First images first: a later image done before the last first image took a create from one.
    last_first = max(firsts, default=math.inf)
    return {
        "jobs": jobs,
        "images": images,
        "ttfi_s": {"p50": percentile(ttfi, 50), "p99": percentile(ttfi, 99)},
        "total_s": {"p50": percentile(total, 50), "p99": percentile(total, 99)},
        "ttfi_s_all": sorted(ttfi),
        "total_s_all": sorted(total),
        "images_failed": failed,
        "later_images_before_last_first": sum(at < last_first for at in laters),
    }


def run_g(tmp: Path, fake: FakeReplicateProcess, repeats: int) -> dict:
    """Scenario g: the service on the Replicate provider, shaping its creates to G_PER_MINUTE
    with bursts of G_BURST, against a fake that throttles as Replicate does (429 above the
    rate); the fake's own per-image time measured on `fake` (the same fake unthrottled, so
    that the measure spends none of the throttled one's tokens)."""
    print(
        f"g: provider rate-limit shaping, {G_JOBS} jobs × {G_IMAGES} at once; the service at "
        f"{G_PER_MINUTE}/min, burst {G_BURST}; the fake throttling at {G_PER_MINUTE}/min, burst {G_FAKE_BURST} "
        "(one token of margin for network jitter between the service's pacing and the fake's clock)",
        flush=True,
    )
    one_image_s = asyncio.run(fake_one_image_s(fake, repeats))
    with FakeReplicateProcess(latency=L, create_rate_per_minute=G_PER_MINUTE, create_burst=G_FAKE_BURST) as throttled:
        settings = service_settings(
            "replicate",
            32,
            throttled,
            PROVIDER_MAX_CREATES_PER_MINUTE=str(G_PER_MINUTE),
            PROVIDER_CREATE_BURST=str(G_BURST),
        )
        with ServerProcess("main:app", settings, tmp / "g") as server:
            result = asyncio.run(scenario_g(server.base_url, G_JOBS, G_IMAGES))
        stats = throttled.stats()
    ideal_ttfi, by_job, by_index = g_optimum(G_JOBS, G_IMAGES, G_BURST, G_PER_MINUTE, one_image_s)
    optimum = {
        "ttfi_s": {"p50": percentile(ideal_ttfi, 50), "p99": percentile(ideal_ttfi, 99)},
        "total_s": {"p50": percentile(by_job, 50), "p99": percentile(by_job, 99)},
        "total_s_index_by_index": {"p50": percentile(by_index, 50), "p99": percentile(by_index, 99)},
    }
    return {
        **result,
        "per_minute": G_PER_MINUTE,
        "burst": G_BURST,
        "fake_burst": G_FAKE_BURST,
        "one_image_s": one_image_s,
        "optimum": optimum,
        "ttfi_p50_over_optimum": result["ttfi_s"]["p50"] / optimum["ttfi_s"]["p50"],
        "creates_accepted": stats["creates_accepted"],
        "throttled": stats["creates_throttled"],
        "max_creates_per_wall_second": stats["max_creates_per_wall_second"],
        "max_creates_in_any_second": stats["max_creates_in_any_second"],
        "creates_per_second": stats["creates_per_second"],
    }


def g_rows(g: dict) -> list[str]:
    """Scenario g's rows of the table (its columns: myflix, baseline, ideal, target)."""
    label = f"g: {g['jobs']} jobs × {g['images']}, Replicate, {g['per_minute']}/min, burst {g['burst']}"
    bound = g["burst"] + g["per_minute"] / 60  # the budget's: the burst and a second's worth
    optimum = g["optimum"]
    return [
        (
            f"| {label} | 429s answered by the fake (burst {g['fake_burst']}) | {g['throttled']} | | 0 "
            f"| {G_TARGETS['throttled']} |"
        ),
        (
            f"| {label} | creates accepted in one second, max (wall-clock second / any 1 s) "
            f"| {g['max_creates_per_wall_second']} / {g['max_creates_in_any_second']} | | ≤ {bound:g} | |"
        ),
        (
            f"| {label} | TTFI p50 | {g['ttfi_s']['p50']:.2f} s ({g['ttfi_p50_over_optimum']:.3f} × optimum) "
            f"| | {optimum['ttfi_s']['p50']:.2f} s (first images first; fake alone {g['one_image_s'] * 1000:.0f} ms) "
            f"| {G_TARGETS['ttfi_p50_over_optimum']} |"
        ),
        (
            f"| {label} | batch p50 | {g['total_s']['p50']:.2f} s | | {optimum['total_s']['p50']:.2f} s "
            f"(later images job by job; index by index {optimum['total_s_index_by_index']['p50']:.2f} s) | |"
        ),
        (
            f"| {label} | later images done before the last first image / images failed "
            f"| {g['later_images_before_last_first']} / {g['images_failed']} | | 0 / 0 | |"
        ),
    ]


# The run ------------------------------------------------------------------------------------


SYSTEMS = {"myflix": "main:app", "baseline": "bench.baseline:app"}
# Scenario a's rows of the service with its images in the S3 store: "myflix+s3/<provider>".
S3_SYSTEM = "myflix+s3"


def machine() -> dict:
    return {
        "machine": f"{platform.machine()}, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, {os.cpu_count()} cores",
        "when": datetime.now().astimezone().isoformat(timespec="seconds"),
        "latency_ms": L_MS,
    }


def run_a(tmp: Path, fake: FakeReplicateProcess, repeats: int) -> dict:
    """Scenario a: the service with its images in a local directory and, taking turns with it,
    the same service with them in an S3 store (SeaweedFS on loopback); the baseline; the fake
    Replicate API alone."""
    results = {}
    with SeaweedS3Process(tmp / "s3") as s3:
        for provider in ("local", "replicate"):
            settings = service_settings(provider, A_WORKERS, fake)
            with (
                ServerProcess("main:app", settings, tmp / f"a-myflix-{provider}") as local_store,
                ServerProcess(
                    "main:app", {**settings, **s3.env(f"a-{provider}")}, tmp / f"a-s3-{provider}"
                ) as s3_store,
            ):
                print(f"a: myflix on {provider}, the local store and the S3 store taking turns", flush=True)
                deployments = {"myflix": [local_store.base_url], S3_SYSTEM: [s3_store.base_url]}
                for system, rows in asyncio.run(scenario_a_side_by_side(deployments, repeats)).items():
                    results[f"{system}/{provider}"] = rows
    for provider in ("local", "replicate"):
        data = tmp / f"a-baseline-{provider}"
        with ServerProcess(SYSTEMS["baseline"], service_settings(provider, A_WORKERS, fake), data) as server:
            print(f"a: baseline on {provider}", flush=True)
            results[f"baseline/{provider}"] = asyncio.run(scenario_a([server.base_url], repeats))
    print("a: the fake Replicate API alone", flush=True)
    results["fake alone/replicate"] = asyncio.run(fake_alone(fake, repeats))
    return results


def run(quick: bool, only: str | None = None) -> dict:
    """Every scenario on one process, beside the naive baseline; `only="a"` or `"g"`: that
    scenario alone."""
    repeats = 2 if quick else 10
    results: dict = machine()
    with tempfile.TemporaryDirectory(prefix="myflix-bench-") as tmp, FakeReplicateProcess(latency=L) as fake:
        if only == "g":
            results["g"] = run_g(Path(tmp), fake, repeats)
            return results
        results["a"] = run_a(Path(tmp), fake, repeats)
        if only == "a":
            return results
        results["b"] = {}
        ideal_ttfi, ideal_total = ideal_round_robin(100, 4, 32)
        results["b"]["ideal"] = {
            "ttfi_over_l": {"p50": percentile(ideal_ttfi, 50), "p99": percentile(ideal_ttfi, 99)},
            "total_over_l": {"p50": percentile(ideal_total, 50), "p99": percentile(ideal_total, 99)},
            "ttfi_over_l_all": sorted(ideal_ttfi),
            "total_over_l_all": sorted(ideal_total),
        }
        for system, app in SYSTEMS.items():
            with ServerProcess(app, service_settings("local", 32), Path(tmp) / f"b-{system}") as server:
                print(f"b: {system}", flush=True)
                results["b"][system] = asyncio.run(scenario_b([server.base_url], 100, 4))
        with ServerProcess("main:app", c_settings(), Path(tmp) / "c") as server:
            print("c: 1,000 subscribers", flush=True)
            results["c"] = asyncio.run(scenario_c([server], 1000))
        d_settings = service_settings("local", 16, LOCAL_LATENCY_MS="1000")
        with ServerProcess("main:app", d_settings, Path(tmp) / "d") as server:
            print("d: logins during streams", flush=True)
            results["d"] = asyncio.run(scenario_d(server, 200, 20))
        with ServerProcess("main:app", service_settings("local", 16), Path(tmp) / "e") as server:
            print("e: job creation", flush=True)
            results["e"] = asyncio.run(scenario_e([server.base_url], 3 if quick else 10, 32))
        results["g"] = run_g(Path(tmp), fake, repeats)
    return results


# Scenario c's provider latency: long enough that all thousand streams are open before the
# first images finish, on two replicas sharing two cores too (only events after every stream
# is open are counted).
C_LATENCY_MS = 10_000


def c_settings(workers: int = 16) -> dict:
    return service_settings("local", workers, LOCAL_LATENCY_MS=str(C_LATENCY_MS), SSE_KEEPALIVE_SECONDS="1")


def run_scaled(quick: bool, database_url: str, redis_url: str) -> dict:
    """Scenarios a, b, c and e on 2 API replicas + 2 workers over Redis and PostgreSQL, the
    workers sharing the single process's worker count; every job is posted to one replica and
    streamed from the other."""
    repeats = 2 if quick else 10
    results: dict = {**machine(), "a": {}}

    def deployment(settings: dict, name: str) -> ScaledDeployment:
        return ScaledDeployment(settings, Path(tmp) / name, database_url, redis_url)

    with tempfile.TemporaryDirectory(prefix="myflix-bench-") as tmp, FakeReplicateProcess(latency=L) as fake:
        for provider in ("local", "replicate"):
            with deployment(service_settings(provider, A_WORKERS // 2, fake), f"a-{provider}") as scaled:
                print(f"scaled a: {provider}", flush=True)
                results["a"][provider] = asyncio.run(scenario_a(scaled.base_urls, repeats))
        with deployment(service_settings("local", 16), "b") as scaled:
            print("scaled b", flush=True)
            results["b"] = asyncio.run(scenario_b(scaled.base_urls, 100, 4))
        with deployment(c_settings(8), "c") as scaled:
            print("scaled c: 1,000 subscribers", flush=True)
            results["c"] = asyncio.run(scenario_c(scaled.replicas, 1000))
        with deployment(service_settings("local", 8), "e") as scaled:
            print("scaled e: job creation", flush=True)
            results["e"] = asyncio.run(scenario_e(scaled.base_urls, 3 if quick else 10, 32))
        claim_timeout = {"WORKER_CLAIM_TIMEOUT_SECONDS": str(TAKEOVER_CLAIM_TIMEOUT_SECONDS)}
        with deployment(service_settings("local", 8, **claim_timeout), "f") as scaled:
            print("scaled f: a worker killed under a backlog", flush=True)
            results["f"] = asyncio.run(scenario_f(scaled, 30, 4))
    return results


# The figures of scenarios a and b in the tables: (label, key, target(s)).
A_FIGURES = (("TTFI / L", "ttfi_over_l_p50", f"≤ {1.02 + 0.005 / L:.3f}"), ("total / L", "total_over_l_p50", "≤ 1.050"))
B_FIGURES = (("TTFI / L", "ttfi_over_l", ("≤ 2.2", "≤ 4.4")), ("batch / L", "total_over_l", ("", "")))


S3_ADDED_TTFI_TARGET_MS = 10  # at N = 1


def s3_added_ttfi_ms(results: dict, provider: str, n: int = 1) -> float | None:
    """The S3 store's TTFI p50 minus the local store's, in ms, in scenario a (None: not run)."""
    a = results.get("a", {})
    s3, local = a.get(f"{S3_SYSTEM}/{provider}"), a.get(f"myflix/{provider}")
    if s3 is None or local is None:
        return None
    return (s3[str(n)]["ttfi_over_l_p50"] - local[str(n)]["ttfi_over_l_p50"]) * results["latency_ms"]


def s3_summary(results: dict) -> str:
    added = {provider: s3_added_ttfi_ms(results, provider) for provider in ("local", "replicate")}
    figures = ", ".join(f"{provider} provider {ms:+.1f} ms" for provider, ms in added.items() if ms is not None)
    if not figures:
        return "S3 store's added TTFI: not measured (these figures predate the S3 store's rows)"
    return (
        f"S3 store's added TTFI at N=1 (TTFI p50 of the S3 store minus the local store's): {figures} "
        f"(target ≤ {S3_ADDED_TTFI_TARGET_MS} ms)"
    )


def table(results: dict) -> str:
    header = f"L = {results['latency_ms']} ms; {results['machine']}; {results['when']}"
    if "kept_from" in results:
        header += f" (scenario a; the others kept from the run of {results['kept_from']})"
    g = results.get("g")
    if g is not None and "when" in g:  # run apart (--only g)
        header += f" (scenario g from its run of {g['when']})"
    lines = [
        header,
        "",
        "| scenario | figure | myflix | baseline | ideal | target |",
        "|---|---|---|---|---|---|",
    ]
    for provider in ("local", "replicate") if "a" in results else ():
        for n in (1, 4, 8, 16):
            ours, base = results["a"][f"myflix/{provider}"][str(n)], results["a"][f"baseline/{provider}"][str(n)]
            alone = results["a"].get(f"fake alone/{provider}", {}).get(str(n))
            s3 = results["a"].get(f"{S3_SYSTEM}/{provider}", {}).get(str(n))
            for figure, key, target in A_FIGURES:
                ideal = "1.000" + (f" (fake alone {alone[key]:.3f})" if alone else "")
                lines.append(
                    f"| a: 1 job, N={n}, {provider} | {figure}, p50 | {ours[key]:.3f} | {base[key]:.3f} "
                    f"| {ideal} | {target} |"
                )
            if s3 is None:
                continue
            for figure, key, target in A_FIGURES:
                ideal = "1.000" + (f" (fake alone {alone[key]:.3f})" if alone else "")
                lines.append(
                    f"| a: 1 job, N={n}, {provider}, S3 store | {figure}, p50 | {s3[key]:.3f} | | {ideal} | {target} |"
                )
            if n == 1:
                lines.append(
                    f"| a: 1 job, N=1, {provider}, S3 store | added TTFI over the local store, p50 "
                    f"| {s3_added_ttfi_ms(results, provider):+.1f} ms | | 0 | ≤ {S3_ADDED_TTFI_TARGET_MS} ms |"
                )
    if "b" not in results:  # a scenario-a-only (or g-only) run
        return "\n".join(lines + (g_rows(g) if g is not None else []))
    b = results["b"]
    for figure, key, targets in B_FIGURES:
        for p, target in zip(("p50", "p99"), targets, strict=False):
            lines.append(
                f"| b: 100 jobs × 4, 32 workers | {figure}, {p} | {b['myflix'][key][p]:.2f} | "
                f"{b['baseline'][key][p]:.2f} | {b['ideal'][key][p]:.2f} | {target} |"
            )
    c, d, e = results["c"], results["d"], results["e"]
    lines += [
        (
            f"| c: {c['subscribers']} subscribers | delivery lag p50 / p99 | {c['lag_ms']['p50']:.1f} / "
            f"{c['lag_ms']['p99']:.1f} ms | | 0 | p99 ≤ 100 ms |"
        ),
        (
            f"| c: {c['subscribers']} subscribers | server RSS growth | {c['rss_mib']['growth']:.0f} MiB "
            f"({c['rss_mib']['before']:.0f} → {c['rss_mib']['peak']:.0f}) | | | ≤ 150 MiB |"
        ),
        f"| c: {c['subscribers']} subscribers | keepalives delivered | {c['keepalives_delivered']} | | | |",
        (
            f"| d: {d['logins']} logins, {d['streams']} streams | event-loop lag p99 | {d['loop_lag_p99_ms']:.1f} ms "
            f"| | 0 | ≤ 20 ms |"
        ),
        (
            f"| d: {d['logins']} logins, {d['streams']} streams | delivery lag p50 / p99 | {d['lag_ms']['p50']:.1f} / "
            f"{d['lag_ms']['p99']:.1f} ms | | 0 | |"
        ),
        f"| e: job creation, {e['concurrency']} clients | jobs/s | {e['jobs_per_second']:.0f} | | | ≥ 300 |",
        (
            f"| e: job creation, {e['concurrency']} clients | POST p50 / p99 | {e['post_ms']['p50']:.1f} / "
            f"{e['post_ms']['p99']:.1f} ms | | | |"
        ),
    ]
    if g is not None:
        lines += g_rows(g)
    return "\n".join(lines)


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(16, 4.8))
    ns = [1, 4, 8, 16]
    for key, style in (
        ("myflix/local", "o-"),
        ("myflix/replicate", "s-"),
        (f"{S3_SYSTEM}/local", "^-"),
        (f"{S3_SYSTEM}/replicate", "v-"),
        ("baseline/local", "o--"),
        ("baseline/replicate", "s--"),
    ):
        if key not in results["a"]:
            continue
        row = results["a"][key]
        left.plot(ns, [row[str(n)]["total_over_l_p50"] for n in ns], style, label=key)
    for provider, style in (("local", "o:"), ("replicate", "s:")):
        if "scaled" in results:
            row = results["scaled"]["a"][provider]
            left.plot(ns, [row[str(n)]["total_over_l_p50"] for n in ns], style, label=f"2+2 scaled/{provider}")
    left.axhline(1.0, color="grey", linewidth=1, label="ideal (L)")
    left.set(title="a: one job, batch time / L (p50)", xlabel="images per job", ylabel="× L", xticks=ns)
    left.legend(fontsize=8)
    if "b" not in results:  # a scenario-a-only run
        for axes in (middle, right):
            axes.set_axis_off()
            axes.text(0.5, 0.5, "not run (scenario a only)", ha="center", va="center", transform=axes.transAxes)
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        return
    for name, style in (("ideal", ":"), ("myflix", "-"), ("baseline", "--")):
        values = results["b"][name]["ttfi_over_l_all"]
        middle.plot(values, [i / len(values) for i in range(1, len(values) + 1)], style, label=f"TTFI {name}")
        values = results["b"][name]["total_over_l_all"]
        middle.plot(
            values, [i / len(values) for i in range(1, len(values) + 1)], style, alpha=0.5, label=f"batch {name}"
        )
    if "scaled" in results:
        values = results["scaled"]["b"]["ttfi_over_l_all"]
        middle.plot(values, [i / len(values) for i in range(1, len(values) + 1)], "-.", label="TTFI 2+2 scaled")
    middle.set(title="b: 100 jobs × 4 images, 32 workers", xlabel="× L", ylabel="fraction of jobs")
    middle.legend(fontsize=8)
    c, d = results["c"], results["d"]
    right.bar(
        ["c p50", "c p99", "d p50", "d p99"],
        [c["lag_ms"]["p50"], c["lag_ms"]["p99"], d["lag_ms"]["p50"], d["lag_ms"]["p99"]],
    )
    right.axhline(100, color="red", linewidth=1, label="target p99")
    right.set(title="c/d: delivery lag (provider done → client)", ylabel="ms")
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


# Targets of the scaled-out part (issue 16): TTFI at N ≤ 16, and b's TTFI p50.
SCALED_A_TTFI_TARGET = "≤ 1.060"
SCALED_B_TARGETS = {("ttfi_over_l", "p50"): "≤ 3.0"}


def scaled_table(single: dict, scaled: dict) -> str:
    lines = [
        (
            f"2 API replicas + 2 workers over Redis and PostgreSQL (every job posted to one replica and "
            f"streamed from the other), beside one process; L = {scaled['latency_ms']} ms; {scaled['when']}"
        ),
        "",
        "| scenario | figure | one process | 2 replicas + 2 workers | target (one process) | target (scaled) |",
        "|---|---|---|---|---|---|",
    ]
    for provider in ("local", "replicate"):
        for n in (1, 4, 8, 16):
            one, two = single["a"][f"myflix/{provider}"][str(n)], scaled["a"][provider][str(n)]
            for figure, key, target in A_FIGURES:
                scaled_target = SCALED_A_TTFI_TARGET if key == "ttfi_over_l_p50" else ""
                lines.append(
                    f"| a: 1 job, N={n}, {provider} | {figure}, p50 | {one[key]:.3f} | {two[key]:.3f} "
                    f"| {target} | {scaled_target} |"
                )
    for figure, key, targets in B_FIGURES:
        for p, target in zip(("p50", "p99"), targets, strict=False):
            lines.append(
                f"| b: 100 jobs × 4, 32 workers in all | {figure}, {p} | {single['b']['myflix'][key][p]:.2f} | "
                f"{scaled['b'][key][p]:.2f} | {target} | {SCALED_B_TARGETS.get((key, p), '')} |"
            )
    one_c, two_c, one_e, two_e = single["c"], scaled["c"], single["e"], scaled["e"]
    lines += [
        (
            f"| c: 1000 subscribers | delivery lag p50 / p99 "
            f"| {one_c['lag_ms']['p50']:.1f} / {one_c['lag_ms']['p99']:.1f} ms "
            f"| {two_c['lag_ms']['p50']:.1f} / {two_c['lag_ms']['p99']:.1f} ms | p99 ≤ 100 ms | |"
        ),
        (
            f"| c: 1000 subscribers | RSS growth (replicas together) | {one_c['rss_mib']['growth']:.0f} MiB "
            f"| {two_c['rss_mib']['growth']:.0f} MiB | ≤ 150 MiB | |"
        ),
        (
            f"| e: job creation, 32 clients | jobs/s | {one_e['jobs_per_second']:.0f} "
            f"| {two_e['jobs_per_second']:.0f} | ≥ 300 | |"
        ),
        (
            f"| e: job creation, 32 clients | POST p50 / p99 "
            f"| {one_e['post_ms']['p50']:.1f} / {one_e['post_ms']['p99']:.1f} ms "
            f"| {two_e['post_ms']['p50']:.1f} / {two_e['post_ms']['p99']:.1f} ms | | |"
        ),
    ]
    takeover = scaled.get("f")
    if takeover is not None and takeover["takeover_s"] is not None:
        lines.append(
            f"| f: a worker killed under a backlog (30 jobs × 4, 2 × 8 workers) | takeover time p50 / max "
            f"({takeover['images_taken_over']} images) | | {takeover['takeover_s']['p50']:.2f} / "
            f"{takeover['takeover_s']['max']:.2f} s | | ≤ {takeover['claim_timeout_s']:g} s "
            f"(WORKER_CLAIM_TIMEOUT_SECONDS) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="where benchmark.json, .md and .png go")
    parser.add_argument(
        "--part",
        choices=("all", "single", "scaled"),
        default="all",
        help="run only one part; the other's figures are kept from the last run",
    )
    parser.add_argument(
        "--only",
        choices=("a", "g"),
        help="run only this scenario of the one-process part (a: with the local store and the S3 store; "
        "g: creates shaped under the provider's rate limit); the other scenarios' figures are kept from the last run",
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("TEST_DATABASE_URL"),
        help="PostgreSQL for the scaled-out part, where it may create a database",
    )
    parser.add_argument("--redis-url", default=os.environ.get("TEST_REDIS_URL"), help="Redis for the scaled-out part")
    args = parser.parse_args()
    path = args.out / "benchmark.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    if args.part == "scaled" and "a" not in results:
        parser.error(
            f"--part scaled sets its figures beside one-process ones: run the single part into {args.out} first"
        )
    if args.only is not None:
        if args.part == "scaled":
            parser.error("--only picks a scenario of the one-process part: not with --part scaled")
        fresh = json.loads(json.dumps(run(args.quick, only=args.only)))
        if args.only == "g":  # the others kept as they were, g marked with its own run's time
            results = {**machine(), **results, "g": {**fresh["g"], "when": fresh["when"]}}
        else:
            kept = {key: value for key, value in results.items() if key in ("b", "c", "d", "e", "g", "scaled")}
            if "b" in kept:
                fresh["kept_from"] = results.get("kept_from", results["when"])
            results = {**fresh, **kept}
    elif args.part in ("all", "single"):
        scaled = results.get("scaled")
        results = json.loads(json.dumps(run(args.quick)))  # the keys as JSON has them
        if scaled:
            results["scaled"] = scaled
    if args.only is None and args.part in ("all", "scaled"):
        if not (args.database_url and args.redis_url):
            parser.error(
                "the scaled-out part needs --database-url and --redis-url (or TEST_DATABASE_URL, TEST_REDIS_URL)"
            )
        results["scaled"] = json.loads(json.dumps(run_scaled(args.quick, args.database_url, args.redis_url)))
    report = table(results)
    if "scaled" in results:
        report += "\n\n" + scaled_table(results, results["scaled"])
    print(report)
    print(s3_summary(results))
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    (args.out / "benchmark.md").write_text(report + "\n")
    if "a" in results:  # the chart is of a, b, c and d
        chart(results, args.out / "benchmark.png")
    print(f"wrote {path}, benchmark.md and benchmark.png")


if __name__ == "__main__":
    main()

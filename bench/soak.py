"""A bounded soak: a steady mix of jobs, streams, reconnects and cancels against the service on
loopback, checking that no event is lost or repeated, nothing answers 5xx, and the server's
memory stays flat.

    python -m bench.soak --seconds 600          # ten minutes, by hand
    python -m bench.soak --seconds 60           # what CI runs

It starts its own service (local provider, temporary data directory) unless --base-url
points at one already running. Exits 1 if any check fails.
"""

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.processes import USERS, ServerProcess, rss_mib

MEMORY_GROWTH_LIMIT_MIB = 30
SOAK_SETTINGS = {
    "IMAGE_PROVIDER": "local",
    "LOCAL_LATENCY_MS": "300",
    "LOCAL_LATENCY_JITTER_MS": "200",
    "GENERATION_MAX_WORKERS": "8",
    "MAX_ACTIVE_JOBS_PER_USER": "1000",
    # Its users sign in at once, several per account from one address, and a sign-in counts
    # against the failure bound until its password proves right.
    "LOGIN_MAX_FAILURES": "1000",
    # A soak makes more images than a day's quota, and its users keep their first token.
    "DAILY_IMAGE_QUOTA": "0",
    "ACCESS_TOKEN_EXPIRE_MINUTES": "120",
}


@dataclass
class Tally:
    jobs: int = 0
    finished: int = 0
    canceled: int = 0
    events: int = 0
    reconnects: int = 0
    throttled: int = 0
    server_errors: list[str] = field(default_factory=list)
    lost_or_repeated: list[str] = field(default_factory=list)
    rss_samples_mib: list[float] = field(default_factory=list)


def check_status(response: httpx.Response, tally: Tally) -> None:
    if response.status_code >= 500:
        tally.server_errors.append(f"{response.request.method} {response.request.url.path} → {response.status_code}")


async def read_events(
    http: httpx.AsyncClient, job_id: str, token: str, after: int, stop_after: int | None, tally: Tally
) -> list[tuple[int, str, dict]] | None:
    """Events after `after`; with `stop_after`, hang up after that many (a dropped client).
    None if the stream could not be opened."""
    headers = {"Last-Event-ID": str(after)} if after else {}
    events: list[tuple[int, str, dict]] = []
    async with http.stream(
        "GET", f"/api/generate/{job_id}/stream", params={"access_token": token}, headers=headers
    ) as response:
        check_status(response, tally)
        if response.status_code != 200:
            return None
        name, event_id = None, None
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("id:"):
                event_id = int(line[3:].strip())
            elif line.startswith("data:") and name != "keepalive":
                events.append((event_id, name, json.loads(line[5:])))
                if name in ("done", "error") or (stop_after is not None and len(events) >= stop_after):
                    break
    return events


async def one_job(http: httpx.AsyncClient, token: str, rng: random.Random, tally: Tally) -> None:
    num_images = rng.randint(1, 4)
    response = await http.post(
        "/api/generate/",
        json={"prompt": f"soak {rng.random():.6f}", "num_images": num_images},
        headers={"Authorization": f"Bearer {token}"},
    )
    check_status(response, tally)
    if response.status_code == 429:
        tally.throttled += 1
        await asyncio.sleep(float(response.headers.get("retry-after", "1")))
        return
    if response.status_code != 202:
        return
    tally.jobs += 1
    job_id = response.json()["job_id"]
    wants_cancel = rng.random() < 0.15
    seen: list[int] = []
    last = 0
    while True:
        drop = rng.random() < 0.3  # hang up mid-stream and come back with Last-Event-ID
        events = await read_events(http, job_id, token, last, rng.randint(1, 4) if drop else None, tally)
        if events is None:
            tally.lost_or_repeated.append(f"{job_id}: the stream could not be opened")
            return
        seen += [event_id for event_id, _, _ in events]
        tally.events += len(events)
        if events:
            last = events[-1][0]
        if wants_cancel and last >= num_images:  # past the queued events: the job is under way
            wants_cancel = False
            cancel = await http.post(f"/api/generate/{job_id}/cancel", headers={"Authorization": f"Bearer {token}"})
            check_status(cancel, tally)
            tally.canceled += cancel.status_code == 202
        if events and events[-1][1] in ("done", "error"):
            break
        tally.reconnects += 1
    if seen != list(range(1, len(seen) + 1)):
        tally.lost_or_repeated.append(f"{job_id}: ids {seen}")
    done = events[-1][2]
    if events[-1][1] != "done" or len(done["images"]) != num_images:
        tally.lost_or_repeated.append(f"{job_id}: ended with {events[-1][1]} {done}")
    tally.finished += 1


async def user_loop(base_url: str, credentials: tuple[str, str], seed: int, until: float, tally: Tally) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
        response = await http.post("/api/auth/login", json={"email": credentials[0], "password": credentials[1]})
        check_status(response, tally)
        token = response.json()["access_token"]
        while time.monotonic() < until:
            await one_job(http, token, rng, tally)


async def sample_memory(pid: int | None, until: float, tally: Tally, every: float) -> None:
    while pid is not None and time.monotonic() < until:
        tally.rss_samples_mib.append(rss_mib(pid))
        await asyncio.sleep(every)


async def soak(base_url: str, seconds: float, users: int, pid: int | None) -> Tally:
    tally = Tally()
    until = time.monotonic() + seconds
    await asyncio.gather(
        sample_memory(pid, until, tally, every=max(1.0, seconds / 30)),
        *(user_loop(base_url, USERS[n % len(USERS)], n, until, tally) for n in range(users)),
    )
    return tally


def memory_growth_mib(samples: list[float]) -> float:
    """Growth from the end of the warm-up (the first fifth) to the end."""
    if len(samples) < 5:
        return 0.0
    settled = samples[len(samples) // 5 :]
    return max(settled) - settled[0]


def report(tally: Tally, seconds: float) -> bool:
    growth = memory_growth_mib(tally.rss_samples_mib)
    rows = [
        ("duration", f"{seconds:.0f} s"),
        ("jobs created / finished", f"{tally.jobs} / {tally.finished}"),
        ("cancels", tally.canceled),
        ("events received", tally.events),
        ("reconnects with Last-Event-ID", tally.reconnects),
        ("429 answers (expected under load)", tally.throttled),
        ("5xx answers", len(tally.server_errors)),
        ("jobs with a lost or repeated event", len(tally.lost_or_repeated)),
        (
            "server RSS first / last (MiB)",
            f"{tally.rss_samples_mib[0]:.0f} / {tally.rss_samples_mib[-1]:.0f}" if tally.rss_samples_mib else "n/a",
        ),
        ("RSS growth after warm-up (MiB)", f"{growth:.1f} (limit {MEMORY_GROWTH_LIMIT_MIB})"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    for problem in (tally.server_errors + tally.lost_or_repeated)[:20]:
        print(f"  ! {problem}")
    return (
        not tally.server_errors
        and not tally.lost_or_repeated
        and tally.finished > 0
        and growth < MEMORY_GROWTH_LIMIT_MIB
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--users", type=int, default=12, help="concurrent simulated users")
    parser.add_argument("--base-url", help="a running service; default: start one")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="myflix-soak-") as data_dir:
        if args.base_url:
            tally = asyncio.run(soak(args.base_url, args.seconds, args.users, None))
        else:
            with ServerProcess("main:app", SOAK_SETTINGS, Path(data_dir)) as service:
                tally = asyncio.run(soak(service.base_url, args.seconds, args.users, service.pid))
    ok = report(tally, args.seconds)
    print("soak: OK" if ok else "soak: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""The design a newcomer would write, kept as a yardstick (run as `bench.baseline:app`):
each image a task on a first-come thread pool of GENERATION_MAX_WORKERS, pushing into one
asyncio.Queue per job that the one subscriber drains, and Replicate polled at a fixed
interval. Same endpoints and events as the service, no
auth, no storage: everything it lacks only makes it faster, so the comparison is fair."""

import asyncio
import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import replicate
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from app.providers.local import render_image

LATENCY_S = int(os.environ.get("LOCAL_LATENCY_MS", "500")) / 1000
PROVIDER = os.environ.get("IMAGE_PROVIDER", "local")
POLL_INTERVAL_S = 0.5

app = FastAPI()
pool = ThreadPoolExecutor(max_workers=int(os.environ.get("GENERATION_MAX_WORKERS", "16")))
jobs: dict[str, tuple[asyncio.Queue, int]] = {}


class Login(BaseModel):
    email: str
    password: str


class Generate(BaseModel):
    prompt: str
    num_images: int


@app.post("/api/auth/login")
async def login(body: Login) -> dict:
    return {"access_token": "baseline", "token_type": "bearer", "expires_in": 3600}


def make_image(prompt: str, index: int) -> None:
    if PROVIDER == "replicate":
        client = replicate.Client(
            api_token=os.environ["REPLICATE_API_TOKEN"], base_url=os.environ["REPLICATE_BASE_URL"]
        )
        prediction = client.predictions.create(model="black-forest-labs/flux-schnell", input={"prompt": prompt})
        while prediction.status not in ("succeeded", "failed", "canceled"):
            time.sleep(POLL_INTERVAL_S)
            prediction.reload()
    else:
        time.sleep(LATENCY_S)
        render_image(prompt, None, index)


@app.post("/api/generate/", status_code=202)
async def generate(body: Generate) -> dict:
    job_id = uuid.uuid4().hex
    queue: asyncio.Queue = asyncio.Queue()
    jobs[job_id] = (queue, body.num_images)
    loop = asyncio.get_running_loop()
    started = time.monotonic()

    def work(index: int) -> None:
        make_image(body.prompt, index)
        loop.call_soon_threadsafe(queue.put_nowait, (index, time.monotonic() - started))

    for index in range(body.num_images):
        pool.submit(work, index)
    return {"job_id": job_id}


@app.get("/api/generate/{job_id}/stream")
async def stream(job_id: str, access_token: str = "") -> StreamingResponse:
    queue, num_images = jobs[job_id]

    async def events():
        ttfi = None
        for _ in range(num_images):
            index, elapsed = await queue.get()
            ttfi = ttfi if ttfi is not None else elapsed * 1000
            payload = {"job_id": job_id, "index": index, "status": "succeeded", "elapsed_ms": elapsed * 1000}
            yield f"event: progress\ndata: {json.dumps(payload)}\n\n"
        done = {"job_id": job_id, "status": "succeeded", "ttfi_ms": ttfi, "total_ms": elapsed * 1000}
        yield f"event: done\ndata: {json.dumps(done)}\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")

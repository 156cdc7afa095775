"""A job's transitions on their own: state in, events and changes out."""

import json
import re

from app.core.security import ImageUrlSigner
from app.services.jobs import domain
from app.services.jobs.views import ImageLinks


def _job(num_images: int = 3) -> domain.Job:
    return domain.new_job("alice@myflix.dev", "a cat", num_images, 40, "local", "m", None)


def _data(update: domain.Update) -> list[dict]:
    return [json.loads(event.data) for event in update.events]


def test_a_new_job_queues_every_image_with_its_place_and_is_inserted():
    job = _job()
    update = domain.accepted(job, [4, 7, None])
    assert update.created and update.images == {0, 1, 2}
    assert [e.id for e in update.events] == [1, 2, 3]
    assert [d.get("queue_position") for d in _data(update)] == [4, 7, None]
    assert job.seed_of(2) == 42


def test_images_finish_one_by_one_and_the_last_one_ends_the_job_with_done():
    job = _job(2)
    domain.accepted(job, [None, None])
    domain.claimed(job, 0, job.accepted_at + 0.1, max_attempts=3)
    first = domain.image_changed(job, 0, "succeeded", job.accepted_at + 0.6, key="job-0.png")
    assert first is not None and not first.closes and job.completed == 1 and job.ttfi_ms == 600.0
    assert job.images[0].latency_ms == 500.0
    last = domain.image_changed(job, 1, "failed", job.accepted_at + 0.9, error="refused")
    assert last is not None and last.closes and job.status == "partial"
    done = _data(last)[-1]
    assert done["status"] == "partial" and done["total_ms"] == 900.0
    assert [image["image_key"] for image in done["images"]] == ["job-0.png", None]
    # An outcome that comes after the end changes nothing.
    assert domain.image_changed(job, 1, "succeeded", job.accepted_at + 1) is None


def test_the_earliest_success_is_the_ttfi_whatever_order_results_are_applied_in():
    job = _job(2)
    domain.image_changed(job, 1, "succeeded", job.accepted_at + 0.8, key="b.png")
    domain.image_changed(job, 0, "succeeded", job.accepted_at + 0.5, key="a.png")
    assert job.ttfi_ms == 500.0 and job.status == "succeeded"


def test_a_cancel_ends_every_unfinished_image_and_the_job():
    job = _job(3)
    domain.image_changed(job, 0, "succeeded", job.accepted_at + 0.5, key="a.png")
    update = domain.canceled(job, job.accepted_at + 0.6)
    assert update.closes and job.status == "canceled"
    assert [image.status for image in job.images] == ["succeeded", "canceled", "canceled"]
    assert domain.concluded(job, job.accepted_at + 1) is None  # already over


def test_a_retry_is_an_event_only_and_a_prediction_id_a_change_only():
    job = _job(1)
    retry = domain.retrying(job, 0, 1, 0.5, "429", job.accepted_at + 0.1)
    assert retry is not None and retry.retries == 1 and not retry.images
    assert _data(retry)[0] | {"elapsed_ms": 0} == {
        "job_id": job.id, "index": 0, "status": "retrying", "error": "429", "elapsed_ms": 0,
        "completed": 0, "total": 1, "attempt": 1, "delay_ms": 500.0,
    }  # fmt: skip
    prediction = domain.prediction_created(job, 0, "p-1")
    assert prediction is not None and prediction.images == {0} and not prediction.events
    assert job.images[0].prediction_id == "p-1"


def test_a_job_whose_images_all_ended_without_done_is_concluded():
    job = _job(1)
    job.images[0].status = "failed"
    job.completed = 1
    update = domain.concluded(job, job.accepted_at + 1)
    assert update is not None and update.closes and job.status == "failed"


def test_events_hold_keys_and_links_are_signed_when_sent_the_same_for_a_while():
    job = _job(1)
    update = domain.image_changed(job, 0, "succeeded", job.accepted_at + 0.5, key="job-0.png")
    assert update is not None
    assert "image_key" in update.events[0].data and "http" not in update.events[0].data
    signer = ImageUrlSigner(b"secret", 86400)
    now = 1_800_000_000
    wire = ImageLinks(signer, "http://one.example/", lambda: now).wire(update.events[0]).decode()
    later = ImageLinks(signer, "http://one.example/", lambda: now + 5).wire(update.events[0]).decode()
    assert wire == later
    assert "http://one.example/api/images/job-0.png?expires=" in wire and "image_key" not in wire
    other_host = ImageLinks(signer, "http://two.example", lambda: now).wire(update.events[-1]).decode()
    assert "http://two.example/api/images/job-0.png" in other_host
    assert signer.verify("job-0.png", signer.expires(now), signer.query("job-0.png", signer.expires(now))[-64:], now)


def test_links_of_a_long_stream_are_signed_as_each_is_sent():
    job = _job(1)
    update = domain.image_changed(job, 0, "succeeded", job.accepted_at + 0.5, key="job-0.png")
    assert update is not None
    signer = ImageUrlSigner(b"secret", 3600)
    now = [1_800_000_000.0]
    links = ImageLinks(signer, "http://one.example", lambda: now[0])  # one stream's, opened now
    first = links.wire(update.events[0]).decode()
    now[0] += 2 * 3600  # the stream is still open two link lifetimes later
    late = links.wire(update.events[0]).decode()
    expires = int(re.search(r"expires=(\d+)", late)[1])
    assert late != first and expires > now[0]
    signature = re.search(r"signature=([0-9a-f]+)", late)[1]
    assert signer.verify("job-0.png", expires, signature, now[0]) > 0


def test_each_take_of_an_image_is_an_attempt_and_past_the_cap_the_image_fails_and_its_job_ends():
    job = _job(2)
    domain.accepted(job, [None, None])
    first = domain.claimed(job, 0, job.accepted_at, max_attempts=2)
    assert first is not None and first.events and job.images[0].status == "running"
    # Taken over after its worker went away: stored, with no event of its own.
    again = domain.claimed(job, 0, job.accepted_at + 5, max_attempts=2)
    assert again is not None and again.images == {0} and not again.events and job.images[0].attempts == 2
    exhausted = domain.claimed(job, 0, job.accepted_at + 10, max_attempts=2)
    assert exhausted is not None and job.images[0].status == "failed"
    assert job.images[0].error == domain.attempts_exhausted_message(2)
    domain.image_changed(job, 1, "succeeded", job.accepted_at + 11, key="b.png")
    assert job.status == "partial"
    assert domain.claimed(job, 0, job.accepted_at + 12, max_attempts=2) is None  # over


def test_a_worker_overtaken_by_a_later_attempt_records_nothing():
    job = _job(1)
    domain.accepted(job, [None])
    domain.claimed(job, 0, job.accepted_at, max_attempts=3)
    domain.claimed(job, 0, job.accepted_at + 5, max_attempts=3)  # the successor's attempt: 2

    def succeed(j: domain.Job) -> domain.Update | None:
        return domain.image_changed(j, 0, "succeeded", j.accepted_at + 6, key="a.png")

    assert domain.by_attempt(0, 1, succeed)(job) is None and job.images[0].status == "running"
    assert domain.by_attempt(0, 2, succeed)(job) is not None and job.status == "succeeded"

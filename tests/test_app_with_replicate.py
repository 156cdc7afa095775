"""The whole service on the Replicate provider: real client, fake Replicate server, real HTTP."""

import pytest

from tests.conftest import create_job, login, read_stream
from tests.fake_replicate import Fault, Rule


def _replicate_server(live_server, fake, **overrides):
    return live_server(
        IMAGE_PROVIDER=None,  # chosen because a token is set
        REPLICATE_API_TOKEN=fake.token,
        REPLICATE_BASE_URL=fake.base_url,
        REPLICATE_INPUT='{"output_format": "png"}',
        REPLICATE_POLL_INTERVAL=0.05,
        **overrides,
    )


@pytest.mark.slow
def test_an_eight_image_job_makes_eight_predictions_concurrently(live_server, fake_replicate):
    fake_replicate.latency = 0.3
    with _replicate_server(live_server, fake_replicate) as server, server.client() as client:
        token = login(client)
        job_id = create_job(client, token, prompt="a castle on a hill", num_images=8, seed=10)
        events = read_stream(client, job_id, params={"access_token": token})
        done = events[-1].data
        assert done["status"] == "succeeded"
        created = fake_replicate.created()
        assert len(created) == 8
        assert sorted(p["input"]["seed"] for p in created) == list(range(10, 18))
        assert all(p["input"]["output_format"] == "png" and p["input"]["num_outputs"] == 1 for p in created)
        assert done["total_ms"] < 8 * 300  # concurrent, not in sequence

        # Each output was fetched once into our own store; the links point at this service.
        by_seed = {p["input"]["seed"]: fake_replicate.predictions[p["id"]]["output"][0] for p in created}
        for image in done["images"]:
            assert image["url"].startswith(server.base_url + "/api/images/")
            ours = client.get(image["url"])
            assert ours.status_code == 200 and ours.headers["content-type"] == "image/png"
            assert ours.content == client.get(by_seed[10 + image["index"]]).content
        downloads = fake_replicate.requests_to("/files/", method="GET")
        assert len(downloads) == 8 + 8  # the service's fetches, then this test's


@pytest.mark.slow
def test_failures_and_retries_surface_per_image(live_server, fake_replicate):
    fake_replicate.add_rule(Rule(match="refused", fail_error="NSFW content detected."))
    fake_replicate.push_create_fault(Fault(status=429, retry_after=0))
    with _replicate_server(live_server, fake_replicate, GENERATION_MAX_WORKERS=1) as server, server.client() as client:
        token = login(client)
        ok_job = create_job(client, token, prompt="fine", num_images=1)
        bad_job = create_job(client, token, prompt="refused", num_images=2)
        ok = read_stream(client, ok_job, params={"access_token": token})[-1].data
        bad = read_stream(client, bad_job, params={"access_token": token})[-1].data
    assert ok["status"] == "succeeded"
    assert bad["status"] == "failed"
    assert [image["error"] for image in bad["images"]] == ["NSFW content detected."] * 2


def test_a_wrong_token_fails_each_image_as_the_service_being_unavailable(live_server, fake_replicate):
    with (
        live_server(
            IMAGE_PROVIDER="replicate",
            REPLICATE_API_TOKEN="r8_not_valid",
            REPLICATE_BASE_URL=fake_replicate.base_url,
        ) as server,
        server.client() as client,
    ):
        token = login(client)
        job_id = create_job(client, token, prompt="x", num_images=1)
        done = read_stream(client, job_id, params={"access_token": token})[-1].data
    assert done["status"] == "failed"
    # The token is the operator's to fix: the user is told only that the service is unavailable.
    assert done["images"][0]["error"] == "The image service is unavailable; try again later."

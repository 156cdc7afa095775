"""The Replicate provider, through the real `replicate` client, against the fake server."""

import socket
import threading
import time

import httpx
import pytest

from app.providers.base import ImageRequest, ImageStopped, ProviderError
from app.providers.replicate import ReplicateProvider
from tests.fake_replicate import Fault, Rule


def _provider(fake, **overrides) -> ReplicateProvider:
    options = dict(
        api_token=fake.token,
        model="black-forest-labs/flux-schnell",
        base_url=fake.base_url,
        extra_input={"aspect_ratio": "16:9", "output_format": "png"},
        max_retries=3,
        poll_interval=0.05,
    )
    options.update(overrides)
    return ReplicateProvider(**options)


def _request(prompt="a lighthouse at dawn", index=0, seed=None) -> ImageRequest:
    return ImageRequest(job_id="job_test", index=index, prompt=prompt, seed=seed)


def _creates(fake):
    return fake.requests_to("/v1/models/black-forest-labs/flux-schnell/predictions", method="POST")


def _generate_in_background(provider: ReplicateProvider, request: ImageRequest) -> tuple[threading.Thread, list[str]]:
    """The call on a thread of its own, and where it records that it stopped."""
    outcome: list[str] = []

    def generate() -> None:
        try:
            provider.generate(request)
        except ImageStopped:
            outcome.append("stopped")

    worker = threading.Thread(target=generate)
    worker.start()
    return worker, outcome


def test_success_returns_the_output_url_of_one_sync_prediction(fake_replicate):
    image = _provider(fake_replicate).generate(_request(seed=42))
    [create] = _creates(fake_replicate)
    assert create.headers["authorization"] == f"Bearer {fake_replicate.token}"
    assert create.headers["prefer"] == "wait=1"  # a held create cannot be cut short
    assert create.json == {
        "input": {
            "aspect_ratio": "16:9",
            "output_format": "png",
            "prompt": "a lighthouse at dawn",
            "num_outputs": 1,
            "seed": 42,
        }
    }
    [prediction] = fake_replicate.created()
    assert image.url == fake_replicate.predictions[prediction["id"]]["output"][0]
    assert httpx.get(image.url).headers["content-type"] == "image/png"


def test_failed_prediction_becomes_the_image_error_without_retry(fake_replicate):
    fake_replicate.add_rule(Rule(match="forbidden", fail_error="NSFW content detected. Try a different prompt."))
    with pytest.raises(ProviderError, match="NSFW content detected"):
        _provider(fake_replicate).generate(_request("something forbidden"))
    assert len(_creates(fake_replicate)) == 1


@pytest.mark.slow
def test_429_on_create_is_retried_after_retry_after(fake_replicate):
    fake_replicate.push_create_fault(Fault(status=429, retry_after=1))
    started = time.monotonic()
    image = _provider(fake_replicate).generate(_request())
    assert image.url
    assert len(_creates(fake_replicate)) == 2
    assert time.monotonic() - started >= 1.0  # honoured Retry-After: 1


@pytest.mark.parametrize("status", [500, 502, 503])
def test_server_error_on_create_is_retried(fake_replicate, status):
    fake_replicate.push_create_fault(Fault(status=status))
    assert _provider(fake_replicate).generate(_request()).url
    assert len(_creates(fake_replicate)) == 2


def test_a_create_whose_answer_was_lost_is_not_sent_again(fake_replicate):
    # Replicate may have made the prediction: a second create could bill the image twice.
    fake_replicate.push_create_fault(Fault(reset=True))
    with pytest.raises(ProviderError, match="Lost the connection"):
        _provider(fake_replicate).generate(_request())
    assert len(_creates(fake_replicate)) == 1


def test_connection_refused_is_retried_then_reported(fake_replicate):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    provider = _provider(fake_replicate, base_url=f"http://127.0.0.1:{port}", max_retries=1)
    with pytest.raises(ProviderError, match="Replicate is unavailable"):
        provider.generate(_request())


@pytest.mark.slow
def test_a_reset_while_polling_is_retried(fake_replicate):
    fake_replicate.wait_cap = 0.05
    fake_replicate.latency = 0.3
    fake_replicate.push_get_fault(Fault(reset=True))
    fake_replicate.push_get_fault(Fault(status=500))
    assert _provider(fake_replicate).generate(_request()).url


@pytest.mark.parametrize(
    "fault",
    [
        Fault(status=429, retry_after=0),
        Fault(status=503, retry_after=0),
        Fault(status=504, retry_after=0),
        Fault(reset=True),
    ],
)
@pytest.mark.slow
def test_the_clients_own_get_retries_are_off(fake_replicate, fault):
    # The replicate client wraps our transport in a RetryTransport that retries GETs on 429,
    # 503 and 504 up to 10 times; ours raises before it sees such an answer. This fails if an
    # upgrade of the client starts retrying what our transport raises.
    fake_replicate.wait_cap = 0.05
    fake_replicate.latency = 0.3
    for _ in range(3):
        fake_replicate.push_get_fault(fault)
    with pytest.raises(ProviderError, match="Replicate is unavailable"):
        _provider(fake_replicate, max_retries=2).generate(_request())
    # One GET per attempt: 1 + 2 retries, not 10 per attempt from the client's RetryTransport.
    assert len(fake_replicate.requests_to("/v1/predictions/", method="GET")) == 3


@pytest.mark.slow
def test_each_retry_is_reported_first_with_its_attempt_delay_and_reason(fake_replicate):
    fake_replicate.push_create_fault(Fault(status=429, retry_after=0))
    fake_replicate.push_create_fault(Fault(status=500))
    request = _request()
    reported = []
    request.on_retry = lambda attempt, delay, reason: reported.append((attempt, delay, reason))
    assert _provider(fake_replicate).generate(request).url
    [(first, no_wait, throttled), (second, backoff, failed)] = reported
    assert (first, no_wait) == (1, 0.0) and "429" in throttled  # Retry-After: 0
    assert second == 2 and 1.0 <= backoff <= 1.5 and "500" in failed  # 0.5 s doubled, plus jitter
    assert len(_creates(fake_replicate)) == 3


def test_a_cancel_cuts_the_wait_before_a_retry_short(fake_replicate):
    fake_replicate.push_create_fault(Fault(status=503, retry_after=30))
    request = _request()
    retried = threading.Event()
    request.on_retry = lambda attempt, delay, reason: retried.set()
    worker, outcome = _generate_in_background(_provider(fake_replicate), request)
    assert retried.wait(5)
    request.stop.cancel()
    worker.join(timeout=2)
    assert not worker.is_alive(), "the 30 s Retry-After was slept to its end"
    assert outcome == ["stopped"]
    assert len(_creates(fake_replicate)) == 1


def test_retries_are_bounded(fake_replicate):
    for _ in range(5):
        fake_replicate.push_create_fault(Fault(status=503, retry_after=0))
    with pytest.raises(ProviderError, match="503"):
        _provider(fake_replicate, max_retries=2).generate(_request())
    assert len(_creates(fake_replicate)) == 3


@pytest.mark.parametrize(
    ("status", "logged"),
    [(401, "401 Unauthenticated: You did not pass a valid authentication token"), (402, "402 Insufficient credit")],
)
def test_the_accounts_own_problems_are_logged_whole_and_not_shown_to_users(fake_replicate, caplog, status, logged):
    if status == 402:
        fake_replicate.push_create_fault(Fault(status=402))
    token = "r8_wrong" if status == 401 else fake_replicate.token
    with pytest.raises(ProviderError) as caught:
        _provider(fake_replicate, api_token=token).generate(_request())
    assert str(caught.value) == "The image service is unavailable; try again later."
    [record] = [r for r in caplog.records if r.name == "myflix.provider.replicate"]
    assert record.levelname == "ERROR" and logged in record.getMessage()
    if status == 402:
        assert "purchase credit" in record.getMessage()  # the detail, whole
    assert len(_creates(fake_replicate)) == 1  # not retried


def test_422_input_validation_is_not_retried(fake_replicate):
    with pytest.raises(ProviderError, match="422"):
        _provider(fake_replicate, extra_input={"num_inference_steps": 9}).generate(_request())
    assert len(_creates(fake_replicate)) == 1


def test_prediction_outlasting_prefer_wait_is_polled_to_the_end(fake_replicate):
    fake_replicate.wait_cap = 0.05
    fake_replicate.latency = 0.4
    image = _provider(fake_replicate).generate(_request())
    [prediction] = fake_replicate.created()
    polls = fake_replicate.requests_to(f"/v1/predictions/{prediction['id']}", method="GET")
    assert polls, "the prediction was never polled"
    assert fake_replicate.predictions[prediction["id"]]["status"] == "succeeded"
    assert image.url == fake_replicate.predictions[prediction["id"]]["output"][0]


def test_a_versioned_model_creates_through_predictions(fake_replicate):
    provider = _provider(fake_replicate, model="black-forest-labs/flux-schnell:abc123")
    assert provider.generate(_request()).url
    [create] = fake_replicate.requests_to("/v1/predictions", method="POST")
    assert create.json["version"] == "abc123"


def test_data_url_outputs_are_accepted(fake_replicate):
    fake_replicate.output_mode = "data"
    image = _provider(fake_replicate).generate(_request())
    assert image.url.startswith("data:image/png;base64,")


def test_empty_output_is_a_clear_error(fake_replicate):
    fake_replicate.add_rule(Rule(match="filtered", outputs=0))
    with pytest.raises(ProviderError, match="no image"):
        _provider(fake_replicate).generate(_request("filtered away"))


def test_cancel_while_polling_cancels_the_prediction(fake_replicate):
    fake_replicate.wait_cap = 0.05
    fake_replicate.add_rule(Rule(match="forever", never_finish=True))
    request = _request("forever and ever")
    worker, outcome = _generate_in_background(_provider(fake_replicate), request)
    fake_replicate.wait_for(lambda fake: bool(fake.requests_to("/v1/predictions/", method="GET")))
    request.stop.cancel()
    worker.join(timeout=5)
    assert not worker.is_alive()
    assert outcome == ["stopped"]
    [prediction] = fake_replicate.created()
    assert fake_replicate.predictions[prediction["id"]]["status"] == "canceled"


def test_interrupt_leaves_the_prediction_running_and_resume_follows_it(fake_replicate):
    fake_replicate.wait_cap = 0.05
    fake_replicate.latency = 0.6
    reported = []
    request = _request("interrupted")
    request.on_prediction = reported.append
    provider = _provider(fake_replicate)
    worker, outcome = _generate_in_background(provider, request)
    fake_replicate.wait_for(lambda fake: bool(fake.requests_to("/v1/predictions/", method="GET")))
    request.stop.interrupt()
    worker.join(timeout=5)
    assert outcome == ["stopped"]
    [prediction] = fake_replicate.created()
    assert reported == [prediction["id"]]
    assert fake_replicate.predictions[prediction["id"]]["status"] != "canceled"

    resumed = _request("interrupted")
    resumed.resume_prediction_id = prediction["id"]
    image = provider.generate(resumed)
    assert len(fake_replicate.created()) == 1  # re-attached, not created again
    assert image.url == fake_replicate.predictions[prediction["id"]]["output"][0]

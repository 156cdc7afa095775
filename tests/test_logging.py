"""Text logs cannot be forged: whatever comes from outside (a path, a prompt, a provider's
error, an exception's message) stays inside the record it is logged in."""

import io
import logging
import re
import sys
from collections.abc import Iterator

import pytest

from app.core.logging import _HANDLER_NAME, JsonFormatter, TextFormatter, configure_logging
from tests.conftest import create_job, login, read_stream
from tests.fake_replicate import Fault

FORGED = "\n2026-12-01 ERROR admin login succeeded"
# A line of the text format starts with its record's time; a forged one would too.
RECORD_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")


def _record(message: str, *args: object, exc_info: object = None, **extra: object) -> logging.LogRecord:
    logger = logging.getLogger("myflix.test")
    return logger.makeRecord(logger.name, logging.INFO, __file__, 1, message, args, exc_info, extra=extra)


def _forged_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(FORGED.lstrip("\n"))]


def test_a_prompt_in_the_message_or_a_field_stays_on_its_line():
    formatter = TextFormatter()
    for record in (
        _record("job accepted: %s", f"a sunset{FORGED}"),
        _record("job accepted", prompt=f"a sunset{FORGED}", error=f"401{FORGED}\r\x1b[2K"),
        _record(f"image failed\u2028{FORGED}"),
    ):
        line = formatter.format(record)
        assert len(line.splitlines()) == 1, line
        assert "\\n2026-12-01 ERROR admin login succeeded" in line
        assert "\x1b" not in line and "\r" not in line


def test_a_traceback_is_indented_and_escaped_so_it_cannot_forge_a_line():
    try:
        raise ValueError(f"bad prompt{FORGED}\rmore")
    except ValueError:
        record = _record("image crashed", exc_info=sys.exc_info(), job_id="job_1")
    # Another handler (pytest's, say) may have formatted the traceback onto the record first.
    logging.Formatter().format(record)
    text = TextFormatter().format(record)
    first, *rest = text.split("\n")
    assert RECORD_START.match(first) and first.endswith("image crashed job_id=job_1")
    assert rest and all(line.startswith("    ") for line in rest), text
    assert "\r" not in text
    assert any("ValueError: bad prompt" in line for line in rest)
    assert all(RECORD_START.match(line) is None for line in rest)


def test_the_text_format_is_the_escaping_one_and_json_stays_json():
    configure_logging("INFO", "text")
    try:
        ours = [h for h in logging.getLogger().handlers if h.get_name() == _HANDLER_NAME]
        assert len(ours) == 1 and isinstance(ours[0].formatter, TextFormatter)
        configure_logging("INFO", "json")
        ours = [h for h in logging.getLogger().handlers if h.get_name() == _HANDLER_NAME]
        assert len(ours) == 1 and isinstance(ours[0].formatter, JsonFormatter)
        assert "\n" not in JsonFormatter().format(_record("x", prompt=FORGED))
    finally:
        logging.getLogger().handlers[:] = [h for h in logging.getLogger().handlers if h.get_name() != _HANDLER_NAME]


@pytest.fixture
def text_log() -> Iterator[io.StringIO]:
    """Every record of the process, as the text format writes it."""
    output = io.StringIO()
    handler = logging.StreamHandler(output)
    handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield output
    finally:
        root.removeHandler(handler)


def test_a_forged_line_in_a_path_prompt_or_provider_error_never_reaches_the_log(live_server, fake_replicate, text_log):
    # The provider's error echoes the prompt, as Replicate's validation errors do.
    problem = f'{{"status": 422, "detail": "prompt: a cat{FORGED.encode("unicode_escape").decode()}"}}'
    fake_replicate.push_create_fault(Fault(status=422, raw_body=problem.encode()))
    replicate = {"REPLICATE_API_TOKEN": fake_replicate.token, "REPLICATE_BASE_URL": fake_replicate.base_url}
    with live_server(IMAGE_PROVIDER="replicate", **replicate) as server, server.client() as client:
        token = login(client)
        assert client.get("/api/generate/x%0a2026-12-01 ERROR admin login succeeded").status_code == 404
        job_id = create_job(client, token, prompt=f"a cat{FORGED}", num_images=1)
        events = read_stream(client, job_id, params={"access_token": token})
    assert events[-1].event == "done" and events[-1].data["status"] == "failed"
    log = text_log.getvalue()
    assert "\\n2026-12-01 ERROR admin login succeeded" in log, "the path and the provider's error are logged"
    assert _forged_lines(log) == []

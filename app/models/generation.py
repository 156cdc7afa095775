"""Request, response and event schemas of the generation endpoints."""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, StringConstraints, field_validator
from pydantic.json_schema import SkipJsonSchema

from app.core.text import is_control_character

ImageStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]
JobStatus = Literal["queued", "running", "succeeded", "partial", "failed", "canceled"]

MAX_PROMPT_CHARS = 2000
MAX_SEED = 2**31 - 1


# What the validators below take, said in the schema: a character that is not whitespace, and
# no control character but tab and line breaks.
_PROMPT_CHAR = r"[^\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f-\u009f]"
_PROMPT_VISIBLE = r"[^\s\u0000-\u001f\u007f-\u009f]"
PROMPT_PATTERN = f"^{_PROMPT_CHAR}*{_PROMPT_VISIBLE}{_PROMPT_CHAR}*$"


def _integral_number(value: object) -> object:
    """JSON has one number type: 2.0 is the integer 2 (as JSON Schema's `integer` says), while
    2.5, "2" and true are not integers at all."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# An integer as JSON Schema means it: no strings or booleans taken for numbers.
JsonInt = Annotated[StrictInt, BeforeValidator(_integral_number)]


class GenerateRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"prompt": "A beautiful sunset", "num_images": 4}]},
    )

    prompt: Annotated[
        str,
        StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_PROMPT_CHARS),
        Field(json_schema_extra={"pattern": PROMPT_PATTERN}),
    ]
    # The schema's maximum is each app's MAX_IMAGES_PER_JOB (see `declare_settings_limits`).
    num_images: JsonInt = Field(ge=1, description="1 to MAX_IMAGES_PER_JOB (the schema's maximum).")
    # The bounds before the validator, so that the schema shows them (minimum and maximum).
    seed: Annotated[StrictInt, Field(ge=0, le=MAX_SEED), BeforeValidator(_integral_number)] | None = Field(
        default=None, description="Image i uses seed + i. Random when absent."
    )

    @field_validator("prompt")
    @classmethod
    def _printable(cls, prompt: str) -> str:
        # Any language and emoji are welcome; control characters (but line breaks and tabs)
        # are not, as they only ever come from broken clients or injection attempts.
        if any(is_control_character(c) and c not in "\t\n\r" for c in prompt):
            raise ValueError("prompt must not contain control characters")
        return prompt


class GenerateResponse(BaseModel):
    job_id: str


class ImageResult(BaseModel):
    # Every field is sent, null when it has no value.
    model_config = ConfigDict(json_schema_serialization_defaults_required=True)

    index: int
    status: ImageStatus
    url: str | None = None
    error: str | None = None
    latency_ms: float | None = Field(
        default=None, description="Provider time of this image: from leaving the queue to finishing."
    )
    queue_position: int | None = Field(
        default=None, description="While queued: 1-based place among all images waiting for a worker."
    )


class JobSnapshot(BaseModel):
    job_id: str
    status: JobStatus
    prompt: str
    num_images: int
    seed: int | None
    created_at: str = Field(description="ISO-8601 UTC time the job was accepted.")
    images: list[ImageResult]
    ttfi_ms: float | None = Field(description="First image succeeded minus job accepted.")
    total_ms: float | None = Field(description="Last image finished minus job accepted.")


class JobPage(BaseModel):
    jobs: list[JobSnapshot] = Field(description="Newest first.")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last.")


def _left_out_without_value(schema: dict[str, Any]) -> None:
    # The server leaves such a field out rather than sending null: in the schema it is
    # optional with no default (a default would make generated clients call it required).
    schema.pop("default", None)


def _sent_only_with_value(description: str) -> Any:
    return Field(default=None, description=description, json_schema_extra=_left_out_without_value)


class ProgressEvent(BaseModel):
    """One per state change of one image, and one per retry. Fields without a value are left out."""

    job_id: str
    index: int
    status: ImageStatus | Literal["retrying"]
    url: str | SkipJsonSchema[None] = _sent_only_with_value("On `succeeded`: the image's signed link.")
    error: str | SkipJsonSchema[None] = _sent_only_with_value("On `failed`, and on `retrying` its reason.")
    elapsed_ms: float = Field(description="Since the job was accepted.")
    completed: int = Field(description="Images finished (succeeded, failed or canceled) so far.")
    total: int
    queue_position: int | SkipJsonSchema[None] = _sent_only_with_value(
        "On `queued`: 1-based place among all images waiting for a worker."
    )
    attempt: int | SkipJsonSchema[None] = _sent_only_with_value("On `retrying`: the retry's number, from 1.")
    delay_ms: float | SkipJsonSchema[None] = _sent_only_with_value("On `retrying`: the wait before it.")


class DoneEvent(BaseModel):
    """The last event of a job that ran to its end."""

    job_id: str
    status: Literal["succeeded", "partial", "failed", "canceled"]
    images: list[ImageResult]
    ttfi_ms: float | None
    total_ms: float


class ErrorEvent(BaseModel):
    """A job-level failure; the stream ends after it."""

    job_id: str
    message: str


class KeepaliveEvent(BaseModel):
    """`{}` after SSE_KEEPALIVE_SECONDS without another event; no `id`."""


# The stream's event names and the schemas of their data, for the docs (OpenAPI).
STREAM_EVENT_MODELS: dict[str, type[BaseModel]] = {
    "progress": ProgressEvent,
    "done": DoneEvent,
    "error": ErrorEvent,
    "keepalive": KeepaliveEvent,
}

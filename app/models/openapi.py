"""What the OpenAPI schema says beyond what FastAPI derives from the routes."""

from typing import Any

from pydantic.json_schema import models_json_schema

from app.models.generation import STREAM_EVENT_MODELS, GenerateRequest

_REF_TEMPLATE = "#/components/schemas/{model}"


def stream_event_schemas() -> dict[str, dict[str, Any]]:
    """The schemas of the stream's event payloads, which no JSON response refers to, and of
    the models they use, as the server sends them (the mode FastAPI gives responses)."""
    _, top = models_json_schema(
        [(model, "serialization") for model in STREAM_EVENT_MODELS.values()], ref_template=_REF_TEMPLATE
    )
    return dict(top.get("$defs", {}))


def declare_settings_limits(schemas: dict[str, Any], max_images_per_job: int) -> None:
    """The limits that come from an app's settings, in its schema's `components.schemas`."""
    num_images = schemas[GenerateRequest.__name__]["properties"]["num_images"]
    num_images["maximum"] = max_images_per_job

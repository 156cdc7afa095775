"""Schemas of the admin endpoints and of usage."""

from datetime import datetime
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field


class UsagePublic(BaseModel):
    images_today: int = Field(
        description="Images your jobs asked for today (UTC), less those that failed or were canceled."
    )
    quota: int | None = Field(description="Images you may ask for per UTC day; null: unlimited.")
    remaining: int | None = Field(description="Images left today; null: unlimited.")
    resets_at: AwareDatetime = Field(description="When today's count starts again (the next UTC midnight).")


class AdminUser(BaseModel):
    email: str
    full_name: str
    role: Literal["user", "admin"]
    disabled: bool
    daily_image_quota: int | None = Field(
        description="The user's own quota (0: unlimited); null: the service's DAILY_IMAGE_QUOTA."
    )
    created_at: datetime | None
    images_today: int
    quota: int | None = Field(description="The quota in effect; null: unlimited.")
    remaining: int | None


class AdminUserPage(BaseModel):
    users: list[AdminUser]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null: this is the last.")


class AdminUserUpdate(BaseModel):
    """Only the fields sent are changed."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"daily_image_quota": 500}]})

    disabled: bool | None = Field(None, description="true ends every session of the user.")
    role: Literal["user", "admin"] | None = None
    daily_image_quota: int | None = Field(
        None, ge=0, le=1_000_000, description="0: unlimited; null: back to the service's DAILY_IMAGE_QUOTA."
    )

from typing import Literal

from pydantic import BaseModel


class HealthResponse(BaseModel):
    status: Literal["ok"]


class CheckResult(BaseModel):
    ok: bool
    detail: str


class ReadinessResponse(BaseModel):
    status: Literal["ready", "not ready"]
    checks: dict[str, CheckResult]

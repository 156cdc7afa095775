from fastapi import APIRouter

from app.models.errors import STORE_UNAVAILABLE, UNAUTHORIZED
from app.models.users import UsagePublic
from app.routers.deps import CurrentUser, DailyQuota, JobServiceDep

router = APIRouter(prefix="/api/usage", tags=["usage"])


@router.get("", operation_id="getUsage", response_model=UsagePublic, responses={**UNAUTHORIZED, **STORE_UNAVAILABLE})
async def usage(user: CurrentUser, quota: DailyQuota, service: JobServiceDep) -> UsagePublic:
    """Your images today against your daily quota (DAILY_IMAGE_QUOTA, or your own)."""
    used = await service.usage(user.email, quota)
    return UsagePublic(
        images_today=used.images_today, quota=used.quota, remaining=used.remaining, resets_at=used.resets_at
    )

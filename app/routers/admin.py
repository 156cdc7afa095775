from typing import Annotated

from fastapi import APIRouter, Query

from app.models.errors import BODY_ERRORS, STORE_UNAVAILABLE, UNAUTHORIZED, error_responses
from app.models.users import AdminUser, AdminUserPage, AdminUserUpdate
from app.routers.deps import AdminUser as Admin
from app.routers.deps import UsersServiceDep
from app.services.users_service import Unchanged, UserWithUsage

router = APIRouter(prefix="/api/admin", tags=["admin"])

_ADMIN_ONLY = {**UNAUTHORIZED, **error_responses(_403="The caller is not an admin"), **STORE_UNAVAILABLE}


def _admin_user(entry: UserWithUsage) -> AdminUser:
    user = entry.user
    return AdminUser(
        email=user.email,
        full_name=user.full_name,
        role="admin" if user.is_admin else "user",
        disabled=user.disabled,
        daily_image_quota=user.daily_image_quota,
        created_at=entry.created_at,
        images_today=entry.images_today,
        quota=entry.quota,
        remaining=entry.remaining,
    )


@router.get("/users", operation_id="listUsers", response_model=AdminUserPage, responses=_ADMIN_ONLY)
async def list_users(
    admin: Admin,
    users: UsersServiceDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    cursor: Annotated[str | None, Query(max_length=254, description="`next_cursor` of the previous page.")] = None,
) -> AdminUserPage:
    """Every user, by email, with their images today and their quota."""
    page = await users.list_users(limit + 1, cursor)
    more = len(page) > limit
    page = page[:limit]
    return AdminUserPage(
        users=[_admin_user(entry) for entry in page], next_cursor=page[-1].user.email if more else None
    )


@router.patch(
    "/users/{email}",
    operation_id="updateUser",
    response_model=AdminUser,
    responses={**BODY_ERRORS, **_ADMIN_ONLY, **error_responses(_404="No such user")},
)
async def update_user(email: str, body: AdminUserUpdate, admin: Admin, users: UsersServiceDep) -> AdminUser:
    """Disable or enable a user (disabling ends their sessions), make them an admin or not, or
    set their own daily image quota. Only the fields sent change."""
    sent = body.model_fields_set
    updated = await users.update_user(
        admin.email,
        email,
        disabled=body.disabled,
        role=body.role,
        daily_image_quota=body.daily_image_quota if "daily_image_quota" in sent else Unchanged,
    )
    return _admin_user(updated)

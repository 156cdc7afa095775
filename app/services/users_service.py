"""Operators' work on accounts: list them with their usage, create, disable and enable them,
reset a password, set a user's own quota. Every action is logged with who did it. Used by the
admin endpoints and by `python -m app.users`; knows nothing of HTTP."""

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime

from app.core.security import hash_password
from app.db.accounts import AccountRepository, UserUsage
from app.db.repository import ConflictingWriteError
from app.db.tables import UserRow
from app.services.auth_service import (
    ADMIN_ROLE,
    EmailTakenError,
    User,
    check_new_password,
    normalize_email,
    user_of,
    valid_email,
)
from app.services.jobs.rows import usage_day

logger = logging.getLogger("myflix.admin")


class UserNotFoundError(Exception):
    def __init__(self, email: str) -> None:
        super().__init__(f"No user {email}.")


class NotAnAdminError(Exception):
    def __init__(self) -> None:
        super().__init__("This needs an administrator's account.")


@dataclass(frozen=True)
class UserWithUsage:
    user: User
    created_at: datetime | None
    images_today: int
    quota: int | None  # None: unlimited
    remaining: int | None


def daily_quota(user: User, default: int) -> int | None:
    """The images the user may ask for per UTC day; None: unlimited (a quota of 0)."""
    quota = default if user.daily_image_quota is None else user.daily_image_quota
    return quota or None


class Unchanged:
    """A field an update leaves as it is."""


# Called with the user's email and the sessions an action ended: what a process remembers of
# them is stale.
OnChanged = Callable[[str, list[str]], None]


class UsersService:
    def __init__(self, accounts: AccountRepository, default_quota: int, on_changed: OnChanged | None = None) -> None:
        self._accounts = accounts
        self._default_quota = default_quota
        self._on_changed = on_changed

    async def list_users(self, limit: int, after_email: str | None) -> list[UserWithUsage]:
        """Users by email, strictly after `after_email`, with their images today."""
        return self._with_quotas(await self._accounts.users_with_usage(_today(), limit, after_email))

    async def get_user(self, email: str) -> UserWithUsage:
        found = self._with_quotas(await self._accounts.users_with_usage(_today(), 1, email=normalize_email(email)))
        if not found:
            raise UserNotFoundError(email)
        return found[0]

    def _with_quotas(self, entries: list[UserUsage]) -> list[UserWithUsage]:
        listed = []
        for entry in entries:
            user = user_of(entry.user)
            quota = daily_quota(user, self._default_quota)
            remaining = None if quota is None else max(0, quota - entry.images_today)
            listed.append(UserWithUsage(user, entry.user.created_at, entry.images_today, quota, remaining))
        return listed

    async def create_user(self, actor: str, email: str, password: str, full_name: str, admin: bool = False) -> User:
        account = valid_email(email)
        check_new_password(password, account)
        row = UserRow(
            email=account,
            full_name=full_name.strip(),
            password_hash=await asyncio.to_thread(hash_password, password),
            role=ADMIN_ROLE if admin else "user",
            disabled=False,
            created_at=datetime.now(UTC),
        )
        try:
            await self._accounts.add_user(row)
        except ConflictingWriteError:
            raise EmailTakenError from None
        self._log(actor, "create user", account, role=row.role)
        return user_of(row)

    async def update_user(
        self,
        actor: str,
        email: str,
        *,
        disabled: bool | None = None,
        role: str | None = None,
        daily_image_quota: int | type[Unchanged] | None = Unchanged,
    ) -> UserWithUsage:
        """Change what is given (`daily_image_quota`: a number, None for the service's default,
        or Unchanged); disabling a user ends every session of theirs."""
        account = normalize_email(email)
        values: dict[str, object] = {}
        if disabled is not None:
            values["disabled"] = disabled
        if role is not None:
            values["role"] = role
        if daily_image_quota is not Unchanged:
            values["daily_image_quota"] = daily_image_quota
        row = await self._accounts.update_user(account, **values)
        if row is None:
            raise UserNotFoundError(email)
        ended = await self._accounts.end_sessions_of(account, "user disabled", datetime.now(UTC)) if disabled else []
        self._changed(account, ended)
        self._log(actor, "update user", account, **values, sessions_ended=len(ended))
        return await self.get_user(account)

    async def reset_password(self, actor: str, email: str, password: str) -> None:
        """A new password; every session of the user ends."""
        account = normalize_email(email)
        check_new_password(password, account)
        password_hash = await asyncio.to_thread(hash_password, password)
        ended = await self._accounts.set_password(account, password_hash, datetime.now(UTC), keep_session=None)
        if ended is None:
            raise UserNotFoundError(email)
        self._changed(account, ended)
        self._log(actor, "reset password", account, sessions_ended=len(ended))

    def _changed(self, email: str, ended: list[str]) -> None:
        if self._on_changed is not None:
            self._on_changed(email, ended)

    @staticmethod
    def _log(actor: str, action: str, target: str, **details: object) -> None:
        logger.info("admin action: %s", action, extra={"actor": actor, "action": action, "target": target, **details})


def _today() -> date:
    return usage_day(datetime.now(UTC))

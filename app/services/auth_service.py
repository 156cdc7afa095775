"""Who may sign in, and the tokens that say so. Knows nothing of HTTP."""

import asyncio
import os
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta

from cachetools import TTLCache

from app.core.security import (
    BCRYPT_MAX_PASSWORD_BYTES,
    InvalidTokenError,
    create_access_token,
    decode_access_token,
    verify_password,
)
from app.core.text import has_control_character
from app.db.repository import Repository
from app.db.tables import UserRow
from app.services.errors import InvalidFieldError
from app.services.fair_turns import FairTurns, QueueFullError
from app.services.login_throttle import LoginThrottle, LoginThrottledError


@dataclass(frozen=True)
class User:
    email: str
    full_name: str


@dataclass(frozen=True)
class UserRecord:
    user: User
    password_hash: str


@dataclass(frozen=True)
class IssuedToken:
    access_token: str
    expires_in: int


class InvalidCredentialsError(Exception):
    """Unknown email or wrong password; deliberately the same error for both."""


class TooManySignInsAtOnceError(LoginThrottledError):
    message = "Too many sign-ins from this client at once; try again shortly."


class PasswordTooLongError(InvalidFieldError):
    location = ("body", "password")

    def __init__(self) -> None:
        super().__init__(f"password must be at most {BCRYPT_MAX_PASSWORD_BYTES} bytes (UTF-8)")


def _demo(email: str, full_name: str, password_hash: str) -> UserRecord:
    return UserRecord(User(email, full_name), password_hash)


# Seeded into the users table at start. Passwords (in the README): alice-wonderland, bob-builder.
DEMO_USERS: tuple[UserRecord, ...] = (
    _demo(
        "alice@myflix.dev",
        "Alice Liddell",
        "$2b$12$BF1eK8J0QozZDs7NeJarAOL4dkK4cjIdfu0XNEn8vnz9tg1czb0XO",
    ),
    _demo(
        "bob@myflix.dev",
        "Bob Builder",
        "$2b$12$P5quqE2LEDXsCYS9iJbezelikk0It0z21CzZaN.06DvwiCT5zR1I.",
    ),
)

# Verified against for unknown emails, so that they cost what a wrong password costs.
_DUMMY_HASH = "$2b$12$149OctSjYyZSdxO7E2PeruJ9Bnqr.EGFd3GVKcvozAI8lD4P5tJe."


def normalize_email(email: str) -> str:
    return email.strip().lower()


# Looks a user up by normalised email.
UserLookup = Callable[[str], Awaitable[UserRecord | None]]
USER_CACHE_SECONDS = 30.0
USER_CACHE_SIZE = 10_000


async def seed_demo_users(repository: Repository) -> None:
    await repository.seed_users(
        UserRow(email=r.user.email, full_name=r.user.full_name, password_hash=r.password_hash) for r in DEMO_USERS
    )


def stored_users(repository: Repository, cache_seconds: float = USER_CACHE_SECONDS) -> UserLookup:
    """Users from the database, each remembered for `cache_seconds`: every request checks its
    token's user, and a database round trip per request costs more than the rest of it."""
    cache: TTLCache[str, UserRecord | None] = TTLCache(maxsize=USER_CACHE_SIZE, ttl=cache_seconds)

    async def find_user(email: str) -> UserRecord | None:
        try:
            return cache[email]
        except KeyError:  # never looked up, or expired
            pass
        row = await repository.get_user(email)
        record = None if row is None else UserRecord(User(row.email, row.full_name), row.password_hash)
        cache[email] = record
        return record

    return find_user


def _yield_to_the_event_loop() -> None:
    """Run this thread at a lower priority (Linux: per thread), so that a burst of logins,
    which keeps every core busy, does not make the event loop wait for a core."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):  # not Linux, or not allowed: run at normal priority
        pass


# A client's sign-ins waiting for bcrypt, at most; more are refused at once (429) instead of
# holding their connections, which others need, for seconds each.
SIGN_INS_QUEUED_PER_CLIENT = 32


class AuthService:
    def __init__(
        self, find_user: UserLookup, jwt_secret: str, token_lifetime: timedelta, throttle: LoginThrottle
    ) -> None:
        self._find_user = find_user
        self._throttle = throttle
        self._jwt_secret = jwt_secret
        self._token_lifetime = token_lifetime
        # One thread more than cores, and one client holds a core less than there are (one at
        # least): a client's flood (unknown emails, each checked against the dummy hash) leaves
        # the others a core, and however many clients flood, the next client's check starts at
        # once on the spare thread instead of waiting for theirs to end. Known and unknown emails
        # take the same turns, so their timing stays the same.
        cores = os.cpu_count() or 1
        self._hashing = ThreadPoolExecutor(
            max_workers=cores + 1, thread_name_prefix="bcrypt", initializer=_yield_to_the_event_loop
        )
        self._hashing_turns = FairTurns(
            slots=cores + 1, per_key=max(1, cores - 1), queue_per_key=SIGN_INS_QUEUED_PER_CLIENT
        )

    async def login(self, email: str, password: str, client: str) -> IssuedToken:
        """`client` identifies the caller (its address) for throttling and for fair turns at bcrypt."""
        if len(password.encode("utf-8", "surrogatepass")) > BCRYPT_MAX_PASSWORD_BYTES:
            raise PasswordTooLongError
        account = normalize_email(email)
        # Counted as failed before the password is checked: concurrent guesses cannot all pass.
        attempt = await self._throttle.enter(account, client)
        try:
            # The turn comes before the user's lookup too: a flood's lookups would queue ahead
            # of everyone's at the database.
            await self._hashing_turns.acquire(client)
        except QueueFullError:
            await attempt.withdraw()
            raise TooManySignInsAtOnceError(retry_after=1) from None
        except BaseException:
            await attempt.withdraw()
            raise
        try:
            # No account has a control character (PostgreSQL would refuse a NUL): an unknown email.
            record = None if has_control_character(account) else await self._find_user(account)
            password_hash = record.password_hash if record else _DUMMY_HASH
            # bcrypt takes a fifth of a second of CPU: keep it off the event loop.
            checking = asyncio.get_running_loop().run_in_executor(
                self._hashing, verify_password, password, password_hash
            )
        except BaseException:
            self._hashing_turns.release(client)
            await attempt.withdraw()
            raise
        # The turn is held until the check ends, even if this request is canceled meanwhile.
        checking.add_done_callback(lambda _: self._hashing_turns.release(client))
        matches = await asyncio.shield(checking)
        if record is None or not matches:
            raise InvalidCredentialsError
        await attempt.succeeded()
        token = create_access_token(record.user.email, self._jwt_secret, self._token_lifetime)
        return IssuedToken(token, int(self._token_lifetime.total_seconds()))

    async def user_for_token(self, token: str) -> User:
        """Raise InvalidTokenError unless the token is valid and names a known user."""
        record = await self._find_user(decode_access_token(token, self._jwt_secret))
        if record is None:
            raise InvalidTokenError("unknown subject")
        return record.user

"""Dependencies shared by the routers, as `Annotated` aliases. All are `async def`: FastAPI
runs a plain `def` dependency on its thread pool, a thread hop per request for nothing."""

import ipaddress
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Query, Request
from fastapi.security import OAuth2PasswordBearer

from app.core.config import Settings
from app.core.security import ImageUrlSigner
from app.services.auth_service import AuthService, SignedIn, User
from app.services.health_service import HealthService
from app.services.image_store import ImageStore
from app.services.jobs.service import JobService
from app.services.jobs.views import ImageLinks
from app.services.stream_slots import StreamSlot, StreamSlots
from app.services.users_service import NotAnAdminError, UsersService, daily_quota

TOKEN_URL = "/api/auth/token"


async def get_app_settings(request: Request) -> Settings:
    # The app's own settings (each test app has its own); not a dependency override, which
    # would make FastAPI analyse every dependency's signature again on every request.
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]

_bearer = OAuth2PasswordBearer(tokenUrl=TOKEN_URL, auto_error=False)


class MissingTokenError(Exception):
    pass


async def get_auth_service(request: Request) -> AuthService:
    auth_service: AuthService = request.app.state.auth_service
    return auth_service


async def get_job_service(request: Request) -> JobService:
    service: JobService = request.app.state.job_service
    return service


async def get_users_service(request: Request) -> UsersService:
    users_service: UsersService = request.app.state.users_service
    return users_service


async def get_health_service(request: Request) -> HealthService:
    health_service: HealthService = request.app.state.health_service
    return health_service


async def get_image_store(request: Request) -> ImageStore:
    image_store: ImageStore = request.app.state.image_store
    return image_store


async def get_image_url_signer(request: Request) -> ImageUrlSigner:
    image_url_signer: ImageUrlSigner = request.app.state.image_url_signer
    return image_url_signer


AuthServiceDep = Annotated[AuthService, Depends(get_auth_service)]
UsersServiceDep = Annotated[UsersService, Depends(get_users_service)]
JobServiceDep = Annotated[JobService, Depends(get_job_service)]
HealthServiceDep = Annotated[HealthService, Depends(get_health_service)]
ImageStoreDep = Annotated[ImageStore, Depends(get_image_store)]
ImageUrlSignerDep = Annotated[ImageUrlSigner, Depends(get_image_url_signer)]


async def _signed_in(token: str | None, auth: AuthService) -> SignedIn:
    if not token:
        raise MissingTokenError
    return await auth.signed_in(token)


async def get_current_session(token: Annotated[str | None, Depends(_bearer)], auth: AuthServiceDep) -> SignedIn:
    return await _signed_in(token, auth)


CurrentSession = Annotated[SignedIn, Depends(get_current_session)]


async def get_current_user(session: CurrentSession) -> User:
    return session.user


async def get_admin(user: Annotated[User, Depends(get_current_user)]) -> User:
    if not user.is_admin:
        raise NotAnAdminError
    return user


async def get_daily_quota(user: Annotated[User, Depends(get_current_user)], settings: SettingsDep) -> int | None:
    """The caller's images per UTC day; None: unlimited."""
    return daily_quota(user, settings.DAILY_IMAGE_QUOTA)


async def get_stream_user(
    token: Annotated[str | None, Depends(_bearer)],
    auth: AuthServiceDep,
    access_token: Annotated[
        str | None,
        Query(description="The access token, for clients that cannot send headers (EventSource)."),
    ] = None,
) -> User:
    return (await _signed_in(token or access_token, auth)).user


async def get_image_links(request: Request, settings: SettingsDep, signer: ImageUrlSignerDep) -> ImageLinks:
    """Image links signed now, for where browsers reach this service: PUBLIC_BASE_URL, or the
    URL this request came to."""
    return ImageLinks(signer, settings.PUBLIC_BASE_URL or str(request.base_url))


async def get_client_address(request: Request) -> str:
    """The caller's address, as the server saw it: X-Forwarded-For counts only when the peer is
    one of FORWARDED_ALLOW_IPS (uvicorn's proxy headers, configured in app/core/http_server.py).
    An IPv6 client is its /64 network, since one host commonly holds a whole /64."""
    host = request.client.host if request.client else "unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:  # not an address (a test client's name, a proxy's odd header)
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


Links = Annotated[ImageLinks, Depends(get_image_links)]
ClientAddress = Annotated[str, Depends(get_client_address)]
CurrentUser = Annotated[User, Depends(get_current_user)]
AdminUser = Annotated[User, Depends(get_admin)]
DailyQuota = Annotated[int | None, Depends(get_daily_quota)]
StreamUser = Annotated[User, Depends(get_stream_user)]


async def get_stream_slot(request: Request, user: StreamUser) -> AsyncIterator[StreamSlot]:
    """The caller's place among their open streams, given back when the response ends,
    however it ends (done, error, the client gone, the server stopping): FastAPI leaves a
    dependency's `yield` only after the response has been sent."""
    slots: StreamSlots = request.app.state.stream_slots
    slot = slots.slot(user.email)
    try:
        yield slot
    finally:
        await slot.release()


StreamSlotDep = Annotated[StreamSlot, Depends(get_stream_slot)]

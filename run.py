"""Start the service: validate the settings, say what is active, run uvicorn."""

import sys

import uvicorn

from app.bootstrap import KEPT_JWT_SECRET_FILE
from app.core.config import S3Location, settings_or_exit
from app.core.http_server import server_config
from app.providers import create_provider
from app.services.auth_service import DEMO_USERS


def main() -> int:
    settings = settings_or_exit()
    try:
        provider = create_provider(settings)
    except ValueError as exc:
        print(f"Invalid settings: {exc}", file=sys.stderr)
        return 2
    provider.close()

    print(f"MyFlix backend ({settings.ENVIRONMENT}) on http://{settings.HOST}:{settings.PORT}")
    print(f"  image provider: {provider.name}, model {provider.model}")
    print(f"  demo users:     {', '.join(r.user.email for r in DEMO_USERS)} (passwords in the README)")
    print(f"  database:       {settings.database_url.split('@')[-1]}")
    store = settings.image_store_location
    print(f"  image store:    {store.url if isinstance(store, S3Location) else store} (links: {settings.IMAGE_LINKS})")
    if settings.uses_placeholder_secret:
        print(f"  token key:      made for this data directory ({settings.DATA_DIR / KEPT_JWT_SECRET_FILE})")
    print(f"  API docs:       http://{settings.HOST}:{settings.PORT}/docs", flush=True)

    uvicorn.Server(server_config("main:app", settings)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

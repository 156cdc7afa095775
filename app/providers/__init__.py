"""Image providers. A provider is a module here named after its `IMAGE_PROVIDER` value that
defines `create_provider(settings) -> ImageProvider`; adding one touches no other file."""

import importlib
import pkgutil

from app.core.config import Settings
from app.providers.base import ImageProvider

_NOT_PROVIDERS = {"base", "downloads", "http_abort"}


def available_providers() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _NOT_PROVIDERS)


def create_provider(settings: Settings) -> ImageProvider:
    name = settings.image_provider
    if name not in available_providers():
        raise ValueError(f"unknown IMAGE_PROVIDER {name!r}; available: {', '.join(available_providers())}")
    module = importlib.import_module(f"{__name__}.{name}")
    provider: ImageProvider = module.create_provider(settings)
    return provider

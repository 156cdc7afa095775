"""Errors shared by the services."""


class InvalidFieldError(ValueError):
    """A request field a service refuses; `location` names the field as the API does."""

    location: tuple[str, ...] = ()

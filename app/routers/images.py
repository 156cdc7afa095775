from typing import Annotated

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import FileResponse

from app.models.errors import error_responses
from app.routers.deps import ImageStoreDep, ImageUrlSignerDep
from app.services.image_store import MEDIA_TYPES, check_image_key, media_type_of

router = APIRouter(prefix="/api/images", tags=["images"])


@router.get(
    "/{key}",
    operation_id="getImage",
    response_class=FileResponse,
    responses={
        200: {
            "description": "The image",
            "content": {
                media_type: {"schema": {"type": "string", "format": "binary"}}
                for media_type in sorted(MEDIA_TYPES.values())
            },
        },
        304: {"description": "Not modified: the If-None-Match ETag still holds"},
        **error_responses(_403="Link expired or tampered with", _404="No such image"),
    },
)
async def get_image(
    key: str,
    store: ImageStoreDep,
    signer: ImageUrlSignerDep,
    expires: Annotated[int, Query()],
    signature: Annotated[str, Query(max_length=128)],
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """An image made by this service, by the signed link in a snapshot or event; no token
    needed, so an `<img src>` loads it. Keys are never reused, so the bytes never change."""
    check_image_key(key)
    remaining = signer.verify(key, expires, signature)
    path = store.path_of(key)
    headers = {"Cache-Control": f"private, max-age={remaining}, immutable", "ETag": f'"{key}"'}
    if if_none_match == headers["ETag"]:
        return Response(status_code=304, headers=headers)
    return FileResponse(path, media_type=media_type_of(key), headers=headers)

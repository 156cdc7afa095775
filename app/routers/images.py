from typing import Annotated

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse
from werkzeug.http import parse_etags, parse_range_header

from app.models.errors import error_responses
from app.routers.deps import ImageStoreDep, ImageUrlSignerDep, SettingsDep
from app.services.image_store import MEDIA_TYPES, check_image_key, media_type_of

router = APIRouter(prefix="/api/images", tags=["images"])

_IMAGE_CONTENT = {
    media_type: {"schema": {"type": "string", "format": "binary"}} for media_type in sorted(MEDIA_TYPES.values())
}


@router.get(
    "/{key}",
    operation_id="getImage",
    response_class=StreamingResponse,
    responses={
        200: {"description": "The image", "content": _IMAGE_CONTENT},
        206: {"description": "The bytes of the image that `Range` asked for", "content": _IMAGE_CONTENT},
        304: {"description": "Not modified: the If-None-Match ETag still holds"},
        307: {"description": "IMAGE_LINKS=presigned: the image at a presigned URL of the store"},
        **error_responses(
            _403="Link expired or tampered with",
            _404="No such image",
            _416="The `Range` lies outside the image",
            _503="The image store cannot be reached; see Retry-After",
        ),
    },
)
async def get_image(
    key: str,
    store: ImageStoreDep,
    signer: ImageUrlSignerDep,
    settings: SettingsDep,
    expires: Annotated[int, Query()],
    signature: Annotated[str, Query(max_length=128)],
    if_none_match: Annotated[str | None, Header(max_length=1024)] = None,
    range_header: Annotated[str | None, Header(alias="Range", max_length=1024)] = None,
    if_range: Annotated[str | None, Header(max_length=1024)] = None,
) -> Response:
    """An image made by this service, by the signed link in a snapshot or event; no token
    needed, so an `<img src>` loads it. Keys are never reused, so the bytes never change:
    `Range`, `If-Range` and `If-None-Match` work on its ETag."""
    check_image_key(key)
    remaining = signer.verify(key, expires, signature)
    etag = f'"{key}"'
    headers = {"Cache-Control": f"private, max-age={remaining}, immutable", "ETag": etag}
    if settings.IMAGE_LINKS == "presigned":
        await store.size_of(key)  # a deleted image is 404 here too, not a redirect to nothing
        return RedirectResponse(store.presigned_url(key, remaining), status_code=307, headers=headers)
    if if_none_match is not None and parse_etags(if_none_match).contains_weak(key):
        await store.size_of(key)
        return Response(status_code=304, headers=headers)
    byte_range = None
    # If-Range with another validator: the image has changed for the client; send it whole.
    requested = parse_range_header(range_header) if range_header and if_range in (None, etag) else None
    # Several ranges are answered with the whole image, as HTTP allows.
    if requested is not None and len(requested.ranges) == 1:
        size = await store.size_of(key)
        byte_range = requested.range_for_length(size)
        if byte_range is None:
            return JSONResponse(
                {"detail": f"Range not satisfiable: the image has {size} bytes"},
                status_code=416,
                headers={"Content-Range": f"bytes */{size}"},
            )
    content = await store.read(key, byte_range)
    headers["Accept-Ranges"] = "bytes"
    headers["Content-Length"] = str(content.end - content.start)
    if byte_range is not None:
        headers["Content-Range"] = f"bytes {content.start}-{content.end - 1}/{content.size}"
    return StreamingResponse(
        content.chunks, status_code=206 if byte_range else 200, headers=headers, media_type=media_type_of(key)
    )

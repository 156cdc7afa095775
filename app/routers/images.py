from fastapi import APIRouter
from fastapi.responses import FileResponse

from app.routers.deps import ImageStoreDep
from app.services.image_store import media_type_of

router = APIRouter(prefix="/api/images", tags=["images"])


@router.get("/{key}", response_class=FileResponse, responses={404: {"description": "No such image"}})
async def get_image(key: str, store: ImageStoreDep) -> FileResponse:
    """An image made by this service. Keys are never reused, so the file never changes."""
    path = store.path_of(key)
    return FileResponse(
        path,
        media_type=media_type_of(path.name),
        headers={"Cache-Control": "public, max-age=31536000, immutable"},
    )

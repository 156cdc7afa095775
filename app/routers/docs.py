"""The API docs, `/docs` (Swagger UI) and `/redoc` (ReDoc), with every asset served by this
service, so that they work with no network: Swagger UI from the swagger-ui-bundle-v2
package, ReDoc's standalone bundle (npm `redoc` 2.5.4, with its licenses) from
app/static/docs/redoc/."""

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path  # type: ignore[import-untyped]

from app.core.config import PROJECT_ROOT
from app.core.security_headers import docs_page_csp

SWAGGER_UI_URL = "/docs/swagger-ui"
DOCS_ASSETS_URL = "/docs/assets"
DOCS_ASSETS_DIR = PROJECT_ROOT / "app" / "static" / "docs"

router = APIRouter(include_in_schema=False)


def mount_assets(app: FastAPI) -> None:
    app.mount(SWAGGER_UI_URL, StaticFiles(directory=swagger_ui_path), name="swagger-ui")
    app.mount(DOCS_ASSETS_URL, StaticFiles(directory=DOCS_ASSETS_DIR), name="docs-assets")


def _with_csp(page: HTMLResponse, styles_by_script: bool = False) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = docs_page_csp(bytes(page.body).decode(), styles_by_script)
    return page


def _root(request: Request) -> str:
    root_path: str = request.scope.get("root_path", "")
    return root_path


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    root = _root(request)
    return _with_csp(
        get_swagger_ui_html(
            openapi_url=f"{root}{request.app.openapi_url}",
            title=f"{request.app.title} - Swagger UI",
            swagger_js_url=f"{root}{SWAGGER_UI_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{SWAGGER_UI_URL}/favicon-32x32.png",
            # No badge from the online validator: its image is fetched from swagger.io.
            swagger_ui_parameters={"validatorUrl": None},
        )
    )


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    root = _root(request)
    return _with_csp(
        get_redoc_html(
            openapi_url=f"{root}{request.app.openapi_url}",
            title=f"{request.app.title} - ReDoc",
            redoc_js_url=f"{root}{DOCS_ASSETS_URL}/redoc/redoc.standalone.js",
            redoc_favicon_url=f"{root}{SWAGGER_UI_URL}/favicon-32x32.png",
            with_google_fonts=False,
        ),
        styles_by_script=True,
    )

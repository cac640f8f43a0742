"""The review page's web server: a Starlette app over the index and the editor, run by uvicorn.

Every request must carry the random token printed with the URL (`?token=`, or the
`X-Sdprep-Token` header), else 403: the page can change the dataset, so another local user or a
web page in the same browser must not reach it. Bound to 127.0.0.1 unless `--host` says otherwise;
on loopback the Host header must name it too (a DNS-rebinding page cannot borrow the browser).
Nothing is fetched from the network: the page is the files in static/.
"""

from __future__ import annotations

import functools
import io
import json
import secrets
import socket
import threading
import webbrowser
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote

from sdprep.buckets import assign_bucket
from sdprep.config import from_dict
from sdprep.dataset import read_sidecar, sdprep_meta
from sdprep.errors import ConfigError, InstallError, JournalError, SdprepError
from sdprep.images import image_header, load_image
from sdprep.prep.review.edits import Editor, Recaption
from sdprep.prep.review.index import Entry, Filter, Index
from sdprep.prep.review.thumbs import thumbnail

if TYPE_CHECKING:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.types import ASGIApp, Receive, Scope, Send

Json = dict[str, Any]  # a request's JSON body, or an answer's

STATIC = Path(__file__).parent / "static"
JS = "text/javascript; charset=utf-8"
STATIC_TYPES = {"app.js": JS, "detail.js": JS, "panels.js": JS, "app.css": "text/css; charset=utf-8"}
WEB_IMAGE_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".bmp": "image/bmp",
}
LOOPBACK = "127.0.0.1"
TOKEN_HEADER = "x-sdprep-token"
MAX_BODY = 256 << 20  # a painted mask of a very large image
SCORES_SHOWN = 80
RECAPTION_KEYS = ("general_threshold", "character_threshold", "mcut", "merge")


# The JSON bodies' fields and what each must be (a missing field takes the handler's default).
# `paths`: a list of dataset-relative paths, or null for "every image".
BODY_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "text": (lambda v: isinstance(v, str), "a string"),
    "flag": (lambda v: isinstance(v, bool), "true or false"),
    "paths": (
        lambda v: v is None or (isinstance(v, list) and all(isinstance(p, str) for p in v)),
        "a list of paths or null",
    ),
}


def check_body(body: Any, fields: Mapping[str, str]) -> Json:
    """`body` when it is a JSON object whose `fields` (name -> a BODY_FIELDS kind) have their types;
    otherwise a ConfigError (answered 400) naming the field."""
    if not isinstance(body, dict):
        raise ConfigError(f"the request body must be a JSON object, got {type(body).__name__}")
    for name, kind in fields.items():
        if name in body:
            ok, wanted = BODY_FIELDS[kind]
            if not ok(body[name]):
                got = json.dumps(body[name])
                raise ConfigError(
                    f"{name}: expected {wanted}, got {got[:60]}{'...' if len(got) > 60 else ''}"
                )
    return body


def require_web_stack() -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise InstallError(
            f"sdprep review needs the review extra ({exc.name} is not installed)",
            "pip install 'sdprep[review]'",
        ) from None


class Guard:
    """ASGI middleware: 403 without the token, or with a Host header the server does not answer to."""

    def __init__(self, app: ASGIApp, token: str, hosts: set[str] | None) -> None:
        self.app, self.token, self.hosts = app, token, hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.allowed(scope):
            from starlette.responses import PlainTextResponse

            await PlainTextResponse("403: the URL's token is missing or wrong", 403)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def allowed(self, scope: Scope) -> bool:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.hosts is not None and headers.get("host", "") not in self.hosts:
            return False
        given = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [""])[0]
        given = given or headers.get(TOKEN_HEADER, "")
        return secrets.compare_digest(given.encode(), self.token.encode())


def _filter(params: Mapping[str, str]) -> Filter:
    def flag(name: str) -> bool:
        return params.get(name, "") in ("1", "true", "on")

    return Filter(params.get("tag", ""), params.get("q", ""), flag("mask"), flag("mono"), flag("problems"))


def _int(params: Mapping[str, str], name: str, default: int, top: int) -> int:
    try:
        return max(0, min(top, int(params.get(name, default))))
    except ValueError:
        return default


def detail(entry: Entry, index: Index) -> dict[str, Any]:
    """Everything the detail view shows of one image."""
    out = entry.to_json()
    try:
        meta = sdprep_meta(read_sidecar(entry.item))
    except SdprepError:
        meta = {}
    found = meta.get("wd14")
    wd14: Json = found if isinstance(found, dict) else {}
    scores = wd14.get("scores") or {}
    categories = wd14.get("categories") or {}
    top = sorted(scores.items(), key=lambda kv: -kv[1])[:SCORES_SHOWN]
    out["scores"] = [[t, s, categories.get(t, "general")] for t, s in top]
    out["rating"] = wd14.get("rating") or {}
    out["model"] = wd14.get("model")
    out["monochrome"] = meta.get("monochrome")
    if entry.size:
        a = assign_bucket(*entry.size, index.settings)
        s = a.scale
        out["bucket"] = {
            "size": list(a.bucket),
            "resized": list(a.resized),
            "crop": [round(v / s, 1) for v in a.crop_ltrb],  # in the image's own pixels
            "scale": round(s, 4),
            "dropped": a.dropped,
        }
    return out


def create_app(index: Index, editor: Editor, token: str, hosts: set[str] | None = None) -> Starlette:
    """The ASGI app of the review page for one dataset."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    def api(
        fn: Callable[[Request, Any], Response | Json], fields: Mapping[str, str] | None = None
    ) -> Callable[[Request], Awaitable[Response]]:
        """Library errors become JSON with the message and hint (409 while the dataset is busy).

        `fields`: the JSON body's fields and their kinds (`check_body`); a body of another shape is 400.
        """

        @functools.wraps(fn)
        async def endpoint(request: Request) -> Response:
            from starlette.concurrency import run_in_threadpool

            body = None
            try:
                if request.method == "POST":
                    raw = await request.body()
                    image = request.headers.get("content-type", "").startswith("image/")
                    body = raw if image else json.loads(raw or b"{}")
                    if not image and fields is not None:
                        body = check_body(body, fields)
                out = await run_in_threadpool(fn, request, body)
            except SdprepError as exc:
                status = 409 if isinstance(exc, JournalError) else 400
                return JSONResponse({"error": exc.message, "hint": exc.hint}, status)
            except json.JSONDecodeError as exc:
                return JSONResponse({"error": f"the request is not JSON: {exc}", "hint": None}, 400)
            return out if isinstance(out, Response) else JSONResponse(out)

        return endpoint

    def entry_of(request: Request) -> Entry:
        return editor.entry(request.query_params.get("path", ""))

    def page(request: Request, _body: Any) -> Response:
        html = (STATIC / "index.html").read_text(encoding="utf-8")
        name = index.root.name or str(index.root)
        html = html.replace("{{TOKEN}}", quote(token)).replace("{{NAME}}", _escape(name))
        return Response(html, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-store"})

    def static(request: Request, _body: Any) -> Response:
        name = request.path_params["name"]
        if name not in STATIC_TYPES:
            return Response("not found", 404)
        return Response((STATIC / name).read_bytes(), media_type=STATIC_TYPES[name])

    def items(request: Request, _body: Any) -> Json:
        p = request.query_params
        found = index.query(_filter(p))
        offset, limit = _int(p, "offset", 0, len(found)), _int(p, "limit", 100, 1000)
        return {
            "total": len(found),
            "offset": offset,
            "items": [e.to_json() for e in found[offset : offset + limit]],
        }

    def paths(request: Request, _body: Any) -> Json:
        return {"paths": [e.rel for e in index.query(_filter(request.query_params))]}

    def tags(request: Request, _body: Any) -> Json:
        flt = _filter(request.query_params)
        return {"tags": index.tag_counts(index.query(flt), keep=flt.tag)}

    def status(request: Request, _body: Any) -> Json:
        return {"images": len(index.entries), "root": str(index.root), "last": editor.last_operation()}

    def item(request: Request, _body: Any) -> Json:
        return detail(entry_of(request), index)

    def thumb(request: Request, _body: Any) -> Response:
        e = entry_of(request)
        data = thumbnail(index.root, e.rel, e.path)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})

    def image(request: Request, _body: Any) -> Response:
        e = entry_of(request)
        kind = WEB_IMAGE_TYPES.get(e.path.suffix.lower())
        if kind and not image_header(e.path, root=e.root).rotated:
            return Response(e.path.read_bytes(), media_type=kind, headers={"Cache-Control": "no-cache"})
        buf = io.BytesIO()  # other formats, and EXIF-rotated images: as displayed, in PNG
        load_image(e.path, "RGBA", root=e.root).save(buf, "PNG")
        return Response(buf.getvalue(), media_type="image/png", headers={"Cache-Control": "no-cache"})

    def mask(request: Request, _body: Any) -> Response:
        e = entry_of(request)
        path = e.item.mask_path()
        if not e.mask or not path.is_file():
            return Response("no mask", 404)
        buf = io.BytesIO()
        load_image(path, "L", root=e.root).save(buf, "PNG")
        return Response(buf.getvalue(), media_type="image/png", headers={"Cache-Control": "no-cache"})

    def post_caption(request: Request, body: Json) -> Json:
        return editor.set_caption(body.get("path", ""), body.get("caption", "")).to_json()

    def post_tags(request: Request, body: Json) -> Json:
        rels = body.get("paths")
        n = editor.edit_tags(body.get("action", ""), body.get("tag", ""), body.get("new", ""), rels)
        return {"changed": n}

    def post_exclude(request: Request, body: Json) -> Json:
        return {"moved": editor.exclude(list(body.get("paths") or []))}

    def post_mask(request: Request, body: bytes) -> Json:
        if not isinstance(body, bytes):
            raise ConfigError("the mask must be sent as an image (Content-Type: image/png)")
        e = entry_of(request)
        editor.save_mask(e.rel, body)
        return editor.entry(e.rel).to_json()

    def post_recaption(request: Request, body: Json) -> Json:
        opts = from_dict(Recaption, {k: body[k] for k in RECAPTION_KEYS if k in body}, where="recaption")
        return editor.recaption(opts, body.get("paths"), apply=bool(body.get("apply")))

    def post_rules(request: Request, body: Json) -> Json:
        return editor.rules(str(body.get("toml", "")), apply=bool(body.get("apply")))

    def post_undo(request: Request, body: Json) -> Json:
        return {"message": editor.undo()}

    routes = [
        Route("/", api(page)),
        Route("/static/{name}", api(static)),
        Route("/thumb", api(thumb)),
        Route("/image", api(image)),
        Route("/mask", api(mask)),
        Route("/api/items", api(items)),
        Route("/api/paths", api(paths)),
        Route("/api/tags", api(tags)),
        Route("/api/status", api(status)),
        Route("/api/item", api(item)),
        Route("/api/caption", api(post_caption, {"path": "text", "caption": "text"}), methods=["POST"]),
        Route(
            "/api/tags",
            api(post_tags, {"action": "text", "tag": "text", "new": "text", "paths": "paths"}),
            methods=["POST"],
        ),
        Route("/api/exclude", api(post_exclude, {"paths": "paths"}), methods=["POST"]),
        Route("/api/mask", api(post_mask), methods=["POST"]),
        Route("/api/recaption", api(post_recaption, {"paths": "paths", "apply": "flag"}), methods=["POST"]),
        Route("/api/rules", api(post_rules, {"toml": "text", "apply": "flag"}), methods=["POST"]),
        Route("/api/undo", api(post_undo, {}), methods=["POST"]),
    ]
    middleware = [Middleware(Guard, token=token, hosts=hosts)]
    return Starlette(routes=routes, middleware=middleware, max_body_size=MAX_BODY)


def _escape(text: str) -> str:
    import html

    return html.escape(text, quote=True)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port} ({exc.strerror})", "choose another --port"
        ) from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(
    root: Path,
    *,
    recursive: bool = False,
    host: str | None = None,
    port: int = 0,
    open_browser: bool = True,
    echo: Callable[[str], None] = print,
) -> None:
    """Index the dataset, print the page's URL, serve until Ctrl-C.

    `host` None binds 127.0.0.1 only; any other address must be asked for explicitly.
    """
    require_web_stack()
    import uvicorn

    from sdprep.dataset import require_images
    from sdprep.lock import dataset_lock

    root = require_images(Path(root).absolute(), recursive)
    with dataset_lock(root, "review"):  # refused now, with the holder named, if a command runs here
        pass
    index = Index(root, recursive)
    index.scan()
    token = secrets.token_urlsafe(24)
    sock = bind(host or LOOPBACK, port)
    bound = sock.getsockname()[1]
    hosts = None if host else {f"{LOOPBACK}:{bound}", f"localhost:{bound}"}
    shown = host or LOOPBACK
    url = f"http://{'[' + shown + ']' if ':' in shown else shown}:{bound}/?token={token}"
    app = create_app(index, Editor(index), token, hosts)
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    echo(f"review: {len(index.entries)} images of {root}")
    if host:
        echo(f"review: listening on {host}: anyone who can reach it and has the URL can change the dataset")
    echo(f"review: open {url}")
    echo("review: Ctrl-C stops the server")
    if open_browser:
        threading.Thread(target=_open_when_up, args=(server, url), daemon=True).start()
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn stops cleanly, then passes Ctrl-C on
        pass
    finally:
        sock.close()
    echo("review: stopped")


def _open_when_up(server: uvicorn.Server, url: str) -> None:
    import time

    for _ in range(200):
        if server.started:
            webbrowser.open(url)
            return
        time.sleep(0.05)

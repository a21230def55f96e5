"""`ldm serve`'s ASGI app (FastAPI, as A1111 itself): AUTOMATIC1111's /sdapi/v1 routes over the
one model worker, the web page at /, optional HTTP basic auth (A1111's --api-auth). Bad requests
are 422 with the message; a failing job answers 500 for itself and the server stays up."""
from __future__ import annotations

import asyncio
import json
import secrets
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Body, Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from . import a1111
from .a1111 import Img2ImgRequest, RequestError, Txt2ImgRequest
from .draw import draw, total_steps
from .models import Entry, find, scan
from .worker import ShuttingDown, Worker

PAGE = Path(__file__).with_name("page.html")


def parse_auth(spec: str | None) -> dict[str, str] | None:
    """`user:pass[,user2:pass2]` -> {user: pass}; ValueError that says how."""
    if not spec:
        return None
    pairs = [c.split(":", 1) for c in spec.split(",")]
    if not all(len(p) == 2 and p[0] and p[1] for p in pairs):
        raise ValueError(f"--api-auth {spec!r}: write user:password (several: user1:pw1,user2:pw2)")
    return dict(pairs)


def _auth_dependency(creds: dict[str, str] | None):
    security = HTTPBasic(auto_error=False)

    def check(given: HTTPBasicCredentials | None = Depends(security)) -> None:
        if creds is None:
            return
        ok = given is not None and given.username in creds and secrets.compare_digest(
            given.password.encode(), creds[given.username].encode())
        if not ok:
            raise HTTPException(401, "Incorrect username or password", headers={"WWW-Authenticate": "Basic"})
    return check


def create_app(model: Path | None = None, models_dir: Path | None = None, lora_dir: Path | None = None,
               device: str = "cpu", dtype: str = "float32", api_auth: str | None = None) -> FastAPI:
    """The app; the model loads once when the app starts (before it accepts requests)."""
    from ..checks import check_device
    from ..pipeline import Pipeline, default_model_path
    check_device(device)
    creds = parse_auth(api_auth)
    model = Path(model) if model is not None else default_model_path()
    if not model.exists():
        raise ValueError(f"--model {model}: no such file or folder")
    if models_dir is not None and not Path(models_dir).is_dir():
        raise ValueError(f"--models-dir {models_dir}: not a folder")
    models_dir, lora_dir = (Path(p) if p is not None else None for p in (models_dir, lora_dir))

    def load(entry: Entry):
        return Pipeline.from_pretrained(entry.path, device=device, dtype=dtype), entry

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.entries = scan(model, models_dir)
        app.state.worker = Worker(load, app.state.entries[0])
        yield
        await asyncio.to_thread(app.state.worker.stop)

    app = FastAPI(title="ldm serve", lifespan=lifespan, dependencies=[Depends(_auth_dependency(creds))])
    _add_error_handlers(app)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return PAGE.read_text(encoding="utf-8")

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(req: Txt2ImgRequest, request: Request):
        return await _generate(request, "txt2img", req, lora_dir)

    @app.post("/sdapi/v1/img2img")
    async def img2img(req: Img2ImgRequest, request: Request):
        return await _generate(request, "img2img", req, lora_dir)

    @app.get("/sdapi/v1/samplers")
    def samplers():
        return [dict(name=n, aliases=al, options=o) for n, (_, al, o) in a1111.SAMPLERS.items()]

    @app.get("/sdapi/v1/schedulers")
    def schedulers():
        return [dict(name=k, label=label, aliases=None, default_rho=7.0 if k == "karras" else -1.0,
                     need_inner_model=False) for k, (label, _) in a1111.SCHEDULERS.items()]

    @app.get("/sdapi/v1/sd-models")
    def sd_models(request: Request):
        return [e.item() for e in request.app.state.entries]

    @app.post("/sdapi/v1/refresh-checkpoints")
    def refresh_checkpoints(request: Request):
        request.app.state.entries = scan(model, models_dir)

    @app.get("/sdapi/v1/loras")
    def loras():
        files = sorted(lora_dir.glob("*.safetensors")) if lora_dir is not None else []
        return [dict(name=p.stem, alias=p.stem, path=str(p), metadata={}) for p in files]

    @app.get("/sdapi/v1/scripts")
    def scripts():
        return dict(txt2img=[], img2img=[])

    @app.get("/sdapi/v1/options")
    def get_options(request: Request):
        return dict(sd_model_checkpoint=request.app.state.worker.entry.title, sd_checkpoint_hash=None,
                    samples_format="png", eta_ddim=0.0, eta_ancestral=1.0, CLIP_stop_at_last_layers=1)

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request, options: dict = Body(...)):
        """Only sd_model_checkpoint changes anything here: the model switches in turn, after the
        jobs queued before it; other options are accepted and ignored."""
        name = options.get("sd_model_checkpoint")
        if name is not None:
            entry = find(request.app.state.entries, str(name))
            if entry != request.app.state.worker.entry:
                await _wait(request, request.app.state.worker.switch_model(entry))
        return None

    @app.get("/sdapi/v1/progress")
    def progress(request: Request, skip_current_image: bool = False):
        return request.app.state.worker.progress()

    @app.post("/sdapi/v1/interrupt")
    def interrupt(request: Request):
        request.app.state.worker.interrupt()
        return {}

    @app.post("/sdapi/v1/png-info")
    def png_info(body: dict = Body(...)):
        image = a1111.decode_image(str(body.get("image", "")), "image")
        items = {k: v for k, v in image.info.items() if isinstance(v, str)}
        info = items.pop("parameters", "")
        return dict(info=info, items=items, parameters=a1111.parse_infotext(info))

    return app


async def _wait(request: Request, job):
    """The job's result; a client that disconnects before the job's turn has it skipped."""
    future = asyncio.wrap_future(job.future)
    while True:
        done, _ = await asyncio.wait({future}, timeout=0.25)
        if done:
            return future.result()
        if not job.future.running() and await request.is_disconnected():
            job.abandoned = True
            raise HTTPException(499, "the client went away before its job ran")


async def _generate(request: Request, kind: str, req, lora_dir: Path | None) -> dict:
    spec = a1111.to_spec(req)                     # 422 now, before queueing, for what can't be drawn

    def run(worker):
        pipe, entry = worker.pipe, worker.entry
        worker.begin(total_steps(pipe, spec))
        return draw(pipe, entry.path, entry.hash, spec, lora_dir, worker.on_step), entry

    drawn, entry = await _wait(request, request.app.state.worker.submit(kind, run))
    n = len(spec.seeds)
    info = dict(prompt=req.prompt, all_prompts=[req.prompt] * n, negative_prompt=req.negative_prompt or "",
                all_negative_prompts=[req.negative_prompt or ""] * n, seed=spec.seeds[0], all_seeds=spec.seeds,
                subseed=-1, all_subseeds=[-1] * n, subseed_strength=0, width=spec.width, height=spec.height,
                sampler_name=spec.sampler_name, cfg_scale=spec.guidance_scale, steps=spec.steps,
                batch_size=spec.batch_size, restore_faces=False, face_restoration_model=None,
                sd_model_name=entry.path.stem, sd_model_hash=entry.hash, sd_vae_name=None, sd_vae_hash=None,
                seed_resize_from_w=-1, seed_resize_from_h=-1,
                denoising_strength=spec.strength if kind == "img2img" else spec.hires and spec.hires_strength,
                extra_generation_params={}, index_of_first_image=0, infotexts=drawn.infotexts,
                styles=req.styles or [], job_timestamp=time.strftime("%Y%m%d%H%M%S"), clip_skip=1,
                is_using_inpainting_conditioning=spec.mask is not None, version="ldm",
                interrupted=drawn.interrupted)
    parameters = req.model_dump()
    if kind == "img2img" and not req.include_init_images:     # as A1111: not echoed back
        parameters.update(init_images=None, mask=None)
    return dict(images=drawn.images if req.send_images else [], parameters=parameters, info=json.dumps(info))


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ValueError)          # RequestError and the library's checks
    async def bad_value(request, e):
        return JSONResponse({"detail": str(e)}, status_code=422)

    @app.exception_handler(TypeError)
    async def bad_type(request, e):
        return JSONResponse({"detail": str(e)}, status_code=422)

    @app.exception_handler(ShuttingDown)
    async def shutting_down(request, e):
        return JSONResponse({"detail": str(e)}, status_code=503)

    @app.exception_handler(Exception)
    async def failed(request, e):
        return JSONResponse({"error": type(e).__name__, "detail": str(e)}, status_code=500)


__all__ = ["create_app", "RequestError"]

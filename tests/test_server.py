"""`ldm serve`: a third-party A1111 client (webuiapi) against the server, images equal to
`ldm generate`'s, A1111's fields and defaults, 422 for bad values, model switching, progress,
interrupt and basic auth. The server runs in-process (uvicorn in a thread) on a tiny random model."""
import base64
import io
import json
import socket
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest
import requests
import uvicorn
import webuiapi
from PIL import Image

from ldm import Pipeline
from ldm.cli import main as cli
from ldm.server.app import create_app
from test_lora import files  # noqa: F401  the LoRA files fixture (kohya and PEFT, made with diffusers)
from tiny_models import random_model, tiny_sd1


@contextmanager
def running(app):
    """The app served by uvicorn in a thread on a free port; yields the port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs=dict(sockets=[sock]), daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the server failed to start"
        time.sleep(0.02)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


class Client:
    """requests to a running server by path (no httpx needed, unlike starlette's test client)."""

    def __init__(self, port: int):
        self.url, self.session = f"http://127.0.0.1:{port}", requests.Session()

    def get(self, path: str, **kw) -> requests.Response:
        return self.session.get(self.url + path, **kw)

    def post(self, path: str, **kw) -> requests.Response:
        return self.session.post(self.url + path, **kw)


@contextmanager
def serving(app):
    with running(app) as port:
        yield Client(port)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "tiny.safetensors"
    Pipeline(random_model(tiny_sd1())).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def port(model):
    with running(create_app(model)) as p:
        yield p


@pytest.fixture(scope="module")
def client(port):
    return Client(port)


def generate(model, tmp_path, *flags) -> Image.Image:
    out = tmp_path / f"cli-{len(list(tmp_path.iterdir()))}.png"
    assert cli(["generate", *flags, "-o", str(out), "--model", str(model), "-q"]) == 0
    return Image.open(out)


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


@pytest.mark.parametrize("sampler, scheduler, flags", [
    ("Euler", "automatic", ["--sampler", "euler"]),
    ("Euler a", "automatic", ["--sampler", "euler_ancestral"]),
    ("DPM++ 2M", "automatic", ["--sampler", "dpmpp_2m", "--karras"]),       # A1111 ≥ 1.9: Karras by default
    ("DPM++ 2M", "uniform", ["--sampler", "dpmpp_2m", "--no-karras"]),
    ("DPM++ 2M Karras", None, ["--sampler", "dpmpp_2m_karras"]),
])
def test_webuiapi_txt2img_equals_ldm_generate(model, port, tmp_path, sampler, scheduler, flags):
    api = webuiapi.WebUIApi(port=port)
    r = api.txt2img(prompt="a red circle", negative_prompt="blurry", seed=7, steps=3, cfg_scale=4.5, width=32,
                    height=16, sampler_name=sampler, scheduler=scheduler, batch_size=2)
    assert len(r.images) == 2 and r.info["all_seeds"] == [7, 8] and r.info["sampler_name"] == sampler.removesuffix(" Karras")
    for image, seed in zip(r.images, (7, 8)):
        ref = generate(model, tmp_path, "a red circle", "--negative", "blurry", "--seed", str(seed), "--steps", "3",
                       "--scale", "4.5", "--width", "32", "--height", "16", *flags)
        assert image.size == (32, 16) and same_pixels(image, ref)
        assert image.text["parameters"] == ref.text["parameters"]      # the PNG says what ldm generate's says
    assert not same_pixels(r.images[0], r.images[1])


def test_webuiapi_img2img_and_inpainting_equal_ldm_generate(model, port, tmp_path):
    init_path, mask_path = tmp_path / "init.png", tmp_path / "mask.png"
    init = generate(model, tmp_path, "a blue square", "--seed", "1", "--steps", "2", "--width", "32", "--height", "32")
    init.save(init_path)
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))
    mask.save(mask_path)
    api = webuiapi.WebUIApi(port=port)
    # webuiapi sends eta=1.0, which A1111 applies to DDIM
    r = api.img2img(images=[init], prompt="a green star", seed=3, steps=4, denoising_strength=0.6, width=32,
                    height=32, sampler_name="DDIM")
    ref = generate(model, tmp_path, "a green star", "--image", str(init_path), "--strength", "0.6", "--seed", "3",
                   "--steps", "4", "--sampler", "ddim", "--eta", "1.0", "--scale", "7")     # A1111's default cfg_scale
    assert same_pixels(r.images[0], ref) and not same_pixels(r.images[0], init)
    r = api.img2img(images=[init], mask_image=mask, prompt="a green star", seed=3, steps=4, denoising_strength=0.9,
                    width=32, height=32, sampler_name="Euler")
    ref = generate(model, tmp_path, "a green star", "--image", str(init_path), "--mask", str(mask_path),
                   "--strength", "0.9", "--seed", "3", "--steps", "4", "--sampler", "euler", "--scale", "7")
    assert same_pixels(r.images[0], ref) and r.info["is_using_inpainting_conditioning"] is True


def test_hires_fix_equals_ldm_generate_hires(model, client, tmp_path):
    r = client.post("/sdapi/v1/txt2img", json=dict(prompt="a cat", seed=2, steps=3, width=16, height=16,
                                                   enable_hr=True, hr_scale=2, denoising_strength=0.5,
                                                   hr_upscaler="Latent", sampler_name="Euler"))
    assert r.status_code == 200
    image = decode(r.json()["images"][0])
    ref = generate(model, tmp_path, "a cat", "--seed", "2", "--steps", "3", "--width", "16", "--height", "16",
                   "--hires", "2", "--hires-strength", "0.5", "--sampler", "euler", "--scale", "7")
    assert image.size == (32, 32) and same_pixels(image, ref)


def test_a1111_response_shapes(client):
    r = client.post("/sdapi/v1/txt2img", json=dict(prompt="x", steps=2, width=16, height=16, n_iter=2,
                                                   unknown_field={"ignored": True}, script_args=[1], styles=[]))
    assert r.status_code == 200
    body = r.json()
    info = json.loads(body["info"])                          # a JSON string, as A1111's
    assert 0 <= info["seed"] < 2 ** 32 and info["all_seeds"] == [info["seed"], info["seed"] + 1]
    assert len(body["images"]) == 2 and not body["images"][0].startswith("data:")
    assert body["parameters"]["cfg_scale"] == 7.0 and body["parameters"]["sampler_index"] == "Euler"
    assert len(info["infotexts"]) == 2 and f"Seed: {info['seed'] + 1}," in info["infotexts"][1]
    png = client.post("/sdapi/v1/png-info", json=dict(image=body["images"][0])).json()
    assert png["info"] == info["infotexts"][0] and png["items"]["seed"] == str(info["seed"])
    assert png["parameters"]["Seed"] == str(info["seed"]) and png["parameters"]["Size-1"] == "16"
    assert png["parameters"]["Prompt"] == "x" and png["parameters"]["Steps"] == "2"
    samplers = {s["name"]: s for s in client.get("/sdapi/v1/samplers").json()}
    assert {"Euler", "Euler a", "DPM++ 2M", "DDIM"} <= set(samplers)
    assert samplers["DPM++ 2M"]["options"] == {"scheduler": "karras"}
    assert "karras" in {s["name"] for s in client.get("/sdapi/v1/schedulers").json()}


@pytest.mark.parametrize("body, message", [
    (dict(steps=0), "greater than or equal to 1"),
    (dict(width=33), "width must be a positive multiple of 2"),
    (dict(sampler_name="DPM++ SDE"), "sampler 'DPM++ SDE' is not available"),
    (dict(scheduler="exponential"), "scheduler 'exponential' is not available"),
    (dict(sampler_name="Euler a", eta=0.5), "ldm draws the full ancestral noise only"),
    (dict(sampler_name="DDIM", scheduler="karras"), "karras=True applies to"),
    (dict(cfg_scale="high"), "valid number"),
    (dict(restore_faces=True), "restore_faces=True is not supported"),
])
def test_bad_values_are_422_and_the_server_stays_up(client, body, message):
    r = client.post("/sdapi/v1/txt2img", json=dict(prompt="x", steps=2, width=16, height=16) | body)
    assert r.status_code == 422 and message in json.dumps(r.json()), r.text
    r = client.post("/sdapi/v1/img2img", json=dict(prompt="x", steps=2, init_images=["bm90IGFuIGltYWdl"]))
    assert r.status_code == 422 and "init_images[0]: not a base64-encoded image" in r.text
    assert client.post("/sdapi/v1/txt2img", json=dict(prompt="x", steps=1, width=16, height=16)).status_code == 200


def test_options_switch_the_model(model, tmp_path, monkeypatch):
    other = tmp_path / "models" / "other.safetensors"
    other.parent.mkdir()
    Pipeline(random_model(tiny_sd1(), seed=1)).save_pretrained(other)
    with serving(create_app(model, models_dir=other.parent)) as c:
        titles = [m["title"] for m in c.get("/sdapi/v1/sd-models").json()]
        assert len(titles) == 2 and titles[0] == c.get("/sdapi/v1/options").json()["sd_model_checkpoint"]
        assert c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope"}).status_code == 422
        assert c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "other"}).status_code == 200
        assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == titles[1]
        r = c.post("/sdapi/v1/txt2img", json=dict(prompt="x", seed=4, steps=2, width=16, height=16))
    ref = generate(other, tmp_path, "x", "--seed", "4", "--steps", "2", "--width", "16", "--height", "16",
                   "--sampler", "euler", "--scale", "7")
    assert same_pixels(decode(r.json()["images"][0]), ref)
    assert json.loads(r.json()["info"])["sd_model_name"] == "other"


def test_progress_then_interrupt_stops_the_job(model, port):
    url = f"http://127.0.0.1:{port}/sdapi/v1"
    result = {}
    long = threading.Thread(target=lambda: result.update(r=requests.post(f"{url}/txt2img", json=dict(
        prompt="x", steps=1000, width=16, height=16, batch_size=3))))
    long.start()
    deadline = time.time() + 60
    while (p := requests.get(f"{url}/progress").json())["state"]["sampling_step"] < 5 and time.time() < deadline:
        time.sleep(0.05)
    assert 0 < p["progress"] < 1 and p["state"]["job"] == "txt2img" and p["state"]["sampling_steps"] == 3000
    assert p["eta_relative"] > 0
    assert requests.post(f"{url}/interrupt").status_code == 200
    long.join(60)
    r = result["r"]
    assert r.status_code == 200 and r.json()["images"] == [] and json.loads(r.json()["info"])["interrupted"]
    assert requests.get(f"{url}/progress").json()["state"]["job_count"] == 0
    after = requests.post(f"{url}/txt2img", json=dict(prompt="x", steps=2, width=16, height=16)).json()
    assert len(after["images"]) == 1


def test_api_auth(model):
    with running(create_app(model, api_auth="user:secret")) as p:
        url = f"http://127.0.0.1:{p}/sdapi/v1/options"
        r = requests.get(url)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Basic"
        assert requests.get(url, auth=("user", "wrong")).status_code == 401
        assert requests.get(url, auth=("user", "secret")).status_code == 200
        api = webuiapi.WebUIApi(port=p, username="user", password="secret")
        assert api.txt2img(prompt="x", steps=1, width=16, height=16).images[0].size == (16, 16)
    with pytest.raises(ValueError, match="write user:password"):
        create_app(model, api_auth="nopassword")


def test_lora_tags_merge_for_the_job_only(saved, files, tmp_path):
    model, root = saved["sd1"]["ldm"], files["sd1"]["root"]
    common = ["--seed", "5", "--steps", "2", "--sampler", "euler", "--scale", "7"]
    with serving(create_app(model, lora_dir=root)) as c:
        body = dict(seed=5, steps=2, sampler_name="Euler", width=32, height=32)
        tagged = c.post("/sdapi/v1/txt2img", json=dict(body, prompt="a cat <lora:kohya:0.5>")).json()
        plain = c.post("/sdapi/v1/txt2img", json=dict(body, prompt="a cat")).json()
        assert c.get("/sdapi/v1/loras").json()[0]["name"] == "kohya"
        missing = c.post("/sdapi/v1/txt2img", json=dict(body, prompt="a cat <lora:nope:1>"))
        assert missing.status_code == 422 and "nope.safetensors" in missing.text
    ref = generate(model, tmp_path, "a cat <lora:kohya:0.5>", "--lora-dir", str(root), *common)
    image = decode(tagged["images"][0])
    assert same_pixels(image, ref) and 'Lora hashes: "kohya: ' in image.text["parameters"]
    assert image.text["prompt"] == "a cat <lora:kohya:0.5>"
    assert same_pixels(decode(plain["images"][0]), generate(model, tmp_path, "a cat", *common))   # unloaded after

"""img2img and inpainting (4- and 9-channel): the same images as diffusers' img2img / inpaint pipelines
from the same weights and seed, built from the folder as it ships; bad input refused before any work."""
import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, PNDMScheduler, StableDiffusionImg2ImgPipeline,
                       StableDiffusionInpaintPipeline, StableDiffusionUpscalePipeline)
from PIL import Image

from ldm import Pipeline
from tiny_models import random_model, tiny_inpaint, tiny_upscaler

SCHEDULERS = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpmpp_2m": DPMSolverMultistepScheduler,
              "euler_ancestral": EulerAncestralDiscreteScheduler, "pndm": PNDMScheduler}
PIXEL_TOL = 1e-4     # as tests/test_pipeline.py: float64 vs float32 schedules leave ~1e-5
PROMPTS = ["a red circle to the left of a blue square", "two green stars"]


def picture(seed: int, size=(32, 32)) -> Image.Image:
    """A smooth random RGB picture (blobs, not noise), so the encoder's latents carry structure."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(low[None], size=size[::-1], mode="bicubic")[0].clamp(0, 1)
    return Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def left_half_mask(size=(32, 32)) -> Image.Image:
    m = np.zeros(size[::-1], dtype=np.uint8)
    m[:, : size[0] // 2] = 255                       # white = repaint
    return Image.fromarray(m)


def reference(cls, folder, sampler):
    ref = cls.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    ref.scheduler = SCHEDULERS[sampler].from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m", "pndm"])
@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_img2img_same_images_as_diffusers(saved, family, sampler, strength):
    ref = reference(StableDiffusionImg2ImgPipeline, saved[family]["diffusers"], sampler)
    ours = Pipeline.from_pretrained(saved[family]["diffusers"])
    kw = dict(image=[picture(0), picture(4)], strength=strength, guidance_scale=7.5)   # one per prompt
    a = ref(PROMPTS, num_inference_steps=7, generator=torch.Generator("cpu").manual_seed(3),
            output_type="np", **kw).images
    b = ours(PROMPTS, steps=7, seed=3, sampler=sampler, output_type="np", **kw)
    assert a.shape == b.shape == (2, 32, 32, 3) and a.std() > 0.05
    assert np.abs(a - b).max() <= PIXEL_TOL


def test_img2img_keeps_the_picture_at_low_strength_and_records_the_steps_run(saved):
    pipe = saved["sd1"]["pipe"]
    init = picture(1)
    low = pipe("x", image=init, strength=0.3, steps=10, seed=0)
    high = pipe("x", image=init, strength=1.0, steps=10, seed=0)
    start = np.asarray(pipe.decode_latents(pipe.encode_image(
        torch.from_numpy(np.asarray(init) / 127.5 - 1).permute(2, 0, 1)[None].float(), sample=False)).permute(0, 2, 3, 1)[0])
    gap = lambda im: np.abs(np.asarray(im, dtype=np.float32) / 127.5 - 1 - start).mean()  # noqa: E731
    assert gap(low[0]) < gap(high[0])
    assert low.request.record(0)["strength"] == 0.3 and low.request.steps_run == 3
    assert high.request.steps_run == 10


@pytest.mark.parametrize("sampler", ["ddim", "euler_ancestral", "dpmpp_2m", "pndm"])
@pytest.mark.parametrize("strength", [0.7, 1.0])
def test_inpainting_4_channel_model_same_images_as_diffusers(saved, family, sampler, strength):
    """Any 4-channel model inpaints by putting the known latents back after every step."""
    ref = reference(StableDiffusionInpaintPipeline, saved[family]["diffusers"], sampler)
    ours = Pipeline.from_pretrained(saved[family]["diffusers"])
    kw = dict(image=picture(2), mask_image=left_half_mask(), strength=strength, guidance_scale=6.0)
    a = ref(PROMPTS, num_inference_steps=6, height=32, width=32,
            generator=torch.Generator("cpu").manual_seed(5), output_type="np", **kw).images
    b = ours(PROMPTS, steps=6, seed=5, sampler=sampler, output_type="np", **kw)
    assert a.std() > 0.05 and np.abs(a - b).max() <= PIXEL_TOL


@pytest.fixture(scope="module")
def inpaint_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inpaint") / "diffusers"
    Pipeline(random_model(tiny_inpaint("sd1"))).save_pretrained(folder, "diffusers")
    return folder


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
@pytest.mark.parametrize("strength", [0.75, 1.0])
def test_inpainting_9_channel_model_same_images_as_diffusers(inpaint_model, sampler, strength):
    ref = reference(StableDiffusionInpaintPipeline, inpaint_model, sampler)
    ours = Pipeline.from_pretrained(inpaint_model)
    assert ours.config.unet.in_channels == 9
    kw = dict(image=picture(3), mask_image=left_half_mask(), strength=strength, guidance_scale=7.5)
    a = ref(PROMPTS[0], num_inference_steps=6, height=32, width=32,
            generator=torch.Generator("cpu").manual_seed(7), output_type="np", **kw).images
    b = ours(PROMPTS[0], steps=6, seed=7, sampler=sampler, output_type="np", **kw)
    assert a.std() > 0.05 and np.abs(a - b).max() <= PIXEL_TOL


def test_inpainting_9_channel_model_is_one_batched_call_per_step(inpaint_model):
    pipe = Pipeline.from_pretrained(inpaint_model)
    unet, batches = pipe.unet, []

    class Counting(torch.nn.Module):
        def forward(self, x, t, c):
            batches.append(tuple(x.shape[:2]))
            return unet(x, t, c)
    pipe.model.model.diffusion_model = Counting()
    pipe(["a", "b"], image=picture(0), mask_image=left_half_mask(), steps=3, seed=0, output_type="latent")
    assert batches == [(4, 9)] * 3                 # [null, prompt] × 2 images, 4 + 1 + 4 channels


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(mask_image=Image.new("L", (16, 32))), ValueError, "mask_image is 16×32 but the image is 32×32"),
    (dict(strength=0), ValueError, r"strength must be a number in \(0, 1\]"),
    (dict(strength=1.5), ValueError, r"strength must be a number in \(0, 1\]"),
    (dict(strength=0.05), ValueError, "leaves no step"),
    (dict(image=Image.new("RGBA", (32, 32))), ValueError, r"RGBA image; give an RGB one"),
    (dict(image=Image.new("RGB", (31, 32))), ValueError, "width must be .* nearest valid sizes are 30 and 32"),
    (dict(image=torch.full((1, 3, 32, 32), 3.0)), ValueError, r"values in \[-1, 1\]"),
    (dict(image=[picture(0)] * 3), ValueError, "3 images for 1 prompts"),
    (dict(height=64), ValueError, "differ from the image's size"),
    (dict(image="in.png"), TypeError, "must be a PIL image"),
])
def test_bad_image_input_is_refused_before_work(saved, kwargs, error, match):
    pipe = Pipeline.from_pretrained(saved["sd1"]["ldm"])
    pipe.model.model.diffusion_model = None                   # any UNet call fails differently
    pipe.model.first_stage_model = None                       # and so would any encoding
    kwargs = {"prompt": "a", "steps": 10, "image": picture(0), **kwargs}
    with pytest.raises(error, match=match):
        pipe(**kwargs)


def test_mask_or_strength_without_an_image_and_9_channels_without_a_mask(saved, inpaint_model):
    pipe = saved["sd1"]["pipe"]
    with pytest.raises(ValueError, match="pass image= too"):
        pipe("a", mask_image=left_half_mask(), steps=2)
    with pytest.raises(ValueError, match="pass image= too"):
        pipe("a", strength=0.5, steps=2)
    nine = Pipeline.from_pretrained(inpaint_model)
    with pytest.raises(ValueError, match="inpainting model .* pass mask_image="):
        nine("a", image=picture(0), steps=2)
    with pytest.raises(ValueError, match="inpainting model"):
        nine("a", steps=2)


@pytest.fixture(scope="module")
def upscaler(tmp_path_factory):
    folder = tmp_path_factory.mktemp("x4") / "diffusers"
    Pipeline(random_model(tiny_upscaler())).save_pretrained(folder, "diffusers")
    return folder


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_x4_upscaler_same_images_as_diffusers(upscaler, sampler):
    ref = reference(StableDiffusionUpscalePipeline, upscaler, sampler)
    ours = Pipeline.from_pretrained(upscaler)
    low = picture(6, (16, 12))
    kw = dict(image=low, noise_level=40, guidance_scale=9.0)
    a = ref(PROMPTS[0], num_inference_steps=5, generator=torch.Generator("cpu").manual_seed(2),
            output_type="np", **kw).images
    b = ours(PROMPTS[0], steps=5, seed=2, sampler=sampler, output_type="np", **kw)
    assert a.shape == b.shape == (1, 48, 64, 3) and a.std() > 0.05      # ×4 the 16×12 input
    assert np.abs(a - b).max() <= PIXEL_TOL
    images = ours(PROMPTS[0], steps=2, seed=2, **kw)
    assert images[0].size == (64, 48) and images.request.record(0)["noise_level"] == 40


def test_x4_upscaler_input_checks(upscaler):
    pipe = Pipeline.from_pretrained(upscaler)
    with pytest.raises(ValueError, match=r"noise_level must be an integer in \[0, 350\]"):
        pipe("a", image=picture(0, (16, 16)), noise_level=351)
    with pytest.raises(ValueError, match="upscaler model: pass image="):
        pipe("a")
    with pytest.raises(ValueError, match="not mask_image= or strength="):
        pipe("a", image=picture(0, (16, 16)), strength=0.5)
    with pytest.raises(ValueError, match="noise_level applies to upscaler models"):
        Pipeline(random_model(tiny_inpaint("sd1")))("a", image=picture(0), mask_image=left_half_mask(),
                                                    noise_level=20)

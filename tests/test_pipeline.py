"""Text-to-image end to end: same pictures as diffusers' StableDiffusionPipeline from the same
weights and seed; one batched UNet call per guided step; bad input refused before any work."""
import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, PNDMScheduler,
                       StableDiffusionPipeline)

from ldm import Pipeline

SCHEDULERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "pndm": PNDMScheduler, "dpmpp_2m": DPMSolverMultistepScheduler,
              "euler": EulerDiscreteScheduler, "euler_ancestral": EulerAncestralDiscreteScheduler}
# Both sides compute in float32 from the same weights and noise; schedules in float64 here and float32
# there leave ~1e-6 in the latents, ~1e-5 in the pixels (measured). 1e-4 fails on any real mismatch.
PIXEL_TOL = 1e-4


@pytest.fixture(scope="module")
def reference(saved):
    out = {}
    for family, s in saved.items():
        ref = StableDiffusionPipeline.from_pretrained(s["diffusers"], safety_checker=None)
        ref.set_progress_bar_config(disable=True)
        out[family] = ref
    return out


@pytest.mark.parametrize("sampler", sorted(SCHEDULERS))
def test_same_images_as_diffusers(saved, reference, family, sampler):
    ref, ours = reference[family], Pipeline.from_pretrained(saved[family]["diffusers"])
    ref.scheduler = SCHEDULERS[sampler].from_config(ref.scheduler.config)
    prompts = ["a red circle to the left of a blue square", "two green stars"]
    kw = dict(guidance_scale=7.5, height=48, width=32, num_images_per_prompt=2)   # non-square, 2 each
    a = ref(prompts, negative_prompt=["", "blurry"], num_inference_steps=6,
            generator=torch.Generator("cpu").manual_seed(3), output_type="np", **kw).images
    b = ours(prompts, negative_prompt=["", "blurry"], steps=6, seed=3, sampler=sampler, output_type="np", **kw)
    assert a.shape == b.shape == (4, 48, 32, 3)
    assert a.std() > 0.05                          # a real picture, not a constant
    assert np.abs(a - b).max() <= PIXEL_TOL


def test_karras_sigmas_match_diffusers(saved, reference):
    ref, ours = reference["sd1"], saved["sd1"]["pipe"]
    ref.scheduler = DPMSolverMultistepScheduler.from_config(ref.scheduler.config, use_karras_sigmas=True)
    a = ref("a cat", num_inference_steps=5, height=32, width=32,
            generator=torch.Generator("cpu").manual_seed(0), output_type="np").images
    b = ours("a cat", steps=5, height=32, width=32, seed=0, sampler="dpmpp_2m", karras=True, output_type="np")
    assert np.abs(a - b).max() <= PIXEL_TOL


class CountingUNet(torch.nn.Module):
    """Wraps a UNet, recording the batch size of every call."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.batches = unet, []

    def forward(self, x, t, context):
        self.batches.append(x.shape[0])
        return self.unet(x, t, context)


@pytest.fixture
def counted(saved):
    pipe = Pipeline.from_pretrained(saved["sd1"]["ldm"])
    counter = CountingUNet(pipe.unet)
    pipe.model.model.diffusion_model = counter
    return pipe, counter


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "euler", "euler_ancestral", "dpmpp_2m"])
def test_one_batched_unet_call_per_guided_step(counted, sampler):
    pipe, counter = counted
    pipe(["a", "b", "c"], steps=4, guidance_scale=5.0, seed=0, sampler=sampler, output_type="latent")
    assert counter.batches == [6] * 4


def test_scale_one_is_a_single_conditional_call(counted):
    pipe, counter = counted
    pipe(["a", "b"], steps=3, guidance_scale=1.0, seed=0, output_type="latent")
    assert counter.batches == [2] * 3


def test_guidance_scale_limits(saved):
    """s = 1 equals the conditional model alone; s = 0 equals the model on the null prompt."""
    pipe = saved["sd1"]["pipe"]
    kw = dict(steps=3, seed=5, output_type="latent")
    cond = pipe("a red circle", guidance_scale=1.0, **kw)
    uncond = pipe("", guidance_scale=1.0, **kw)
    guided_one = pipe("a red circle", negative_prompt="", guidance_scale=1.0 + 1e-9, **kw)
    guided_zero = pipe("a red circle", guidance_scale=0.0, **kw)
    assert torch.allclose(guided_one, cond, atol=1e-5)
    assert torch.allclose(guided_zero, uncond, atol=1e-5)
    assert not torch.allclose(cond, uncond, atol=1e-3)


def test_seed_reproducibility_and_latents(saved):
    pipe = saved["sd1"]["pipe"]
    a = pipe("x", steps=2, seed=11, output_type="latent")
    b = pipe("x", steps=2, seed=11, output_type="latent")
    c = pipe("x", steps=2, seed=12, output_type="latent")
    noise = torch.randn((1, 4, 16, 16), generator=torch.Generator("cpu").manual_seed(11))
    d = pipe("x", steps=2, latents=noise, output_type="latent")
    assert torch.equal(a, b) and torch.equal(a, d) and not torch.equal(a, c)


def test_outputs_and_parameters(saved):
    pipe = saved["sd1"]["pipe"]
    images = pipe(["p", "q"], steps=2, seed=1, num_images_per_prompt=2, negative_prompt="neg")
    assert len(images) == 4 and images[0].size == (32, 32)
    assert [i.info["prompt"] for i in images] == ["p", "p", "q", "q"]
    assert images[1].info["seed"] == 1 and images[1].info["negative_prompt"] == "neg"
    arr = pipe("p", steps=2, seed=1, output_type="np")
    assert arr.dtype == np.float32 and arr.shape == (1, 32, 32, 3) and 0 <= arr.min() and arr.max() <= 1
    assert np.array_equal(np.asarray(pipe("p", steps=2, seed=1)[0]), (arr[0] * 255).round().astype(np.uint8))


def test_null_prompt_encoded_once_per_call(saved, monkeypatch):
    pipe = Pipeline.from_pretrained(saved["sd1"]["ldm"])
    calls = []
    forward = pipe.text_encoder.forward
    monkeypatch.setattr(pipe.text_encoder, "forward", lambda tokens: calls.append(tokens.shape[0]) or forward(tokens))
    pipe(["a", "b", "c"], steps=5, seed=0, output_type="latent")
    assert calls == [3, 1]  # the prompts, then "" once — not per step, not per image


def test_long_prompt_truncated_with_one_warning(saved):
    with pytest.warns(UserWarning, match="dropped") as record:
        saved["sd1"]["pipe"]("word " * 100, steps=1, seed=0, output_type="latent")
    assert len([w for w in record if "dropped" in str(w.message)]) == 1


def test_nan_latents_raise_instead_of_black_image(saved):
    pipe = Pipeline.from_pretrained(saved["sd1"]["ldm"])
    with torch.no_grad():
        pipe.unet.out[2].bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="NaN"):
        pipe("a", steps=3, seed=0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(height=31), "height must be a positive multiple of 2, got 31; the nearest valid sizes are 30 and 32"),
    (dict(width=33), "nearest valid sizes are 32 and 34"),
    (dict(steps=0), "steps must be an integer"),
    (dict(guidance_scale=-1.0), "guidance_scale must be a finite number"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number"),
    (dict(prompt=[]), "empty list"),
    (dict(prompt=["a", "b"], negative_prompt=["x", "y", "z"]), "2 prompts but 3 negative prompts"),
    (dict(sampler="plms"), "choose one of ddpm, ddim, pndm, euler"),
    (dict(width=0), "width must be a positive multiple of 2, got 0; the nearest valid size is 2"),  # was `or`-ed away
    (dict(height=0), "height must be a positive multiple of 2, got 0"),
    (dict(height=-8), "got -8; the nearest valid size is 2"),
    (dict(steps=1.5), "steps must be an integer"),
    (dict(eta=5.0, sampler="ddim"), r"eta must be a number in \[0, 1\]"),               # was "math domain error"
    (dict(eta=0.5, sampler="euler"), "eta only applies to the ddim sampler"),
    (dict(karras=True, sampler="ddim"), "karras=True applies to"),
    (dict(seed=-1), "seed must be an integer"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt must be an integer"),
    (dict(height=100_000, width=100_000), "need at least .* GiB.*available.*smaller size"),
    (dict(latents=torch.zeros(1, 4, 8, 8)), r"latents must have shape \(1, 4, 16, 16\)"),
    (dict(output_type="tensor"), "output_type must be one of"),
])
def test_bad_input_is_refused_before_work(saved, kwargs, match):
    pipe = Pipeline.from_pretrained(saved["sd1"]["ldm"])
    pipe.model.model.diffusion_model = None  # any UNet call would fail with a different error
    kwargs = {"prompt": "a", "steps": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs)


def test_numpy_numbers_and_zero_seed_are_valid(saved):
    pipe = saved["sd1"]["pipe"]
    a = pipe("a", steps=np.int64(2), height=np.int32(16), width=np.int64(16), seed=np.uint8(0),
             guidance_scale=np.float32(3.0), num_images_per_prompt=np.int64(1), output_type="np")
    b = pipe("a", steps=2, height=16, width=16, seed=0, guidance_scale=3.0, output_type="np")
    assert np.array_equal(a, b) and a.shape == (1, 16, 16, 3)


def test_prompt_type_error(saved):
    with pytest.raises(TypeError, match="string or a list of strings"):
        saved["sd1"]["pipe"](123)


def test_guidance_wrappers_apply_after_cfg_in_order(saved):
    """A new guidance is a function model_fn -> model_fn in `guidance=`, not a new parameter."""
    pipe = saved["sd1"]["pipe"]
    seen = []

    def tag(name, factor):
        def wrap(model_fn):
            def wrapped(x, t):
                seen.append(name)
                return model_fn(x, t) * factor
            return wrapped
        return wrap
    kw = dict(steps=2, seed=4, output_type="latent", sampler="ddim")
    plain = pipe("a", **kw)
    same = pipe("a", guidance=[tag("a", 2.0), tag("b", 0.5)], **kw)    # ×2 then ×½: the same output
    assert seen == ["b", "a"] * 2                      # the last wrapper is the outermost, once per step
    assert torch.allclose(same, plain, atol=1e-6)
    assert not torch.allclose(pipe("a", guidance=[tag("c", 0.5)], **kw), plain, atol=1e-3)
    with pytest.raises(TypeError, match="model_fn -> model_fn"):
        pipe("a", guidance=["rescale"], **kw)


def test_images_carry_the_checked_settings(saved):
    pipe = saved["sd1"]["pipe"]
    images = pipe(["p", "q"], steps=2, guidance_scale=3.0, seed=9, sampler="dpmpp_2m", karras=True)
    req = images.request
    assert (req.steps, req.guidance_scale, req.seed, req.sampler_name) == (2, 3.0, 9, "dpmpp_2m_karras")
    assert req.record(1) == images[1].info and req.record(1)["prompt"] == "q"

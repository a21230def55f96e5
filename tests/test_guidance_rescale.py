"""CFG rescale (guidance_rescale, Lin et al. 2023 §3.4): same numbers as diffusers' rescale_noise_cfg,
in the wrapper, through Pipeline (same images as StableDiffusionPipeline) and from the command line."""
import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from PIL import Image

from ldm import Pipeline
from ldm.cli import main as cli
from ldm.guidance import cfg, classifier_free

B, L, D = 3, 5, 8


class FakeUNet:
    """A deterministic `unet(x, t, context)` whose outputs differ per sample in mean and std."""

    def __init__(self):
        self.batches = []
        self.proj = torch.randn(D, 4, generator=torch.Generator().manual_seed(0))

    def __call__(self, x, t, context):
        self.batches.append(x.shape[0])
        c = (context.mean(1) @ self.proj)[:, :, None, None]                  # (N, 4, 1, 1)
        return torch.tanh(x) * (1 + c.abs()) + c


def inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 4, 8, 8, generator=g)
    context, uncond = torch.randn(B, L, D, generator=g), torch.randn(B, L, D, generator=g)
    return x, torch.tensor([981] * B), context, uncond


@pytest.mark.parametrize("phi", [0.0, 0.3, 0.7, 1.0])
def test_matches_diffusers_rescale_noise_cfg(phi):
    unet, s = FakeUNet(), 7.5
    x, t, context, uncond = inputs()
    out = classifier_free(unet, context, uncond, s, cfg(s, phi))(x, t)
    assert unet.batches == [2 * B]                                  # still one batched forward
    out_u, out_c = unet(x, t, uncond), unet(x, t, context)
    expected = rescale_noise_cfg(out_u + s * (out_c - out_u), out_c, guidance_rescale=phi)
    assert torch.allclose(out, expected, atol=1e-5)


def test_zero_is_plain_cfg():
    x, t, context, uncond = inputs()
    plain = classifier_free(FakeUNet(), context, uncond, 7.5)(x, t)
    assert torch.equal(classifier_free(FakeUNet(), context, uncond, 7.5, cfg(7.5, 0.0))(x, t), plain)
    assert not torch.allclose(classifier_free(FakeUNet(), context, uncond, 7.5, cfg(7.5, 0.7))(x, t), plain, atol=1e-3)


def test_scale_at_most_one_is_not_rescaled():
    """As diffusers: rescale only with guidance (s > 1)."""
    x, t, context, uncond = inputs()
    for s in (0.5, 1.0):
        assert torch.equal(classifier_free(FakeUNet(), context, uncond, s, cfg(s, 1.0))(x, t),
                           classifier_free(FakeUNet(), context, uncond, s)(x, t))


def test_full_rescale_restores_the_conditional_std():
    unet = FakeUNet()
    x, t, context, uncond = inputs()
    out = classifier_free(unet, context, uncond, 7.5, cfg(7.5, 1.0))(x, t)
    out_c = unet(x, t, context)
    plain = classifier_free(unet, context, uncond, 7.5)(x, t)
    std = lambda a: a.flatten(1).std(1)  # noqa: E731  per sample (B,)
    assert torch.allclose(std(out), std(out_c), rtol=1e-5)
    assert (std(plain) > 1.5 * std(out_c)).all()                     # CFG had inflated it


@pytest.mark.parametrize("phi", [-0.1, 1.5, float("nan"), "0.7"])
def test_out_of_range_is_refused(phi):
    _, _, context, uncond = inputs()
    with pytest.raises(ValueError, match=r"guidance_rescale must be a finite number in \[0, 1\]"):
        classifier_free(FakeUNet(), context, uncond, 7.5, cfg(7.5, phi))


def test_pipeline_refuses_out_of_range_before_work(saved):
    pipe = Pipeline.from_pretrained(saved["sd1"]["ldm"])
    pipe.model.model.diffusion_model = None  # any UNet call would fail with a different error
    with pytest.raises(ValueError, match=r"guidance_rescale must be a finite number in \[0, 1\]"):
        pipe("a", steps=2, guidance_rescale=2.0)


def test_same_images_as_diffusers(saved, family):
    """ε (sd1) and v (sd2) models: rescale acts on the raw UNet output, as in diffusers."""
    ref = StableDiffusionPipeline.from_pretrained(saved[family]["diffusers"], safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ours = Pipeline.from_pretrained(saved[family]["diffusers"])
    prompts, kw = ["a red circle", "two green stars"], dict(guidance_scale=20.0, height=32, width=32)
    a = ref(prompts, num_inference_steps=5, generator=torch.Generator("cpu").manual_seed(3),
            output_type="np", guidance_rescale=0.7, **kw).images
    b = ours(prompts, steps=5, seed=3, sampler="euler", output_type="np", guidance_rescale=0.7, **kw)
    plain = ours(prompts, steps=5, seed=3, sampler="euler", output_type="np", **kw)
    assert a.std() > 0.05
    assert np.abs(a - b).max() <= 1e-4          # float32 rounding only (see test_pipeline.PIXEL_TOL)
    assert np.abs(plain - b).max() > 5 / 255    # the option did far more than the tolerance


def test_cli_flag_reaches_the_pipeline(saved, tmp_path, capsys):
    model, out = saved["sd1"]["ldm"], tmp_path / "img.png"
    assert cli(["generate", "a red circle", "-o", str(out), "--model", str(model), "--steps", "3",
                "--seed", "7", "--scale", "9", "--guidance-rescale", "0.7", "-q"]) == 0
    img = Image.open(out)
    assert img.text["guidance_rescale"] == "0.7" and "CFG rescale: 0.7" in img.text["parameters"]
    ref = Pipeline.from_pretrained(model)("a red circle", steps=3, seed=7, guidance_scale=9.0,
                                          guidance_rescale=0.7)[0]
    assert np.array_equal(np.asarray(img), np.asarray(ref))
    assert cli(["generate", "x", "-o", str(tmp_path / "b.png"), "--model", str(model),
                "--guidance-rescale", "1.5", "-q"]) == 2
    assert "guidance_rescale must be a finite number in [0, 1]" in capsys.readouterr().err

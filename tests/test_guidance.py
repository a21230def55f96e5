"""ldm.guidance: classifier-free guidance batching and limits, classifier / score-gradient guidance."""
import pytest
import torch

from ldm.config import ScheduleConfig
from ldm.guidance import classifier_free, classifier_guidance, gradient_of
from ldm.samplers import sample
from ldm.schedule import alphas_cumprod

B, L, D = 2, 5, 8


class CountingUNet:
    """A fake `unet(x, t, context)` that records the batch of every call."""

    def __init__(self):
        self.calls = []
        self.proj = torch.randn(D, 4, generator=torch.Generator().manual_seed(0))

    def __call__(self, x, t, context):
        self.calls.append(dict(batch=x.shape[0], t=t.clone(), context=context.clone()))
        c = (context.mean(1) @ self.proj)[:, :, None, None]                  # (N, 4, 1, 1)
        return torch.tanh(x) * torch.cos(t.float() / 300).reshape(-1, 1, 1, 1) + c


def inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 4, 8, 8, generator=g)
    context, uncond = torch.randn(B, L, D, generator=g), torch.randn(B, L, D, generator=g)
    return x, torch.tensor([981, 981]), context, uncond


def test_cfg_is_one_batched_call_in_uncond_cond_order():
    unet = CountingUNet()
    x, t, context, uncond = inputs()
    out = classifier_free(unet, context, uncond, 7.5)(x, t)
    (call,) = unet.calls
    assert call["batch"] == 2 * B and torch.equal(call["t"], torch.cat([t, t]))
    assert torch.equal(call["context"], torch.cat([uncond, context]))
    out_u, out_c = unet(x, t, uncond), unet(x, t, context)
    assert torch.allclose(out, out_u + 7.5 * (out_c - out_u), atol=1e-6)


def test_cfg_scale_one_is_the_conditional_model_in_one_b_batch_call():
    unet = CountingUNet()
    x, t, context, uncond = inputs()
    out = classifier_free(unet, context, uncond, 1.0)(x, t)
    assert [c["batch"] for c in unet.calls] == [B]
    assert torch.equal(out, unet(x, t, context))


def test_cfg_scale_zero_is_the_unconditional_model():
    unet = CountingUNet()
    x, t, context, uncond = inputs()
    assert torch.allclose(classifier_free(unet, context, uncond, 0.0)(x, t), unet(x, t, uncond), atol=1e-6)


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "euler"])
def test_one_unet_call_of_batch_2b_per_step(name):
    unet = CountingUNet()
    x, _, context, uncond = inputs()
    sample(name, classifier_free(unet, context, uncond, 5.0), x, ScheduleConfig(), 6)
    assert [c["batch"] for c in unet.calls] == [2 * B] * 6


def test_cfg_shape_mismatch_raises():
    x, t, context, uncond = inputs()
    with pytest.raises(ValueError, match="same shape"):
        classifier_free(CountingUNet(), context, uncond[:1], 7.5)


def test_gradient_of_works_under_no_grad():
    mu = torch.full((B, 4, 8, 8), 0.3)
    log_prob = lambda x, t: -0.5 * ((x - mu) ** 2).flatten(1).sum(1)  # noqa: E731  (B,)
    x, t, _, _ = inputs()
    with torch.no_grad():
        grad = gradient_of(log_prob)(x, t)
    assert torch.allclose(grad, mu - x, atol=1e-6)


def test_classifier_guidance_shifts_eps_by_scaled_gradient():
    """ε̂ = ε − s √(1−ᾱ_t) ∇ log p(y | x_t) (Dhariwal & Nichol, Alg. 2)."""
    ac = alphas_cumprod(ScheduleConfig())
    x, _, _, _ = inputs()
    t = torch.tensor([10, 900])
    eps_fn = lambda x, t: 0.5 * x  # noqa: E731
    grad_fn = lambda x, t: torch.ones_like(x)  # noqa: E731
    out = classifier_guidance(eps_fn, grad_fn, ac, 3.0)(x, t)
    expected = 0.5 * x - 3.0 * (1 - ac[t]).sqrt().float().reshape(-1, 1, 1, 1)
    assert torch.allclose(out, expected, atol=1e-6)
    t_float = t.float()  # Euler's fractional timesteps: integer values give the same ᾱ
    assert torch.allclose(classifier_guidance(eps_fn, grad_fn, ac, 3.0)(x, t_float), expected, atol=1e-6)
    assert torch.equal(classifier_guidance(eps_fn, grad_fn, ac, 0.0)(x, t), eps_fn(x, t))


def test_classifier_guidance_pulls_samples_toward_the_class():
    """Data N(0, 0.5²) with its optimal ε, and log p(y|x_t) = −‖x_t − m‖²/2: guidance moves the sample
    mean from 0 toward m = 1, further for a larger scale."""
    ac = alphas_cumprod(ScheduleConfig())

    def eps_fn(x, t):  # ε*(x_t, t) = √(1−ᾱ) x_t / (ᾱ σ_d² + 1 − ᾱ)
        a = ac[t].float().reshape(-1, 1, 1, 1)
        return (1 - a).sqrt() * x / (a * 0.25 + 1 - a)
    grad_fn = gradient_of(lambda x, t: -0.5 * ((x - 1.0) ** 2).flatten(1).sum(1))
    noise = torch.randn(256, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    means = [sample("ddim", classifier_guidance(eps_fn, grad_fn, ac, s), noise, ScheduleConfig(), 20).mean().item()
             for s in (0.0, 0.5, 2.0)]
    assert abs(means[0]) < 0.05 and means[0] + 0.1 < means[1] < means[2] - 0.1 and means[2] < 1.0, means

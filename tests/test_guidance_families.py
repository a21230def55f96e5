"""The three guidance families against closed forms on a Gaussian toy.

Data z0 ~ N(μ, σ² I), so at step t the marginal is N(√ᾱ μ, v I), v = ᾱσ² + 1 − ᾱ, and the exact
ε-prediction is ε(z) = √(1−ᾱ) (z − √ᾱ μ) / v (ε = −√(1−ᾱ) ∇ log p_t). A density
p_t(z) · Π q_k(z)^w_k with Gaussian factors is again Gaussian, so each family's guided ε must be the ε of a Gaussian
whose mean and variance are known: that is what the tests check, with independent formulas.
"""
import math

import pytest
import torch

from ldm.config import ScheduleConfig
from ldm.guidance import classifier_free, classifier_guidance, gradient_of
from ldm.samplers import sample
from ldm.schedule import alphas_cumprod
from ldm.semantic_guidance import clip_guidance, clip_image_score, clip_text_score, semantic_guidance

AC = alphas_cumprod(ScheduleConfig())
SHAPE = (2, 4, 3, 3)
G = torch.Generator().manual_seed(0)
MU, SIGMA = torch.randn(SHAPE[1:], generator=G, dtype=torch.float64), 0.7


def exact_eps(mu, sigma):
    """The ε-prediction of the data N(mu, sigma² I), at integer or fractional t."""
    def eps(z, t):
        a = _alpha_bar(t, z)
        return (1 - a).sqrt() * (z - a.sqrt() * mu) / (a * sigma ** 2 + 1 - a)
    return eps


def _alpha_bar(t, z):
    """ᾱ at t: table for integer t; for fractional t the log-σ interpolation (independent of ldm's)."""
    if not t.is_floating_point():
        a = AC[t].double()
    else:
        log_sigma = ((1 - AC) / AC).sqrt().log()
        lo = t.floor().long().clamp(max=len(AC) - 2)
        w = t.double() - lo
        sigma = ((1 - w) * log_sigma[lo] + w * log_sigma[lo + 1]).exp()
        a = 1 / (1 + sigma ** 2)
    return a.reshape(-1, *(1,) * (z.ndim - 1))


def gaussian_eps(z, a, mean, var):
    """ε of N(mean, var I) at noise level ᾱ = a: √(1−ᾱ) (z − mean) / var."""
    return (1 - a).sqrt() * (z - mean) / var


def state(t):
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return z, torch.tensor([t, t]) if isinstance(t, int) else torch.tensor([t, t], dtype=torch.float64)


@pytest.mark.parametrize("t", [999, 500, 40, 617.3])
@pytest.mark.parametrize("s", [1.0, 3.0])
def test_classifier_guidance_is_the_eps_of_the_tilted_gaussian(t, s):
    """log p(y | z_t) = −|z_t − m|² / 2ρ²: p_t(z) p(y|z)^s is N(m', v') with 1/v' = 1/v + s/ρ²."""
    m, rho = torch.randn(SHAPE[1:], generator=torch.Generator().manual_seed(2), dtype=torch.float64), 1.3
    z, tt = state(t)
    log_p = lambda x, t: -0.5 * ((x - m) ** 2).flatten(1).sum(1) / rho ** 2          # noqa: E731  (B,)
    guided = classifier_guidance(exact_eps(MU, SIGMA), gradient_of(log_p), AC, s)(z, tt)
    a = _alpha_bar(tt, z)
    v = a * SIGMA ** 2 + 1 - a
    v_post = 1 / (1 / v + s / rho ** 2)
    m_post = v_post * (a.sqrt() * MU / v + s * m / rho ** 2)
    tol = 1e-9 if isinstance(t, int) else 1e-5          # ldm interpolates σ at fractional t in float32
    torch.testing.assert_close(guided, gaussian_eps(z, a, m_post, v_post), rtol=tol, atol=tol)


@pytest.mark.parametrize("w", [0.0, 1.0, 4.0, 7.5])
def test_classifier_free_guidance_is_the_eps_of_p_uncond_to_1_minus_w_times_p_cond_to_w(w):
    """p_t(z)^(1−w) p_t(z|y)^w of two Gaussians is N(m_w, v_w): 1/v_w = (1−w)/v0 + w/v1 (positive here)."""
    mu0, s0 = torch.zeros(SHAPE[1:], dtype=torch.float64), 1.0          # the unconditional data
    mu1, s1 = MU, SIGMA                                                 # the data of condition y

    def unet(x, t, context):                                            # context (N, 1, 1): 0 = ∅, 1 = y
        c = context.reshape(-1, 1, 1, 1)
        return c * exact_eps(mu1, s1)(x, t) + (1 - c) * exact_eps(mu0, s0)(x, t)
    z, t = state(300)
    cond, null = torch.ones(2, 1, 1, dtype=torch.float64), torch.zeros(2, 1, 1, dtype=torch.float64)
    guided = classifier_free(unet, cond, null, w)(z, t)
    a = _alpha_bar(t, z)
    v0, v1 = a * s0 ** 2 + 1 - a, a * s1 ** 2 + 1 - a
    v_w = 1 / ((1 - w) / v0 + w / v1)
    m_w = v_w * ((1 - w) * a.sqrt() * mu0 / v0 + w * a.sqrt() * mu1 / v1)
    torch.testing.assert_close(guided, gaussian_eps(z, a, m_w, v_w), rtol=1e-9, atol=1e-9)


class LinearDecoder:
    """D(z) = W z + b per pixel (C -> 3 channels), counting its calls."""

    def __init__(self):
        g = torch.Generator().manual_seed(3)
        self.w = torch.randn(3, SHAPE[1], generator=g, dtype=torch.float64)
        self.b = torch.randn(3, 1, 1, generator=g, dtype=torch.float64)
        self.calls = 0

    def __call__(self, z):
        self.calls += 1
        return torch.einsum("oc,bchw->bohw", self.w, z) + self.b

    def adjoint(self, x):
        return torch.einsum("oc,bohw->bchw", self.w, x)


@pytest.mark.parametrize("through_model", [False, True])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_semantic_guidance_follows_the_score_of_the_decoded_posterior_mean(through_model, prediction_type):
    """score(x) = −|x − c|² / 2τ² of the picture D(x̂0): x̂0 = E[z0 | z_t] = μ + √ᾱσ²(z − √ᾱμ)/v
    (Tweedie), ∇_z score = J Wᵀ (c − D(x̂0)) / τ², J = 1/√ᾱ (model held fixed) or √ᾱσ²/v (through it)."""
    decoder, s, tau = LinearDecoder(), 2.5, 0.8
    target = torch.randn(3, *SHAPE[2:], generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    score = lambda x: -0.5 * ((x - target) ** 2).flatten(1).sum(1) / tau ** 2          # noqa: E731
    eps_fn = exact_eps(MU, SIGMA)
    if prediction_type == "epsilon":
        model_fn = eps_fn
    else:                                                   # v = √ᾱ ε − √(1−ᾱ) x0 of the same model
        def model_fn(z, t):
            a = _alpha_bar(t, z)
            e = eps_fn(z, t)
            return a.sqrt() * e - (1 - a).sqrt() * (z - (1 - a).sqrt() * e) / a.sqrt()
    z, t = state(450)
    out = semantic_guidance(model_fn, score, decoder, AC, s, prediction_type=prediction_type,
                            through_model=through_model)(z, t)
    a = _alpha_bar(t, z)
    v = a * SIGMA ** 2 + 1 - a
    x0 = MU + a.sqrt() * SIGMA ** 2 * (z - a.sqrt() * MU) / v
    jac = a.sqrt() * SIGMA ** 2 / v if through_model else 1 / a.sqrt()
    grad = jac * decoder.adjoint(target - decoder(x0)) / tau ** 2
    expected_eps = eps_fn(z, t) - s * (1 - a).sqrt() * grad
    got_eps = out if prediction_type == "epsilon" else a.sqrt() * out + (1 - a).sqrt() * z   # ε from v
    torch.testing.assert_close(got_eps, expected_eps, rtol=1e-9, atol=1e-9)


def test_semantic_guidance_every_k_steps_and_checkpointed_decoder():
    """every=2 on a 6-step run: the decoder runs on steps 0, 2, 4 only — twice each when checkpointed
    (forward, then recomputed in the backward pass), once without; and a second run starts over."""
    for checkpointed, per_step in ((True, 2), (False, 1)):
        decoder = LinearDecoder()
        wrap = semantic_guidance(exact_eps(MU, SIGMA).__call__, lambda x: -(x ** 2).flatten(1).sum(1), decoder,
                                 AC, 1.0, every=2, checkpoint_decoder=checkpointed)
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        for run in range(2):
            sample("ddim", wrap, z.float().double(), ScheduleConfig(), 6)
            assert decoder.calls == 3 * per_step * (run + 1)


def test_semantic_guidance_scale_zero_is_the_model():
    z, t = state(200)
    decoder = LinearDecoder()
    out = semantic_guidance(exact_eps(MU, SIGMA), lambda x: x.sum((1, 2, 3)), decoder, AC, 0.0)(z, t)
    assert torch.equal(out, exact_eps(MU, SIGMA)(z, t)) and decoder.calls == 0


def tiny_clip(seed: int = 0):
    """A random open_clip CLIP (32-px ViT, 1 layer per tower) and the real BPE tokenizer (offline)."""
    import open_clip
    torch.manual_seed(seed)
    vision = dict(layers=1, width=32, patch_size=8, image_size=32, head_width=16)
    text = dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)
    return open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text).eval(), open_clip.get_tokenizer("ViT-B-32")


def test_clip_scores_are_the_cosines_and_give_a_gradient():
    model, tokenizer = tiny_clip()
    pictures = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(6)) * 2 - 1
    prompts = ["a red circle", "two blue squares"]
    text_score = clip_text_score(model, tokenizer, prompts)
    x = torch.nn.functional.interpolate((pictures + 1) / 2, size=(32, 32), mode="bicubic", antialias=True)
    x = (x - torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]) / torch.tensor(
        [0.26862954, 0.26130258, 0.27577711])[:, None, None]
    with torch.no_grad():
        img, txt = model.encode_image(x), model.encode_text(tokenizer(prompts))
    torch.testing.assert_close(text_score(pictures), torch.cosine_similarity(img, txt), rtol=1e-5, atol=1e-6)
    image_score = clip_image_score(model, pictures[:1])
    torch.testing.assert_close(image_score(pictures[:1]), torch.ones(1), rtol=1e-5, atol=1e-5)
    p = pictures.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(text_score(p).sum(), p)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_clip_guidance_through_a_pipeline_moves_the_image_towards_the_prompt(saved):
    """A tiny random pipeline and CLIP: guidance raises the CLIP similarity of the picture it draws."""
    pipe = saved["sd1"]["pipe"]
    model, tokenizer = tiny_clip()
    score = clip_text_score(model, tokenizer, ["a red circle"])
    kw = dict(steps=4, guidance_scale=1.0, height=32, width=32, seed=0, sampler="ddim", output_type="np")
    plain = torch.from_numpy(pipe("a red circle", **kw)).permute(0, 3, 1, 2) * 2 - 1
    guided = torch.from_numpy(pipe("a red circle", guidance=[clip_guidance(pipe, score, 400.0)], **kw)
                              ).permute(0, 3, 1, 2) * 2 - 1
    assert math.isfinite(float(guided.sum())) and not torch.allclose(guided, plain)
    with torch.no_grad():
        assert float(score(guided.float())) > float(score(plain.float()))

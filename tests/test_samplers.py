"""ldm.samplers: step-for-step parity with diffusers' schedulers, analytic Gaussian checks, guards."""
import math
from dataclasses import replace

import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, PNDMScheduler)

from ldm.config import ScheduleConfig
from ldm.grids import vp_grid
from ldm.samplers import SAMPLERS, ddim, ddpm, effective_name, sample
from ldm.schedule import alphas_cumprod, sampling_timesteps, sigmas_from_alphas_cumprod, t_to_sigma

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 notes from diffusers

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
          steps_offset=1)
SHAPE = (2, 4, 8, 8)


def model_fn(x, t):
    """A fixed nonlinear stand-in for the UNet."""
    tt = t.float().reshape(-1, 1, 1, 1)
    return 0.6 * torch.tanh(x) * torch.cos(tt / 300) + 0.2 * x * torch.sin(tt / 170) + 0.05 * torch.sin(tt / 50)


def noise_and_generator():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)), torch.Generator().manual_seed(3)


def run_diffusers(sched, noise, num_steps, generator, **step_kwargs):
    """The StableDiffusionPipeline denoising loop."""
    if sched.num_inference_steps is None:
        sched.set_timesteps(num_steps)
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        out = model_fn(sched.scale_model_input(x, t), t.expand(x.shape[0]))
        if not isinstance(sched, PNDMScheduler):        # the one step() without a generator
            step_kwargs["generator"] = generator
        x = sched.step(out, t, x, **step_kwargs).prev_sample
    return x


def diffusers_scheduler(name, prediction_type, spacing, karras, **extra):
    common = dict(SD, prediction_type=prediction_type, timestep_spacing=spacing, **extra)
    if name == "ddpm":
        return DDPMScheduler(**common, clip_sample=False)
    if name == "ddim":
        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False)
    if name == "pndm":
        return PNDMScheduler(**common, skip_prk_steps=True, set_alpha_to_one=False)
    if name == "euler":
        return EulerDiscreteScheduler(**common, use_karras_sigmas=karras)
    if name == "dpmpp_2m":
        return DPMSolverMultistepScheduler(**common, use_karras_sigmas=karras)
    return EulerAncestralDiscreteScheduler(**common)


def assert_rel_close(ours, ref, rtol=1e-5):
    rel = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert ours.shape == ref.shape and rel < rtol, f"max relative difference {rel:.2e}"


CASES = [("ddpm", False, 0.0), ("ddim", False, 0.0), ("ddim", False, 0.5), ("pndm", False, 0.0), ("euler", False, 0.0),
         ("euler", True, 0.0), ("euler_ancestral", False, 0.0), ("dpmpp_2m", False, 0.0),
         ("dpmpp_2m", True, 0.0)]


@pytest.mark.parametrize("name,karras,eta", CASES)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("num_steps", [9, 16])
def test_parity_with_diffusers(name, karras, eta, prediction_type, spacing, num_steps):
    noise, generator = noise_and_generator()
    sched = diffusers_scheduler(name, prediction_type, spacing, karras)
    ref = run_diffusers(sched, noise, num_steps, generator, **({"eta": eta} if name == "ddim" else {}))
    cfg = ScheduleConfig(prediction_type=prediction_type, timestep_spacing=spacing)
    ours = sample(name, model_fn, noise, cfg, num_steps, eta=eta, karras=karras,
                  generator=torch.Generator().manual_seed(3))
    assert_rel_close(ours, ref)


ZERO_SNR_CASES = [(n, k, e, "v_prediction") for n, k, e in CASES if n != "pndm"] + [  # PNDM: no zero SNR
    (n, k, e, "epsilon") for n, k, e in CASES if n not in ("ddpm", "ddim", "pndm")]  # ε can't start at SNR 0


@pytest.mark.parametrize("name,karras,eta,prediction_type", ZERO_SNR_CASES)
def test_zero_terminal_snr_parity_with_diffusers(name, karras, eta, prediction_type):
    # Lin et al. 2023's recipe: ᾱ_T = 0 and "trailing" timesteps, so the first step starts from pure noise
    noise, generator = noise_and_generator()
    sched = diffusers_scheduler(name, prediction_type, "trailing", karras, rescale_betas_zero_snr=True)
    ref = run_diffusers(sched, noise, 10, generator, **({"eta": eta} if name == "ddim" else {}))
    cfg = ScheduleConfig(prediction_type=prediction_type, timestep_spacing="trailing",
                         rescale_betas_zero_snr=True)
    seen = []
    ours = sample(name, model_fn, noise, cfg, 10, eta=eta, karras=karras,
                  generator=torch.Generator().manual_seed(3), callback=seen.append)
    assert torch.isfinite(ours).all()
    assert_rel_close(ours, ref, rtol=1e-4)  # diffusers' float32 at σ_T = 4096 and β̃ near ᾱ = 0
    if not karras:
        assert seen[0]["t"] == 999


@pytest.mark.parametrize("name,extra", [("ddpm", dict(clip_sample=True)),
                                        ("ddim", dict(clip_sample=True, set_alpha_to_one=True)),
                                        ("ddim", dict(clip_sample=True, clip_sample_range=2.0)),
                                        ("pndm", dict(set_alpha_to_one=True))])
def test_clip_sample_and_set_alpha_to_one_parity(name, extra):
    # the classes' own defaults, which a folder that leaves the keys unset gets
    noise, generator = noise_and_generator()
    sched = diffusers_scheduler(name, "epsilon", "leading", False)
    sched = type(sched).from_config(sched.config, **extra)
    ref = run_diffusers(sched, noise, 8, generator)
    ours = sample(name, model_fn, noise, ScheduleConfig(timestep_spacing="leading", **extra), 8,
                  generator=torch.Generator().manual_seed(3))
    plain = sample(name, model_fn, noise, ScheduleConfig(timestep_spacing="leading"), 8,
                   generator=torch.Generator().manual_seed(3))
    assert_rel_close(ours, ref)
    assert not torch.allclose(ours, plain)        # the setting changed the result


def test_pndm_refuses_prk_warmup():
    noise, _ = noise_and_generator()
    with pytest.raises(ValueError, match="PRK"):
        sample("pndm", model_fn, noise, ScheduleConfig(skip_prk_steps=False), 8)


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_zero_terminal_snr_with_epsilon_prediction_is_refused(name):
    # diffusers divides by √ᾱ_T = 0 here and returns NaN; we say what to change
    noise, _ = noise_and_generator()
    cfg = ScheduleConfig(timestep_spacing="trailing", rescale_betas_zero_snr=True)
    with pytest.raises(ValueError, match="v_prediction"):
        sample(name, model_fn, noise, cfg, 10)
    leading = sample(name, model_fn, noise, ScheduleConfig(rescale_betas_zero_snr=True), 10,
                     generator=torch.Generator().manual_seed(0))   # starts at t = 901: fine
    assert torch.isfinite(leading).all()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_fixed_large_parity(prediction_type):
    noise, generator = noise_and_generator()
    sched = DDPMScheduler(**SD, clip_sample=False, variance_type="fixed_large", prediction_type=prediction_type)
    ref = run_diffusers(sched, noise, 12, generator)
    cfg = ScheduleConfig(prediction_type=prediction_type, variance_type="fixed_large")
    ours = ddpm(model_fn, noise, vp_grid(12, cfg), cfg, generator=torch.Generator().manual_seed(3))
    assert_rel_close(ours, ref)


def test_ddim_on_a_suffix_of_the_schedule():
    # img2img runs the tail of a 10-step schedule; diffusers' stride stays 1000 // 10
    noise, _ = noise_and_generator()
    sched = diffusers_scheduler("ddim", "epsilon", "leading", False)
    sched.set_timesteps(10)
    sched.timesteps = sched.timesteps[4:]
    ref = run_diffusers(sched, noise, 10, None)
    cfg, grid = ScheduleConfig(), vp_grid(10, ScheduleConfig())
    assert grid.stride == 100
    ours = ddim(model_fn, noise, replace(grid, timesteps=grid.timesteps[4:]), cfg)   # the stride stays
    assert_rel_close(ours, ref)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_euler_ancestral_karras_parity(prediction_type):
    # diffusers' EulerAncestral has no use_karras_sigmas: give it EulerDiscrete's Karras grid
    noise, generator = noise_and_generator()
    karras = EulerDiscreteScheduler(**SD, timestep_spacing="leading", use_karras_sigmas=True)
    karras.set_timesteps(10)
    sched = EulerAncestralDiscreteScheduler(**SD, timestep_spacing="leading", prediction_type=prediction_type)
    sched.set_timesteps(10)
    sched.sigmas, sched.timesteps = karras.sigmas, karras.timesteps
    ref = run_diffusers(sched, noise, 10, generator)
    ours = sample("euler_ancestral_karras", model_fn, noise,
                  ScheduleConfig(prediction_type=prediction_type, timestep_spacing="leading"), 10,
                  generator=torch.Generator().manual_seed(3))
    assert_rel_close(ours, ref)


@pytest.mark.parametrize("name,cls", [("euler_karras", EulerDiscreteScheduler),
                                      ("dpmpp_2m_karras", DPMSolverMultistepScheduler)])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_karras_names_match_diffusers_use_karras_sigmas(name, cls, prediction_type, spacing):
    # ComfyUI's names against the diffusers class switched the way its users switch it
    noise, generator = noise_and_generator()
    plain = cls(**SD, prediction_type=prediction_type, timestep_spacing=spacing)
    ref = run_diffusers(cls.from_config(plain.config, use_karras_sigmas=True), noise, 12, generator)
    ours = sample(name, model_fn, noise, ScheduleConfig(prediction_type=prediction_type, timestep_spacing=spacing),
                  12, generator=torch.Generator().manual_seed(3))
    assert_rel_close(ours, ref)


KARRAS_NAMES = ["euler_karras", "euler_ancestral_karras", "dpmpp_2m_karras"]


@pytest.mark.parametrize("name", KARRAS_NAMES)
def test_karras_is_an_alias_for_the_karras_name(name):
    noise, _ = noise_and_generator()
    base, cfg = name.removesuffix("_karras"), ScheduleConfig()
    run = lambda n, **kw: sample(n, model_fn, noise, cfg, 9,  # noqa: E731
                                 generator=torch.Generator().manual_seed(3), **kw)
    by_name = run(name)
    assert torch.equal(run(base, karras=True), by_name) and torch.equal(run(name, karras=True), by_name)
    assert not torch.allclose(run(base), by_name)        # the grid is what differs
    assert effective_name(base, cfg, True) == effective_name(name, cfg) == name
    assert effective_name(base, cfg, False) == effective_name(base, cfg) == base
    with pytest.raises(ValueError, match=f"karras=False.*{base}"):
        run(name, karras=False)


def test_karras_none_follows_the_schedule_where_the_class_reads_it():
    cfg = ScheduleConfig(use_karras_sigmas=True)
    # EulerAncestralDiscreteScheduler and the VP classes have no use_karras_sigmas
    assert [effective_name(n, cfg) for n in ("euler", "dpmpp_2m", "euler_ancestral", "ddim")] == [
        "euler_karras", "dpmpp_2m_karras", "euler_ancestral", "ddim"]
    assert effective_name("euler", cfg, False) == "euler"
    noise, _ = noise_and_generator()
    assert torch.equal(sample("dpmpp_2m", model_fn, noise, cfg, 9),
                       sample("dpmpp_2m_karras", model_fn, noise, ScheduleConfig(), 9))


def test_registry_rows():
    assert list(SAMPLERS)[:6] == ["ddpm", "ddim", "pndm", "euler", "euler_ancestral", "dpmpp_2m"]
    assert sorted(n for n, s in SAMPLERS.items() if s.karras) == sorted(KARRAS_NAMES)
    assert [n for n, s in SAMPLERS.items() if s.eta] == ["ddim"]
    for name in KARRAS_NAMES:   # the same step on another grid
        base = SAMPLERS[name.removesuffix("_karras")]
        assert replace(base, karras=True) == SAMPLERS[name]


def test_euler_ancestral_is_ddpm_in_sigma_space():
    # with "leading" spacing both walk the same chain and draw the same noise: identical samples
    noise, _ = noise_and_generator()
    cfg = ScheduleConfig(timestep_spacing="leading")
    a = sample("ddpm", model_fn, noise, cfg, 12, generator=torch.Generator().manual_seed(5))
    b = sample("euler_ancestral", model_fn, noise, cfg, 12, generator=torch.Generator().manual_seed(5))
    assert_rel_close(b, a)


def test_seeding():
    noise, _ = noise_and_generator()
    run = lambda name, seed, **kw: sample(name, model_fn, noise, ScheduleConfig(), 6,  # noqa: E731
                                          generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(run("ddim", 0), run("ddim", 1))  # η = 0 draws nothing
    assert torch.equal(run("ddim", 0, eta=1.0), run("ddim", 0, eta=1.0))
    assert not torch.allclose(run("ddim", 0, eta=1.0), run("ddim", 1, eta=1.0))
    assert torch.equal(run("euler_ancestral", 2), run("euler_ancestral", 2))


# --- analytic: for data ~ N(0, σ_d²) the optimal ε is closed form --------------------------------

SIGMA_DATA = 0.5


def gaussian_eps_model(cfg):
    """ε*(x_t, t) = √(1−ᾱ) x_t / (ᾱ σ_d² + 1 − ᾱ); fractional t interpolated as diffusers' Euler."""
    sigmas = sigmas_from_alphas_cumprod(alphas_cumprod(cfg))

    def eps(x, t):
        a = (1 / (1 + t_to_sigma(t, sigmas) ** 2)).to(x).reshape(-1, 1, 1, 1)
        return (1 - a).sqrt() * x / (a * SIGMA_DATA ** 2 + 1 - a)
    return eps


def test_deterministic_samplers_solve_the_gaussian_flow():
    """The probability-flow ODE maps x_T to c·x_T with c = std_end / std_start; samplers converge to it."""
    cfg = ScheduleConfig(timestep_spacing="trailing")
    ac, model = alphas_cumprod(cfg), gaussian_eps_model(cfg)
    var = lambda a: a * SIGMA_DATA ** 2 + 1 - a  # noqa: E731  Var(x_t) at ᾱ
    a_T, a_0, s_T = ac[-1].item(), ac[0].item(), sigmas_from_alphas_cumprod(ac)[-1].item()
    exact = {"ddim": math.sqrt(var(a_0) / var(a_T)),                     # ends at ᾱ_0 (SD-compat)
             "dpmpp_2m": SIGMA_DATA / math.sqrt(var(a_T)),                 # VP x_T = noise, ends at σ = 0
             "euler": s_T * SIGMA_DATA / math.sqrt(SIGMA_DATA ** 2 + s_T ** 2)}  # VE x_T = σ_max noise
    noise = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for name, c_exact in exact.items():
        errors = []
        for num_steps in (10, 50, 250):
            out = sample(name, model, noise, cfg, num_steps)
            c = ((out * noise).sum() / (noise * noise).sum()).item()
            assert (out - c * noise).abs().max() < 1e-12            # a deterministic linear map
            errors.append(abs(c - c_exact) / c_exact)
        assert errors[0] > errors[1] > errors[2] and errors[2] < 0.02, (name, errors)


def test_samplers_produce_sigma_data_std():
    cfg = ScheduleConfig(timestep_spacing="trailing")
    noise = torch.randn(1000, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    for name in SAMPLERS:
        out = sample(name, gaussian_eps_model(cfg), noise, cfg, 250, generator=torch.Generator().manual_seed(1))
        assert out.std().item() == pytest.approx(SIGMA_DATA, rel=0.04), name


def test_ddpm_fixed_small_and_large_bracket_sigma_data():
    # strided DDPM under-disperses with β̃ and over-disperses with β (Bao et al. 2022, Analytic-DPM)
    cfg = ScheduleConfig(timestep_spacing="trailing")
    grid, model = vp_grid(50, cfg), gaussian_eps_model(cfg)
    noise = torch.randn(1000, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    std = {v: ddpm(model, noise, grid, replace(cfg, variance_type=v),
                   generator=torch.Generator().manual_seed(1)).std().item()
           for v in ("fixed_small", "fixed_large")}
    assert std["fixed_small"] < 0.97 * SIGMA_DATA < 1.02 * SIGMA_DATA < std["fixed_large"]


# --- driver contract ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SAMPLERS)
def test_callback_once_per_step(name):
    noise, _ = noise_and_generator()
    seen = []
    out = sample(name, model_fn, noise, ScheduleConfig(), 5, generator=torch.Generator().manual_seed(0),
                 callback=seen.append)
    assert [d["i"] for d in seen] == list(range(5))
    assert torch.equal(seen[-1]["x"], out) and seen[-1]["pred_x0"].shape == SHAPE
    if name in ("ddpm", "ddim", "pndm"):
        assert [d["t"] for d in seen] == sampling_timesteps(5, ScheduleConfig()).tolist()


@pytest.mark.parametrize("name", SAMPLERS)
def test_nan_raises_floating_point_error(name):
    noise, _ = noise_and_generator()
    calls = []

    def broken(x, t):
        calls.append(1)
        out = model_fn(x, t)
        return out * float("nan") if len(calls) == 3 else out
    step = 1 if name == "pndm" else 2            # PLMS calls the model twice for its first step
    with pytest.raises(FloatingPointError, match=rf"step {step} .*float32.*guidance_scale"):
        sample(name, broken, noise, ScheduleConfig(), 6, generator=torch.Generator().manual_seed(0))


def test_bad_arguments_raise_value_error():
    noise, _ = noise_and_generator()
    with pytest.raises(ValueError, match="ddpm, ddim, pndm, euler, euler_ancestral, dpmpp_2m"):
        sample("plms", model_fn, noise, ScheduleConfig(), 10)
    with pytest.raises(ValueError, match="eta"):
        sample("euler", model_fn, noise, ScheduleConfig(), 10, eta=0.5)
    for name in ("ddpm", "ddim", "pndm"):
        with pytest.raises(ValueError, match="karras=True applies to euler, euler_ancestral, dpmpp_2m"):
            sample(name, model_fn, noise, ScheduleConfig(), 10, karras=True)
    with pytest.raises(TypeError, match="karras"):
        sample("euler", model_fn, noise, ScheduleConfig(), 10, karras=1)
    with pytest.raises(ValueError, match="eta only applies to the ddim sampler"):
        sample("dpmpp_2m_karras", model_fn, noise, ScheduleConfig(), 10, eta=0.3)
    for num_steps in (0, 1001):
        with pytest.raises(ValueError, match="num_steps"):
            sample("dpmpp_2m", model_fn, noise, ScheduleConfig(), num_steps)
    with pytest.raises(ValueError, match="epsilon, v_prediction, sample"):
        sample("ddim", model_fn, noise, ScheduleConfig(prediction_type="eps"), 10)

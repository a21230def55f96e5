"""ldm.schedule against diffusers' schedulers, CompVis' formula and closed forms."""
import math

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       EulerDiscreteScheduler)

from ldm.config import ScheduleConfig
from ldm.grids import dpm_grid, euler_grid, vp_grid
from ldm.schedule import (alphas_cumprod, diffusion_loss, dpm_solver_schedule, eps_from_v,
                          eps_from_x0, euler_schedule, karras_sigmas, make_beta_schedule,
                          pred_x0_from_eps, q_sample, sampling_timesteps, sigma_to_t,
                          sigmas_from_alphas_cumprod, t_to_sigma, to_eps_and_x0, training_noise, v_target,
                          x0_from_v)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 notes from diffusers

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
          steps_offset=1)
SCHEDULES = [("linear", 1e-4, 0.02, 2e-6), ("scaled_linear", 0.00085, 0.012, 2e-6),
             # diffusers' float32 cumprod drifts to ~1.3e-5 where cosine ᾱ reaches 1e-9
             ("squaredcos_cap_v2", 1e-4, 0.02, 5e-5)]
STEPS = [1, 7, 20, 50, 333]
# diffusers takes σ = √((1−ᾱ)/ᾱ) of float32 ᾱ: 1−ᾱ_0 = 8.5e-4 keeps ~1e-5 relative precision, and its
# Karras timesteps (log-σ interpolation in float32) move by up to ~1e-3
SIGMA_RTOL, KARRAS_T_ATOL = 2e-5, 2e-3


@pytest.mark.parametrize("name,start,end,rtol", SCHEDULES)
def test_alphas_cumprod_matches_diffusers(name, start, end, rtol):
    ours = alphas_cumprod(ScheduleConfig(beta_schedule=name, beta_start=start, beta_end=end))
    ref = DDPMScheduler(beta_schedule=name, beta_start=start, beta_end=end).alphas_cumprod
    assert ours.dtype == torch.float64 and ours.shape == (1000,)
    assert ((ours.float() - ref).abs() / ref).max() < rtol


@pytest.mark.parametrize("name,start,end,rtol", SCHEDULES[:2])
def test_zero_terminal_snr_matches_diffusers(name, start, end, rtol):
    ours = alphas_cumprod(ScheduleConfig(beta_schedule=name, beta_start=start, beta_end=end,
                                         rescale_betas_zero_snr=True))
    ref = DDIMScheduler(beta_schedule=name, beta_start=start, beta_end=end,
                        rescale_betas_zero_snr=True).alphas_cumprod
    plain = alphas_cumprod(ScheduleConfig(beta_schedule=name, beta_start=start, beta_end=end))
    assert ours[-1].item() == 0 and plain[-1].item() > 1e-5       # x_T holds no signal at all
    assert ours[0].item() == pytest.approx(plain[0].item(), rel=1e-12)  # ᾱ_1 is kept
    assert (ours[1:].diff() < 0).all()                                   # still a noising schedule
    # diffusers subtracts √ᾱ_T in float32: ~1e-11 absolute error where ᾱ falls to ~1e-7
    assert torch.allclose(ours.float(), ref, rtol=rtol, atol=1e-10)
    assert ref[-1].item() == pytest.approx(0, abs=1e-9)


def test_scaled_linear_is_compvis_linear_in_float64():
    # CompVis ldm.modules.diffusionmodules.util.make_beta_schedule("linear"), then np.cumprod
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ref = np.cumprod(1.0 - betas.numpy(), axis=0)
    assert torch.equal(alphas_cumprod(ScheduleConfig()).float(), torch.from_numpy(ref).float())


def test_cosine_schedule_closed_form():
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    ac = alphas_cumprod(ScheduleConfig(beta_schedule="squaredcos_cap_v2"))
    expected = torch.tensor([f((t + 1) / 1000) / f(0) for t in range(990)], dtype=torch.float64)
    assert torch.allclose(ac[:990], expected, rtol=1e-12, atol=0)
    assert make_beta_schedule("squaredcos_cap_v2", 1000).max().item() == pytest.approx(0.999)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("num_steps", STEPS)
def test_sampling_timesteps_match_ddim_and_ddpm(spacing, num_steps):
    cfg = ScheduleConfig(timestep_spacing=spacing)
    ours = sampling_timesteps(num_steps, cfg)
    for cls in (DDIMScheduler, DDPMScheduler):
        sched = cls(**SD, timestep_spacing=spacing)
        sched.set_timesteps(num_steps)
        assert ours.dtype == torch.long and torch.equal(ours, sched.timesteps)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize("karras", [False, True])
def test_euler_schedule_matches_diffusers(spacing, num_steps, karras):
    cfg = ScheduleConfig(timestep_spacing=spacing)
    ts, sigmas = euler_schedule(num_steps, cfg, karras=karras)
    sched = EulerDiscreteScheduler(**SD, timestep_spacing=spacing, use_karras_sigmas=karras)
    sched.set_timesteps(num_steps)
    assert ts.dtype == torch.float32 and sigmas.shape == (num_steps + 1,) and sigmas[-1] == 0
    assert torch.allclose(ts, sched.timesteps, rtol=0, atol=KARRAS_T_ATOL if karras else 0)
    assert torch.allclose(sigmas.float(), sched.sigmas, rtol=SIGMA_RTOL, atol=0)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize("karras", [False, True])
def test_dpm_solver_schedule_matches_diffusers(spacing, num_steps, karras):
    cfg = ScheduleConfig(timestep_spacing=spacing)
    ts, sigmas = dpm_solver_schedule(num_steps, cfg, karras=karras)
    sched = DPMSolverMultistepScheduler(**SD, timestep_spacing=spacing, use_karras_sigmas=karras)
    sched.set_timesteps(num_steps)
    assert ts.dtype == torch.long and torch.equal(ts, sched.timesteps)
    assert torch.allclose(sigmas.float(), sched.sigmas, rtol=SIGMA_RTOL, atol=0)


@pytest.mark.parametrize("spacing", [None, "leading", "trailing", "linspace"])
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("grid_fn,cls", [(euler_grid, EulerDiscreteScheduler), (dpm_grid, DPMSolverMultistepScheduler)])
def test_sigma_grids_hold_the_schedule_and_diffusers_init_sigma(grid_fn, cls, spacing, karras):
    cfg = ScheduleConfig(timestep_spacing=spacing)
    grid = grid_fn(10, cfg, karras=karras)
    ts, sigmas = (euler_schedule if grid_fn is euler_grid else dpm_solver_schedule)(10, cfg, karras=karras)
    assert torch.equal(grid.timesteps, ts) and torch.equal(grid.sigmas, sigmas) and grid.alphas_cumprod is None
    plain = cls(**SD, **({"timestep_spacing": spacing} if spacing else {}))   # unset: the class's default
    sched = cls.from_config(plain.config, use_karras_sigmas=karras)
    sched.set_timesteps(10)
    assert grid.init_sigma == pytest.approx(float(sched.init_noise_sigma), rel=SIGMA_RTOL)
    assert [s for _, _, s, _ in grid.sigma_steps()] == sigmas[:-1].tolist()


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_vp_grid(spacing):
    cfg = ScheduleConfig(timestep_spacing=spacing)
    grid = vp_grid(7, cfg)
    assert torch.equal(grid.timesteps, sampling_timesteps(7, cfg)) and grid.sigmas is None
    assert torch.equal(grid.alphas_cumprod, alphas_cumprod(cfg))
    assert grid.stride == 1000 // 7 and grid.init_sigma == 1.0
    with pytest.raises(ValueError, match="σ grid"):
        vp_grid(7, cfg, karras=True)


def test_trailing_never_yields_negative_timesteps():
    # float arange gives 1000/61 spacing an extra ~0 point; diffusers keeps it as t = -1
    cfg = ScheduleConfig(timestep_spacing="trailing")
    ts = sampling_timesteps(61, cfg)
    sched = DDIMScheduler(**SD, timestep_spacing="trailing")
    sched.set_timesteps(61)
    assert len(ts) == 61 and ts.min() >= 0 and torch.equal(ts, sched.timesteps[:61])


def test_sigma_t_conversions():
    ac = alphas_cumprod(ScheduleConfig())
    sigmas = sigmas_from_alphas_cumprod(ac)
    assert torch.allclose(sigmas, ((1 - ac) / ac).sqrt())
    k = torch.tensor([0, 1, 250, 998, 999])
    assert torch.allclose(sigma_to_t(sigmas[k], sigmas), k.double(), atol=1e-9)
    # t -> σ interpolates σ linearly (np.interp), σ -> t interpolates log σ
    assert torch.allclose(t_to_sigma(k.float(), sigmas), sigmas[k], rtol=1e-12)
    assert torch.allclose(t_to_sigma(torch.tensor([500.25]), sigmas), 0.75 * sigmas[500] + 0.25 * sigmas[501])
    log_mid = 0.75 * sigmas[500].log() + 0.25 * sigmas[501].log()
    assert sigma_to_t(log_mid.exp()[None], sigmas).item() == pytest.approx(500.25, abs=1e-9)
    query = karras_sigmas(0.03, 14.6, 9).numpy()  # diffusers' _sigma_to_t on the same grid
    ref = EulerDiscreteScheduler(**SD)._sigma_to_t(query, np.log(sigmas.numpy()))
    assert np.allclose(sigma_to_t(torch.from_numpy(query), sigmas).numpy(), ref, rtol=0, atol=1e-9)


def test_karras_sigmas():
    s = karras_sigmas(0.1, 10.0, 5, rho=7.0)
    assert s[0].item() == pytest.approx(10.0) and s[-1].item() == pytest.approx(0.1)
    assert (s[1:] < s[:-1]).all()
    mid = (10.0 ** (1 / 7) + 0.5 * (0.1 ** (1 / 7) - 10.0 ** (1 / 7))) ** 7  # Karras eq. (5), i = 2
    assert s[2].item() == pytest.approx(mid, rel=1e-12)


def test_q_sample_statistics():
    ac = alphas_cumprod(ScheduleConfig())
    x0 = torch.full((200_000,), 0.7)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    x_t = q_sample(x0, torch.tensor(500), noise, ac)
    a = ac[500].item()
    assert x_t.mean().item() == pytest.approx(math.sqrt(a) * 0.7, abs=0.01)
    assert x_t.std().item() == pytest.approx(math.sqrt(1 - a), rel=0.01)


def test_q_sample_and_velocity_match_diffusers():
    ac = alphas_cumprod(ScheduleConfig())
    sched = DDPMScheduler(**SD)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([1, 500, 999])
    assert torch.allclose(q_sample(x0, t, noise, ac), sched.add_noise(x0, noise, t), rtol=1e-5, atol=1e-6)
    assert torch.allclose(v_target(x0, noise, t, ac), sched.get_velocity(x0, noise, t), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_conversions_recover_x0_and_noise(prediction_type):
    ac = alphas_cumprod(ScheduleConfig())
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([10, 400, 900])
    x_t = q_sample(x0, t, noise, ac)
    output = {"epsilon": noise, "sample": x0, "v_prediction": v_target(x0, noise, t, ac)}[prediction_type]
    eps, pred_x0 = to_eps_and_x0(output, x_t, t, ac, prediction_type)
    assert torch.allclose(eps, noise, atol=2e-4) and torch.allclose(pred_x0, x0, atol=2e-4)
    v = v_target(x0, noise, t, ac)
    assert torch.allclose(pred_x0_from_eps(noise, x_t, t, ac), x0, atol=2e-4)
    assert torch.allclose(eps_from_x0(x0, x_t, t, ac), noise, atol=2e-4)
    assert torch.allclose(x0_from_v(v, x_t, t, ac), x0, atol=1e-5)
    assert torch.allclose(eps_from_v(v, x_t, t, ac), noise, atol=1e-5)


def test_diffusion_loss_targets():
    ac = alphas_cumprod(ScheduleConfig())
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([3, 700])
    v = v_target(x0, noise, t, ac)
    assert diffusion_loss(noise, x0, noise, t, ac, "epsilon").item() == 0
    assert diffusion_loss(v, x0, noise, t, ac, "v_prediction").item() == 0
    assert diffusion_loss(x0, x0, noise, t, ac, "sample").item() == 0
    zero = torch.zeros_like(x0)
    loss = {pt: diffusion_loss(zero, x0, noise, t, ac, pt).item() for pt in ("epsilon", "v_prediction")}
    assert loss["epsilon"] == pytest.approx(noise.pow(2).mean().item())
    assert loss["v_prediction"] == pytest.approx(v.pow(2).mean().item())


def test_min_snr_weighting_counts_each_error_as_a_clipped_x0_error():
    ac = alphas_cumprod(ScheduleConfig())
    g = torch.Generator().manual_seed(3)
    x0, noise, out = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    t = torch.tensor([2, 300, 990])                 # SNR far above 5, near 1, far below
    snr = ac[t] / (1 - ac[t])
    assert snr[0] > 5 > snr[2]
    per = (out - noise).pow(2).flatten(1).mean(1)
    want = (per * snr.clamp(max=5) / snr).mean().item()
    assert diffusion_loss(out, x0, noise, t, ac, "epsilon", snr_gamma=5).item() == pytest.approx(want, rel=1e-5)
    per_x0 = (out - x0).pow(2).flatten(1).mean(1)
    want_x0 = (per_x0 * snr.clamp(max=5)).mean().item()
    assert diffusion_loss(out, x0, noise, t, ac, "sample", snr_gamma=5).item() == pytest.approx(want_x0, rel=1e-5)
    # a γ above every SNR leaves ε-prediction's loss unweighted
    plain = diffusion_loss(out, x0, noise, t, ac, "epsilon").item()
    assert diffusion_loss(out, x0, noise, t, ac, "epsilon", snr_gamma=1e9).item() == pytest.approx(plain, rel=1e-5)
    with pytest.raises(ValueError, match="snr_gamma"):
        diffusion_loss(out, x0, noise, t, ac, "epsilon", snr_gamma=-1)


@pytest.mark.parametrize("prediction_type,weight_at_T", [("epsilon", 1.0), ("v_prediction", 0.0),
                                                         ("sample", 0.0)])
def test_min_snr_weighting_is_finite_at_zero_terminal_snr(prediction_type, weight_at_T):
    # min(SNR, γ)/SNR → 1 as SNR → 0 for ε; the v and x0 weights vanish with the SNR
    ac = alphas_cumprod(ScheduleConfig(rescale_betas_zero_snr=True))
    g = torch.Generator().manual_seed(4)
    x0, noise, out = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    t = torch.tensor([999, 999])
    loss = diffusion_loss(out, x0, noise, t, ac, prediction_type, snr_gamma=5)
    target = {"epsilon": noise, "v_prediction": -x0, "sample": x0}[prediction_type]
    want = weight_at_T * (out - target).pow(2).mean().item()
    assert torch.isfinite(loss) and loss.item() == pytest.approx(want, rel=1e-5, abs=1e-12)


def test_offset_noise_shifts_each_channel_by_one_constant():
    x0 = torch.zeros(4000, 4, 8, 8)
    torch.manual_seed(0)
    plain = training_noise(x0)
    assert plain.shape == x0.shape and abs(plain.std().item() - 1) < 0.01
    torch.manual_seed(0)
    offset = training_noise(x0, 0.5)
    means = offset.mean(dim=(2, 3))                                  # (B, C): mostly the offset
    assert abs(means.std().item() - (0.25 + 1 / 64) ** 0.5) < 0.02  # offset² + the 64 pixels' own mean
    assert torch.allclose(offset - offset.mean(dim=(2, 3), keepdim=True),
                          plain - plain.mean(dim=(2, 3), keepdim=True), atol=1e-6)
    with pytest.raises(ValueError, match="noise_offset"):
        training_noise(x0, -0.1)


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="linear, scaled_linear, squaredcos_cap_v2"):
        make_beta_schedule("cosine", 1000)
    with pytest.raises(ValueError, match="num_steps"):
        sampling_timesteps(0, ScheduleConfig())
    with pytest.raises(ValueError, match="num_steps"):
        euler_schedule(1001, ScheduleConfig())
    with pytest.raises(ValueError, match="leading, trailing, linspace"):
        sampling_timesteps(10, ScheduleConfig(timestep_spacing="uniform"))
    with pytest.raises(ValueError, match="trailing"):  # leading + steps_offset=1 reaches t = 1000
        sampling_timesteps(1000, ScheduleConfig())
    ac = alphas_cumprod(ScheduleConfig())
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="epsilon, v_prediction, sample"):
        to_eps_and_x0(x, x, torch.tensor([5]), ac, "eps")
    with pytest.raises(ValueError, match="integer"):
        q_sample(x, torch.tensor([5.5]), x, ac)

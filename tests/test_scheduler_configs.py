"""Every sampler draws diffusers' picture from folders whose scheduler config is exactly what the real
SD 1.5 (PNDM, ε) and SD 2.1 (DDIM, v) folders ship, with diffusers switched the way its users switch
it (`Cls.from_config(pipe.scheduler.config)`): keys the folder leaves unset take the defaults of the
class they are loaded into, and a folder's own scheduler is the sampler when none is named."""
import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, PNDMScheduler,
                       StableDiffusionPipeline)

from ldm import Pipeline
from ldm.formats.diffusers_scheduler import schedule_from_diffusers

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

# scheduler/scheduler_config.json of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1
SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
                  "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                  "trained_betas": None, "clip_sample": False}
SD21_SCHEDULER = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                  "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
                  "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
REAL = {"sd1": SD15_SCHEDULER, "sd2": SD21_SCHEDULER}
CLASSES = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "pndm": PNDMScheduler, "euler": EulerDiscreteScheduler,
           "euler_ancestral": EulerAncestralDiscreteScheduler, "dpmpp_2m": DPMSolverMultistepScheduler}
# float32 noise: the two implementations differ only in rounding (schedules in float64 here, float32
# there; ~1e-6 of the latents), which the decoder turns into ~1e-5 of a pixel at most
PIXEL_TOL = 1e-4
KW = dict(guidance_scale=7.5, height=32, width=48)        # non-square on purpose


def ship(saved, family, tmp_path, **scheduler):
    """A copy of the family's diffusers folder with the real SD scheduler config (plus `scheduler`)."""
    folder = tmp_path / f"{family}-shipped"
    shutil.copytree(saved[family]["diffusers"], folder)
    config = {**REAL[family], **scheduler}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", config["_class_name"]]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def theirs(folder, sampler=None, karras=False, ref=None):
    """diffusers' pipeline from the folder as it ships (or `ref`, loaded from it), switched to
    `sampler` the way its docs do."""
    if ref is None:
        ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
        ref.set_progress_bar_config(disable=True)
        ref.shipped_scheduler = ref.scheduler
    ref.scheduler = ref.shipped_scheduler
    if sampler is not None:   # the docs' idiom; Karras as users ask for it
        extra = {"use_karras_sigmas": True} if karras else {}
        ref.scheduler = CLASSES[sampler].from_config(ref.scheduler.config, **extra)
    return ref


@pytest.fixture(scope="module")
def loaded(saved, tmp_path_factory):
    """(folder, diffusers pipeline, ours) per family and spacing, loaded once for the sampler matrix."""
    cache = {}

    def get(family, spacing):
        if (family, spacing) not in cache:
            folder = ship(saved, family, tmp_path_factory.mktemp("shipped"),
                          **({"timestep_spacing": spacing} if spacing else {}))
            cache[family, spacing] = folder, theirs(folder), Pipeline.from_pretrained(folder)
        return cache[family, spacing]
    return get


def images(ref, ours, **kw):
    a = ref(["a red circle", "two green stars"], negative_prompt=["", "blurry"], num_inference_steps=7,
            generator=torch.Generator("cpu").manual_seed(3), output_type="np", **KW).images
    b = ours(["a red circle", "two green stars"], negative_prompt=["", "blurry"], steps=7, seed=3,
             output_type="np", **KW, **kw)
    assert a.shape == b.shape == (2, 32, 48, 3)
    assert a.std() > 0.05                                  # a real picture, not a constant
    return a, b


VARIANTS = [(s, False) for s in CLASSES] + [("euler", True), ("dpmpp_2m", True)]


@pytest.mark.parametrize("spacing", [None, "trailing"], ids=["spacing-unset", "spacing-set"])
@pytest.mark.parametrize("sampler,karras", VARIANTS)
def test_every_sampler_matches_diffusers_on_real_sd_configs(loaded, family, sampler, karras, spacing):
    folder, ref, ours = loaded(family, spacing)
    a, b = images(theirs(folder, sampler, karras, ref), ours, sampler=sampler, karras=karras or None)
    assert np.abs(a - b).max() <= PIXEL_TOL


@pytest.mark.parametrize("sampler", ["euler_karras", "dpmpp_2m_karras"])
def test_karras_names_match_diffusers_use_karras_sigmas_on_real_sd_configs(loaded, family, sampler):
    # ComfyUI's name for what `--karras` asks: the same picture as the alias
    folder, ref, ours = loaded(family, None)
    a, b = images(theirs(folder, sampler.removesuffix("_karras"), True, ref), ours, sampler=sampler)
    assert np.abs(a - b).max() <= PIXEL_TOL


def test_unset_spacing_differs_by_sampler_as_in_diffusers(saved, tmp_path):
    # the defect: Euler read "leading" from a config that sets nothing, and drew another picture
    folder = ship(saved, "sd1", tmp_path)
    ref = theirs(folder, "euler")
    assert ref.scheduler.config.timestep_spacing == "linspace"
    assert theirs(folder, "ddim").scheduler.config.timestep_spacing == "leading"
    leading = ship(saved, "sd1", tmp_path / "x", timestep_spacing="leading")
    a, _ = images(ref, Pipeline.from_pretrained(folder), sampler="euler")
    c, _ = images(theirs(leading, "euler"), Pipeline.from_pretrained(leading), sampler="euler")
    assert np.abs(a - c).max() > 10 / 255                 # the setting matters: the test can fail


@pytest.mark.parametrize("shipped", [dict(_class_name="DPMSolverMultistepScheduler", use_karras_sigmas=True),
                                     dict(_class_name="EulerAncestralDiscreteScheduler"),
                                     dict()], ids=["dpm-karras", "euler-a", "as-real"])
def test_the_folders_own_scheduler_is_the_default(saved, family, tmp_path, shipped):
    folder = ship(saved, family, tmp_path, **shipped)
    ours = Pipeline.from_pretrained(folder)
    a, b = images(theirs(folder), ours)                    # no sampler named on either side
    assert np.abs(a - b).max() <= PIXEL_TOL
    if shipped.get("use_karras_sigmas"):
        c = ours(["a red circle", "two green stars"], negative_prompt=["", "blurry"], steps=7, seed=3,
                 output_type="pil", **KW)
        assert c[0].info["sampler"] == "dpmpp_2m_karras"


def test_unset_keys_survive_our_formats(saved, tmp_path):
    folder = ship(saved, "sd1", tmp_path)
    pipe = Pipeline.from_pretrained(folder)
    assert pipe.config.schedule.timestep_spacing is None and pipe.config.default_sampler == "pndm"
    pipe.save_pretrained(tmp_path / "ours.safetensors")
    again = Pipeline.from_pretrained(tmp_path / "ours.safetensors")
    assert again.config == pipe.config
    pipe.save_pretrained(tmp_path / "out-diffusers", "diffusers")
    written = json.loads((tmp_path / "out-diffusers" / "scheduler" / "scheduler_config.json").read_text())
    assert written["_class_name"] == "PNDMScheduler" and "timestep_spacing" not in written
    a, b = images(theirs(tmp_path / "out-diffusers", "euler"), again, sampler="euler")
    assert np.abs(a - b).max() <= PIXEL_TOL


def test_use_default_values_means_unset():
    # what diffusers' own config of a loaded scheduler holds for keys the file did not set
    sched = PNDMScheduler.from_config(SD15_SCHEDULER)
    assert "timestep_spacing" in sched.config._use_default_values
    cfg, sampler = schedule_from_diffusers(dict(sched.config))
    assert cfg.timestep_spacing is None and sampler == "pndm"
    assert cfg.set_alpha_to_one is False and cfg.skip_prk_steps is True


def test_absent_keys_take_the_class_defaults():
    cfg, sampler = schedule_from_diffusers({"_class_name": "DDIMScheduler"})
    ref = DDIMScheduler.from_config({})
    assert sampler == "ddim"
    for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
                "steps_offset", "clip_sample", "clip_sample_range"):
        assert getattr(cfg, key) == ref.config[key], key
    assert cfg.set_alpha_to_one is None and cfg.timestep_spacing is None   # resolved per sampler


@pytest.mark.parametrize("key,value", [("algorithm_type", "sde-dpmsolver++"), ("solver_order", 3),
                                       ("final_sigmas_type", "sigma_min"), ("thresholding", True),
                                       ("trained_betas", [0.1] * 1000), ("timestep_type", "continuous"),
                                       ("variance_type", "learned_range"), ("some_future_key", 1)])
def test_keys_ldm_cannot_honour_are_refused(saved, tmp_path, key, value):
    folder = ship(saved, "sd1", tmp_path, **{key: value})
    with pytest.raises(ValueError, match=key):
        Pipeline.from_pretrained(folder)


def test_unknown_scheduler_class_must_be_named(saved, tmp_path):
    folder = ship(saved, "sd1", tmp_path, _class_name="UniPCMultistepScheduler")
    pipe = Pipeline.from_pretrained(folder)
    with pytest.raises(ValueError, match="UniPCMultistepScheduler.*default scheduler.*ddim"):
        pipe("a cat", steps=2)
    assert len(pipe("a cat", steps=2, sampler="ddim")) == 1


@pytest.mark.parametrize("key,value,match", [("steps_offset", -1, "steps_offset must be >= 0"),
                                             ("beta_start", 0, r"beta_start must be a number in \(0, 1\)"),
                                             ("num_train_timesteps", "1000", "expected int"),
                                             ("timestep_spacing", "uniform", "timestep_spacing must be one of")])
def test_bad_values_name_the_file_and_key(key, value, match):
    with pytest.raises(ValueError, match=f"scheduler_config.json: .*{match}"):
        schedule_from_diffusers({**SD15_SCHEDULER, key: value}, "scheduler/scheduler_config.json")

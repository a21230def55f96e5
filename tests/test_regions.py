"""Regional prompts (ldm/regions.py) and the scene layout planner (ldm/shapes/layout.py)."""
import json
import random
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from ldm import Pipeline
from ldm.cli import main as cli
from ldm.cli import parse_region
from ldm.config import LDMConfig
from ldm.settings import set_settings
from ldm.shapes.scenes import caption, random_scene
from ldm.shapes.prompts import parse
from ldm.guidance import classifier_free, only_from, prompt_rows
from ldm.shapes.layout import HALVES, plan_scene
from ldm.regions import Region, box_mask, compose, regional_rows
from tiny_models import random_model, tiny_sd1


# -- regions and masks -----------------------------------------------------------------------------

@pytest.mark.parametrize("box", [(0.5, 0, 0.5, 1), (0, 0, 1.2, 1), (0, 0, 1), (0, 0, float("nan"), 1),
                                 (0, 0, True, 1), "0,0,1,1"])
def test_a_box_must_be_four_fractions_left_of_right_and_above_bottom(box):
    with pytest.raises(ValueError, match="box"):
        Region("a red circle", box)


def test_a_region_needs_a_prompt():
    with pytest.raises(ValueError, match="non-empty string"):
        Region("  ", (0, 0, 1, 1))


def test_box_masks_cover_the_boxes_cells_and_at_least_one():
    left = box_mask((0, 0, 0.5, 1), 16, 16)
    assert left.shape == (1, 16, 16) and left[..., :8].min() == 1 and left[..., 8:].max() == 0
    assert box_mask((0.4, 0.4, 0.41, 0.41), 16, 16).sum() == 1          # thinner than a cell
    assert box_mask((0, 0, 1, 1), 5, 7).sum() == 35


def test_compose_pastes_regions_into_their_masks_and_averages_overlaps():
    cond = torch.zeros(2, 3, 4, 4)
    regions = torch.stack([torch.full((3, 4, 4), 1.0), torch.full((3, 4, 4), 3.0), torch.full((3, 4, 4), 5.0)])
    owner = torch.tensor([0, 0, 1])                                           # two regions on image 0
    masks = torch.stack([box_mask((0, 0, 0.75, 1), 4, 4), box_mask((0.5, 0, 1, 1), 4, 4),
                         box_mask((0, 0, 0.5, 0.5), 4, 4)])
    out = compose(cond, regions, owner, masks)
    assert out[0, :, :, :2].eq(1).all() and out[0, :, :, 2].eq(2).all() and out[0, :, :, 3].eq(3).all()
    assert out[1, :, :2, :2].eq(5).all() and out[1, :, 2:].eq(0).all() and out[1, :, :, 2:].eq(0).all()


# -- the guidance wrapper --------------------------------------------------------------------------

class CountingUNet:
    """out = x · t/1000 + mean of the context; records the batch size of every call."""
    def __init__(self):
        self.batches = []

    def __call__(self, x, t, context):
        self.batches.append(x.shape[0])
        return x * (t.float() / 1000).view(-1, 1, 1, 1) + context.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def test_regional_cfg_is_one_batched_call_that_guides_each_box_by_its_prompt():
    b, s = 2, 4.0
    context, uncond = torch.randn(b, 3, 8), torch.randn(b, 3, 8)
    region_context = torch.randn(3, 3, 8)
    owner = torch.tensor([0, 0, 1])
    masks = torch.stack([box_mask(HALVES["left"], 4, 4), box_mask(HALVES["right"], 4, 4),
                         box_mask(HALVES["top"], 4, 4)])
    unet = CountingUNet()
    plain = classifier_free(unet, context, uncond, s)
    regional = only_from(600, regional_rows(context, region_context, owner, masks), prompt_rows(context))
    model_fn = classifier_free(unet, regional, uncond, s)
    x = torch.randn(b, 4, 4, 4)

    late = model_fn(x, torch.tensor([300, 300]))                               # below from_t: plain CFG
    assert torch.equal(late, plain(x, torch.tensor([300, 300])))
    unet.batches.clear()
    early = model_fn(x, torch.tensor([800, 800]))
    assert unet.batches == [2 * b + 3]                                         # one forward of 2B + R

    def cfg(cond_ctx, i):
        u = x[i] * 0.8 + uncond[i].mean()
        return u + s * (x[i] * 0.8 + cond_ctx.mean() - u)
    assert torch.allclose(early[0, :, :, :2], cfg(region_context[0], 0)[:, :, :2], atol=1e-6)
    assert torch.allclose(early[0, :, :, 2:], cfg(region_context[1], 0)[:, :, 2:], atol=1e-6)
    assert torch.allclose(early[1, :, :2], cfg(region_context[2], 1)[:, :2], atol=1e-6)
    assert torch.allclose(early[1, :, 2:], cfg(context[1], 1)[:, 2:], atol=1e-6)    # outside: the prompt


def test_boxes_that_tile_every_image_leave_out_the_whole_prompts_rows():
    context, uncond, region_context = torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(4, 3, 8)
    owner = torch.tensor([0, 0, 1, 1])
    halves = [HALVES["left"], HALVES["right"], HALVES["top"], HALVES["bottom"]]
    masks = torch.stack([box_mask(h, 4, 4) for h in halves])
    unet = CountingUNet()
    tiled = classifier_free(unet, regional_rows(context, region_context, owner, masks), uncond, 3.0)
    x, t = torch.randn(2, 4, 4, 4), torch.tensor([900, 900])
    unet.batches.clear()
    out = tiled(x, t)
    assert unet.batches == [2 + 4]                                             # B uncond + R regions
    other = torch.randn(2, 3, 8)                                               # the prompt is unused
    same = classifier_free(unet, regional_rows(other, region_context, owner, masks), uncond, 3.0)(x, t)
    assert torch.equal(out, same)
    u = x[1] * 0.9 + uncond[1].mean()
    assert torch.allclose(out[1, :, 2:], (u + 3 * (x[1] * 0.9 + region_context[3].mean() - u))[:, 2:], atol=1e-6)


def test_without_guidance_the_regional_call_has_no_uncond_rows():
    context, region_context = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    unet = CountingUNet()
    rows = regional_rows(context, region_context, torch.tensor([0]), box_mask((0, 0, 1, 1), 4, 4)[None])
    x = torch.randn(1, 4, 4, 4)
    out = classifier_free(unet, rows, context, 1.0)(x, torch.tensor([500]))
    assert unet.batches == [1] and torch.allclose(out, x * 0.5 + region_context.mean(), atol=1e-6)


# -- the scene planner -----------------------------------------------------------------------------

def test_the_planner_gives_each_of_two_objects_its_half_and_only_its_own_words():
    rng = random.Random(0)
    for _ in range(300):
        scene = random_scene(rng, ("two_objects",))
        text = caption(scene, rng)
        spec = parse(text)
        regions = plan_scene(text)
        assert len(regions) == 2
        for region, obj in zip(regions, spec.objects):
            (alone,) = parse(region.prompt).objects                           # one object per region
            assert (alone.shape, alone.colour, alone.size, alone.count) == (obj.shape, obj.colour, obj.size, obj.count)
            assert HALVES[alone.position] == region.box                       # its words say its box
            assert parse(region.prompt).background == spec.background
        a, b = (r.box for r in regions)
        if spec.relation == "left_of":
            assert a[2] <= b[0]
        elif spec.relation == "above":
            assert a[3] <= b[1]
        elif spec.relation == "right_of":
            assert b[2] <= a[0]
        elif spec.relation == "below":
            assert b[3] <= a[1]


@pytest.mark.parametrize("prompt", ["a red circle on the left", "three blue stars", "a teapot", "",
                                    "a green square on a navy background"])
def test_the_planner_leaves_prompts_with_one_kind_of_object_or_none_alone(prompt):
    assert plan_scene(prompt) == []


def test_objects_own_positions_choose_their_halves():
    regions = plan_scene("a red circle at the bottom and a blue square at the top")
    assert [r.box for r in regions] == [HALVES["bottom"], HALVES["top"]]
    assert regions[0].prompt == "a red circle at the bottom"


# -- the pipeline and the command line -------------------------------------------------------------

@pytest.fixture(scope="module")
def planned():
    return Pipeline(random_model(replace(tiny_sd1(), layout_planner="scenes")))


KW = dict(steps=4, seed=0, output_type="np", height=32, width=32)


def test_auto_regions_change_two_object_prompts_only(planned):
    two = "a red circle left of a blue square"
    assert abs(planned(two, **KW) - planned(two, regions=None, **KW)).max() > 1e-4
    one = "a red circle on the left"
    assert np.array_equal(planned(one, **KW), planned(one, regions=None, **KW))
    plan = planned(two, **{**KW, "output_type": "pil"})[0].info["regions"]
    assert plan == [["a red circle on the left", [0.0, 0.0, 0.5, 1.0]],
                    ["a blue square on the right", [0.5, 0.0, 1.0, 1.0]]]
    explicit = planned(two, regions=[Region(p, tuple(b)) for p, b in plan], **KW)
    assert np.array_equal(planned(two, **KW), explicit)
    assert np.array_equal(planned(two, regions_from_t=1000, **KW), planned(two, regions=None, **KW))


def test_regions_per_prompt_match_the_same_prompts_drawn_alone(planned):
    prompts = ["a red circle", "a green star"]
    regions = [[("a blue square", (0, 0, 0.5, 1))], []]
    f = planned.config.autoencoder.downsample_factor
    latents = torch.randn(2, planned.config.unet.in_channels, 32 // f, 32 // f)
    kw = {**KW, "seed": None}
    both = planned(prompts, regions=regions, latents=latents, **kw)
    first = planned(prompts[0], regions=regions[0], latents=latents[:1], **kw)
    second = planned(prompts[1], regions=None, latents=latents[1:], **kw)
    assert np.allclose(both[0], first[0], atol=1e-5) and np.allclose(both[1], second[0], atol=1e-5)
    assert not np.allclose(first, planned(prompts[0], regions=None, latents=latents[:1], **kw), atol=1e-3)
    assert planned(prompts, regions=regions, **{**KW, "output_type": "pil"})[1].info["regions"] == []


def test_a_model_without_a_planner_draws_the_prompt_alone():
    plain = Pipeline(random_model(tiny_sd1()))
    two = "a red circle left of a blue square"
    assert np.array_equal(plain(two, **KW), plain(two, regions=None, **KW))


@pytest.mark.parametrize("regions, error, match", [
    ("all", ValueError, "'auto', None"), (3, TypeError, "regions must be"),
    ([[("a", (0, 0, 1, 1))]] * 3, ValueError, "region lists"), ([("a", (0, 0, 2, 1))], ValueError, "box"),
    ([["a", "b", "c"]], TypeError, "a region must be")])
def test_bad_regions_are_refused_before_any_work(planned, regions, error, match):
    with pytest.raises(error, match=match):
        planned(["a red circle", "a blue square"], regions=regions, **KW)


@pytest.mark.parametrize("from_t", [-1, 1001, True, "600"])
def test_regions_from_t_must_be_a_timestep(planned, from_t):
    with pytest.raises(ValueError, match="regions_from_t"):
        planned("a red circle and a blue square", regions_from_t=from_t, **KW)


def test_ldm_generate_plans_takes_regions_and_records_them(planned, tmp_path):
    planned.save_pretrained(tmp_path / "m.safetensors")
    two = "a red circle left of a blue square"
    args = ["generate", two, "--model", str(tmp_path / "m.safetensors"), "--steps", "3", "--seed", "1", "-q"]
    assert cli(args + ["-o", str(tmp_path / "auto.png")]) == 0
    assert cli(args + ["-o", str(tmp_path / "off.png"), "--no-regions"]) == 0
    assert cli(args + ["-o", str(tmp_path / "own.png"), "--region", "a green star@0,0,1,0.5"]) == 0
    auto, off, own = (Image.open(tmp_path / f"{n}.png") for n in ("auto", "off", "own"))
    assert json.loads(auto.text["regions"])[0] == ["a red circle on the left", [0.0, 0.0, 0.5, 1.0]]
    assert "Regions: 2" in auto.text["parameters"] and json.loads(off.text["regions"]) == []
    assert json.loads(own.text["regions"]) == [["a green star", [0.0, 0.0, 1.0, 0.5]]]
    ref = Pipeline.from_pretrained(tmp_path / "m.safetensors")(two, steps=3, seed=1)[0]
    assert np.array_equal(np.asarray(auto), np.asarray(ref))
    assert not np.array_equal(np.asarray(auto), np.asarray(off))
    assert cli(args + ["-o", str(tmp_path / "x.png"), "--region", "a star@0,0,1"]) == 2
    assert cli(args + ["-o", str(tmp_path / "x.png"), "--region", "a star@0,0,1,1", "--no-regions"]) == 2
    assert not (tmp_path / "x.png").exists()


def test_parse_region_reads_the_last_at_sign():
    assert parse_region("a star @ night@0.5,0,1,1") == Region("a star @ night", (0.5, 0, 1, 1))


def test_ldm_convert_sets_the_planner_and_refuses_shape_changes(tmp_path):
    Pipeline(random_model(tiny_sd1())).save_pretrained(tmp_path / "m.safetensors")
    assert cli(["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "p.safetensors"), "--to", "ldm",
                "--set", "layout_planner=scenes", "--set", "regions_from_t=700"]) == 0
    cfg = Pipeline.from_pretrained(tmp_path / "p.safetensors").config
    assert (cfg.layout_planner, cfg.regions_from_t) == ("scenes", 700)
    for bad in ("unet.model_channels=8", "layout_planner=llm"):
        assert cli(["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "q.safetensors"), "--to", "ldm",
                    "--set", bad]) == 2
    assert not (tmp_path / "q.safetensors").exists()
    with pytest.raises(ValueError, match="without retraining"):
        set_settings(LDMConfig(), ["schedule.beta_start=0.1"])

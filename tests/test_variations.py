"""CLIP image encoder and image variations: CLIP's preprocessing equal to transformers'
CLIPImageProcessor, the embedding equal to CLIPVisionModelWithProjection's (and to open_clip's visual
tower from the original layout), and the same images as diffusers' StableDiffusionImageVariationPipeline
from the folder and from our file; bad input refused before work."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionImageVariationPipeline
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from ldm import Pipeline
from ldm.image_encoder import clip_preprocess, hf_to_openclip_visual, openclip_visual_to_hf
from tiny_models import random_model, tiny_image_encoder, tiny_variation

PIXEL_TOL = 1 / 255


def photo(seed: int, size=(48, 40)) -> Image.Image:
    g = np.random.RandomState(seed)
    low = torch.from_numpy(g.rand(1, 3, 5, 5)).float()
    x = torch.nn.functional.interpolate(low, size=size[::-1], mode="bicubic")[0].clamp(0, 1)
    return Image.fromarray((x.permute(1, 2, 0).numpy() * 255 + g.rand(*size[::-1], 3) * 20).clip(0, 255)
                           .astype(np.uint8))


@pytest.fixture(scope="module")
def variation(tmp_path_factory):
    root = tmp_path_factory.mktemp("variation")
    pipe = Pipeline(random_model(tiny_variation()))
    pipe.save_pretrained(root / "diffusers", "diffusers")
    pipe.save_pretrained(root / "model.safetensors", "ldm")
    return root


@pytest.mark.parametrize("size", [(48, 40), (40, 64), (20, 20), (31, 17), (224, 300)])
def test_clip_preprocessing_equals_clip_image_processor(size):
    cfg = tiny_image_encoder()
    ref = CLIPImageProcessor(size={"shortest_edge": cfg.image_size},
                             crop_size={"height": cfg.image_size, "width": cfg.image_size})
    image = photo(1, size)
    a = ref(images=[image], return_tensors="pt").pixel_values
    b = clip_preprocess([image], cfg)
    assert a.shape == b.shape == (1, 3, 32, 32)
    assert (a - b).abs().max() <= 1e-5


def test_image_embedding_equals_transformers(variation):
    pipe = Pipeline.from_pretrained(variation / "diffusers")
    encoder = CLIPVisionModelWithProjection.from_pretrained(variation / "diffusers" / "image_encoder")
    processor = CLIPImageProcessor.from_pretrained(variation / "diffusers" / "feature_extractor")
    images = [photo(0), photo(3, (30, 50))]
    ref = encoder(processor(images=images, return_tensors="pt").pixel_values).image_embeds
    ours = pipe.encode_image_embedding(images)
    assert ours.shape == (2, 32) and pipe.encode_image_embedding(images[0]).shape == (1, 32)
    assert ref.std() > 0.1 and (ours - ref).abs().max() <= 1e-5


def test_open_clip_visual_layout_converts_exactly():
    """The SD 2.1-unclip original file holds open_clip's visual tower: converted, it embeds as open_clip."""
    from open_clip.transformer import VisionTransformer
    torch.manual_seed(0)
    tower = VisionTransformer(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=37 / 32,
                              output_dim=24).eval()
    with torch.no_grad():
        for p in tower.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sd = openclip_visual_to_hf(tower.state_dict())
    cfg = tiny_image_encoder(projection_dim=24, hidden_act="gelu")
    from ldm.image_encoder import ImageEncoder
    ours = ImageEncoder(cfg).eval()
    ours.clip.load_state_dict(sd, strict=True)
    x = clip_preprocess([photo(2)], cfg)
    with torch.no_grad():
        assert (ours(x) - tower(x)).abs().max() <= 1e-5
    back = hf_to_openclip_visual(sd)
    assert set(back) == set(tower.state_dict()) and all(torch.equal(back[k], v) for k, v in tower.state_dict().items())


@pytest.mark.parametrize("source", ["diffusers", "ldm"])
@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_variations_same_images_as_diffusers(variation, source, sampler):
    ref = StableDiffusionImageVariationPipeline.from_pretrained(variation / "diffusers", safety_checker=None)
    ref.scheduler = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}[sampler].from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    ours = Pipeline.from_pretrained(variation / ("diffusers" if source == "diffusers" else "model.safetensors"))
    a = ref(photo(0), num_inference_steps=4, guidance_scale=3.0, num_images_per_prompt=2,
            generator=torch.Generator("cpu").manual_seed(2), output_type="np").images
    b = ours(image=photo(0), steps=4, guidance_scale=3.0, num_images_per_prompt=2, seed=2, sampler=sampler,
             output_type="np")
    assert a.shape == b.shape == (2, 32, 32, 3) and a.std() > 0.05
    assert np.abs(a[0] - a[1]).max() > 0.05                      # two different variations
    assert np.abs(a - b).max() <= PIXEL_TOL


def test_variations_follow_the_image(variation):
    pipe = Pipeline.from_pretrained(variation / "model.safetensors")
    one = pipe(image=photo(0), steps=3, seed=1, output_type="np")
    other = pipe(image=photo(5), steps=3, seed=1, output_type="np")
    images = pipe(image=[photo(0), photo(5)], steps=3, seed=1)
    assert np.abs(one - other).max() > 0.02                      # the embedding conditions the drawing
    assert len(images) == 2 and images.request.record(0)["prompt"] == ""


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(), ValueError, "image-variation model: pass image="),
    (dict(image=Image.new("RGBA", (32, 32))), ValueError, "RGBA image; give an RGB one"),
    (dict(image=Image.new("RGB", (0, 32))), ValueError, "is empty"),
    (dict(image=[]), ValueError, "empty list"),
    (dict(image="scene.png"), TypeError, "must be a PIL image"),
    (dict(image=photo(0), prompt="a cat"), ValueError, "no text encoder"),
    (dict(image=photo(0), noise_level=10), ValueError, "apply to Stable unCLIP models"),
    (dict(image=photo(0), strength=0.5), ValueError, "strength is not taken"),
    (dict(image=photo(0), negative_prompt="blurry"), ValueError, "no negative_prompt"),
    (dict(image=photo(0), regions=[("a red circle", (0, 0, 0.5, 0.5))]), ValueError, "no regional prompts"),
])
def test_bad_variation_input_is_refused_before_work(variation, kwargs, error, match):
    pipe = Pipeline.from_pretrained(variation / "model.safetensors")
    pipe.model.model.diffusion_model = pipe.model.embedder = None   # any work fails differently
    with pytest.raises(error, match=match):
        pipe(steps=2, **kwargs)


def test_shape_world_clip_learns_to_match_scenes_and_captions():
    """ldm/shapes/clip.py: a few contrastive steps on one batch of rendered scenes pair each with its caption."""
    from ldm.shapes.clip import ShapeCLIP, batch, retrieval
    torch.manual_seed(0)
    model = ShapeCLIP().train()
    pixels, captions = batch(8, seed=0)
    assert pixels.shape == (8, 3, 64, 64) and len(set(captions)) == 8
    before = retrieval(model, pixels, captions)["image_to_text"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    first = None
    for _ in range(30):
        loss = model.loss(pixels, captions)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first and retrieval(model, pixels, captions)["image_to_text"] >= max(before, 0.75)


def test_cli_draws_variations_of_an_image_without_a_prompt(tmp_path):
    """`ldm generate --image in.png -n 2 --model <variation model>`: no prompt, the same pictures as
    the Python call, the PNG parameters written."""
    from ldm.cli import main as cli
    pipe = Pipeline(random_model(tiny_variation()))
    model, src = tmp_path / "variation.safetensors", tmp_path / "in.png"
    pipe.save_pretrained(model)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(src)
    out = tmp_path / "v.png"
    assert cli(["generate", "--image", str(src), "--model", str(model), "-n", "2", "--steps", "2",
                "--seed", "3", "-o", str(out), "-q"]) == 0
    ref = pipe(image=Image.open(src).convert("RGB"), num_images_per_prompt=2, steps=2, seed=3)
    paths = sorted(tmp_path.glob("v-*.png"))
    assert len(paths) == 2
    for i, path in enumerate(paths):
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(ref[i]))
        assert "Seed: 3" in Image.open(path).text["parameters"]

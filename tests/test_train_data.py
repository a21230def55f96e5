"""ldm.training.data (captions, transforms, corrupt files, bad input, held-out split, condition
dropout) and ldm.training.config (strict YAML, overrides, fitting an --init checkpoint)."""
import json
import random
from dataclasses import replace

import pytest
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader

from ldm.presets import tiny
from ldm.training.config import TrainConfig, VAETrainConfig, load_train_config
from ldm.training.data import ImageCaptionDataset, caption_collate, load_image, scan_folder, split_holdout
from ldm.training.optim import lr_factor


def make_image(path, size=(40, 40), colour=(200, 40, 40)):
    im = Image.new("RGB", size, (240, 240, 240))
    ImageDraw.Draw(im).rectangle((2, 2, size[0] // 3, size[1] - 3), fill=colour)  # left-heavy: flips show
    im.save(path)


def make_folder(root, n=6, size=(40, 40), captions="jsonl", column="text"):
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        make_image(root / f"img{i}.png", size, (40 * i % 255, 100, 200))
        if captions == "jsonl":
            rows.append({"file_name": f"img{i}.png", column: f"caption {i}"})
        elif captions == "txt":
            (root / f"img{i}.txt").write_text(f"caption {i}\n")
    if rows:
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_captions_from_metadata_column_and_sidecars(tmp_path):
    make_folder(tmp_path / "d", n=3, captions="jsonl", column="prompt")
    make_image(tmp_path / "d" / "sub_extra.png")
    (tmp_path / "d" / "sub_extra.txt").write_text("  from a sidecar \n")
    report = scan_folder(tmp_path / "d", 32, caption_column="prompt")
    assert {i.path.name: i.caption for i in report.items} == {
        "img0.png": "caption 0", "img1.png": "caption 1", "img2.png": "caption 2", "sub_extra.png": "from a sidecar"}
    with pytest.raises(ValueError, match=r"no caption column 'text' \(it has: prompt\).*caption_column"):
        scan_folder(tmp_path / "d", 32)


def test_transforms_resize_crop_flip(tmp_path):
    make_image(tmp_path / "wide.png", size=(64, 40))
    x = load_image(tmp_path / "wide.png", 32, True, False, random.Random(0))
    assert x.shape == (3, 32, 32) and -1.0 <= x.min() < x.max() <= 1.0
    flipped = load_image(tmp_path / "wide.png", 32, True, True, random.Random(1))  # Random(1) flips first
    assert random.Random(1).random() < 0.5 and torch.allclose(flipped, x.flip(-1))
    crops = {tuple(load_image(tmp_path / "wide.png", 32, False, False, random.Random(s))[0, 5, :].tolist())
             for s in range(8)}
    assert len(crops) > 1, "random crops should move across the 51 px wide resized image"
    report = scan_folder(make_folder(tmp_path / "d", n=2), 32)
    ds = ImageCaptionDataset(report.items, 32, center_crop=True, random_flip=True, seed=0)
    draws = {bool(torch.equal(ds[0]["x"], ds[0]["x"].flip(-1))) for _ in range(2)}
    assert len(draws) == 1, "an item's augmentation is fixed by (seed, epoch, index)"


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])  # header fine, data cut: only a full decode notices


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    root = make_folder(tmp_path / "d", n=5)
    (root / "garbage.png").write_bytes(b"not an image at all")
    truncate(root / "img1.png")
    (root / "metadata.jsonl").open("a").write(json.dumps({"file_name": "garbage.png", "text": "x"}) + "\n")
    report = scan_folder(root, 32)
    assert report.unreadable == ["garbage.png", "img1.png"]  # found before training, not mid-run
    assert "2 unreadable image file(s) will be skipped: garbage.png, img1.png" in " ".join(report.warnings(32))
    assert [i.path.name for i in report.items] == ["img0.png", "img2.png", "img3.png", "img4.png"]
    truncate(root / "img3.png")  # broken after the scan: replaced by the next image and counted
    ds = ImageCaptionDataset(report.items, 32)
    loader = DataLoader(ds, batch_size=2, collate_fn=caption_collate)
    batches = list(loader)  # a whole epoch, no exception
    assert sum(int(b["skipped"]) for b in batches) == 1
    assert all(b["x"].shape == (2, 3, 32, 32) for b in batches)


def test_a_folder_where_no_image_decodes_is_an_error(tmp_path):
    root = make_folder(tmp_path / "d", n=3)
    for i in range(3):
        truncate(root / f"img{i}.png")
    with pytest.raises(ValueError, match=rf"none of the 3 images in {root} can be decoded: img0.png, img1.png, "
                                         r"img2.png \(first error: img0.png: image file is truncated"):
        scan_folder(root, 32)


def test_bad_input_is_reported_before_training(tmp_path):
    with pytest.raises(ValueError, match="does not exist: set data.path"):
        scan_folder(tmp_path / "nope", 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        scan_folder(tmp_path / "empty", 32)
    root = make_folder(tmp_path / "d", n=3, captions="none")
    (root / "img1.txt").write_text("only this one")
    with pytest.raises(ValueError, match=r"2 of 3 images .* have no caption: img0.png, img2.png\..*allow_uncaptioned"):
        scan_folder(root, 32)
    report = scan_folder(root, 32, captions="optional")
    assert report.uncaptioned == ["img0.png", "img2.png"]
    small = scan_folder(make_folder(tmp_path / "s", n=3, size=(24, 40)), 32)
    assert small.small == ["img0.png (24×40)", "img1.png (24×40)", "img2.png (24×40)"]
    assert "3 image(s) are smaller than 32 px and will be upscaled" in small.warnings(32)[0]
    assert load_image(small.items[0].path, 32, True, False, random.Random(0)).shape == (3, 32, 32)


def test_holdout_split(tmp_path):
    items = list(range(20))
    train, held = split_holdout(items, 0.2, seed=0)
    assert len(held) == 4 and sorted(train + held) == items
    assert split_holdout(items, 0.2, seed=0) == (train, held)
    assert split_holdout(items, 0.2, seed=1)[1] != held
    assert len(split_holdout(items, 3)[1]) == 3 and split_holdout(items, 0)[1] == []
    with pytest.raises(ValueError, match="none would be left"):
        split_holdout(items, 20)


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_condition_dropout_rate(p):
    tokenize_calls = []
    n, dropped = 0, 0
    for b in range(500):
        samples = [{"x": torch.zeros(1), "caption": f"c{i}", "seed": hash((0, 0, b * 8 + i)), "skipped": 0}
                   for i in range(8)]
        batch = caption_collate(samples, tokenize=lambda c: tokenize_calls.append(list(c)) or torch.zeros(len(c)),
                                cond_drop=p)
        n += len(batch["captions"])
        dropped += sum(c == "" for c in batch["captions"])
        assert all(c in ("", s["caption"]) for c, s in zip(batch["captions"], samples))
    assert abs(dropped / n - p) < 0.03, f"dropped {dropped}/{n}"
    assert tokenize_calls[-1] == batch["captions"], "the tokens are those of the dropped-out captions"


def test_condition_dropout_extremes():
    samples = [{"x": torch.zeros(1), "caption": "a cat", "seed": s, "skipped": 0} for s in range(50)]
    assert caption_collate(samples, cond_drop=0.0)["captions"] == ["a cat"] * 50
    assert caption_collate(samples, cond_drop=1.0)["captions"] == [""] * 50


# ---------------------------------------------------------------------------------------------
# Training configs


def test_train_config_yaml_is_strict_and_overridable(tmp_path):
    cfg = load_train_config(TrainConfig, "configs/train_tiny.yaml",
                            ["optim.lr=3e-4", "--data.random_flip=True", "model.unet.use_checkpoint=True"])
    assert cfg.optim.lr == 3e-4 and cfg.data.random_flip and cfg.model.unet.use_checkpoint
    assert cfg.model.unet.model_channels == tiny().unet.model_channels
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_steps: 3\noptim:\n  learning_rate: 1.0e-3\n")
    with pytest.raises(ValueError, match=r"unknown config key\(s\) .*learning_rate for OptimConfig"):
        load_train_config(TrainConfig, bad)
    with pytest.raises(ValueError, match="unknown config key 'optim.lrr'"):
        load_train_config(TrainConfig, None, ["optim.lrr=1"])
    with pytest.raises(ValueError, match="max_steps: expected int, got 'many'"):
        load_train_config(TrainConfig, None, ["max_steps='many'"])
    with pytest.raises(ValueError, match="max_steps: expected int, got 'abc'"):  # a ValueError: one line in the scripts
        load_train_config(TrainConfig, None, ["max_steps=abc"])
    with pytest.raises(ValueError, match="model.unet.model_channels: expected int, got 'wide'"):
        load_train_config(TrainConfig, None, ["model.unet.model_channels=wide"])
    bad.write_text("max_steps: 3\noptim: {lr: many}\n")
    with pytest.raises(ValueError, match=rf"{bad}: optim.lr: expected float, got 'many'"):
        load_train_config(TrainConfig, bad)
    for path in ("configs/train_sd15_finetune.yaml", "configs/train_sd21_finetune.yaml"):
        assert load_train_config(TrainConfig, path).model.unet.use_checkpoint
    vae = load_train_config(VAETrainConfig, "configs/train_vae_tiny.yaml", ["model.ch=64"])
    assert vae.model.ch == 64 and vae.optim.betas == (0.5, 0.9)


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_steps: 3\noptim:\n  lr: 1.0e-4\n   betas: [0.9, 0.99]\n")
    with pytest.raises(ValueError, match=rf"{bad}, line 4 column 9: invalid YAML: mapping values are not allowed"):
        load_train_config(TrainConfig, bad)
    bad.write_text("unet: {model_channels: 32\n")  # as a model_preset file too
    with pytest.raises(ValueError, match=rf"{bad}, line 2 column 1: invalid YAML"):
        load_train_config(TrainConfig, None, [f"model_preset={bad}"])


@pytest.mark.parametrize("cls,override,message", [
    (TrainConfig, "max_steps=0", r"max_steps must be >= 1 \(optimizer steps to train\), got 0"),
    (TrainConfig, "max_steps=-3", "max_steps must be >= 1"),
    (TrainConfig, "batch_size=0", "batch_size must be >= 1, got 0"),
    (TrainConfig, "log_every=0", "log_every must be >= 1, got 0"),
    (TrainConfig, "checkpoint_every=-1", "checkpoint_every must be >= 0"),
    (TrainConfig, "keep_checkpoints=0", "keep_checkpoints must be >= 1"),
    (TrainConfig, "sample_every=-5", "sample_every must be >= 0"),
    (TrainConfig, "sample_steps=0", "sample_steps must be >= 1"),
    (TrainConfig, "cond_drop=1.5", r"cond_drop must be a probability in \[0, 1\], got 1.5"),
    (TrainConfig, "ema_decay=2", "ema_decay must be in"),
    (TrainConfig, "mixed_precision=fp32", "mixed_precision must be '', 'no', 'fp16' or 'bf16', got 'fp32'"),
    (TrainConfig, "optim.lr=0", "optim.lr must be a finite number > 0, got 0.0"),
    (TrainConfig, "optim.lr=-1e-4", "optim.lr must be a finite number > 0, got -0.0001"),
    (TrainConfig, "optim.grad_accum=0", "optim.grad_accum must be >= 1, got 0"),
    (TrainConfig, "optim.betas=[0.9]", r"optim.betas must be two numbers in \[0, 1\)"),
    (TrainConfig, "optim.warmup_steps=-1", "optim.warmup_steps must be >= 0"),
    (TrainConfig, "data.holdout=1.5", "data.holdout must be a fraction in"),
    (TrainConfig, "data.resolution=-64", "data.resolution must be >= 0"),
    (TrainConfig, "model.unet.num_res_blocks=-1", "UNetConfig.num_res_blocks must be >= 1, got -1"),
    (VAETrainConfig, "disc_layers=0", "disc_layers must be >= 1"),
    (VAETrainConfig, "kl_weight=-1", "kl_weight must be >= 0"),
    (VAETrainConfig, "max_steps=0", "max_steps must be >= 1"),
])
def test_train_config_values_are_checked_when_built(cls, override, message):
    with pytest.raises(ValueError, match=message):
        load_train_config(cls, None, [override])


def test_lr_schedule_warms_up_then_holds_or_decays_to_zero():
    constant = lr_factor(load_train_config(TrainConfig, None, ["optim.warmup_steps=10"]).optim, 110)
    cosine = lr_factor(load_train_config(TrainConfig, None, ["optim.warmup_steps=10",
                                                              "optim.lr_schedule='cosine'"]).optim, 110)
    assert [constant(s) for s in (0, 4, 9, 60, 109)] == pytest.approx([0.1, 0.5, 1.0, 1.0, 1.0])
    assert [cosine(s) for s in (0, 9, 10, 60, 110, 500)] == pytest.approx([0.1, 1.0, 1.0, 0.5, 0.0, 0.0])
    with pytest.raises(ValueError, match="optim.lr_schedule must be one of constant, cosine, got 'linear'"):
        load_train_config(TrainConfig, None, ["optim.lr_schedule='linear'"])


def test_train_config_must_fit_init_checkpoint():
    file_cfg = tiny()
    cfg = load_train_config(TrainConfig, None, ["model.unet.use_checkpoint=True"], init="x",
                            read_model=lambda p: file_cfg)
    assert cfg.model.unet == file_cfg.unet.__class__(**{**file_cfg.unet.__dict__, "use_checkpoint": True})
    with pytest.raises(ValueError, match=r"does not fit the --init checkpoint x: model.unet.model_channels: "
                                         r"config 64, checkpoint 32"):
        load_train_config(TrainConfig, None, ["model.unet.model_channels=64"], init="x", read_model=lambda p: file_cfg)
    with pytest.raises(ValueError, match="model.text_encoder.hidden_size: config 768"):
        load_train_config(TrainConfig, None, ["model_preset=sd15"], init="x", read_model=lambda p: file_cfg)
    own = load_train_config(TrainConfig, None, ["model_preset=''", "model.unet.use_checkpoint=True"], init="x",
                            read_model=lambda p: file_cfg)
    assert own.model.unet.model_channels == 32 and own.model.unet.use_checkpoint
    with pytest.raises(ValueError, match="model_preset is empty and there is no --init"):
        load_train_config(TrainConfig, None, ["model_preset=''"])
    # a --vae brings its own autoencoder: the checkpoint's (here another scale_factor) is not compared
    other_vae = replace(file_cfg, autoencoder=replace(file_cfg.autoencoder, scale_factor=0.6))
    with pytest.raises(ValueError, match="model.autoencoder.scale_factor: config 0.18215, checkpoint 0.6"):
        load_train_config(TrainConfig, None, [], init="x", read_model=lambda p: other_vae)
    assert load_train_config(TrainConfig, None, ["vae=v.safetensors"], init="x",
                             read_model=lambda p: other_vae).model.unet == tiny().unet


def test_removed_experiments_are_accepted_off_and_refused_on(tmp_path):
    """Training YAMLs and commands from before the grounding loss and the bidirectional text encoder
    were removed still run when they leave them off."""
    old = tmp_path / "old.yaml"
    old.write_text("max_steps: 3\ngrounding: 0.0\ngrounding_pixel: 0\nmodel:\n  text_encoder:\n"
                   "    bidirectional: false\n")
    cfg = load_train_config(TrainConfig, old, ["grounding=0", "model.text_encoder.bidirectional=false"])
    assert cfg.max_steps == 3 and cfg.model == tiny()
    old.write_text("max_steps: 3\ngrounding: 0.1\n")
    with pytest.raises(ValueError, match=r"grounding=0.1 turns on the cross-attention grounding loss .*removed "
                                         r"from ldm \(ldm 0.1.0 at commit b2dd828 has it\); only grounding=0.0"):
        load_train_config(TrainConfig, old)
    with pytest.raises(ValueError, match="grounding_pixel=0.02 turns on the cross-attention grounding loss"):
        load_train_config(TrainConfig, None, ["grounding_pixel=0.02"])
    with pytest.raises(ValueError, match="text_encoder.bidirectional=True turns on a bidirectional CLIP text"):
        load_train_config(TrainConfig, None, ["model.text_encoder.bidirectional=true"])
    with pytest.raises(ValueError, match="unknown config key 'grounding'"):  # never a field of the VAE's config
        load_train_config(VAETrainConfig, None, ["grounding=0"])

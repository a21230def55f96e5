"""ldm.shapes.noisy_classifier: grid labels of scenes and prompts, the constrained best grid, save/load, and
`pipe(prompt, classifier_scale=s)` (a tiny random pipeline and classifier)."""
import math

import numpy as np
import pytest
import torch

from ldm.shapes import noisy_classifier as nc
from ldm.shapes.scenes import scene_from_prompt

CFG = nc.ClassifierConfig()


def test_scene_labels_mark_each_instance_in_its_cell():
    scene = scene_from_prompt("three red stars on the left", seed=0)
    labels = nc.scene_labels(scene)
    star, red = 1 + CFG.shapes.index("star"), CFG.colours.index("red")
    assert labels[0, :, 0].tolist() == [star] * 3 and (labels[0, :, 1:] == nc.EMPTY).all()
    assert labels[1, :, 0].tolist() == [red] * 3


@pytest.mark.parametrize("prompt, placements", [
    ("three red stars", math.comb(9, 3)),                  # identical instances: unordered cells
    ("two blue squares on the left", math.comb(3, 2)),     # both in the left column
    ("a green heart in the centre", 1),
    # left_of with the evaluator's dominance (Δcol > |Δrow|): 6 adjacent same-row pairs + 7 across two columns
    ("a red circle to the left of a blue square", 6 + 7),
    ("a yellow ring", 9),
])
def test_placements_of_a_prompt_are_exactly_the_grids_that_satisfy_it(prompt, placements):
    target = nc.prompt_target(prompt)
    plans = nc._assignments(target, 3)
    assert len(plans) == placements
    assert len({tuple(p) for p in plans.tolist()}) == placements        # no placement twice
    if "left of" in prompt:
        for a, b in plans.tolist():
            (ar, ac), (br, bc) = divmod(a, 3), divmod(b, 3)
            assert bc - ac > abs(br - ar)


def test_unreadable_prompts_are_not_guided():
    assert nc.prompt_target("a photograph of a cat") is None


def test_prompt_log_prob_is_the_best_satisfying_grid():
    """Logits that make cell 4 (centre) a red circle and cell 0 a red circle less so: for "a red circle"
    the score is log p(red circle at 4) + log p(empty elsewhere), found among the 9 placements."""
    class Fixed(torch.nn.Module):
        config = CFG

        def __init__(self, shape, colour):
            super().__init__()
            self.shape, self.colour = shape, colour

        def forward(self, z, t):
            return self.shape.expand(len(z), -1, -1, -1), self.colour.expand(len(z), -1, -1, -1)
    g = torch.Generator().manual_seed(0)
    shape, colour = torch.randn(1, 9, 3, 3, generator=g), torch.randn(1, 9, 3, 3, generator=g)
    circle, red = 1 + CFG.shapes.index("circle"), CFG.colours.index("red")
    shape[0, circle, 1, 1] += 6
    colour[0, red, 1, 1] += 6
    shape[0, circle, 0, 0] += 3
    score = nc.prompt_log_prob(Fixed(shape, colour), [nc.prompt_target("a red circle"), None])
    got = score(torch.zeros(2, 4, 8, 8), torch.tensor([500, 500]))
    ls, lc = shape.log_softmax(1)[0].flatten(1), colour.log_softmax(1)[0].flatten(1)
    best = max(ls[nc.EMPTY].sum() - ls[nc.EMPTY, c] + ls[circle, c] + lc[red, c] for c in range(9))
    assert float(got[0]) == pytest.approx(float(best), rel=1e-6) and float(got[1]) == 0.0


def test_save_and_load_give_the_same_classifier(tmp_path):
    torch.manual_seed(0)
    clf = nc.NoisyClassifier(nc.ClassifierConfig(channels=16)).eval()
    path = nc.save(clf, tmp_path / "c.safetensors")
    back = nc.load(path)
    z, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 900])
    for a, b in zip(clf(z, t), back(z, t)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="no such classifier"):
        nc.load(tmp_path / "missing.safetensors")


def test_loss_is_cross_entropy_over_cells_and_occupied_colours():
    torch.manual_seed(0)
    clf = nc.NoisyClassifier(nc.ClassifierConfig(channels=16))
    labels = torch.stack([nc.scene_labels(scene_from_prompt("two blue squares on the left", seed=1))])
    z, t = torch.randn(1, 4, 16, 16), torch.tensor([300])
    value, stats = nc.loss(clf, z, t, labels)
    shape_logits, colour_logits = clf(z, t)
    occupied = labels[0, 0] != nc.EMPTY
    colour_rows = colour_logits.permute(0, 2, 3, 1)[0][occupied]            # (occupied cells, K)
    expected = (torch.nn.functional.cross_entropy(shape_logits, labels[:, 0])
                + torch.nn.functional.cross_entropy(colour_rows, labels[0, 1][occupied]))
    assert float(value) == pytest.approx(float(expected), rel=1e-6)


def test_pipeline_classifier_scale(saved):
    pipe = saved["sd1"]["pipe"]
    kw = dict(steps=3, guidance_scale=1.0, height=32, width=32, seed=0, sampler="ddim", output_type="latent")
    with pytest.raises(ValueError, match="needs a noisy classifier"):
        pipe("a red circle", classifier_scale=2.0, **kw)
    torch.manual_seed(0)
    clf = nc.NoisyClassifier(nc.ClassifierConfig(in_channels=pipe.config.unet.in_channels, channels=16))
    with torch.no_grad():
        for p in clf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    nc.attach(pipe, clf)
    try:
        with pytest.raises(ValueError, match="classifier_scale"):
            pipe("a red circle", classifier_scale=-1.0, **kw)
        plain = pipe(["a red circle", "a cat"], **kw)
        assert torch.equal(pipe(["a red circle", "a cat"], classifier_scale=0.0, **kw), plain)
        guided = pipe(["a red circle", "a cat"], classifier_scale=50.0, **kw)
        assert not torch.allclose(guided[0], plain[0])        # guided toward its grid
        assert torch.equal(guided[1], plain[1])              # "a cat": nothing to guide toward
        target = nc.prompt_log_prob(clf, [nc.prompt_target("a red circle")])
        t = torch.tensor([1])
        assert float(target(guided[:1], t)) > float(target(plain[:1], t))
    finally:
        del pipe.classifier


def test_classifier_guides_only_below_its_reliable_t(saved):
    """prompt_guidance leaves the model's output alone at t ≥ GUIDE_BELOW_T and shifts it below."""
    pipe = saved["sd1"]["pipe"]
    torch.manual_seed(0)
    clf = nc.NoisyClassifier(nc.ClassifierConfig(in_channels=pipe.config.unet.in_channels, channels=16))
    nc.attach(pipe, clf)
    try:
        model_fn = lambda x, t: torch.zeros_like(x)                          # noqa: E731
        guided = nc.prompt_guidance(pipe, ["a red circle"], 50.0)(model_fn)
        x = torch.randn(1, pipe.config.unet.in_channels, 8, 8, generator=torch.Generator().manual_seed(1))
        for t in (nc.GUIDE_BELOW_T, 900):
            assert torch.equal(guided(x, torch.tensor([t])), model_fn(x, t))
        assert guided(x, torch.tensor([nc.GUIDE_BELOW_T - 1])).abs().sum() > 0
    finally:
        del pipe.classifier


def test_cli_classifier_scale_uses_the_shipped_classifier(tmp_path):
    """`ldm generate --classifier-scale S` on the default model: the classifier shipped beside it,
    the same picture as the Python call with it attached, the scale in the PNG's parameters."""
    from PIL import Image

    from ldm import Pipeline
    from ldm.cli import main as cli
    from ldm.pipeline import DEFAULT_CLASSIFIER
    out = tmp_path / "guided.png"
    kw = dict(steps=3, seed=5, guidance_scale=1.0)
    assert cli(["generate", "two red circles", "-o", str(out), "--steps", "3", "--seed", "5", "--scale", "1",
                "--classifier-scale", "4", "-q"]) == 0
    pipe = Pipeline.from_pretrained(None)
    nc.attach(pipe, DEFAULT_CLASSIFIER)
    ref = pipe("two red circles", classifier_scale=4.0, **kw)[0]
    plain = pipe("two red circles", **kw)[0]
    img = Image.open(out)
    assert np.array_equal(np.asarray(img), np.asarray(ref))
    assert not np.array_equal(np.asarray(ref), np.asarray(plain))
    assert img.text["classifier_scale"] == "4.0" and "Classifier scale: 4.0" in img.text["parameters"]

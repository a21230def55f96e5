"""Session fixtures: tiny random models of both SD families, saved once in every format."""
import pytest

from ldm import Pipeline
from tiny_models import FAMILIES, random_model


@pytest.fixture(scope="session", params=sorted(FAMILIES))
def family(request):
    return request.param


@pytest.fixture(scope="session")
def saved(tmp_path_factory):
    """Per family: the random model, and its files in all three formats (written once)."""
    out = {}
    for name, make in FAMILIES.items():
        cfg = make()
        model = random_model(cfg)
        root = tmp_path_factory.mktemp(name)
        pipe = Pipeline(model)
        paths = {"ldm": root / "model.safetensors", "original": root / "original.safetensors",
                 "diffusers": root / "diffusers"}
        for fmt, path in paths.items():
            pipe.save_pretrained(path, fmt)
        out[name] = dict(cfg=cfg, model=model, pipe=pipe, **paths)
    return out

"""Reduced precision: where it is native, what 'auto' picks, the layout it runs in, what it costs in
pixels; and torch.compile, which must not change the numbers."""
import warnings

import numpy as np
import pytest
import torch

from ldm import LatentDiffusion, Pipeline, precision
from ldm.cli import main as cli
from tiny_models import random_model, tiny_sd1

CPU = torch.device("cpu")


@pytest.fixture
def native_bf16(monkeypatch):
    def set_(value: bool):
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: value)
    return set_


def test_auto_picks_bf16_only_where_the_cpu_has_it(native_bf16):
    native_bf16(False)
    assert precision.resolve("auto", CPU) == torch.float32
    native_bf16(True)
    assert precision.resolve("auto", CPU) == torch.bfloat16
    assert precision.auto_dtype(torch.device("cuda")) == torch.float16


def test_emulated_bf16_warns_and_native_does_not(native_bf16):
    native_bf16(False)
    with pytest.warns(UserWarning, match="emulated .*AVX512-BF16"):
        precision.resolve(torch.bfloat16, CPU)
    native_bf16(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert precision.resolve("bf16", CPU) == torch.bfloat16
        assert precision.resolve(torch.float32, CPU) == torch.float32


def test_bad_dtypes_are_refused():
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        precision.resolve("float8", CPU)
    with pytest.raises(TypeError, match="torch.float32, torch.bfloat16"):
        precision.resolve(torch.int8, CPU)


def psnr(a, b) -> float:
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float(10 * np.log10(255 ** 2 / mse)) if mse else float("inf")


def test_bf16_runs_channels_last_and_stays_close_to_fp32(native_bf16):
    native_bf16(True)                        # no warning: the layout and numbers are what is tested
    model = random_model(tiny_sd1())
    ref = Pipeline(model)("a red circle", steps=3, height=64, width=64, seed=3)
    assert Pipeline(model).unet.input_blocks[0][0].weight.is_contiguous()           # fp32: NCHW, exact
    fast = Pipeline(random_model(tiny_sd1()), dtype="bf16")
    fast.model.load_state_dict(model.state_dict())
    conv = fast.unet.input_blocks[0][0].weight
    assert conv.dtype == torch.bfloat16 and conv.is_contiguous(memory_format=torch.channels_last)
    out = fast("a red circle", steps=3, height=64, width=64, seed=3)
    assert 25 < psnr(out[0], ref[0]) < float("inf")      # close, and not secretly float32


def test_cli_dtype_auto_is_float32_without_native_bf16(tmp_path, native_bf16, saved):
    native_bf16(False)
    out = tmp_path / "a.png"
    assert cli(["generate", "a red circle", "--model", str(saved["sd1"]["ldm"]), "--steps", "2",
                "--height", "64", "--width", "64", "--seed", "1", "--dtype", "auto", "-o", str(out), "-q"]) == 0
    ref = tmp_path / "b.png"
    assert cli(["generate", "a red circle", "--model", str(saved["sd1"]["ldm"]), "--steps", "2",
                "--height", "64", "--width", "64", "--seed", "1", "-o", str(ref), "-q"]) == 0
    from PIL import Image
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(ref)))


@pytest.mark.slow   # inductor compiles C++ for a minute or more on 2 cores
def test_compiled_unet_gives_the_same_pictures():
    model = random_model(tiny_sd1())
    ref = Pipeline(model)("a red circle", steps=2, height=64, width=64, seed=0, output_type="np")
    pipe = Pipeline(model).compile()
    out = pipe("a red circle", steps=2, height=64, width=64, seed=0, output_type="np")
    assert np.abs(out - ref).max() <= 1 / 255
    assert not any("_orig_mod" in k for k in pipe.model.state_dict())    # names unchanged: saving, LoRA

"""State-dict keys of a `LatentDiffusion` (= the original SD single-file layout): the prefix of each
part, the keys an original file may carry that the model does not own, and the strict key check."""
import re

# SD-compat: the original checkpoints' names of the three parts, kept by LatentDiffusion
UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model."

# Keys an original checkpoint may carry that the model does not own, and why.
IGNORED = (
    re.compile(r"^(betas|alphas_cumprod.*|sqrt_.*|log_one_minus.*|posterior_.*|lvlb_weights|logvar)$"),  # schedule buffers, recomputed
    re.compile(r"^low_scale_model\."),                  # the x4 upscaler's low-res noise schedule (low_res_schedule)
    re.compile(r"^model_ema\."),                          # EMA copy (extracted with use_ema=True)
    re.compile(rf"^{re.escape(VAE)}loss\."),              # VAE training losses (LPIPS, discriminator)
    re.compile(rf"^{re.escape(TEXT)}.*position_ids$"),    # old transformers buffer
    re.compile(rf"^{re.escape(TEXT)}model\.visual\."),    # OpenCLIP image tower (SD2 deletes it)
)


def split(sd: dict, prefix: str) -> dict:
    """The entries of `sd` under `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def assert_shapes_match(sd: dict, reference: dict, what: str) -> None:
    """Raise a ValueError naming the first missing, unexpected and mismatched keys."""
    missing = [k for k in reference if k not in sd]
    unexpected = [k for k in sd if k not in reference]
    mismatched = [f"{k}: {tuple(sd[k].shape)} vs {tuple(reference[k].shape)}"
                  for k in reference if k in sd and tuple(sd[k].shape) != tuple(reference[k].shape)]
    if missing or unexpected or mismatched:
        def first(xs):
            return ", ".join(xs[:3]) + (f" (+{len(xs) - 3} more)" if len(xs) > 3 else "") if xs else "none"
        raise ValueError(f"{what} does not fit the model config: {len(missing)} missing "
                         f"[{first(missing)}], {len(unexpected)} unexpected [{first(unexpected)}], "
                         f"{len(mismatched)} mismatched [{first(mismatched)}]. Check that the config "
                         f"(or --config override) describes this checkpoint.")


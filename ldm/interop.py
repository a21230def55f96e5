"""In-memory hand-over to diffusers: the same weights as a `diffusers.StableDiffusionPipeline`,
without writing a folder. Used to compare against the reference (tests, bench/)."""
import tempfile

from . import text
from .formats.diffusers_configs import unet_config_to_diffusers, vae_config_to_diffusers
from .formats.diffusers_folder import text_to_diffusers
from .formats.diffusers_keys import unet_to_diffusers, vae_to_diffusers
from .formats.diffusers_scheduler import schedule_to_diffusers
from .formats.keys import TEXT, UNET, VAE, split


def to_diffusers(pipe):
    """A diffusers StableDiffusionPipeline (the scheduler of the model's default sampler) holding copies
    of `pipe`'s weights."""
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    cfg, sd = pipe.config, pipe.model.state_dict()
    unet = UNet2DConditionModel.from_config(unet_config_to_diffusers(cfg.unet, cfg.latent_size))
    unet.load_state_dict(unet_to_diffusers(split(sd, UNET), cfg.unet))
    vae = AutoencoderKL.from_config(vae_config_to_diffusers(cfg.autoencoder, cfg.sample_size))
    vae.load_state_dict(vae_to_diffusers(split(sd, VAE), cfg.autoencoder))
    te_sd, _ = text_to_diffusers(split(sd, TEXT), cfg.text_encoder)
    te = CLIPTextModel(text.hf_config_of(cfg.text_encoder))
    te.load_state_dict({k.removeprefix("text_model."): v for k, v in te_sd.items()})
    with tempfile.TemporaryDirectory() as tmp:
        text.save_hf_tokenizer(tmp, cfg.text_encoder.pad_with, cfg.text_encoder.max_length)
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    config = schedule_to_diffusers(cfg.schedule, cfg.default_sampler)
    scheduler = getattr(diffusers, config["_class_name"]).from_config(config)   # as loading a folder does
    ref = StableDiffusionPipeline(unet=unet.eval(), vae=vae.eval(), text_encoder=te.eval(), tokenizer=tokenizer,
                                  scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                  requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref.to(device=pipe.device, dtype=pipe.dtype)

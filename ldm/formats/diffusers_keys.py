"""Key maps between our parameter names (= original CompVis/SD layout) and diffusers' layout,
generated from the config, for the UNet and the autoencoder. One table serves both directions."""
from ..config import AutoencoderConfig, UNetConfig

_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
           "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
               "nin_shortcut": "conv_shortcut"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _rename(key: str, prefixes: dict[str, str]) -> str | None:
    """Longest-prefix rename of `key` (prefixes end at a module boundary), None if none applies."""
    for old in sorted(prefixes, key=len, reverse=True):
        if key == old or key.startswith(old + "."):
            return prefixes[old] + key[len(old):]
    return None


def _unet_prefixes(cfg: UNetConfig) -> dict[str, str]:
    """Module-prefix map ours -> diffusers' UNet2DConditionModel."""
    m = {"input_blocks.0.0": "conv_in", "time_embed.0": "time_embedding.linear_1",
         "time_embed.2": "time_embedding.linear_2", "label_emb": "class_embedding",
         "out.0": "conv_norm_out", "out.2": "conv_out"}
    if cfg.adm_in_channels:   # unCLIP: label_emb is an MLP, diffusers' TimestepEmbedding
        m.update({"label_emb.0.0": "class_embedding.linear_1", "label_emb.0.2": "class_embedding.linear_2"})

    def resnet(ours, theirs):
        m.update({f"{ours}.{a}": f"{theirs}.{b}" for a, b in _RESNET.items()})

    n, nrb = len(cfg.channel_mult), cfg.num_res_blocks
    for i in range(n):
        attn = 2 ** i in cfg.attention_resolutions
        for j in range(nrb):
            k = 1 + i * (nrb + 1) + j
            resnet(f"input_blocks.{k}.0", f"down_blocks.{i}.resnets.{j}")
            if attn:
                m[f"input_blocks.{k}.1"] = f"down_blocks.{i}.attentions.{j}"
        if i != n - 1:
            m[f"input_blocks.{(i + 1) * (nrb + 1)}.0.op"] = f"down_blocks.{i}.downsamplers.0.conv"
    resnet("middle_block.0", "mid_block.resnets.0")
    m["middle_block.1"] = "mid_block.attentions.0"
    resnet("middle_block.2", "mid_block.resnets.1")
    for i in range(n):  # diffusers' up block i is our level n-1-i
        attn = 2 ** (n - 1 - i) in cfg.attention_resolutions
        for j in range(nrb + 1):
            k = i * (nrb + 1) + j
            resnet(f"output_blocks.{k}.0", f"up_blocks.{i}.resnets.{j}")
            if attn:
                m[f"output_blocks.{k}.1"] = f"up_blocks.{i}.attentions.{j}"
        if i != n - 1:
            m[f"output_blocks.{i * (nrb + 1) + nrb}.{2 if attn else 1}.conv"] = f"up_blocks.{i}.upsamplers.0.conv"
    return m


def _vae_prefixes(cfg: AutoencoderConfig) -> dict[str, str]:
    """Module-prefix map ours -> diffusers' AutoencoderKL."""
    n, nrb = len(cfg.ch_mult), cfg.num_res_blocks
    same = ["quant_conv", "post_quant_conv"] + [f"{p}.{c}" for p in ("encoder", "decoder") for c in ("conv_in", "conv_out")]
    m = {"encoder.norm_out": "encoder.conv_norm_out", "decoder.norm_out": "decoder.conv_norm_out"}
    m.update({k: k for k in same})

    def resnet(ours, theirs):
        m.update({f"{ours}.{a}": f"{theirs}.{b}" for a, b in _VAE_RESNET.items()})

    for part in ("encoder", "decoder"):
        resnet(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0")
        resnet(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1")
        m.update({f"{part}.mid.attn_1.{a}": f"{part}.mid_block.attentions.0.{b}" for a, b in _VAE_ATTN.items()})
    for i in range(n):
        for j in range(nrb):
            resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}")
        m[f"encoder.down.{i}.downsample.conv"] = f"encoder.down_blocks.{i}.downsamplers.0.conv"
        for j in range(nrb + 1):  # SD-compat: decoder.up is indexed by level, diffusers by order
            resnet(f"decoder.up.{n - 1 - i}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}")
        m[f"decoder.up.{n - 1 - i}.upsample.conv"] = f"decoder.up_blocks.{i}.upsamplers.0.conv"
    return m


def _convert(sd: dict, prefixes: dict[str, str], what: str) -> dict:
    out = {}
    for k, v in sd.items():
        new = _rename(k, prefixes)
        if new is None:
            raise ValueError(f"{what} key {k!r} does not fit this config")
        out[new] = v
    return out


def unet_to_diffusers(sd: dict, cfg: UNetConfig) -> dict:
    return _convert(sd, _unet_prefixes(cfg), "UNet")


def unet_from_diffusers(sd: dict, cfg: UNetConfig) -> dict:
    return _convert(sd, {v: k for k, v in _unet_prefixes(cfg).items()}, "diffusers UNet")


def vae_to_diffusers(sd: dict, cfg: AutoencoderConfig) -> dict:
    out = _convert(sd, _vae_prefixes(cfg), "autoencoder")
    # SD-compat: the mid-block attention's q/k/v/proj_out are 1×1 convs here, Linear in diffusers
    return {k: v[:, :, 0, 0] if ".attentions." in k and v.dim() == 4 else v for k, v in out.items()}


def vae_from_diffusers(sd: dict, cfg: AutoencoderConfig) -> dict:
    out = _convert(sd, {v: k for k, v in _vae_prefixes(cfg).items()}, "diffusers autoencoder")
    return {k: v[:, :, None, None] if ".attn_1." in k and v.dim() == 2 else v for k, v in out.items()}

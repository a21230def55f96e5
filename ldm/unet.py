"""Cross-attention UNet ε_θ(z_t, t, τ(y)). Parameter names follow CompVis `openaimodel.py`
(time_embed, input_blocks, middle_block, output_blocks, out) so SD checkpoints load with
strict=True. The timestep (and optional class label) enters every ResBlock channel-wise."""
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import SpatialTransformer
from .config import UNetConfig
from .layers import Downsample, Upsample, normalize, timestep_embedding, zero_module


class ResBlock(nn.Module):
    """Two 3×3 convs with the embedding injected between them: added (SD), or as a per-channel
    scale and shift after the norm (`scale_shift`, the seeds' AdaGN)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int,
                 scale_shift: bool = False):
        super().__init__()
        self.scale_shift = scale_shift
        self.in_layers = nn.Sequential(normalize(channels, groups), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(),
                                        nn.Linear(emb_channels, out_channels * (2 if scale_shift else 1)))
        self.out_layers = nn.Sequential(normalize(out_channels, groups), nn.SiLU(), nn.Dropout(0.0),
                                        zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x, emb):
        h = self.in_layers(x)
        emb = self.emb_layers(emb)[:, :, None, None].to(h.dtype)  # (B, C or 2C, 1, 1)
        if self.scale_shift:
            norm, rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = emb.chunk(2, dim=1)
            h = rest(norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb)
        return self.skip_connection(x) + h


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential whose layers get what they need: ResBlocks the embedding, transformers the context."""

    def forward(self, x, emb, context, up_size=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, up_size)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        mc, g = cfg.model_channels, cfg.norm_groups
        emb_ch = mc * 4

        def res(cin, cout):
            return ResBlock(cin, emb_ch, cout, g, cfg.use_scale_shift_norm)

        def attn(ch, level):  # level None: the middle block
            heads, dim_head = cfg.heads_at(ch)
            no_self = (cfg.disable_middle_self_attn if level is None else
                       bool(cfg.disable_self_attentions and cfg.disable_self_attentions[level]))
            return SpatialTransformer(ch, heads, dim_head, cfg.transformer_depth, cfg.context_dim,
                                      cfg.use_linear_in_transformer, g, no_self)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        if cfg.num_classes is not None:
            self.label_emb = nn.Embedding(cfg.num_classes, emb_ch)
        elif cfg.adm_in_channels is not None:  # SD-compat: openaimodel's num_classes="sequential" (unCLIP)
            self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(cfg.adm_in_channels, emb_ch), nn.SiLU(),
                                                         nn.Linear(emb_ch, emb_ch)))

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_chans, ch, ds = [mc], mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [res(ch, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(attn(ch, level))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch, None), res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), mc * mult)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(attn(ch, level))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(normalize(ch, g), nn.SiLU(),
                                 zero_module(nn.Conv2d(mc, cfg.out_channels, 3, padding=1)))
        self.gradient_checkpointing = cfg.use_checkpoint

    def _run(self, block, h, emb, context, up_size=None):
        if self.gradient_checkpointing and self.training:
            return checkpoint(block, h, emb, context, up_size, use_reentrant=False)
        return block(h, emb, context, up_size)

    def encode(self, x, t, context, y=None):
        """The encoder half: (middle-block output, the input blocks' outputs (the skips), emb)."""
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(x.dtype))  # (B, 4mc)
        if self.config.num_classes is not None or self.config.adm_in_channels is not None:
            if y is None:
                raise ValueError("this UNet is class-conditional: pass class labels y of shape (B,) "
                                 "(or vectors (B, adm_in_channels))")
            emb = emb + self.label_emb(y.to(emb.dtype) if y.is_floating_point() else y)
        context = context.to(x.dtype)
        skips, h = [], x
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            skips.append(h)
        return self._run(self.middle_block, h, emb, context), skips, emb

    def forward(self, x, t, context, y=None):
        """x (B, C, h, w), t (B,) int or float timesteps, context (B, L, D), y (B,) class labels."""
        h, skips, emb = self.encode(x, t, context, y)
        context = context.to(x.dtype)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            # upsample to the next skip's size, so latents need not be a multiple of 2**levels
            h = self._run(block, h, emb, context, skips[-1].shape[-2:] if skips else None)
        return self.out(h)

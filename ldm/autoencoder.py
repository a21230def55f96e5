"""KL-regularised autoencoder (LDM's first stage): Encoder, Decoder, diagonal Gaussian posterior.
Parameter names follow CompVis `ldm/modules/diffusionmodules/model.py` (conv_in, down.N.block,
mid.block_1/attn_1/block_2, up.N, norm_out, conv_out, quant_conv, post_quant_conv)."""
import torch
import torch.nn.functional as F
from torch import nn

from .config import AutoencoderConfig
from .layers import normalize


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = normalize(cin, groups, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = normalize(cout, groups, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over h·w. SD-compat: q/k/v/proj_out are 1×1 convs."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = normalize(ch, groups, eps=1e-6)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2)[:, None] for m in (self.q, self.k, self.v))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """SD-compat: asymmetric (0, 1, 0, 1) padding then a stride-2 3×3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks, attns, sample=None):
    m = nn.Module()
    m.block, m.attn = nn.ModuleList(blocks), nn.ModuleList(attns)
    if sample is not None:
        setattr(m, *sample)
    return m


def _mid(ch: int, groups: int) -> nn.Module:
    m = nn.Module()
    m.block_1, m.attn_1, m.block_2 = ResnetBlock(ch, ch, groups), AttnBlock(ch, groups), ResnetBlock(ch, ch, groups)
    return m


def _run_mid(mid, h):
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        g, ch, n = cfg.norm_groups, cfg.ch, len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin, res = ch, 1  # res: downsampling so far (attn_resolutions are given as factors here)
        for i, mult in enumerate(cfg.ch_mult):
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(cin, ch * mult, g))
                cin = ch * mult
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(cin, g))
            self.down.append(_level(blocks, attns, ("downsample", Downsample(cin)) if i != n - 1 else None))
            res *= 2
        self.mid = _mid(cin, g)
        self.norm_out = normalize(cin, g, eps=1e-6)
        self.conv_out = nn.Conv2d(cin, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = _run_mid(self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        g, ch, n = cfg.norm_groups, cfg.ch, len(cfg.ch_mult)
        cin = ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = _mid(cin, g)
        up, res = [], 2 ** (n - 1)
        for i in reversed(range(n)):
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(cin, ch * cfg.ch_mult[i], g))
                cin = ch * cfg.ch_mult[i]
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(cin, g))
            up.insert(0, _level(blocks, attns, ("upsample", Upsample(cin)) if i != 0 else None))
            res //= 2
        self.up = nn.ModuleList(up)  # SD-compat: decoder.up is indexed by level, run in reverse
        self.norm_out = normalize(cin, g, eps=1e-6)
        self.conv_out = nn.Conv2d(cin, cfg.out_ch, 3, padding=1)

    def forward(self, z):
        h = _run_mid(self.mid, self.conv_in(z))
        for level in reversed(self.up):
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """Posterior q(z|x) = N(mean, exp(logvar)); logvar clamped to [-30, 20] as in LDM."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype,
                            device=generator.device if generator is not None else self.mean.device)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over latent dims -> (B,)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class Upsampler(nn.Module):
    """The learned ×k after the decoder (pixel_scale k, upsampler_channels > 0), in place of the bicubic
    ×k: each output pixel is a convex combination of the 5×5 decoder pixels around it, with weights
    predicted by a small sub-pixel CNN (ESPCN, Shi et al. 2016: 3×3 convolutions at the decoder's output
    size, then 25 weights for each of the k·k output pixels of a decoder pixel, rearranged by
    pixel_shuffle; kernel prediction as in CARAFE, Wang et al. 2019). A softmax over the 25 makes them
    the weights: the network learns where an edge runs, not which colours meet there, and a confident
    choice is a sharp edge in the decoder's own colours (a flat colour stays exactly that colour; no
    ringing). The softmax's logits are the network's output plus a fixed prior, -d²/(2·0.5²) with d
    the distance from the output pixel to a decoder pixel's centre (in decoder pixels): the last
    convolution starts at zero, so an untrained upsampler is that smooth Gaussian interpolation."""
    WINDOW, SIGMA = 5, 0.5

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        c, k, n = cfg.upsampler_channels, cfg.pixel_scale, self.WINDOW
        self.scale = k
        self.conv_in = nn.Conv2d(cfg.out_ch, c, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in range(cfg.upsampler_blocks))
        self.conv_out = nn.Conv2d(c, n * n * k * k, 1)   # channel j·k² + s: neighbour j (row-major), sub-pixel s
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        self.register_buffer("prior", self.prior_logits(k), persistent=False)

    @classmethod
    def prior_logits(cls, k: int) -> torch.Tensor:
        """(WINDOW², k²): -d²/(2σ²) from sub-pixel s of the centre decoder pixel to neighbour j."""
        sub = (torch.arange(k, dtype=torch.float64) + 0.5) / k - 0.5      # sub-pixel centres, in decoder pixels
        off = torch.arange(cls.WINDOW, dtype=torch.float64) - cls.WINDOW // 2
        dy = off[:, None, None, None] - sub[None, None, :, None]
        dx = off[None, :, None, None] - sub[None, None, None, :]
        return (-(dy ** 2 + dx ** 2) / (2 * cls.SIGMA ** 2)).reshape(cls.WINDOW ** 2, k * k).float()

    def kernels(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, h, w) -> the weights (B, WINDOW², k², h, w): over dim 1 they sum to 1."""
        B, _, h, w = x.shape
        f = F.silu(self.conv_in(x))
        for conv in self.blocks:
            f = f + F.silu(conv(f))
        logits = self.conv_out(f).reshape(B, self.WINDOW ** 2, self.scale ** 2, h, w)
        return torch.softmax(logits + self.prior.to(logits.dtype)[None, :, :, None, None], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, h, w), the decoder's output -> (B, C, h·k, w·k)."""
        B, C, h, w = x.shape
        k, n, r = self.scale, self.WINDOW, self.WINDOW // 2
        weights = self.kernels(x).permute(0, 3, 4, 2, 1).reshape(B, h * w, k * k, n * n)
        near = F.unfold(F.pad(x, (r, r, r, r), mode="replicate"), n)             # (B, C·n², h·w)
        near = near.reshape(B, C, n * n, h * w).permute(0, 3, 2, 1)              # (B, h·w, n², C)
        out = (weights @ near).permute(0, 3, 2, 1).reshape(B, C * k * k, h, w)  # channel c·k² + s
        return F.pixel_shuffle(out, k)


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        if cfg.upsampler_channels:  # absent otherwise: the state dict of every other model is unchanged
            self.upsampler = Upsampler(cfg)

    def encode(self, x: torch.Tensor, resample: bool = True) -> DiagonalGaussian:
        """x (B, 3, H, W) in [-1, 1] -> posterior over z (B, embed_dim, H/f, W/f), unscaled.
        resample=False: x is already at the learned network's size (H/pixel_scale), as the training
        data loaders provide it, so pixel_scale costs nothing in training."""
        k = self.config.pixel_scale
        if k != 1 and resample:  # (B, 3, H/k, W/k): the learned encoder sees the image k× smaller
            x = F.interpolate(x, scale_factor=1 / k, mode="bicubic", antialias=True, align_corners=False)
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor, resample: bool = True) -> torch.Tensor:
        """z (B, embed_dim, h, w), unscaled -> x (B, 3, h·f, w·f) in about [-1, 1].
        resample=False: the learned decoder's output, before the ×pixel_scale."""
        x = self.decoder(self.post_quant_conv(z))
        k = self.config.pixel_scale
        if k != 1 and resample:  # (B, 3, h·f, w·f): bicubic ×k after the learned decoder (+ the upsampler's residual)
            if hasattr(self, "upsampler"):
                return self.upsampler(x)
            x = F.interpolate(x, scale_factor=k, mode="bicubic", align_corners=False)
        return x

    def forward(self, x, generator=None, resample: bool = True):
        posterior = self.encode(x, resample)
        return self.decode(posterior.sample(generator), resample), posterior

"""Image-generation metrics, offline: FID and KID on the FID Inception-v3's pool3 features (clean-fid's
resize), and CLIP score with a CLIP model the caller supplies. Not imported by `import ldm`.

    ldm.metrics.fid("renders/", "samples/")       # or a .npz of reference (mu, sigma)
    ldm.metrics.kid("renders/", "samples/")       # raw unbiased MMD², as clean-fid (not × 1000)
    ldm.metrics.clip_score(images, prompts, model=m, preprocess=p, tokenizer=t)
"""
from .clip_score import clip_score
from .distances import (fid, frechet_distance, kernel_distance, kid, load_statistics, save_statistics,
                        statistics)
from .inception import features, inception_weights
from .images import UnreadableImageWarning

__all__ = ["fid", "kid", "clip_score", "features", "frechet_distance", "kernel_distance", "statistics",
           "load_statistics", "save_statistics", "inception_weights", "UnreadableImageWarning"]

"""Max per-pixel gap between ldm and diffusers for every sampler on folders shipped with the real SD 1.5 /
2.1 scheduler configs (tests/test_scheduler_configs.py builds them). Run from the repo root:
python bench/parity_gap.py"""
import sys, tempfile
from pathlib import Path
import numpy as np
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny_models import FAMILIES, random_model
from ldm import Pipeline
import test_scheduler_configs as T
root = Path(tempfile.mkdtemp())
saved = {}
for fam, make in FAMILIES.items():
    p = Pipeline(random_model(make())); d = root / fam; p.save_pretrained(d, "diffusers"); saved[fam] = {"diffusers": d}
worst = {}
for fam in saved:
    for spacing in (None, "trailing"):
        folder = T.ship(saved, fam, root / f"{fam}{spacing}", **({"timestep_spacing": spacing} if spacing else {}))
        ref = T.theirs(folder); ours = Pipeline.from_pretrained(folder)
        for s, k in T.VARIANTS:
            a, b = T.images(T.theirs(folder, s, k, ref), ours, sampler=s, karras=k or None)
            worst[(fam, spacing, s, k)] = float(np.abs(a - b).max())
for k, v in worst.items(): print(k, f"{v:.2e}")
print("max", max(worst.values()))

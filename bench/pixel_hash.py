"""sha256 of 12 default-model images (6 prompts x 2, default settings): equal hashes before and after a
change mean the same pixels. python bench/pixel_hash.py; with PYTHONPATH=<other checkout> for the other side."""
import sys, numpy as np, hashlib
import ldm
print(ldm.__file__, file=sys.stderr)
p = ldm.Pipeline.from_pretrained()
prompts = ["a red circle to the left of a blue square", "two green stars", "a yellow heart at the top",
           "a small purple triangle", "three orange diamonds on a white background", "a cyan cross below a pink circle"]
h = hashlib.sha256()
for i, pr in enumerate(prompts):
    for im in p(pr, seed=100 + i, num_images_per_prompt=2):
        h.update(np.asarray(im).tobytes())
print(h.hexdigest())

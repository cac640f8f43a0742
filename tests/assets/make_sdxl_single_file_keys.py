"""Regenerate tests/assets/sdxl_single_file_keys.txt.gz: SDXL 1.0's single-file weight names, checked by
diffusers' own LDM converters (every name consumed, every diffusers weight produced)."""

import gzip
from pathlib import Path

import torch
from diffusers.loaders import single_file_utils as s

from sdprep.train.models.fullsize import FULL, build_components
from sdprep.train.save.sgm import TE1_PREFIX, TE2_PREFIX, UNET_PREFIX, VAE_PREFIX, pipeline_to_sgm

with torch.device("meta"):
    u, v, a, b = build_components(FULL)
sd = pipeline_to_sgm(u, a, b, v)
# oracle: diffusers' converters map the names back onto exactly the diffusers models' weights
unet = s.convert_ldm_unet_checkpoint(
    {k: t for k, t in sd.items() if k.startswith(UNET_PREFIX)}, dict(u.config)
)
assert set(unet) == set(u.state_dict()), set(unet) ^ set(u.state_dict())
vae = s.convert_ldm_vae_checkpoint({k: t for k, t in sd.items() if k.startswith(VAE_PREFIX)}, dict(v.config))
assert set(vae) == set(v.state_dict()), set(vae) ^ set(v.state_dict())
te1 = s.convert_ldm_clip_checkpoint(
    {k: t for k, t in sd.items() if k.startswith(TE1_PREFIX)}, remove_prefix=TE1_PREFIX
)
want = {
    k if k.startswith("text_model.") else "text_model." + k
    for k in a.state_dict()
    if not k.endswith("position_ids")
}
assert set(te1) - {"text_model.embeddings.position_ids"} == want, set(te1) ^ want
te2 = s.convert_open_clip_checkpoint(
    b, {k: t for k, t in sd.items() if k.startswith(TE2_PREFIX)}, prefix=TE2_PREFIX
)
want2 = {k for k in b.state_dict() if not k.endswith("position_ids")}
assert set(te2) - {"text_model.embeddings.position_ids"} == want2, set(te2) ^ want2
print(len(sd), len(unet), len(vae), len(te1), len(te2))
text = "\n".join(sorted(sd)) + "\n"
(Path(__file__).parent / "sdxl_single_file_keys.txt.gz").write_bytes(gzip.compress(text.encode(), mtime=0))

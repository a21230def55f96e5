"""The checkpoint formats, one job a module; `ldm.checkpoint` is the entry point (load, save).
- files: .safetensors / pickle reading, atomic writes, JSON, which format a path holds;
- keys: the SD key prefixes of the three parts, keys the model does not own, the strict key check;
- original: the single-file SD layout and the config inferred from its tensor shapes;
- diffusers_folder: a diffusers folder's weights and config; diffusers_configs: its parts'
  config.json files; diffusers_keys: its UNet/VAE key maps; diffusers_scheduler: its scheduler config."""

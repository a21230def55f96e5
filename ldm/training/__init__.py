"""What the training scripts (train_ldm.py, train_vae.py) share, one job a module:

    config.py       the training configs (strict YAML, --set overrides, fitting an --init checkpoint)
    data.py         image-caption folders, datasets, the latent cache, the shuffled loader
    run.py          the accelerator, start / resume / log / checkpoint / export steps of a run
    state.py        resumable checkpoints, the data position, the metrics log
    optim.py        AdamW and the learning-rate schedule
    ema.py          the EMA of the trained weights (train_ldm.py)
    vae_losses.py   the autoencoder's losses: L1/MSE, KL, LPIPS, PatchGAN (train_vae.py)
    vae_export.py   the autoencoder file train_vae.py writes and train_ldm.py --vae reads
    hooks.py        where tests look inside a run (no-ops here)

The core (ldm.pipeline and below) never imports this package."""

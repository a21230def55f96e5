"""Datasets: folders of images with captions (`images`); the experiments' scene-record targets (`matching`, `grounding`)."""

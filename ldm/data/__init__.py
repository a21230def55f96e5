"""Datasets: procedurally rendered captioned scenes (`ldm.data.scenes`) and dataset classes."""

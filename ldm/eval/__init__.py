"""Prompt-adherence evaluation: prompt parsing, classical shape detection and per-category scores.

Entry point: `ldm.eval.adherence.evaluate(images, prompts)`; CLI: `ldm.eval.cli`.
"""

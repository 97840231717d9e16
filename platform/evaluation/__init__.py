"""Evaluation: the DreamBench protocol and the scores the paper reports (DINO, CLIP-I, CLIP-T, FID)."""

"""Binding published CLIP models (open_clip hub/local checkpoints, Hugging Face ``CLIPModel``s) as M3Bind teachers:
``pipeline`` runs it from a config, ``align`` is stage 1 with LoRA on both towers, ``fixtures`` builds tiny
checkpoints in the published formats offline (tests, CI, the benchmark)."""

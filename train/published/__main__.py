"""``python -m train.published --config train/configs/published.yaml``: see ``train.published.pipeline``."""

from .pipeline import main

main()

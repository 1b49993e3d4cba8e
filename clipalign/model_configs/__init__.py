"""open_clip model configs shipped with clipalign (JSON, open_clip's format), registered with open_clip on import."""

from pathlib import Path

import open_clip

MODEL_CONFIG_DIR = Path(__file__).parent
open_clip.add_model_config(MODEL_CONFIG_DIR)

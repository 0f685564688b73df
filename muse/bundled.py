"""Where the models shipped inside the package live. Imports no torch, so command-line help can read their defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from persist import read_json_object

ASSETS = Path(__file__).resolve().parent / "assets"  # bundled models, one pipeline directory per preset name
DEFAULT_PRESET = "default"
PIPELINE_FILE = "pipeline.json"


def bundled_presets() -> list[str]:
    """Names of the models shipped inside the package (loadable with `MusePipeline.from_pretrained(name)`)."""
    if not ASSETS.is_dir():
        return []
    return sorted(d.name for d in ASSETS.iterdir() if (d / PIPELINE_FILE).is_file())


def bundled_sampling_defaults() -> dict[str, Any]:
    """The bundled default model's sampling defaults as saved (for help texts); {} when it is not installed or
    unreadable."""
    try:
        config = read_json_object(ASSETS / DEFAULT_PRESET / PIPELINE_FILE)["config"]
    except (OSError, ValueError, KeyError):
        return {}
    sampling = config.get("sampling", config) if isinstance(config, dict) else {}
    return sampling if isinstance(sampling, dict) else {}

"""One home for what musegen writes to and reads from disk; a leaf package (the standard library, torch and
safetensors only), importable from vqgan/, transformer/, superres/, sampling/ and muse/.

- `persist.files`: atomic writes that always fsync the file and its directory (bytes, text, JSON, any writer that
  takes a path, a whole directory swapped in), bounded reads, and JSON read with one error wording.
- `persist.strict`: frozen dataclasses from plain data, strictly, with "did you mean" and the dotted path of a bad
  key, values in messages shown with a bounded repr.
- `persist.weights`: safetensors files with their SHA-256, strict state-dict loads, the component directory
  (config.json + weights) and the integrity rule for it. It imports torch, so it is imported on its own
  (`from persist.weights import ...`): `import persist` stays free of torch, for config loading and `--help`.
"""

from persist.files import (
    MAX_JSON_BYTES,
    atomic_write,
    atomic_write_bytes,
    atomic_write_dir,
    atomic_write_json,
    atomic_write_text,
    fsync_dir,
    parse_json,
    read_bytes_bounded,
    read_json,
    read_json_object,
    replace_synced,
)
from persist.strict import (
    DIFFUSERS_METADATA,
    ConfigError,
    bounded_repr,
    dataclass_from_dict,
    dataclass_from_diffusers_config,
    dataclass_to_dict,
)

__all__ = [
    "MAX_JSON_BYTES", "atomic_write", "atomic_write_bytes", "atomic_write_dir", "atomic_write_json",
    "atomic_write_text", "fsync_dir", "parse_json", "read_bytes_bounded", "read_json", "read_json_object",
    "replace_synced", "DIFFUSERS_METADATA", "ConfigError", "bounded_repr", "dataclass_from_dict",
    "dataclass_from_diffusers_config", "dataclass_to_dict",
]

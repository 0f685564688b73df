"""Pre-encoded token shards: VQGAN token ids and text-encoder states computed once, read by every training step.

Format: a directory of `tokens-000000.safetensors`, `tokens-000001.safetensors`, ... Each shard holds N items:

| tensor            | shape      | dtype                                                   |
|-------------------|------------|---------------------------------------------------------|
| `tokens`          | (N, h, w)  | int16 when every id < 32768, else int32                  |
| `low_res_tokens`  | (N, h', w')| same rule; optional, present in every shard or in none   |
| `text_states`     | (N, S, D)  | float16                                                 |
| `text_mask`       | (N, S)     | bool, True = real text token                            |

and in the safetensors metadata (string -> string): `format` = "musegen-tokens/1", `keys` and `captions` (JSON lists
of N strings). S may differ between shards: a shard keeps only the text positions that some item in it uses, so short
captions do not store 77 padding states each; the reader pads back to the longest S of the directory (zero states,
mask False). h, w, h', w' and D must agree across shards.

Shards are written whole through a temporary file and renamed (`persist.atomic_write_bytes`), so a reader (or a
crash) never sees half a shard.
The reader maps the files and reads one item's rows at a time, so a dataset larger than memory costs nothing to open.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import safetensors.numpy
import torch
from safetensors import safe_open
from torch.utils.data import Dataset

from persist import atomic_write_bytes, parse_json

FORMAT = "musegen-tokens/1"
SHARD_GLOB = "tokens-*.safetensors"


class TokenShardWriter:
    """Append batches of encoded items; every `items_per_shard` items become one shard file.

    Use as a context manager (or call `close`) so the last, partial shard is written. Refuses a directory that already
    holds shards unless `overwrite`, which deletes them first: mixing two tokenizations would silently corrupt training.
    """

    def __init__(self, out_dir: str | Path, *, items_per_shard: int = 4096, overwrite: bool = False) -> None:
        if items_per_shard <= 0:
            raise ValueError(f"items_per_shard must be positive, got {items_per_shard}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        existing = sorted(self.out_dir.glob(SHARD_GLOB))
        if existing and not overwrite:
            raise FileExistsError(f"{self.out_dir} already holds {len(existing)} token shards; pass overwrite=True")
        for path in existing:
            path.unlink()
        self.items_per_shard = items_per_shard
        self.shards: list[Path] = []
        self.num_items = 0
        self._pending: list[dict[str, np.ndarray | list[str]]] = []
        self._pending_items = 0
        self._signature: dict[str, tuple[int, ...]] | None = None

    def add(
        self,
        *,
        keys: Sequence[str],
        captions: Sequence[str],
        tokens: np.ndarray | torch.Tensor,
        text_states: np.ndarray | torch.Tensor,
        text_mask: np.ndarray | torch.Tensor,
        low_res_tokens: np.ndarray | torch.Tensor | None = None,
    ) -> None:
        """Buffer one batch: tokens (B, h, w) ids, text_states (B, S, D), text_mask (B, S) bool (True = real)."""
        batch = {
            "tokens": as_numpy(tokens),
            "text_states": as_numpy(text_states).astype(np.float16),
            "text_mask": as_numpy(text_mask).astype(bool),
        }
        if low_res_tokens is not None:
            batch["low_res_tokens"] = as_numpy(low_res_tokens)
        B = len(keys)
        if len(captions) != B or any(len(array) != B for array in batch.values()):
            sizes = ", ".join(f"{name} {len(array)}" for name, array in batch.items())
            raise ValueError(f"batch sizes differ: {len(keys)} keys, {len(captions)} captions, {sizes}")
        states, mask = batch["text_states"], batch["text_mask"]
        if batch["tokens"].ndim != 3 or states.ndim != 3 or mask.shape != states.shape[:2]:
            raise ValueError("expected tokens (B, h, w), text_states (B, S, D), text_mask (B, S)")
        # Everything but B and S must stay the same for the whole directory; S is padded per shard.
        signature = {name: a.shape[2:] if name.startswith("text_") else a.shape[1:] for name, a in batch.items()}
        if self._signature is None:
            self._signature = signature
        elif signature != self._signature:
            raise ValueError(f"batch shapes {signature} differ from earlier batches {self._signature}")
        for name in ("tokens", "low_res_tokens"):
            if name in batch and batch[name].size and batch[name].min() < 0:
                raise ValueError(f"{name} holds negative ids")
        batch["keys"], batch["captions"] = list(keys), list(captions)
        self._pending.append(batch)
        self._pending_items += B
        while self._pending_items >= self.items_per_shard:
            self._write(self.items_per_shard)

    def close(self) -> list[Path]:
        """Write the remaining items as a last shard; returns all shard paths written."""
        if self._pending_items:
            self._write(self._pending_items)
        return self.shards

    def __enter__(self) -> TokenShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # On an exception the pending items are dropped rather than written as a shard that looks complete.
        if exc_type is None:
            self.close()

    def _write(self, count: int) -> None:
        merged: dict[str, np.ndarray | list[str]] = {}
        for name in self._pending[0]:
            parts = [batch[name] for batch in self._pending]
            if name in ("keys", "captions"):
                merged[name] = [x for part in parts for x in part]
                continue
            if name.startswith("text_"):  # batches may differ in S: pad to the widest before joining
                S = max(part.shape[1] for part in parts)
                parts = [pad_text(part, S) for part in parts]
            merged[name] = np.concatenate(parts)
        shard = {name: value[:count] for name, value in merged.items()}
        rest = {name: value[count:] for name, value in merged.items()}
        self._pending = [rest] if len(rest["keys"]) else []
        self._pending_items -= count

        used = shard["text_mask"].any(axis=0).nonzero()[0]
        S = int(used.max()) + 1 if len(used) else 1  # keep positions up to the last real token of any item
        tensors = {
            "tokens": id_array(shard["tokens"]),
            "text_states": np.ascontiguousarray(shard["text_states"][:, :S]),
            "text_mask": np.ascontiguousarray(shard["text_mask"][:, :S]),
        }
        if "low_res_tokens" in shard:
            tensors["low_res_tokens"] = id_array(shard["low_res_tokens"])
        metadata = {"format": FORMAT, "keys": json.dumps(shard["keys"]), "captions": json.dumps(shard["captions"])}
        path = self.out_dir / f"tokens-{len(self.shards):06d}.safetensors"
        atomic_write_bytes(path, safetensors.numpy.save(tensors, metadata=metadata))
        self.shards.append(path)
        self.num_items += count


class TokenShardDataset(Dataset):
    """Map-style dataset over every shard in a directory. Items: dict(tokens=(h, w) long, text_states=(S, D) float32,
    text_mask=(S,) bool, caption=str, key=str, and low_res_tokens=(h', w') long when the shards have them), with S the
    longest text length of the directory so items collate without further padding."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.shards = sorted(self.directory.glob(SHARD_GLOB))
        if not self.shards:
            raise FileNotFoundError(f"no token shards ({SHARD_GLOB}) in {self.directory}")
        self.keys: list[str] = []
        self.captions: list[str] = []
        self._starts: list[int] = []
        shapes: dict[str, tuple[int, ...]] = {}
        names: set[str] | None = None
        self.text_length = 0
        for path in self.shards:
            try:
                with safe_open(path, framework="np") as f:
                    metadata = f.metadata() or {}
                    shard_shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
            except Exception as error:  # noqa: BLE001 - header damage of any kind
                raise ValueError(f"token shard {path} is corrupt or truncated: {error}") from None
            if metadata.get("format") != FORMAT:
                raise ValueError(f"{path} is not a {FORMAT} shard (format={metadata.get('format')!r})")
            keys = parse_json(metadata.get("keys", ""), f"{path}'s metadata 'keys'")
            captions = parse_json(metadata.get("captions", ""), f"{path}'s metadata 'captions'")
            if names is None:
                names = set(shard_shapes)
            if set(shard_shapes) != names:
                raise ValueError(f"{path} holds {sorted(shard_shapes)}, other shards {sorted(names)}")
            for name, shape in shard_shapes.items():
                if shape[0] != len(keys):
                    raise ValueError(f"{path}: {name} has {shape[0]} rows for {len(keys)} keys")
                # S (axis 1 of the text tensors) may vary between shards; every other axis must agree.
                fixed = (shape[2:],) if name.startswith("text_") else (shape[1:],)
                if shapes.setdefault(name, fixed) != fixed:
                    raise ValueError(f"{path}: {name} has shape {shape}, other shards {shapes[name]}")
            self.text_length = max(self.text_length, shard_shapes["text_mask"][1])
            self._starts.append(len(self.keys))
            self.keys += keys
            self.captions += captions
        self.has_low_res = "low_res_tokens" in names
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        shard = bisect.bisect_right(self._starts, index) - 1
        row = index - self._starts[shard]
        f = self._handle(shard)
        states = f.get_slice("text_states")[row].astype(np.float32)  # (S_shard, D)
        mask = f.get_slice("text_mask")[row]  # (S_shard,)
        item = {
            "tokens": torch.from_numpy(f.get_slice("tokens")[row].astype(np.int64)),  # (h, w)
            "text_states": torch.from_numpy(pad_text(states[None], self.text_length)[0]),  # (S, D)
            "text_mask": torch.from_numpy(pad_text(mask[None], self.text_length)[0]),  # (S,)
            "caption": self.captions[index],
            "key": self.keys[index],
        }
        if self.has_low_res:
            item["low_res_tokens"] = torch.from_numpy(f.get_slice("low_res_tokens")[row].astype(np.int64))
        return item

    def _handle(self, shard: int):
        # Opened lazily in the process that reads, because a DataLoader worker cannot inherit the memory map.
        if shard not in self._handles:
            self._handles[shard] = safe_open(self.shards[shard], framework="np")
        return self._handles[shard]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state


def as_numpy(array: np.ndarray | torch.Tensor) -> np.ndarray:
    return array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)


def id_array(ids: np.ndarray) -> np.ndarray:
    dtype = np.int16 if ids.size == 0 or ids.max() <= np.iinfo(np.int16).max else np.int32
    return np.ascontiguousarray(ids.astype(dtype))


def pad_text(array: np.ndarray, S: int) -> np.ndarray:
    """Zero-pad axis 1 (text positions) of (N, S', ...) to S; for masks the padding is False (not a real token)."""
    return np.pad(array, [(0, 0), (0, S - array.shape[1])] + [(0, 0)] * (array.ndim - 2))

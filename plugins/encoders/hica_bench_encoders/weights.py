"""Weights: safe loading, digests for encoder identities, reproducible random init, Hub files.

Checkpoints are only ever read with ``torch.load(weights_only=True)`` or safetensors. An identity
digest is the sha256 of the checkpoint file, or, for weights not read from one file (random init,
a model fetched by name), of the state dict tensors themselves.
"""

from __future__ import annotations

import contextlib
import hashlib
import zipfile
from pathlib import Path
from typing import Any, Iterator, Sequence

from hica_bench.errors import UserError

#: What a ``path`` option of a transformers checkpoint accepts (resolved by :func:`hub_folder`).
HUB_PATH = "a local model folder, or a Hugging Face repo name (HF cache first, then the Hub)"


def local_file(path: str, option: str) -> Path:
    """``path`` (``~`` expanded) as an existing file, else a UserError naming ``option``."""
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise UserError(f"{option}={path!r}: no such file")
    return resolved.resolve()


def state_dict_sha256(module: Any) -> str:
    """Hex sha256 over a module's state dict (names, dtypes, shapes and raw bytes, in key order)."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if not isinstance(tensor, torch.Tensor):
            continue
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{data.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def seeded(seed: int = 0) -> Iterator[None]:
    """Fixed CPU random state inside (random init is then the same in every process); restored after."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


#: ``torch.nn.init``'s in-place initialisers, which :func:`filled_by_strict_load` makes no-ops
_INITIALISERS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                 "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_")


@contextlib.contextmanager
def filled_by_strict_load(checkpoint: Path) -> Iterator[None]:
    """For building a model whose every parameter a strict load of ``checkpoint`` then overwrites (open_clip's
    ``create_model``/``load_checkpoint`` load strictly): inside, ``torch.nn.init``'s initialisers do nothing (their
    random values would be overwritten), and a zip-format torch checkpoint is memory-mapped (torch's own
    ``load.mmap`` setting; copy-on-write, and copied into the parameters by the load, so nothing stays mapped)
    instead of read whole through the unpickler. Measured on ViT-B-32 (605 MB, 2 cores): build + load 3.4-6.3 s ->
    0.2 s, which is what lets a fresh-cache zero-shot run match CLIP_benchmark end to end.

    Only for strict loads: a parameter the checkpoint lacks is then an error, never an uninitialised value. The same
    idea as transformers' ``no_init_weights``, written here because that helper is internal to transformers and has
    moved between its versions. Patches module attributes for the duration: build in one thread."""
    import torch
    import torch.utils.serialization.config as serialization

    saved = {name: getattr(torch.nn.init, name) for name in _INITIALISERS if hasattr(torch.nn.init, name)}
    mmap = checkpoint.suffix not in (".safetensors", ".npz", ".npy") and zipfile.is_zipfile(checkpoint)
    try:
        for name in saved:
            setattr(torch.nn.init, name, _no_init)
        with serialization.patch({"load.mmap": mmap}):
            yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def _no_init(tensor: Any, *args: Any, **kwargs: Any) -> Any:
    return tensor


def load_state_dict(path: Path) -> dict[str, Any]:
    """A state dict from a ``.safetensors`` file or a torch file (``weights_only=True``).

    Common wrappers (``state_dict``, ``model``, ``module.`` prefixes) are unwrapped.
    """
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle refusal, truncated file, not a checkpoint at all
        raise UserError(f"cannot read weights from {path} ({first_line(exc)}); expected a state dict saved "
                        "with torch.save or safetensors") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}


def hub_file(repo_id: str, filenames: Sequence[str], what: str, hint: str) -> str:
    """Local path of the first of ``filenames`` in Hugging Face repo ``repo_id``: from the HF cache when
    it is there (no network), else downloaded. Unreachable Hub -> one-line UserError ending with ``hint``."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RemoteEntryNotFoundError

    for name in filenames:
        with contextlib.suppress(EntryNotFoundError, OSError, ValueError):
            return hf_hub_download(repo_id, name, local_files_only=True)
    reason = f"the repository has none of {', '.join(filenames)}"
    for name in filenames:
        try:
            return hf_hub_download(repo_id, name)
        except RemoteEntryNotFoundError:
            continue  # this file name does not exist in the repo; try the next
        except (LocalEntryNotFoundError, ConnectionError):
            reason = "it is not in the Hugging Face cache and the Hub is unreachable (or HF_HUB_OFFLINE is set)"
            break
        except Exception as exc:  # unknown or gated repository, HTTP errors
            reason = first_line(exc)
            break
    raise UserError(f"cannot fetch the {what} from the Hugging Face Hub ({repo_id}): {reason}; {hint}")


def hub_folder(source: str, what: str, option: str, allow: Sequence[str] | None = None) -> Path:
    """A model folder: ``source`` itself when it is a local folder, else the Hugging Face repo ``source`` from the HF
    cache (no network) or downloaded (only the files matching ``allow`` when given, e.g. configs and tokenizer files
    of a base model whose weights come from elsewhere). A missing folder, or an unreachable Hub, is one line saying
    what to download and where to pass it (``option``)."""
    from huggingface_hub import snapshot_download

    folder = Path(source).expanduser()
    if folder.is_dir():
        return folder.resolve()
    if source.startswith(("/", ".", "~")) or source.count("/") != 1:
        raise UserError(f"{option}={source!r}: no such folder (and not a Hugging Face repo name org/model)")
    include = "".join(f" --include '{pattern}'" for pattern in allow or ())
    hint = (f"download it on a connected machine with `hf download {source}{include} --local-dir <folder>` and pass "
            f"{option}=<folder>")
    skip = ["*.msgpack", "*.h5", "*.onnx", "*.ot", "*.tflite", "tf_model*", "flax_model*", "rust_model*", "*.mlmodel*"]
    try:
        return Path(snapshot_download(source, local_files_only=True, allow_patterns=allow, ignore_patterns=skip))
    except Exception:
        pass
    try:  # the PyTorch weights and configs only: not the TensorFlow, Flax or ONNX copies a repo may also hold
        return Path(snapshot_download(source, allow_patterns=allow, ignore_patterns=skip))
    except Exception as exc:
        reason = ("it is not in the Hugging Face cache and the Hub is unreachable (or HF_HUB_OFFLINE is set)"
                  if "offline" in str(exc).lower() or "connect" in str(exc).lower() or "resolve" in str(exc).lower()
                  else first_line(exc))
        raise UserError(f"cannot fetch the {what} from the Hugging Face Hub ({source}): {reason}; {hint}") from None


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one short line (for UserError messages)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def hf_input_spec(folder: Path, what: str) -> Any:
    """The :class:`~hica_bench.interfaces.InputSpec` a Hugging Face model folder's own image processor config
    (``preprocessor_config.json``) gives: the crop size when it crops (else the resize size), mean, std and the
    resampling filter. The harness resizes each (square) image straight to that size, with bilinear or bicubic
    interpolation (the processor's bilinear stays bilinear; every other filter becomes bicubic): a processor that
    resizes to 256 and then centre-crops 224 (DINOv2) sees the whole image at 224 here."""
    from transformers import AutoImageProcessor

    from hica_bench.interfaces import InputSpec

    try:
        processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
        size = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
        size = size or getattr(processor, "size", None) or {}
        size = {"height": size} if isinstance(size, int) else {k: getattr(size, k, None) if not isinstance(size, dict)
                                                               else size.get(k) for k in ("height", "shortest_edge", "width")}
        side = size.get("height") or size.get("shortest_edge") or size.get("width")
        mean, std = ([v] if isinstance(v, (int, float)) else list(v) for v in (processor.image_mean, processor.image_std))
        mean, std = (mean * 3 if len(mean) == 1 else mean), (std * 3 if len(std) == 1 else std)
        resample = getattr(processor, "resample", None)
        resample = 3 if resample is None else int(resample)  # PIL's codes: 2 bilinear, 3 bicubic
        return InputSpec(size=int(side), mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),
                         interpolation="bilinear" if resample == 2 else "bicubic")
    except Exception as exc:
        raise UserError(f"{what}: no usable image processor config in {folder} ({first_line(exc)}); the folder needs "
                        "the preprocessor_config.json published with the weights") from None

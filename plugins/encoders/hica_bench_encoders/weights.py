"""Weights: safe loading, digests for encoder identities, reproducible random init, Hub files.

Checkpoints are only ever read with ``torch.load(weights_only=True)`` or safetensors. An identity
digest is the sha256 of the checkpoint file, or, for weights not read from one file (random init,
a model fetched by name), of the state dict tensors themselves.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Any, Iterator, Sequence

from hica_bench.errors import UserError


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


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one short line (for UserError messages)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."

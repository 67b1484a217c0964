"""Is the model hub reachable? Offline, timm's download of ``pretrained=True`` weights
retries for about 45 s before it fails; one short connection attempt says so at once.
Weights already in the local hub caches need no network and pass."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from . import offline_weights

TIMEOUT_S = 3.0
_HUB_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def check_hub_reachable(name: str, timeout: float = TIMEOUT_S) -> None:
    """``RuntimeError`` naming the offline alternatives when timm model ``name``'s weights
    are neither cached nor downloadable (its host does not answer within ``timeout``)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name) or None
    cfg = cfg.to_dict() if cfg is not None else {}
    if _cached(cfg):
        return
    url = os.environ.get("HF_ENDPOINT", "https://huggingface.co") if cfg.get("hf_hub_id") else (
        cfg.get("url") or "https://huggingface.co"
    )  # fmt: skip
    host, port = _endpoint(url)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise RuntimeError(
            f"pretrained=True (dtl-train: --pretrained hub) downloads {name!r}'s weights, but "
            f"{host}:{port} cannot be reached ({exc.strerror or exc}) and they are not cached. "
            f"Offline, pass pretrained=PATH to a local checkpoint{offline_weights.hint()}"
        ) from None


def _endpoint(url: str) -> tuple[str, int]:
    """The host and port a download of ``url`` connects to (the proxy's, when one is set)."""
    parts = urlsplit(url)
    proxy = os.environ.get(f"{parts.scheme}_proxy") or os.environ.get(
        f"{parts.scheme.upper()}_PROXY"
    )
    if proxy:
        parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    default = 443 if parts.scheme == "https" else 80
    return parts.hostname or "huggingface.co", parts.port or default


def _cached(cfg: dict) -> bool:
    """Are the weights of this pretrained config in the Hugging Face or torch hub cache?"""
    repo = cfg.get("hf_hub_id")
    if repo:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return False
        repo, _, revision = repo.partition("@")
        for filename in (cfg.get("hf_hub_filename"), *_HUB_FILES):
            if filename and isinstance(
                try_to_load_from_cache(repo, filename, revision=revision or None), str
            ):
                return True
        return False
    url = cfg.get("url")
    if url:
        import torch

        return (Path(torch.hub.get_dir()) / "checkpoints" / Path(urlsplit(url).path).name).is_file()
    return False

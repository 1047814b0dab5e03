"""The Hugging Face hub: source strings, the local cache, and whether the hub answers at all."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse


def hub_source(hub_id: str, subfolder: str | None) -> str:
    """What ``ModelInfo.source`` records for hub weights: ``hf:<repo>[/<subfolder>]``."""
    return f"hf:{hub_id}" + (f"/{subfolder}" if subfolder else "")


def in_hf_cache(hub_id: str, subfolder: str | None) -> bool:
    """Whether the repo's ``config.json`` is in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return False
    name = f"{subfolder}/config.json" if subfolder else "config.json"
    try:
        return isinstance(try_to_load_from_cache(hub_id, name), str)
    except Exception:
        return False


_HUB_REACHABLE: bool | None = None


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint answers a TCP connect quickly (cached per process).

    huggingface_hub retries unreachable hosts for ~25 s before failing; probing first keeps an
    offline `--model sd-vae-ft-ema` down to one prompt error line.
    """
    global _HUB_REACHABLE
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    if _HUB_REACHABLE is None:
        try:
            from huggingface_hub import constants

            endpoint = constants.ENDPOINT
        except Exception:  # pragma: no cover
            endpoint = "https://huggingface.co"
        url = urlparse(endpoint)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
                _HUB_REACHABLE = True
        except OSError:
            _HUB_REACHABLE = False
    return _HUB_REACHABLE

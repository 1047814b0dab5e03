"""Tile embeddings: pathology foundation models, and an offline stand-in.

``load_embedder(name, device)`` returns an :class:`Embedder` or raises
:class:`EmbedderUnavailable` (a :class:`~wsicodec.errors.WsicodecError`) with one line saying why:
a missing library, a missing Hugging Face token for a gated model, no network, or a failed load.
Callers that can do without (``wsicodec eval``) print that line and carry on without the column.

Names:
  ``uni``        UNI, ``hf-hub:MahmoodLab/UNI`` through timm (gated)
  ``phikon-v2``  Phikon-v2, ``owkin/phikon-v2`` through transformers (CLS token)
  ``gigapath``   Prov-GigaPath tile encoder, ``hf-hub:prov-gigapath/prov-gigapath`` through timm (gated)
  ``lpips-vgg``  offline STAND-IN: pooled features of the LPIPS VGG16 backbone (../shared/weights/lpips)
  ``lpips-alex`` offline STAND-IN: the same for the LPIPS AlexNet backbone

Every embedder takes float (N,3,H,W) in [0, 1] on its device. :meth:`Embedder.embed` keeps the
graph (the fine-tune's feature-matching loss backpropagates through it); :meth:`embed_batched` is
for evaluation.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlparse

import torch
import torch.nn.functional as F

from wsicodec.errors import WsicodecError

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
NETWORK_TIMEOUT_S = 3.0


class EmbedderUnavailable(WsicodecError):
    """This embedder cannot be used here (library, token, network or weights missing)."""


@dataclass(frozen=True)
class EmbedderSpec:
    name: str
    label: str  # shown in tables
    repo: str | None  # Hugging Face repo id
    library: str | None  # import name that must be present
    gated: bool
    standin: bool


SPECS: dict[str, EmbedderSpec] = {
    "uni": EmbedderSpec("uni", "UNI", "MahmoodLab/UNI", "timm", True, False),
    "phikon-v2": EmbedderSpec("phikon-v2", "Phikon-v2", "owkin/phikon-v2", "transformers", False, False),
    "gigapath": EmbedderSpec("gigapath", "Prov-GigaPath", "prov-gigapath/prov-gigapath", "timm", True, False),
    "lpips-vgg": EmbedderSpec("lpips-vgg", "VGG-pool†", None, None, False, True),
    "lpips-alex": EmbedderSpec("lpips-alex", "Alex-pool†", None, None, False, True),
}
FOUNDATION = ("uni", "phikon-v2", "gigapath")
STANDIN_DEFAULT = "lpips-vgg"


class Embedder:
    """A frozen network mapping tiles to one vector each."""

    def __init__(self, spec: EmbedderSpec, fn: Callable[[torch.Tensor], torch.Tensor], module: torch.nn.Module | None,
                 device: torch.device):
        self.spec = spec
        self._fn = fn
        self.module = module
        self.device = device
        if module is not None:
            module.eval().requires_grad_(False)

    name = property(lambda self: self.spec.name)
    label = property(lambda self: self.spec.label)
    standin = property(lambda self: self.spec.standin)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(N,3,H,W) in [0,1] -> (N,D); differentiable with respect to ``x``."""
        return self._fn(x.to(self.device)).flatten(1)

    def embed_batched(self, x: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        out = []
        with torch.inference_mode():
            for i in range(0, len(x), batch_size):
                out.append(self.embed(x[i : i + batch_size]).float().cpu())
        return torch.cat(out) if out else torch.zeros(0)


# ---------------------------------------------------------------- availability checks
def _hub_host() -> str:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    return urlparse(endpoint).hostname or "huggingface.co"


def network_reachable(host: str | None = None, timeout: float = NETWORK_TIMEOUT_S) -> bool:
    """Can we open a TCP connection to the hub? DNS can hang, so the whole check runs in a thread."""
    import socket

    host = host or _hub_host()
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(result and result[0])


def _is_cached(repo: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    for fname in ("model.safetensors", "pytorch_model.bin"):
        hit = try_to_load_from_cache(repo, fname)
        if isinstance(hit, str):
            return True
    return False


def _token() -> str | None:
    try:
        from huggingface_hub import get_token
    except ImportError:
        return os.environ.get("HF_TOKEN")
    return get_token()


@contextmanager
def _hub_env(offline: bool):
    """Short hub timeouts (never a long hang), offline mode when the weights are cached."""
    keys = {"HF_HUB_ETAG_TIMEOUT": "10", "HF_HUB_DOWNLOAD_TIMEOUT": "30"}
    if offline:
        keys["HF_HUB_OFFLINE"] = "1"
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: v for k, v in keys.items() if k == "HF_HUB_OFFLINE" or os.environ.get(k) is None})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_available(name: str) -> EmbedderSpec:
    """Raise :class:`EmbedderUnavailable` with a one-line reason unless ``name`` can be loaded."""
    spec = SPECS.get(name)
    if spec is None:
        raise EmbedderUnavailable(f"unknown embedder {name!r}; choose from {', '.join(SPECS)}")
    if spec.standin:
        return spec
    if importlib.util.find_spec(spec.library) is None:
        raise EmbedderUnavailable(
            f"{spec.label} needs the '{spec.library}' package (pip install 'wsicodec[fm]'); skipping it"
        )
    if _is_cached(spec.repo):
        return spec
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise EmbedderUnavailable(f"{spec.label} ({spec.repo}) is not in the Hugging Face cache and HF_HUB_OFFLINE is set")
    if spec.gated and not _token():
        raise EmbedderUnavailable(
            f"{spec.label} is gated: accept its terms at https://huggingface.co/{spec.repo} and set HF_TOKEN "
            "(or run `hf auth login`)"
        )
    if not network_reachable():
        raise EmbedderUnavailable(f"{spec.label} ({spec.repo}) is not cached and {_hub_host()} cannot be reached")
    return spec


# ---------------------------------------------------------------- builders
def _resize_normalise(x: torch.Tensor, size: int = 224) -> torch.Tensor:
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(_IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(_IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def _build_timm(spec: EmbedderSpec, device: torch.device) -> Embedder:
    import timm

    kwargs = {"init_values": 1e-5, "dynamic_img_size": True} if spec.name == "uni" else {}
    net = timm.create_model(f"hf-hub:{spec.repo}", pretrained=True, **kwargs).to(device)
    return Embedder(spec, lambda x: net(_resize_normalise(x)), net, device)


def _build_phikon(spec: EmbedderSpec, device: torch.device) -> Embedder:
    from transformers import AutoModel

    net = AutoModel.from_pretrained(spec.repo).to(device)
    return Embedder(spec, lambda x: net(pixel_values=_resize_normalise(x)).last_hidden_state[:, 0], net, device)


def _build_standin(spec: EmbedderSpec, device: torch.device) -> Embedder:
    from wsicodec.research import lpips as _lpips

    net_name = spec.name.split("-", 1)[1]
    net = _lpips.LPIPS(net_name).to(device)
    return Embedder(spec, lambda x: net.pooled_features(x * 2 - 1), net, device)


def load_embedder(name: str, device: torch.device | str | None = None) -> Embedder:
    """Build embedder ``name`` on ``device`` or raise :class:`EmbedderUnavailable` (one line)."""
    spec = check_available(name)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if spec.standin:
        try:
            return _build_standin(spec, dev)
        except WsicodecError as exc:
            raise EmbedderUnavailable(f"{spec.label}: {exc}") from None
    builder = _build_phikon if spec.name == "phikon-v2" else _build_timm
    try:
        with _hub_env(offline=_is_cached(spec.repo)):
            return builder(spec, dev)
    except Exception as exc:  # hub errors come in many classes; all mean "not usable here"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EmbedderUnavailable(f"{spec.label} ({spec.repo}) could not be loaded: {first[:200]}") from None


def load_first_available(names: list[str], device=None, warn: Callable[[str], None] | None = None) -> Embedder:
    """The first of ``names`` that loads; each failure is reported through ``warn``."""
    last: EmbedderUnavailable | None = None
    for name in names:
        try:
            return load_embedder(name, device)
        except EmbedderUnavailable as exc:
            last = exc
            if warn:
                warn(str(exc))
    raise last or EmbedderUnavailable("no embedder given")

"""Latent quantisers: K-means codebook, uniform N levels, static int8, none (float16).

Interface:

    q = make_quantizer(kind, levels=256, latent_range=None)   # kind in {"kmeans","uniform","int8","none"}
        # (model_info=ModelInfo is accepted too: its latent_range is used when latent_range is not given)
    q.fit(sample: torch.Tensor (N,C,h,w))       # no-op for static ones
    q.quantize(latents: torch.Tensor (N,C,h,w)) -> np.ndarray (N,C,h,w) of q.dtype (uint8 | float16)
    q.dequantize(stored: np.ndarray) -> torch.Tensor float32
    q.to_json() -> dict (plain JSON);  q.arrays() -> {"codebook": float32 (C or 1, levels)} or {}
    Quantizer.from_json(attrs, arrays) -> Quantizer

Every index-based quantiser (kmeans, uniform, int8) stores its levels as a codebook, so that a reader
needs one rule only: ``value = codebook[channel if per_channel else 0][index]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from wsicodec.errors import WsicodecError


class QuantizerError(WsicodecError, ValueError):
    """A bad quantiser choice (kind, level count): the user's input, reported as one line."""


MAX_LEVELS = 256  # indices are uint8

# --quant int8 when the model states no hard latent bound: 256 levels over this fixed range.
# (formats/pzarr-v1.md states it; a container records the range it used, so this may change freely.)
DEFAULT_INT8_RANGE = (-8.0, 8.0)

# Histogram resolution for the 1-D k-means fit and the percentiles of the robust range.
_HIST_BINS = 65536
_ROBUST_PCT = (0.1, 99.9)  # k-means starts from levels evenly spaced over this range, then moves them
# uniform levels stay where they start: clipping the tails costs more than a wider step (measured on TAEF2
# latents: 0.01-99.99 % gives 3.6x lower error than 0.1-99.9 % at 256 levels, and 4 % fewer bytes)
_UNIFORM_PCT = (0.01, 99.99)
_LLOYD_MAX_ITERS = 2000


def _as_channels_first(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(N,C,h,w) -> float32 (C, N*h*w), contiguous."""
    t = torch.as_tensor(x)
    if t.ndim != 4:
        raise ValueError(f"latents must be (N, C, h, w), got shape {tuple(t.shape)}")
    return t.detach().to("cpu", torch.float32).transpose(0, 1).reshape(t.shape[1], -1).contiguous()


class _Histogram:
    """A fine histogram of one set of values: bin centres and counts (empty bins dropped)."""

    def __init__(self, values: torch.Tensor, bins: int = _HIST_BINS):
        v = values.detach().to("cpu", torch.float32).reshape(-1).numpy()
        if not np.isfinite(v).all():
            v = v[np.isfinite(v)]
        if v.size == 0:
            raise ValueError("cannot fit a quantiser on an empty (or all non-finite) sample")
        lo, hi = float(v.min()), float(v.max())
        self.lo, self.hi = lo, hi
        if hi <= lo:
            self.points = np.array([lo])
            self.weights = np.array([float(v.size)])
            return
        scale = bins / (hi - lo)
        idx = ((v - np.float32(lo)) * np.float32(scale)).astype(np.int32)
        np.clip(idx, 0, bins - 1, out=idx)
        counts = np.bincount(idx, minlength=bins).astype(np.float64)
        keep = np.nonzero(counts)[0]
        self.points = lo + (keep + 0.5) / scale  # bin centres; a bin is 1/65536 of the range
        self.weights = counts[keep]

    def percentile(self, q: float) -> float:
        cdf = np.cumsum(self.weights)
        i = int(np.searchsorted(cdf, cdf[-1] * (q / 100.0)))
        return float(self.points[min(i, len(cdf) - 1)])


def _lloyd_1d(hist: _Histogram, levels: int) -> np.ndarray:
    """Weighted 1-D k-means on histogram points; returns sorted float32 centroids (levels,).

    Points are sorted, so each level owns a contiguous run of them: cluster sums come from prefix
    sums at the runs' boundaries, which makes an iteration O(levels log points).
    """
    pts, w = hist.points, hist.weights
    lo, hi = hist.percentile(_ROBUST_PCT[0]), hist.percentile(_ROBUST_PCT[1])
    if hi <= lo:
        lo, hi = float(pts[0]), float(pts[-1])
    if hi <= lo:  # a constant sample: every level the same value
        return np.full(levels, lo, dtype=np.float32)
    cw_all = np.concatenate([[0.0], np.cumsum(w)])
    cs_all = np.concatenate([[0.0], np.cumsum(w * pts)])
    c = np.linspace(lo, hi, levels)
    tol = 1e-6 * (hist.hi - hist.lo) / levels
    for _ in range(_LLOYD_MAX_ITERS):
        mids = (c[1:] + c[:-1]) * 0.5
        # level k owns points in (mids[k-1], mids[k]]: ties go to the lower level, as in quantize()
        b = np.concatenate([[0], np.searchsorted(pts, mids, side="right"), [len(pts)]])
        cw = cw_all[b[1:]] - cw_all[b[:-1]]
        cs = cs_all[b[1:]] - cs_all[b[:-1]]
        empty = cw <= 0
        new = np.where(empty, c, cs / np.where(empty, 1.0, cw))
        if empty.any():
            # re-seed each empty level at the point that costs the most right now
            a = np.searchsorted(mids, pts, side="left")
            err = w * (pts - new[a]) ** 2
            for k in np.nonzero(empty)[0]:
                j = int(np.argmax(err))
                if err[j] <= 0:
                    break
                new[k] = pts[j]
                err[j] = 0.0
        new.sort()
        shift = float(np.abs(new - c).max())
        c = new
        if shift <= tol and not empty.any():
            break
    return c.astype(np.float32)


def _uniform_levels(hist: _Histogram, levels: int) -> np.ndarray:
    """Evenly spaced levels over the robust range of this slide's latents."""
    lo, hi = hist.percentile(_UNIFORM_PCT[0]), hist.percentile(_UNIFORM_PCT[1])
    if hi <= lo:
        lo, hi = hist.lo, max(hist.hi, hist.lo + 1e-6)
    return np.linspace(lo, hi, levels, dtype=np.float64).astype(np.float32)


@dataclass(frozen=True)
class QuantKind:
    """One quantiser strategy. Every kind but ``none`` stores uint8 indices into a codebook (the format's
    one rule); kinds differ only in how that codebook is chosen."""

    name: str
    summary: str  # one line for CLI help and docs
    fit_levels: Callable[[_Histogram, int], np.ndarray] | None  # per-slide fit; None: static or no codebook
    takes_levels: bool  # whether "kind:N" chooses the level count
    per_channel_default: bool = False


# One shared codebook by default. Measured on TAEF2 latents of CMU-1 (benchmarks/bench_quantizers.py,
# codebooks fitted on half the tiles, measured on the other half): per-channel K-means-256 has 19 % lower
# error than shared K-means-256 but its indices cost 2.3 % more bytes (plus a 32 KB codebook); at equal
# bytes (per-channel with 224 levels vs shared with 256) the shared codebook is as good or better.
QUANT_KINDS: dict[str, QuantKind] = {k.name: k for k in (
    QuantKind("kmeans", "K-means codebook fitted per slide (the paper's)", _lloyd_1d, True),
    QuantKind("uniform", "evenly spaced levels over the slide's robust range", _uniform_levels, True),
    QuantKind("int8", "static 256 levels over the model's latent range", None, False),
    QuantKind("none", "float16 latents, no quantisation (reference)", None, False),
)}
KINDS = tuple(QUANT_KINDS)


def kinds_help() -> str:
    """'kmeans (K-means codebook ...) | uniform (...) | ...' for CLI help, from the table."""
    return " | ".join(f"{k.name} ({k.summary})" for k in QUANT_KINDS.values())


def quant_label(kind: str, levels: int | None) -> str:
    """How evaluation tables and stats name a quantiser: 'kmeans-256', 'int8', 'none'."""
    spec = QUANT_KINDS.get(kind)
    return f"{kind}-{levels}" if levels and spec is not None and spec.takes_levels else str(kind)


class Quantizer:
    """Maps float latents to stored values and back. Build with :func:`make_quantizer`."""

    def __init__(self, kind: str, levels: int = 256, *, per_channel: bool = False,
                 range_: tuple[float, float] | None = None, codebook: np.ndarray | None = None,
                 quality: str | None = None):
        if kind not in KINDS:
            raise QuantizerError(f"unknown quantiser {kind!r}; choose one of {', '.join(KINDS)}")
        if kind != "none" and not (2 <= int(levels) <= MAX_LEVELS):
            raise QuantizerError(f"levels must be between 2 and {MAX_LEVELS} (uint8 indices), got {levels}")
        self.kind = kind
        self.levels = int(levels) if kind != "none" else 0
        self.per_channel = bool(per_channel) if kind != "none" else False
        self.range = (float(range_[0]), float(range_[1])) if range_ is not None else None
        self.codebook = None if codebook is None else np.ascontiguousarray(codebook, dtype=np.float32)
        self.fit_values = 0
        self.quality = quality  # the model's operating point this grid belongs to (informative)
        self._mids: torch.Tensor | None = None
        self._table: torch.Tensor | None = None

    # --------------------------------------------------------------------------- properties
    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float16) if self.kind == "none" else np.dtype(np.uint8)

    @property
    def is_fitted(self) -> bool:
        return self.kind == "none" or self.codebook is not None

    @property
    def needs_fit(self) -> bool:
        return QUANT_KINDS[self.kind].fit_levels is not None

    # --------------------------------------------------------------------------- fitting
    def fit(self, sample: torch.Tensor | np.ndarray) -> "Quantizer":
        """Fit to a sample of this slide's latents (N,C,h,w). No-op for int8 and none."""
        if not self.needs_fit:
            return self
        x = _as_channels_first(sample)
        self.fit_values = int(x.numel())
        groups = list(x) if self.per_channel else [x.reshape(-1)]
        fit_levels = QUANT_KINDS[self.kind].fit_levels
        assert fit_levels is not None  # needs_fit says so
        self.codebook = np.stack([fit_levels(_Histogram(g), self.levels) for g in groups]).astype(np.float32)
        if self.kind == "uniform" and not self.per_channel:
            self.range = (float(self.codebook[0, 0]), float(self.codebook[0, -1]))
        self._mids = self._table = None
        return self

    # --------------------------------------------------------------------------- mapping
    def _prepare(self) -> None:
        if self._table is None:
            if self.codebook is None:
                raise RuntimeError(f"{self.kind} quantiser used before fit()")
            cb = torch.from_numpy(self.codebook)
            self._table = cb
            self._mids = ((cb[:, 1:] + cb[:, :-1]) * 0.5).contiguous()

    def quantize(self, latents: torch.Tensor | np.ndarray) -> np.ndarray:
        """Float latents (N,C,h,w) -> stored values (N,C,h,w) of :attr:`dtype`."""
        t = torch.as_tensor(latents)
        if t.ndim != 4:
            raise ValueError(f"latents must be (N, C, h, w), got shape {tuple(t.shape)}")
        if self.kind == "none":
            return t.detach().to("cpu", torch.float32).to(torch.float16).numpy()
        self._prepare()
        n, ch, hh, ww = t.shape
        # nearest level = number of midpoints strictly below x (ties go to the lower level)
        if not self.per_channel:
            x = t.detach().to("cpu", torch.float32).contiguous()
            return torch.searchsorted(self._mids[0], x, out_int32=True).to(torch.uint8).numpy()
        if self._mids.shape[0] != ch:
            raise ValueError(f"quantiser fitted for {self._mids.shape[0]} channels, got {ch}")
        idx = torch.searchsorted(self._mids, _as_channels_first(t), out_int32=True)  # row c: channel c
        out = idx.to(torch.uint8).reshape(ch, n, hh, ww).transpose(0, 1)
        return np.ascontiguousarray(out.numpy())

    def dequantize(self, stored: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Stored values (N,C,h,w) or (C,h,w) -> float32 latents of the same shape."""
        if isinstance(stored, torch.Tensor):
            s = stored.cpu()
        else:
            a = np.asarray(stored)
            s = torch.from_numpy(a if a.flags.writeable else a.copy())
        if self.kind == "none":
            return s.to(torch.float32)
        self._prepare()
        if s.dtype != torch.uint8:
            raise ValueError(f"{self.kind} quantiser expects uint8 indices, got {s.dtype}")
        idx = s.long()
        if not self.per_channel:
            return self._table[0][idx]
        ch_axis = idx.ndim - 3  # (C,h,w) or (N,C,h,w)
        ch = idx.shape[ch_axis]
        if ch != self._table.shape[0]:
            raise ValueError(f"quantiser has {self._table.shape[0]} channel codebooks, got {ch} channels")
        # value = codebook[channel][index]: gather from a flat table with per-channel offsets
        offs = (torch.arange(ch) * self.levels).reshape((ch, 1, 1))
        return self._table.reshape(-1)[idx + offs]

    # --------------------------------------------------------------------------- storage
    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "kind": self.kind,
            "levels": self.levels,
            "per_channel": self.per_channel,
            "dtype": str(self.dtype),
            "range": list(self.range) if self.range is not None else None,
        }
        if self.codebook is not None:
            d["codebook_shape"] = list(self.codebook.shape)
        if self.fit_values:
            d["fit_values"] = self.fit_values
        if self.quality:
            d["quality"] = self.quality
        return d

    def arrays(self) -> dict[str, np.ndarray]:
        if self.kind == "none":
            return {}
        self._prepare()
        return {"codebook": self.codebook}

    @classmethod
    def from_json(cls, attrs: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> "Quantizer":
        arrays = arrays or {}
        kind = attrs.get("kind")
        if kind not in KINDS:
            raise ValueError(f"unknown quantiser kind {kind!r}")
        rng = attrs.get("range")
        q = cls(kind, int(attrs.get("levels") or 256) if kind != "none" else 256,
                per_channel=bool(attrs.get("per_channel", False)),
                range_=tuple(rng) if rng else None)
        q.fit_values = int(attrs.get("fit_values", 0) or 0)
        q.quality = attrs.get("quality") if isinstance(attrs.get("quality"), str) else None
        if kind != "none":
            cb = arrays.get("codebook")
            if cb is None:
                raise ValueError(f"{kind} quantiser needs its codebook array")
            cb = np.asarray(cb, dtype=np.float32)
            if cb.ndim != 2 or cb.shape[1] != q.levels:
                raise ValueError(f"codebook shape {cb.shape} does not match {q.levels} levels")
            q.per_channel = cb.shape[0] > 1 or q.per_channel
            q.codebook = np.ascontiguousarray(cb)
        return q

    def __repr__(self) -> str:
        pc = ", per_channel" if self.per_channel else ""
        return f"Quantizer({self.kind!r}, levels={self.levels}{pc})"


def make_quantizer(kind: str = "kmeans", levels: int = 256, latent_range: tuple[float, float] | None = None,
                   *, per_channel: bool | None = None, model_info: Any = None) -> Quantizer:
    """Build a quantiser. ``latent_range`` (or ``model_info.latent_range``) fixes int8's range."""
    if kind not in KINDS:
        raise QuantizerError(f"unknown quantiser {kind!r}; choose one of {', '.join(KINDS)}")
    if latent_range is None and model_info is not None:
        latent_range = getattr(model_info, "latent_range", None)
    if kind == "int8":
        if levels != 256:
            raise QuantizerError("int8 is the static 256-level baseline; use --quant uniform for other level counts")
        lo, hi = latent_range if latent_range else DEFAULT_INT8_RANGE
        table = np.linspace(lo, hi, 256, dtype=np.float64).astype(np.float32)[None, :]
        return Quantizer("int8", 256, range_=(float(lo), float(hi)), codebook=table)
    if kind == "none":
        return Quantizer("none")
    if per_channel is None:
        per_channel = QUANT_KINDS[kind].per_channel_default
    return Quantizer(kind, levels, per_channel=per_channel)

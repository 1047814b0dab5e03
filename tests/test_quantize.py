"""Quantisers: fidelity, assignment rule, serialisation, limits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from wsicodec.errors import WsicodecError
from wsicodec.quant.quantizer import DEFAULT_INT8_RANGE, Quantizer, make_quantizer


def mixture_latents(n=24, c=8, hw=16, seed=0) -> torch.Tensor:
    """Latents shaped like an autoencoder's: per-channel offsets and spreads, two modes, a soft bound."""
    g = torch.Generator().manual_seed(seed)
    mode = (torch.rand((n, c, hw, hw), generator=g) < 0.3).float()
    centre = torch.linspace(-1.0, 1.0, c).reshape(1, c, 1, 1)
    spread = torch.linspace(0.2, 0.9, c).reshape(1, c, 1, 1)
    z = centre + mode * 1.2 + spread * torch.randn((n, c, hw, hw), generator=g)
    return torch.tanh(z / 3) * 3


def mse(q, z) -> float:
    return float(((q.dequantize(q.quantize(z)) - z) ** 2).mean())


def test_kmeans_beats_static_int8_on_realistic_latents():
    z = mixture_latents()
    km = make_quantizer("kmeans").fit(z)
    i8 = make_quantizer("int8", latent_range=(-3.0, 3.0)).fit(z)
    e_km, e_i8 = mse(km, z), mse(i8, z)
    assert e_km < 0.7 * e_i8, (e_km, e_i8)


def test_kmeans_is_close_to_optimal_and_better_than_uniform():
    z = mixture_latents(seed=1)
    km = make_quantizer("kmeans", per_channel=False).fit(z)
    un = make_quantizer("uniform").fit(z)
    assert mse(km, z) < mse(un, z)
    # a converged 1-D k-means codebook: every level is the mean of the values it receives
    x = z.reshape(-1)
    idx = torch.from_numpy(km.quantize(z).astype(np.int64)).reshape(-1)
    cb = torch.from_numpy(km.codebook[0]).double()
    used = torch.bincount(idx, minlength=256) > 50
    means = torch.bincount(idx, weights=x.double(), minlength=256) / torch.bincount(idx, minlength=256).clamp(min=1)
    step = float(cb[-1] - cb[0]) / 255
    assert float((means[used] - cb[used]).abs().max()) < 0.05 * step


def test_searchsorted_assignment_equals_brute_force_nearest():
    g = torch.Generator().manual_seed(3)
    sample = torch.randn((4, 3, 8, 8), generator=g) * 2
    for per_channel in (False, True):
        q = make_quantizer("kmeans", levels=37, per_channel=per_channel).fit(sample)
        z = torch.randn((5, 3, 8, 8), generator=g) * 2.5  # includes values past the fitted range
        idx = torch.from_numpy(q.quantize(z).astype(np.int64))
        cb = torch.from_numpy(q.codebook)
        books = cb[torch.arange(3)] if per_channel else cb[[0, 0, 0]]
        # brute force: distance to every level of the channel's codebook
        d = (z.unsqueeze(-1) - books.reshape(1, 3, 1, 1, -1)).abs()
        best = d.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
        assert torch.allclose(best, d.min(-1).values, atol=1e-6)


@pytest.mark.parametrize("kind", ["kmeans", "uniform", "int8", "none"])
def test_json_round_trip_gives_identical_reconstruction(kind):
    z = mixture_latents(n=4)
    q = make_quantizer(kind, latent_range=(-3.0, 3.0)).fit(z)
    attrs = json.loads(json.dumps(q.to_json()))  # must be plain JSON
    arrays = {k: np.array(v) for k, v in q.arrays().items()}
    q2 = Quantizer.from_json(attrs, arrays)
    stored = q.quantize(z)
    assert stored.dtype == q.dtype == q2.dtype
    assert stored.shape == tuple(z.shape)
    np.testing.assert_array_equal(q2.quantize(z), stored)
    assert torch.equal(q2.dequantize(stored), q.dequantize(stored))
    assert q2.dequantize(stored).dtype == torch.float32


@pytest.mark.parametrize("kind", ["kmeans", "uniform", "int8"])
def test_one_dequantisation_rule_for_every_index_kind(kind):
    """value = codebook[channel or 0][index]: what a reader in another language does."""
    z = mixture_latents(n=2)
    q = make_quantizer(kind, latent_range=(-3.0, 3.0)).fit(z)
    stored = q.quantize(z)
    cb = q.arrays()["codebook"]
    assert cb.dtype == np.float32 and cb.shape[1] == q.levels and cb.shape[0] in (1, z.shape[1])
    ch = np.arange(z.shape[1]).reshape(1, -1, 1, 1) if cb.shape[0] > 1 else 0
    np.testing.assert_array_equal(cb[ch, stored], q.dequantize(stored).numpy())


def test_int8_is_static_over_the_model_range_or_the_documented_default():
    q = make_quantizer("int8", latent_range=(-3.0, 3.0))
    assert q.to_json()["range"] == [-3.0, 3.0]
    assert np.isclose(q.codebook[0, 0], -3.0) and np.isclose(q.codebook[0, -1], 3.0)
    before = q.codebook.copy()
    q.fit(mixture_latents() * 0.1)  # fitting does not move a static quantiser
    np.testing.assert_array_equal(q.codebook, before)
    assert make_quantizer("int8").to_json()["range"] == list(DEFAULT_INT8_RANGE)
    # values beyond the range clip to the end levels
    s = q.quantize(torch.tensor([-10.0, 10.0]).reshape(1, 2, 1, 1))
    assert s.ravel().tolist() == [0, 255]


def test_fewer_uniform_levels_make_more_compressible_indices():
    z = mixture_latents(n=8)
    q256 = make_quantizer("uniform", levels=256).fit(z)
    q64 = make_quantizer("uniform", levels=64).fit(z)
    s64 = q64.quantize(z)
    assert s64.max() < 64 and len(np.unique(s64)) > 32
    assert mse(q64, z) > mse(q256, z)


def test_none_keeps_float16():
    z = mixture_latents(n=2)
    q = make_quantizer("none")
    s = q.quantize(z)
    assert s.dtype == np.float16 and q.arrays() == {}
    assert torch.allclose(q.dequantize(s), z, atol=2e-3)


def test_levels_are_limited_to_uint8_and_kinds_are_checked():
    with pytest.raises(ValueError, match="256"):
        make_quantizer("kmeans", levels=257)
    with pytest.raises(ValueError, match="256"):
        make_quantizer("uniform", levels=1000)
    with pytest.raises(WsicodecError, match="unknown quantiser"):  # the CLI prints it as one line
        make_quantizer("vq")
    with pytest.raises(WsicodecError, match="uniform"):
        make_quantizer("int8", levels=64)
    with pytest.raises(RuntimeError, match="fit"):
        make_quantizer("kmeans").quantize(mixture_latents(n=1))


def test_degenerate_samples_do_not_break_the_fit():
    const = torch.full((2, 2, 4, 4), 0.7)
    q = make_quantizer("kmeans").fit(const)
    assert torch.allclose(q.dequantize(q.quantize(const)), const)
    few = torch.tensor([0.0, 1.0, 2.0]).repeat(20).reshape(2, 2, 3, 5)  # 3 distinct values, 256 levels
    q = make_quantizer("kmeans", per_channel=False).fit(few)
    assert mse(q, few) < 1e-8  # bin-centre precision: range / 65536


def test_fit_handles_ten_million_values():
    """1e7 values fit through a histogram (the timing itself lives in benchmarks/bench_quantizers.py)."""
    z = torch.randn((100, 10, 100, 100))
    q = make_quantizer("kmeans", per_channel=False).fit(z)
    assert q.fit_values == 10_000_000
    assert np.all(np.diff(q.codebook[0]) >= 0)

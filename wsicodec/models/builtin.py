"""The project's own autoencoder: small, CPU-fast, bounded latents, weights shipped in the package.

    BUILTIN_MODELS: dict[id, packaged weights file name]; DEFAULT_MODEL_ID
    load_builtin(model_id=DEFAULT_MODEL_ID, device=None) -> BuiltinAutoencoder
    load_builtin_folder(path, device=None) -> BuiltinAutoencoder      # folders written by `wsicodec train`
    save_builtin_folder(net, path, *, model_id, extra=None)           # writes such a folder (atomically)
    is_builtin_folder(path) -> bool
    build_net(config) -> CodecNet;  CodecNet.config (JSON-plain)
    FAMILY: the "builtin" model family (wsicodec.models.family), registered on import

Architecture (CodecNet): no convolution at full resolution. The encoder pixel-unshuffles the
tile by 4 (3 -> 48 channels at 1/4 size), runs 3x3 residual blocks there, halves the size with
strided convolutions until 1/factor, and ends in ``bound * tanh(x / bound)`` so latents live in
(-bound, bound) and a uniform quantiser's grid covers them exactly. The decoder mirrors it with
pixel-shuffle upsampling and ends in a pixel-shuffle by 4. Input and output range is [-1, 1].

Weights files are safetensors (fp16 for the packaged ones) whose metadata carries the JSON config
under "wsicodec_config"; a folder holds ``wsicodec-model.json`` (the manifest, see docs/models.md)
plus ``model.safetensors``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsicodec._io import atomic_output
from wsicodec.errors import ModelError
from wsicodec.models.base import Autoencoder, ModelInfo, pick_device, sha256_of_state_dict
from wsicodec.models.family import Family, register_family
from wsicodec.models.manifest import MANIFEST_NAME, write_manifest
from wsicodec.models.spec import ModelSpec

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
V1_MODEL_ID = "wsicodec-base-f8c4-v1"
V2_MODEL_ID = "wsicodec-base-f8c12-v2"
DEFAULT_MODEL_ID = V2_MODEL_ID
BUILTIN_MODELS: dict[str, str] = {
    V2_MODEL_ID: "wsicodec-base-f8c12-v2.safetensors",  # rate-distortion trained, operating points low/default/high
    V1_MODEL_ID: "wsicodec-base-f8c4-v1.safetensors",  # release 0.1/0.2's default; its containers restore as ever
}
# latent shape (channels, factor) of each packaged model, for listings that must not load weights
BUILTIN_SHAPES: dict[str, tuple[int, int]] = {V2_MODEL_ID: (12, 8), V1_MODEL_ID: (4, 8)}
WEIGHTS_NAME = "model.safetensors"
MODEL_CLASS = "wsicodec.BuiltinCodec"

DEFAULT_CONFIG: dict[str, Any] = {
    "factor": 8,
    "latent_channels": 4,
    "enc_stem": 8,  # pixel-unshuffle factor of the encoder's input
    "enc_stem_kernel": 1,  # the stem mixes each unshuffled cell's 192 values; blocks add context
    "enc_widths": [96],  # channels at 1/enc_stem, then at each further halving down to 1/factor
    "enc_blocks": [1],
    "dec_stem": 4,  # pixel-shuffle factor of the decoder's output
    "dec_widths": [112, 48],  # channels at 1/factor, then at each doubling up to 1/dec_stem
    "dec_blocks": [1, 1],
    "bound": 3.0,
    # what compress uses unless told otherwise; chosen by measuring stored bytes and fidelity
    "default_quantizer": {"kind": "uniform", "levels": 64},
}  # v1's shape, also `wsicodec train`'s starting point; v2 is DEFAULT_CONFIG + the "arch" of its model card


class ResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        # start as identity: the net trains as a shallow one first, which matters on few CPU steps
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.act(self.conv1(x)))


def _levels(factor: int, stem: int, widths: list, blocks: list, what: str) -> int:
    n = int(round(math.log2(factor / stem))) + 1
    if stem < 1 or factor % stem or 2 ** (n - 1) * stem != factor:
        raise ModelError(f"builtin model: {what} stem {stem} does not divide factor {factor} by a power of two")
    if len(widths) != n or len(blocks) != n:
        raise ModelError(f"builtin model: {what} needs {n} widths and block counts for factor {factor}/stem {stem}")
    return n


class Encoder(nn.Module):
    def __init__(self, config: dict[str, Any]):
        super().__init__()
        s, w, b = int(config["enc_stem"]), list(config["enc_widths"]), list(config["enc_blocks"])
        n = _levels(int(config["factor"]), s, w, b, "encoder")
        k = int(config.get("enc_stem_kernel", 3))
        layers: list[nn.Module] = [nn.PixelUnshuffle(s), nn.Conv2d(3 * s * s, w[0], k, padding=k // 2)]
        for i in range(n):
            if i:
                layers.append(nn.Conv2d(w[i - 1], w[i], 3, stride=2, padding=1))
            layers += [ResBlock(w[i]) for _ in range(b[i])]
        layers += [nn.ReLU(inplace=True), nn.Conv2d(w[-1], int(config["latent_channels"]), 3, padding=1)]
        self.net = nn.Sequential(*layers)
        self.bound = float(config["bound"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(x) / self.bound) * self.bound


class Decoder(nn.Module):
    def __init__(self, config: dict[str, Any]):
        super().__init__()
        s, w, b = int(config["dec_stem"]), list(config["dec_widths"]), list(config["dec_blocks"])
        n = _levels(int(config["factor"]), s, w, b, "decoder")
        layers: list[nn.Module] = [nn.Conv2d(int(config["latent_channels"]), w[0], 3, padding=1)]
        for i in range(n):
            if i:
                layers += [nn.Conv2d(w[i - 1], w[i] * 4, 1), nn.PixelShuffle(2)]
            layers += [ResBlock(w[i]) for _ in range(b[i])]
        layers += [nn.ReLU(inplace=True), nn.Conv2d(w[-1], 3 * s * s, 3, padding=1), nn.PixelShuffle(s)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class RateModel(nn.Module):
    """The entropy model of a rate-distortion-trained model (config key ``"rd"``), per operating point.

    For operating point ``q`` and latent channel ``c`` the stored symbol is
    ``k = clamp(round(z * gain[q, c]), -128, 127)`` (uint8 index ``k + 128``), dequantised to
    ``k / gain[q, c]``: a per-channel uniform codebook, so containers need no new reading rule. The
    probability of symbol ``k`` is ``softmax(logits[q, c])[k + 128]`` (learned per-channel densities);
    its ``-log2`` is the rate the training minimises and what the rANS codec pays.

    Training relaxes rounding with additive uniform noise for the rate: the histogram density of the
    symbols convolved with a one-step box is the linear interpolation of neighbouring symbol masses.
    """

    SYMBOLS = 256
    OFFSET = 128

    def __init__(self, channels: int, qualities: list[str]):
        super().__init__()
        self.qualities = list(qualities)
        n = len(self.qualities)
        self.log_gain = nn.Parameter(torch.zeros(n, channels))
        k = torch.arange(self.SYMBOLS, dtype=torch.float32) - self.OFFSET
        # start as a discretised Laplacian of scale 2: mass near zero, every symbol possible
        self.logits = nn.Parameter((-k.abs() / 2.0).expand(n, channels, self.SYMBOLS).clone())

    def index(self, quality: str) -> int:
        try:
            return self.qualities.index(quality)
        except ValueError:
            raise ModelError(f"unknown quality {quality!r}; this model offers {', '.join(self.qualities)}") from None

    def gain(self, q: torch.Tensor) -> torch.Tensor:
        """(N,) operating-point numbers -> (N, C, 1, 1) gains."""
        return self.log_gain.exp()[q][:, :, None, None]

    def probs(self, q: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits.float(), dim=-1)[q]  # (N, C, 256)

    def bits_noisy(self, s: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Bits per sample of noisy scaled latents ``s`` (N,C,h,w) -> (N,)."""
        n, c = s.shape[:2]
        u = (s + self.OFFSET).clamp(0, self.SYMBOLS - 1).reshape(n, c, -1)
        k = u.detach().floor().clamp(max=self.SYMBOLS - 2)
        f = u - k
        p = self.probs(q)
        ki = k.long()
        pk = p.gather(2, ki)
        pk1 = p.gather(2, ki + 1)
        lik = (pk * (1 - f) + pk1 * f).clamp_min(1e-9)
        return -torch.log2(lik).sum(dim=(1, 2))

    def bits_hard(self, sym: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Bits per sample of integer symbols (N,C,h,w) in [-128, 127] -> (N,)."""
        n, c = sym.shape[:2]
        p = self.probs(q)
        idx = (sym.long() + self.OFFSET).clamp(0, self.SYMBOLS - 1).reshape(n, c, -1)
        return -torch.log2(p.gather(2, idx).clamp_min(1e-12)).sum(dim=(1, 2))

    def steps(self, quality: str) -> torch.Tensor:
        """(C,) quantiser step per channel at this operating point."""
        return (-self.log_gain[self.index(quality)]).exp().detach()

    def symbol_probs(self, quality: str) -> torch.Tensor:
        """(C, 256) float64 probabilities of the stored indices at this operating point."""
        return torch.softmax(self.logits[self.index(quality)].detach().double(), dim=-1)


class CodecNet(nn.Module):
    """encoder + decoder (+ the entropy model of rate-distortion-trained configs); images in [-1, 1]."""

    def __init__(self, config: dict[str, Any] | None = None):
        super().__init__()
        cfg = dict(DEFAULT_CONFIG)
        cfg.update(config or {})
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        rd = cfg.get("rd")
        if rd:
            self.rate = RateModel(int(cfg["latent_channels"]), list(rd["qualities"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def build_net(config: dict[str, Any] | None = None) -> CodecNet:
    return CodecNet(config)


# ------------------------------------------------------------------------------- the adapter
class BuiltinAutoencoder(Autoencoder):
    def __init__(self, net: CodecNet, *, model_id: str, device: str | torch.device | None = None,
                 source: str = "", bf16_cpu: bool = False):
        self.device = pick_device(device)
        self.net = net.eval().to(self.device)
        if self.device.type == "cpu":
            self.net = self.net.to(memory_format=torch.channels_last)
        self.bf16_cpu = bf16_cpu
        cfg = net.config
        # the decoder's reach in latent cells (its receptive field), where the config states it
        self.decode_halo_cells = int(cfg.get("decode_halo_cells", Autoencoder.decode_halo_cells))
        state = {k: v for k, v in net.state_dict().items()}
        dec = {k: v for k, v in state.items() if k.startswith("decoder.")}
        bound = float(cfg["bound"])
        self.info = ModelInfo(
            model_id=model_id,
            model_class=MODEL_CLASS,
            latent_channels=int(cfg["latent_channels"]),
            spatial_factor=int(cfg["factor"]),
            input_range=(-1.0, 1.0),
            latent_range=(-bound, bound),
            weights_sha256=sha256_of_state_dict(state),
            decoder_sha256=sha256_of_state_dict(dec),
            config=json.loads(json.dumps(cfg)),
            source=source,
        )

    # ------------------------------------------------------------------ operating points (rd models)
    def operating_points(self) -> list[str]:
        """Named operating points of a rate-distortion-trained model, lowest rate first; [] otherwise."""
        rate = getattr(self.net, "rate", None)
        return list(rate.qualities) if rate is not None else []

    def default_operating_point(self) -> str | None:
        rd = self.net.config.get("rd") or {}
        return rd.get("default") if rd else None

    def operating_point_quantizer(self, quality: str | None = None):
        """The quantiser of one operating point: 256 levels per channel, ``(k - 128) * step[c]``.

        It is a plain per-channel codebook (kind ``int8``: static, nothing fitted per slide), so any
        reader of the container format dequantises it with the one rule ``codebook[c][index]``."""
        import numpy as np

        from wsicodec.quant.quantizer import Quantizer

        rate = getattr(self.net, "rate", None)
        if rate is None:
            raise ModelError(f"model {self.info.model_id} has no operating points")
        quality = quality or self.default_operating_point() or rate.qualities[0]
        steps = rate.steps(quality).double().cpu().numpy()  # raises ModelError for an unknown name
        k = np.arange(RateModel.SYMBOLS, dtype=np.float64) - RateModel.OFFSET
        codebook = (steps[:, None] * k[None, :]).astype(np.float32)
        return Quantizer("int8", 256, per_channel=True, codebook=codebook,
                         range_=(float(codebook.min()), float(codebook.max())), quality=quality)

    def _autocast(self):
        if self.device.type == "cpu" and self.bf16_cpu:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return super()._autocast()

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.device.type == "cpu" else x

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.encoder(self._prep(x))

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.net.decoder(self._prep(z))


# ------------------------------------------------------------------------------- files
def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise ModelError(f"builtin model weights missing: {path}") from None
    except Exception as exc:
        raise ModelError(f"cannot load builtin model weights {path}: {exc}") from None
    if "wsicodec_config" not in meta:
        raise ModelError(f"{path} is not a wsicodec builtin weights file (no wsicodec_config metadata)")
    return state, json.loads(meta["wsicodec_config"])


def net_from_file(path: str | Path) -> CodecNet:
    state, config = _read_weights(Path(path))
    net = CodecNet(config)
    state = {k: v.float() for k, v in state.items()}
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(f"weights in {path} do not fit the builtin architecture: {str(exc).splitlines()[0]}") from None
    return net


def save_weights(net: CodecNet, path: str | Path, *, fp16: bool = True) -> None:
    from safetensors.torch import save_file

    state = {k: (v.half() if fp16 and v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in net.state_dict().items()}
    with atomic_output(path) as tmp:
        save_file(state, str(tmp), metadata={"wsicodec_config": json.dumps(net.config)})


def load_builtin(model_id: str = DEFAULT_MODEL_ID, device: str | None = None) -> BuiltinAutoencoder:
    if model_id not in BUILTIN_MODELS:
        raise ModelError(f"unknown builtin model {model_id!r}; known: {', '.join(sorted(BUILTIN_MODELS))}")
    path = WEIGHTS_DIR / BUILTIN_MODELS[model_id]
    net = net_from_file(path)
    # fp16 storage -> fp32 compute: the hash is of what runs, which round-trips exactly
    return BuiltinAutoencoder(net, model_id=model_id, device=device, source=f"package:{path.name}")


def is_builtin_folder(path: str | Path) -> bool:
    manifest = Path(path) / MANIFEST_NAME
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text()).get("architecture") == "builtin"
    except (OSError, ValueError):
        return False


def load_builtin_folder(path: str | Path, device: str | None = None) -> BuiltinAutoencoder:
    folder = Path(path)
    manifest_path = folder / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{folder} has no {MANIFEST_NAME}; not a wsicodec model folder") from None
    except ValueError as exc:
        raise ModelError(f"{manifest_path} is not valid JSON: {exc}") from None
    if manifest.get("architecture") != "builtin":
        raise ModelError(f"{manifest_path} describes architecture {manifest.get('architecture')!r}, not 'builtin'")
    weights = folder / manifest.get("weights", WEIGHTS_NAME)
    net = net_from_file(weights)
    model_id = manifest.get("id") or manifest.get("model_id") or f"local:{folder.resolve().name}"
    return BuiltinAutoencoder(net, model_id=model_id, device=device, source=str(folder))


def save_builtin_folder(net: CodecNet, path: str | Path, *, model_id: str | None = None,
                        extra: dict[str, Any] | None = None, fp16: bool = False, description: str = "",
                        base: str | None = None) -> Path:
    """Write (or update) a model folder that ``--model DIR`` loads.

    Other files in the folder (e.g. training checkpoints) are left alone. Weights are renamed into
    place first and the manifest last, so a folder only looks loadable once both are complete."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(net, folder / WEIGHTS_NAME, fp16=fp16)
    write_manifest(folder, model_id=model_id or f"local:{folder.resolve().name}", architecture="builtin",
                   base=base, description=description or "wsicodec builtin-architecture autoencoder",
                   extra={"model_class": MODEL_CLASS, "weights": WEIGHTS_NAME, "config": net.config,
                          **(extra or {})})
    return folder


def param_count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# ------------------------------------------------------------------------------- the family
def _specs() -> list[ModelSpec]:
    specs = []
    for model_id in BUILTIN_MODELS:
        channels, factor = BUILTIN_SHAPES.get(model_id, (0, 0))
        specs.append(ModelSpec(
            model_id, "builtin", channels, factor, (-1.0, 1.0),
            description="wsicodec's own model, rate-distortion trained, --quality low|default|high (default)"
            if model_id == DEFAULT_MODEL_ID else "wsicodec's own model (0.2's default)",
            licence="Apache-2.0 (trained on permissively licensed data)",
        ))
    return specs


def _packaged(spec: ModelSpec) -> bool:
    return spec.id in BUILTIN_MODELS and (WEIGHTS_DIR / BUILTIN_MODELS[spec.id]).is_file()


def _load_folder(folder: Path, device: str | None, model_id: str) -> BuiltinAutoencoder:
    model = load_builtin_folder(folder, device)
    model.info.model_id = model_id
    return model


def _save(model: BuiltinAutoencoder, folder: str | Path, *, model_id: str, description: str = "",
          base: str | None = None, extra: dict[str, Any] | None = None) -> Path:
    return save_builtin_folder(model.net, folder, model_id=model_id, description=description, base=base,
                               extra=extra)


FAMILY = register_family(Family(
    name="builtin",
    sniff=is_builtin_folder,  # builtin folders always carry a manifest
    load_folder=_load_folder,
    load_spec=lambda spec, device: load_builtin(spec.id, device),
    save=_save,
    builders={"builtin": MODEL_CLASS},
    specs=_specs,
    default_model=DEFAULT_MODEL_ID,
    packaged=True,
    offline=_packaged,
))

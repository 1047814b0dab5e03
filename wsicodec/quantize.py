"""Latent quantisers: K-means codebook, static uniform int8, uniform N levels, none (float16).

OWNER: container helper. Interface:

    q = make_quantizer(kind, levels=256, model_info=ModelInfo)   # kind in {"kmeans","uniform","int8","none"}
    q.fit(sample: torch.Tensor (N,C,h,w))       # no-op for static ones
    q.quantize(latents: torch.Tensor (N,C,h,w)) -> np.ndarray (N,C,h,w) of q.dtype (uint8 | float16)
    q.dequantize(stored: np.ndarray) -> torch.Tensor float32
    q.to_json() -> dict (plain JSON);  q.arrays() -> {"codebook": float32 (C or 1, levels)} or {}
    Quantizer.from_json(attrs, arrays) -> Quantizer
"""

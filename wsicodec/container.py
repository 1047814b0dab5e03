"""The .pzarr container: the only module that knows its layout (formats/pzarr-v1.md specifies it).

OWNER: container helper. Interface:

    with ContainerWriter(out_path, grid=..., model=ModelInfo, quantizer=Quantizer, tissue=bool (rows,cols),
                         source=dict, associated=dict[str, np.ndarray], overwrite=False,
                         single_file=False) as writer:
        writer.write_tile(row, col, stored)       # stored: (C, t/f, t/f) of quantizer dtype; buffered per shard
    # on clean exit: shards flushed, attributes written, temp name renamed to out_path; on exception: temp removed

    c = Container.open(path)                      # ContainerError for missing/truncated/foreign/unknown major version
    c.attrs (the "pzarr" attribute dict), c.grid (TileGrid), c.model (dict), c.quantizer (Quantizer),
    c.tissue (bool (rows, cols)), c.associated_images() -> dict[str, np.ndarray],
    c.read_latents(r0, c0, r1, c1) -> np.ndarray (C, (r1-r0)*t/f, (c1-c0)*t/f) stored values, in *latent cells*
         (r*, c* are latent-cell coordinates; cells outside the mosaic or in background tiles come back as the
          container's background value (the stored encoding of a white tile))
    stored_tile_bytes(stored: np.ndarray) -> int   # bytes one tile costs in a container (same codec + shard index)
"""

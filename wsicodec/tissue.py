"""Which tiles hold tissue, decided on a low-resolution thumbnail.

OWNER: slide helper. Interface:

    tissue_tiles(thumbnail: np.ndarray, grid: TileGrid, min_fraction: float = 0.05) -> np.ndarray[bool] (rows, cols)
"""

"""Source slides: anything OpenSlide opens, read at the archive resolution.

OWNER: slide helper. Interface (others rely on it; change only by agreement):

    grid = TileGrid(...)                          # frozen dataclass, JSON round-trip
    slide = SourceSlide(path, source_mpp=None)    # raises SlideError with one-line messages
    slide.grid(target_mpp=0.5, tile_size=256) -> TileGrid
    slide.read_tile(grid, row, col) -> np.uint8 (tile, tile, 3)   # thread-safe; white past edges
    slide.thumbnail(max_size=1024) -> np.uint8 (h, w, 3)          # covers exactly the grid's area
    slide.associated_images() -> dict[str, np.ndarray]            # "label", "macro", "thumbnail"
    slide.properties -> dict[str, str]; slide.mpp; slide.objective_power; slide.mpp_source
"""

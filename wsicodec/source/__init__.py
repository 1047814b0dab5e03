"""The source slide: OpenSlide reads at the archive resolution, and which tiles hold tissue."""

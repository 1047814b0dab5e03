"""Pipelines: slide -> container (compress), container -> pixels (decoder, restore, TIFF writer)."""

"""The .pzarr container format (formats/pzarr-v1.md): spec constants, writer, reader."""

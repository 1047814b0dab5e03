"""Test and benchmark helpers shipped with the package: synthetic slides, tiny models, contract checks.

    wsicodec.testing.synthetic   write_synthetic_slide, write_synthetic_leica: H&E-like pyramidal slides
                                 OpenSlide opens (Aperio, Leica SCN), deterministic, any size
    wsicodec.testing.tiny        write_tiny_taesd, write_tiny_builtin: tiny random autoencoders saved as
                                 model folders, fast enough for every test

Plain functions, importable without pytest; tests/conftest.py wraps them in cached fixtures.
"""

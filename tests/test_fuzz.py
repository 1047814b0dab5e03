"""Seeded bit-flip fuzzing: every flip that changes a decoded pixel or attribute is refused.

benchmarks/fuzz_containers.py runs the same harness with more flips and prints the detection table.
"""

from __future__ import annotations

import pytest

import wsicodec
from wsicodec.format.container import Container
from wsicodec.models import load_model
from wsicodec.testing.fuzz import detection_table, fuzz_container


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory):
    from wsicodec.testing.synthetic import write_synthetic_slide

    return write_synthetic_slide(tmp_path_factory.mktemp("fuzz") / "s.svs", 1024, 1024)


@pytest.mark.parametrize("single_file", [False, True], ids=["directory", "zip"])
@pytest.mark.slow
def test_every_damaging_flip_is_refused(small_slide, tiny_model_dir, tmp_path, single_file):
    model = load_model(str(tiny_model_dir))
    path = tmp_path / "c.pzarr"
    wsicodec.compress(small_slide, path, model=model, single_file=single_file)
    assert Container.open(path).verify() == []  # intact: nothing to report
    results = fuzz_container(path, flips=160, seed=11, model=model)
    table = detection_table(results)
    print(table)
    assert len({r.kind for r in results}) >= 8, table  # every kind of stored file was hit
    assert not [r for r in results if r.silent], table
    # in a directory every stored byte is covered: the manifest array's own metadata document too, whose content
    # the format pins (formats/pzarr-v1.md, section 3.6)
    if not single_file:
        accepted = {r.key for r in results if not (r.verify_refused and r.restore_refused)}
        assert accepted == set(), table

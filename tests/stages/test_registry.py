"""The registry reads each stage's `registered_as` from the source: a stage registers in its own file."""

from __future__ import annotations

import pytest

from stages.registry import UnknownStage, builtin_stages, scan, stage_class


def test_every_registration_is_the_class_own_declaration():
    found = builtin_stages()
    assert ("VideoCaptioner", "QwenVLCaptioner") in found and ("ImageGenerator", "StableDiffusion3Generator") in found
    for (step_type, name), target in found.items():
        cls = stage_class(step_type, name)
        assert f"{cls.__module__}:{cls.__name__}" == target
        own = {label if "/" in label else f"{label}/{cls.__name__}" for label in cls.registered_as}
        assert f"{step_type}/{name}" in own, (target, cls.registered_as)


def test_a_stage_added_in_one_file_is_found(tmp_path):
    (tmp_path / "family").mkdir()
    (tmp_path / "family" / "judge.py").write_text(
        "class Base:\n    registered_as: tuple = ()\n\n\n"
        'class Judge(Base):\n    """A judge."""\n\n    registered_as = ("VideoFilter", "VideoFilter/OldJudge")\n'
    )
    assert scan(tmp_path, "extra") == {
        ("VideoFilter", "Judge"): "extra.family.judge:Judge",
        ("VideoFilter", "OldJudge"): "extra.family.judge:Judge",
    }


def test_a_registration_that_is_not_a_literal_or_taken_says_so(tmp_path):
    (tmp_path / "a.py").write_text("TYPES = ('VideoFilter',)\n\n\nclass A:\n    registered_as = TYPES\n")
    with pytest.raises(UnknownStage, match=r"a.py:5: A.registered_as must be a literal tuple of strings"):
        scan(tmp_path, "extra")
    (tmp_path / "a.py").write_text("class A:\n    registered_as = ('VideoFilter/Same',)\n")
    (tmp_path / "b.py").write_text("class B:\n    registered_as = ('VideoFilter/Same',)\n")
    with pytest.raises(UnknownStage, match=r"VideoFilter/Same is registered twice: by extra.a:A and by extra.b:B"):
        scan(tmp_path, "extra")

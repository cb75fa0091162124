import pytest

from tnkd.registry import Registry, build


class Thing:
    def __init__(self, size: int = 1) -> None:
        self.size = size


def make_registry() -> Registry:
    reg = Registry("thing")
    reg.register("thing", "alias-name")(Thing)
    return reg


def test_lookup_is_case_and_dash_insensitive():
    reg = make_registry()
    assert reg.get("THING") is Thing
    assert reg.get("alias_name") is Thing
    assert "Alias-Name" in reg
    assert reg.names() == ["alias_name", "thing"]
    assert len(reg) == 2


def test_duplicates_are_refused():
    reg = make_registry()
    with pytest.raises(KeyError, match="already registered"):
        reg.add("Thing", Thing)


def test_miss_lists_valid_names():
    reg = make_registry()
    with pytest.raises(
        ValueError, match=r"unknown thing 'thin'; expected one of: alias_name, thing"
    ):
        reg.get("thin")
    with pytest.raises(TypeError, match="expected a thing name"):
        reg.get(3)


def test_build_from_name_mapping_and_instance():
    reg = make_registry()
    assert build(reg, "thing").size == 1
    assert build(reg, {"name": "thing", "size": 5}).size == 5
    inst = Thing(7)
    assert build(reg, inst, base=Thing) is inst
    with pytest.raises(ValueError, match="needs a 'name' key"):
        build(reg, {"size": 2})
    with pytest.raises(TypeError, match="expected a thing name, a mapping"):
        build(reg, 3.5)

"""The field registry (bayes_spi/config/fields.py) is the one list of field kinds: build, config, autoset, CLI."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

from bayes_spi.config.fields import FIELD_NAMES, FIELDS, field_kind, fields_help
from bayes_spi.infer.build import build_field
from bayes_spi.infer.config import FitConfig
from bayes_spi.models.fields import FourierNetField, SirenField, SirenVoxelField, VoxelField
from bayes_spi.models.variational_field import VariationalAmplitudeField

PACKAGE = Path(__file__).resolve().parent.parent / "bayes_spi"

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(field_width=8, field_depth=1, voxel_grid=5, variational_grid=5, field_w0=3.0,
             variational_kl_weight=0.5, variational_scale_init=0.2)


def test_each_kind_builds_its_class_from_the_settings_it_names() -> None:
    expected = {"siren": SirenField, "fouriernet": FourierNetField, "voxel": VoxelField, "hybrid": SirenVoxelField,
                "variational": VariationalAmplitudeField}
    assert FIELD_NAMES == tuple(expected)
    config_fields = {f.name for f in dataclasses.fields(FitConfig)}
    for name, kind in FIELDS.items():
        assert set(kind.settings) <= config_fields, name
        field = build_field(FitConfig(field=name, symmetry="O", **SMALL), 0.1)
        assert type(field) is expected[name], name
        assert field.symmetry == "O"  # build_field applies the point group
    # the settings reach the constructors
    hybrid = build_field(FitConfig(field="hybrid", **SMALL), 0.1)
    assert hybrid.n_voxel == 5 and hybrid.net.first.shape == (8, 3) and hybrid.net.w0_first == 3.0
    assert build_field(FitConfig(field="voxel", **SMALL), 0.1).n == 5
    variational = build_field(FitConfig(field="variational", **SMALL), 0.1)
    assert variational.n == 5 and variational.kl_weight == 0.5
    q = torch.randn(4, 3) * 0.03
    assert torch.all(torch.isfinite(variational.log_intensity(q)))


def test_config_checks_and_messages_come_from_the_registry() -> None:
    with pytest.raises(ValueError, match="expected siren, fouriernet, voxel, hybrid or variational, got 'sirne'"):
        FitConfig(field="sirne")
    with pytest.raises(ValueError, match="expected siren, fouriernet or hybrid with latent_dim > 0"):
        FitConfig(field="voxel", latent_dim=2)
    with pytest.raises(ValueError, match="expected none with field variational"):
        FitConfig(field="variational", intensity_prior="wilson")
    with pytest.raises(ValueError, match="expected C1, I, O or Dn with n even with field variational"):
        FitConfig(field="variational", symmetry="C3")
    with pytest.raises(ValueError, match="fit setting field: expected"):
        field_kind("nope")
    assert [n for n, k in FIELDS.items() if k.voxels] == ["voxel", "hybrid"]
    assert [n for n, k in FIELDS.items() if k.neural] == ["siren", "fouriernet", "hybrid", "variational"]


def test_the_command_line_offers_the_registered_kinds_with_their_help() -> None:
    from bayes_spi.cli.fit import command

    option = next(p for p in command.params if p.name == "field")
    assert tuple(option.type.choices) == FIELD_NAMES
    assert fields_help() in option.help
    for kind in FIELDS.values():
        assert kind.name in option.help and kind.help in option.help


def test_no_other_module_lists_the_field_kinds() -> None:
    """A tuple, list or set literal holding two or more field names outside the registry is a second list."""
    names = set(FIELD_NAMES)
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "config/fields.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                found = {e.value for e in node.elts if isinstance(e, ast.Constant) and e.value in names}
                if len(found) >= 2:
                    bad.append(f"{rel}:{node.lineno}: {sorted(found)}")
    assert not bad, "field kinds listed outside bayes_spi/config/fields.py:\n" + "\n".join(bad)

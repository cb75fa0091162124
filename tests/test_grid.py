import json
from pathlib import Path

import pytest
import yaml

from tnkd.cli import run
from tnkd.experiments.files import unique_path

MAIN = Path(__file__).resolve().parents[1] / "configs" / "digits" / "main.yaml"


def _grid_config(folder: Path, name: str, bond_dim: int, results: Path) -> Path:
    settings = yaml.safe_load(MAIN.read_text())
    settings["student"]["init_args"]["bond_dim"] = bond_dim
    settings["variants"] = settings["variants"][:2]
    settings["results"] = str(results)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def test_grid_runs_every_family_and_reports_them_together(tmp_path, capsys):
    folder = tmp_path / "configs"
    folder.mkdir()
    _grid_config(folder, "grid_mps_d4", 4, tmp_path / "d4.json")
    _grid_config(folder, "grid_mps_d6", 6, tmp_path / "d6.json")
    (folder / "teacher.yaml").write_text("not a grid config: ignored\n")
    (tmp_path / "d6.json").write_text("{}")  # a file already there is kept, not overwritten
    common = ["--teacher_epochs", "2", "--epochs", "2", "--seeds", "[0]", "--logger", "none"]
    plot = ["--plot", str(tmp_path / "grid.png"), "--title", "Digits"]
    written = run(
        ["grid", str(folder), *plot, *common, "--teacher_checkpoint", str(tmp_path / "t.pt")]
    )
    assert written == [tmp_path / "d4.json", tmp_path / "d6.1.json"]
    assert (tmp_path / "d6.json").read_text() == "{}"
    params = [json.loads(p.read_text())["runs"][0]["student_params"] for p in written]
    # closed form of the MPS parameter count (64 sites, d = 2, 10 classes) at D = 4 and 6
    assert params == [64 * D * 2 * D + D * 10 * D + 2 * D + 1 for D in (4, 6)]
    out = capsys.readouterr().out
    assert "Digits d4" in out and "Digits d6.1" in out and "| KL (Hinton) |" in out
    assert (tmp_path / "grid.png").stat().st_size > 1000


def test_grid_reports_a_failing_config_and_runs_the_rest(tmp_path, capsys):
    folder = tmp_path / "configs"
    folder.mkdir()
    good = _grid_config(folder, "grid_b", 4, tmp_path / "b.json")
    bad = folder / "grid_a.yaml"
    bad.write_text(good.read_text().replace("num_sites: 64", "num_sites: 50"))
    with pytest.raises(SystemExit, match=r"1 of 2 configs failed.*grid_a\.yaml \(.*expects 50"):
        common = ["--teacher_epochs", "1", "--epochs", "1", "--seeds", "[0]", "--logger", "none"]
        run(["grid", str(folder), *common, "--teacher_checkpoint", str(tmp_path / "t.pt")])
    assert (tmp_path / "b.json").exists()
    assert "expects 50 inputs" in capsys.readouterr().out  # with the progress lines


def test_grid_needs_grid_configs(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no grid\*\.yaml"):
        run(["grid", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="neither a folder"):
        run(["grid", str(tmp_path / "missing.yaml")])


def test_unique_path_never_returns_an_existing_file(tmp_path):
    (tmp_path / "r.json").write_text("x")
    (tmp_path / "r.1.json").write_text("y")
    assert unique_path(tmp_path / "r.json") == tmp_path / "r.2.json"
    assert unique_path(tmp_path / "new.json") == tmp_path / "new.json"

"""What DVC removes before a stage runs is put back when the stage fails (`pipeline.kept`);
the real `dvc repro` case is in tests/test_e2e.py."""

from pathlib import Path

from pipeline import kept


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_kept_outputs_come_back_file_by_file_and_only_under_dvc(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".dvc").mkdir()
    models, plots, metrics = Path("models/finetune"), Path("plots/finetune"), Path("m.json")
    for path, data in ((models / "model.safetensors", b"w"), (plots / "curve.csv", b"c"),
                       (plots / "curve.png", b"p"), (metrics, b"{}")):  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    before = _tree(tmp_path / "models") | _tree(tmp_path / "plots")
    kept.keep(plots, metrics, models)  # not under DVC: nothing kept
    assert kept.put_back() is None and not (tmp_path / ".dvc/tmp").exists()

    monkeypatch.setenv("DVC_STAGE", "finetune")
    assert kept.put_back() is None  # nothing kept yet
    kept.keep(plots, metrics, models)
    # what dvc repro removes: a listed folder, a listed file, a listed file in a folder
    for path in (models / "model.safetensors", metrics, plots / "curve.csv"):
        path.unlink()
    models.rmdir()
    assert sorted(kept.put_back()) == sorted(map(str, (plots, metrics, models)))
    assert _tree(tmp_path / "models") | _tree(tmp_path / "plots") == before
    assert metrics.read_bytes() == b"{}"
    assert kept.put_back() == []  # nothing missing: nothing to do

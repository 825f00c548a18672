"""The README's result tables are the committed benchmark outputs, spliced in by a script."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_updater():
    spec = importlib.util.spec_from_file_location("update_readme", ROOT / "benchmarks" / "update_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_result_blocks_match_benchmarks_results():
    updater = load_updater()
    readme = (ROOT / "README.md").read_text()
    blocks = updater.BLOCK.findall(readme)
    assert len(blocks) >= 5, "the README quotes the benchmark results through <!-- results: ... --> blocks"
    assert updater.render(readme) == readme, "README.md is stale: run python benchmarks/update_readme.py"


def test_splicing_takes_one_section_and_turns_its_headings_bold(tmp_path, monkeypatch):
    updater = load_updater()
    monkeypatch.setattr(updater, "RESULTS", tmp_path)
    (tmp_path / "r.md").write_text("# Title\n\nintro\n\n## A\n\na-text\n\n### A1\n\nsub\n\n## B\n\nb-text\n")
    assert updater.extract("r.md#A") == "a-text\n\n**A1**\n\nsub\n"
    assert updater.extract("r.md").startswith("intro")
    doc = "x\n<!-- results: r.md#B -->\nold\n<!-- /results -->\ny\n"
    assert updater.render(doc) == "x\n<!-- results: r.md#B -->\nb-text\n<!-- /results -->\ny\n"

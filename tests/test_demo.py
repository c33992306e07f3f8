import json

import pytest

from promptkit.cli import main


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick"]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = {(r["method"], r["split"]): r["top1"] for r in results["rows"]}
    for key in [("zero-shot", "test"), ("zero-shot", "shifted"), ("coop", "test"), ("coop", "base"),
                ("coop", "novel"), ("maple", "test"), ("tpt", "shifted (48-image subset)"),
                ("zero", "shifted (48-image subset)"), ("zero-shot", "shifted (48-image subset)")]:
        assert key in rows and 0 <= rows[key] <= 100, key
    assert rows[("coop", "test")] > rows[("zero-shot", "test")]  # few-shot prompts learn something
    for name in ("results.md", "accuracy_vs_shots.png", "reliability_coop.png"):
        assert (out / name).stat().st_size > 0
    assert "| coop | test |" in capsys.readouterr().out

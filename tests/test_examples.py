import runpy
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_zero_shot_and_coop_example_runs_and_learns(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["zero_shot_and_coop.py"])
    runpy.run_path(str(EXAMPLES / "zero_shot_and_coop.py"), run_name="__main__")
    out = capsys.readouterr().out
    losses = [float(line.rsplit(" ", 1)[1]) for line in out.splitlines() if line.startswith("CoOp step")]
    assert len(losses) == 5 and losses[-1] < losses[0]
    assert (tmp_path / "coop_prompts" / "prompt_weights.safetensors").is_file()

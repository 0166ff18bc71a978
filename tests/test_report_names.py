"""Generator and run names reach matplotlib as plain text: `$`, `\\`, `_`, `^`, `%` and braces are
drawn as written, never parsed as mathtext (an unbalanced `sd$\\frac$` crashed `report`)."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.text import Text

from ds_trainer import cli, report
from ds_trainer.metrics import per_generator_metrics
from ds_trainer.report_figures import build_figures, plain_text

HOSTILE = ["sd$\\frac$", "a$b", "x_{1}", "100%", "back\\slash\\", "$x^2$ and $y$", "\\$escaped", "{brace}^"]


def hostile_eval(path: Path, names: list[str], n: int = 20) -> Path:
    rng = np.random.default_rng(0)
    scores, labels, gens = [], [], []
    for g in names:
        for label in (0, 1):
            scores += np.clip(rng.normal(0.3 + 0.3 * label, 0.1, n), 0, 1).tolist()
            labels += [label] * n
            gens += [g] * n
    scores, labels = np.asarray(scores), np.asarray(labels)
    result = {
        "checkpoint": str(path.parent / "ckpt" / "best"), "epoch": 1, "global_step": 4, "split": "val",
        "samples": len(scores), "bad_samples": 0, "generators": per_generator_metrics(scores, labels, gens),
        "overall": {}, "config": {"model": {"model_name": "tiny"}},
        "predictions": report.predictions_block(scores, labels, gens),
    }  # fmt: skip
    path.write_text(json.dumps(result))
    return path


def hostile_run(run_dir: Path, names: list[str]) -> Path:
    run_dir.mkdir(parents=True)
    rows = [{"epoch": e, "step": 4 * e, "train_loss": 0.7 / e, "val_loss": 0.8 / e, "val_auc": 0.7,
             "val_generators": {**{g: {"auc": 0.6 + 0.01 * k} for k, g in enumerate(names)}, "mean": {"auc": 0.6}}}
            for e in (1, 2)]  # fmt: skip
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


@pytest.mark.parametrize("names", [HOSTILE, ["sd$\\frac$"], ["a$b", "plain"]])
def test_report_draws_hostile_generator_and_run_names(tmp_path: Path, capsys, names: list[str]) -> None:
    ev = hostile_eval(tmp_path / "eval.json", names)
    run = hostile_run(tmp_path / "run", names)
    out = tmp_path / "rep"
    argv = ["report", "--eval", str(ev), "--run", str(run), "--out", str(out), "--name", "run$\\alpha_1$"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    for figure in ("roc", "pr", "scores", "accuracy", "confusion", "training"):
        assert (out / f"{figure}.png").stat().st_size > 1000, figure
    page = (out / "report.html").read_text()
    for name in names:
        assert html.escape(name) in page


def test_every_drawn_text_is_the_name_as_written(tmp_path: Path) -> None:
    run = report.load_eval(hostile_eval(tmp_path / "eval.json", HOSTILE), name="r$\\x$")
    report.attach_run(run, hostile_run(tmp_path / "run", HOSTILE))
    with plain_text():
        figures = build_figures([run])
        for fig in figures.values():
            fig.canvas.draw()  # tick labels are made here, under the same setting
    texts = [t for fig in figures.values() for t in fig.findobj(Text) if t.get_text()]
    shown = {t.get_text() for t in texts}
    for name in HOSTILE:
        assert any(name in s for s in shown), name
    assert not [t.get_text() for t in texts if t.get_parse_math()]
    for fig in figures.values():
        report.pyplot().close(fig)

"""The evaluation report: figures from eval results, the HTML page in a real browser, TensorBoard.

Fast and pure (no DeepSpeed): eval results are built here from scores drawn per generator; the
2-rank train → `ds-trainer eval --report` path is in test_protocol.py.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ds_trainer import cli, report
from ds_trainer.bootstrap import bootstrap_intervals
from ds_trainer.errors import DataError
from ds_trainer.metrics import per_generator_metrics
from ds_trainer.report_figures import mean_roc

GENERATORS = ("adm", "biggan", "midjourney")


def fake_eval(
    path: Path, shift: float, seed: int = 0, n: int = 60, trained: tuple[str, ...] | None = None, resamples: int = 0
) -> Path:
    """An eval result as `ds-trainer eval` writes it: the protocol table and every image's score
    (with `trained`, the unseen-generators mean; with `resamples`, the bootstrap intervals).

    Real images score around 0.3, generated ones around 0.3 + shift (BigGAN harder: half the shift).
    """
    rng = np.random.default_rng(seed)
    scores, labels, gens = [], [], []
    for g in GENERATORS:
        for label in (0, 1):
            mu = 0.3 + (shift * (0.5 if g == "biggan" else 1.0) if label else 0.0)
            scores += np.clip(rng.normal(mu, 0.12, n), 0, 1).tolist()
            labels += [label] * n
            gens += [g] * n
    scores, labels = np.asarray(scores), np.asarray(labels)
    table = per_generator_metrics(scores, labels, gens, trained)
    result = {
        "checkpoint": str(path.parent / "ckpt" / "best"), "epoch": 3, "global_step": 24, "split": "val",
        "samples": len(scores), "bad_samples": 0, "generators": table, "overall": {},
        "config": {"model": {"model_name": "tiny", "mode": "fine-tune"}, "training": {"learning_rate": 0.001}},
        "predictions": report.predictions_block(scores, labels, gens), "trained_generators": trained,
    }  # fmt: skip
    if resamples:
        result["ci"] = bootstrap_intervals(scores, labels, gens, resamples=resamples, trained=trained)
    path.write_text(json.dumps(result))
    return path


def write_metrics(run_dir: Path, epochs: int = 3) -> Path:
    """metrics.jsonl and steps.jsonl as training writes them: 8 steps an epoch, loss every 2nd step."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = [{"epoch": e, "step": 8 * e, "train_loss": 0.7 / e, "val_loss": 0.8 / e, "val_auc": 0.6 + 0.1 * e,
             "train_acc": 0.5 + 0.1 * e, "val_acc": 0.45 + 0.1 * e, "lr": 1e-3 / e, "samples_per_s": 50.0 + e,
             "val_generators": {**{g: {"auc": 0.5 + 0.1 * e + 0.01 * k} for k, g in enumerate(GENERATORS)},
                                "mean": {"auc": 0.51 + 0.1 * e}}}
            for e in range(1, epochs + 1)]  # fmt: skip
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    steps = [
        {"step": s, "train/lr": 1e-3 * (1 - s / 30), **({"train/loss": 0.8 - s / 40} if s % 2 == 0 else {})}
        for s in range(1, 8 * epochs + 1)
    ]
    (run_dir / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    return run_dir


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


def test_one_run_report_has_every_figure_and_the_table(tmp_path, capsys):
    ev = fake_eval(tmp_path / "eval.json", shift=0.4)
    run_dir = write_metrics(tmp_path / "run")
    assert cli.main(["report", "--eval", str(ev), "--run", str(run_dir), "--out", str(tmp_path / "rep")]) == 0
    page = tmp_path / "rep" / "report.html"
    assert capsys.readouterr().out.strip() == str(page)
    for name in ("roc", "pr", "scores", "accuracy", "confusion", "calibration", "training"):
        w, h = png_size(tmp_path / "rep" / f"{name}.png")
        assert w > 300 and h > 200, name
    text = page.read_text()
    # Self-contained: every figure embedded, nothing fetched.
    assert text.count("data:image/png;base64,") == 7
    assert not re.search(r"(src|href)=['\"]https?:", text)
    # The table: a row per generator and the mean, with the values eval computed.
    table = json.loads(ev.read_text())["generators"]
    for g in (*GENERATORS, "mean"):
        row = re.search(rf"<tr[^>]*><td>{g}</td>(.*?)</tr>", text)
        assert row, g
        cells = re.findall(r"<td>([^<]*)</td>", row.group(1))
        assert cells[:5] == [f"{100 * table[g][k]:.1f}" for k in ("acc", "real_acc", "fake_acc", "ap", "auc")]
    assert "model_name: tiny" in text and str(tmp_path / "ckpt" / "best") in text


def test_mean_roc_auc_is_the_protocol_mean_and_confusion_matches_accuracy(tmp_path):
    run = report.load_eval(fake_eval(tmp_path / "eval.json", shift=0.3))
    table = run.table()
    _, _, mean_auc = mean_roc(run)
    assert mean_auc == pytest.approx(table["mean"]["auc"], abs=1e-6)
    cm = report.confusion_counts(run)
    assert cm.sum() == len(run.scores)
    real_acc = cm[0, 0] / cm[0].sum()
    fake_acc = cm[1, 1] / cm[1].sum()
    pooled = per_generator_metrics(run.scores, run.labels, ["all"] * len(run.scores))["all"]
    assert (real_acc, fake_acc) == (pytest.approx(pooled["real_acc"]), pytest.approx(pooled["fake_acc"]))


def test_comparing_runs_overlays_them(tmp_path):
    a = fake_eval(tmp_path / "a.json", shift=0.45, seed=1)
    b = fake_eval(tmp_path / "b.json", shift=0.15, seed=2)
    out = tmp_path / "rep"
    assert (
        cli.main(["report", "--eval", str(a), "--eval", str(b), "--name", "full", "--name", "probe", "--out", str(out)])
        == 0
    )
    text = (out / "report.html").read_text()
    for g in (*GENERATORS, "mean"):
        assert len(re.findall(rf"<tr[^>]*><td>{g}</td><td class='run'>(full|probe)</td>", text)) == 2, g
    runs = [report.load_eval(a, "full"), report.load_eval(b, "probe")]
    roc = report.roc_figure(runs)
    # A panel per generator plus the mean, each with one line per run (and the chance diagonal).
    panels = [ax for ax in roc.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == [*GENERATORS, "mean"]
    for ax in panels:
        labels = [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]
        assert [lab.split(" ")[0] for lab in labels] == ["full", "probe"]
    bars = report.accuracy_figure(runs)
    assert len(bars.axes[0].patches) == 2 * (len(GENERATORS) + 1)


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--eval", "missing.json"], 2, "no such file"),
        (["--eval", "notjson.json"], 3, "not JSON"),
        (["--eval", "nopred.json"], 3, "no per-image predictions"),
        (["--eval", "good.json", "--run", "a", "--run", "b"], 2, "2 --run for 1 --eval"),
        (["--eval", "good.json", "--eval", "good.json"], 2, "share a name"),
        (["--eval", "good.json", "--threshold", "1.5"], 2, "between 0 and 1"),
        (["--eval", "good.json", "--run", "nowhere"], 2, "no metrics.jsonl"),
    ],
)
def test_bad_report_input_is_refused_clearly(tmp_path, monkeypatch, capsys, args, code, message):
    monkeypatch.chdir(tmp_path)
    fake_eval(tmp_path / "good.json", shift=0.3)
    (tmp_path / "notjson.json").write_text("{oops")
    result = json.loads((tmp_path / "good.json").read_text())
    del result["predictions"]
    (tmp_path / "nopred.json").write_text(json.dumps(result))
    assert cli.main(["report", *args, "--out", "rep"]) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_figures_and_pr_curves_reach_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = report.load_eval(fake_eval(tmp_path / "eval.json", shift=0.3))
    report.log_to_tensorboard([run], tmp_path / "tb")
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0, "images": 0})
    acc.Reload()
    assert {f"pr/{g}" for g in (*GENERATORS, "all")} <= set(acc.Tags()["tensors"])
    assert {f"report/{n}" for n in ("roc", "scores", "accuracy", "confusion")} <= set(acc.Tags()["images"])
    (event,) = acc.Tensors("pr/adm")
    assert event.step == 24
    # pr_curve data: 6 rows (TP, FP, TN, FN, precision, recall) x thresholds; all images counted.
    from tensorboard.util.tensor_util import make_ndarray

    data = make_ndarray(event.tensor_proto)
    assert data.shape[0] == 6
    assert data[0, 0] + data[1, 0] == 2 * 60  # at threshold 0 every adm image is called AI


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def run_chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    exe = chromium()
    assert exe is not None
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
             "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
             "--virtual-time-budget=5000"]  # fmt: skip
    return subprocess.run([exe, *flags, *args], check=False, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(chromium() is None, reason="no chromium: `.ci/run` installs Debian's chromium for this test")
def test_report_page_renders_in_headless_chromium(tmp_path):
    a = fake_eval(tmp_path / "a.json", shift=0.45, seed=1, trained=("adm",), resamples=200)  # intervals, unseen mean
    b = fake_eval(tmp_path / "b.json", shift=0.15, seed=2)
    run_dir = write_metrics(tmp_path / "run")
    out = tmp_path / "rep"
    assert (
        cli.main(
            [
                "report",
                "--eval",
                str(a),
                "--eval",
                str(b),
                "--run",
                str(run_dir),
                "--run",
                str(run_dir),
                "--name",
                "full",
                "--name",
                "probe",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    url = (out / "report.html").as_uri()

    dom = run_chromium(["--dump-dom", url], tmp_path / "profile1")
    assert dom.returncode == 0, dom.stderr[-2000:]
    # The page's own script counts images that decoded to a non-zero size, after load.
    body = re.search(r"<body([^>]*)>", dom.stdout)
    assert body, dom.stdout[:2000]
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(1)))
    assert attrs.get("data-images") == "7" and attrs.get("data-images-loaded") == "7", attrs
    # The rendered table: a row per generator and run, plus the runs table.
    assert len(re.findall(r"<tr>\s*<td>(adm|biggan|midjourney)</td>", dom.stdout)) == 6
    assert len(re.findall(r'<tr class="mean">', dom.stdout)) == 2
    # run a's unseen-generators mean and its intervals (every metric of every row of it), rendered
    assert (
        len(re.findall(r'<tr class="mean unseen">\s*<td>mean_unseen</td>\s*<td class="run">full</td>', dom.stdout)) == 1
    )
    assert len(re.findall(r'<small class="ci">\[[\d.]+, [\d.]+\]</small>', dom.stdout)) >= 5 * 11

    shot = tmp_path / "page.png"
    res = run_chromium([f"--screenshot={shot}", "--window-size=1280,2400", url], tmp_path / "profile2")
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("L"), dtype=np.float32)
    assert pixels.shape == (2400, 1280)
    # Not a blank page: text, table lines and plots make the screenshot far from uniform.
    assert pixels.std() > 20 and (pixels < 128).mean() > 0.01


def run_from_confusion(cm: list[list[int]], name: str = "cm") -> report.EvalRun:
    """An eval result whose confusion matrix at threshold 0.5 is `cm` (rows: true real, true AI)."""
    labels, scores = [], []
    for true, row in enumerate(cm):
        for predicted, count in enumerate(row):
            labels += [true] * count
            scores += [0.8 if predicted else 0.2] * count
    n = len(labels)
    return report.EvalRun(
        name, Path(f"{name}.json"), {}, np.asarray(scores), np.asarray(labels), np.full(n, "all", dtype=object)
    )


def wcag_contrast(a, b) -> float:
    """The WCAG 2 contrast ratio of two sRGB colours (1 = identical, 21 = black on white)."""

    def luminance(rgb):
        c = np.asarray(rgb[:3], dtype=float)
        c = np.where(c <= 0.03928, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
        return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]

    hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


@pytest.mark.parametrize("cm", [[[50, 30], [41, 39]], [[95, 5], [3, 97]], [[900, 100], [10, 90]], [[0, 40], [40, 0]]])
def test_every_confusion_cell_annotation_is_readable_on_its_cell(cm):
    from matplotlib.colors import to_rgb

    fig = report.confusion_figure([run_from_confusion(cm)])
    try:
        ax = fig.axes[0]
        (image,) = ax.images
        cells = image.get_array()
        texts = [t for t in ax.texts if t.get_text()]
        assert len(texts) == 4
        for text in texts:
            j, i = (round(v) for v in text.get_position())
            assert text.get_text().split("\n")[0] == str(cm[i][j])
            face = image.to_rgba(cells[i, j])
            ratio = wcag_contrast(to_rgb(text.get_color()), face)
            assert ratio >= 3, (cm, (i, j), text.get_color(), face, ratio)
    finally:
        report.pyplot().close(fig)


def test_accuracy_bars_are_in_percent_like_their_labels(tmp_path):
    run = report.load_eval(fake_eval(tmp_path / "eval.json", shift=0.3))
    fig = report.accuracy_figure([run])
    try:
        table = run.table()
        for ax, key in zip(fig.axes, ("acc", "real_acc", "fake_acc")):
            heights = [bar.get_height() for bar in ax.patches]
            assert heights == pytest.approx([100 * table[g][key] for g in (*GENERATORS, "mean")])
            labels = [t.get_text() for t in ax.texts]
            assert labels == [f"{h:.0f}" for h in heights]
            assert 100 <= ax.get_ylim()[1] <= 115 and "%" in ax.get_ylabel()
    finally:
        report.pyplot().close(fig)


def test_pr_curves_are_on_the_page_with_the_protocol_ap(tmp_path):
    ev = fake_eval(tmp_path / "eval.json", shift=0.25)
    out = tmp_path / "rep"
    report.write_report([report.load_eval(ev)], out)
    assert "id='fig-pr'" in (out / "report.html").read_text()
    run = report.load_eval(ev)
    fig = report.pr_figure([run])
    try:
        (ax,) = fig.axes
        legend = [line.get_label() for line in ax.get_lines()]
        table = run.table()
        assert legend == [f"{g} (AP {table[g]['ap']:.3f})" for g in GENERATORS]
        assert ax.get_title() == f"{run.name}: mean AP {table['mean']['ap']:.3f}"
        # recall runs 0..1 and precision ends at the share of AI images when everything is called AI
        recall, precision = ax.get_lines()[0].get_data()
        assert recall.max() == 1.0 and recall.min() == 0.0 and precision[recall == 1.0].min() == pytest.approx(0.5)
    finally:
        report.pyplot().close(fig)


def _lines(ax) -> dict[str, object]:
    return {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}


def test_training_curves_show_step_loss_accuracy_and_auc_per_generator(tmp_path):
    from matplotlib.colors import to_rgba

    run = report.load_eval(fake_eval(tmp_path / "eval.json", shift=0.3))
    report.attach_run(run, write_metrics(tmp_path / "run"))
    fig = report.training_figure([run])
    try:
        panels = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
        assert set(panels) >= {"loss", "accuracy", "validation AUC", f"validation AUC per generator: {run.name}"}
        loss = _lines(panels["loss"])
        # the loss of every logged step (steps.jsonl), not only one point per epoch
        steps, values = loss["train loss (logged steps)"].get_data()
        assert list(steps) == list(range(2, 25, 2)) and values[0] == pytest.approx(0.75)
        assert list(loss["train loss (epoch mean)"].get_data()[0]) == [8, 16, 24]
        # train and val told apart by colour, not only by the dash pattern
        for panel, train, val in (
            ("loss", "train loss (epoch mean)", "val loss"),
            ("accuracy", "train accuracy", "val accuracy"),
        ):
            lines = _lines(panels[panel])
            assert to_rgba(lines[train].get_color()) != to_rgba(lines[val].get_color()), panel
        acc = _lines(panels["accuracy"])
        assert list(acc["val accuracy"].get_data()[1]) == pytest.approx([55, 65, 75])  # percent
        per_gen = _lines(panels[f"validation AUC per generator: {run.name}"])
        assert list(per_gen) == [*GENERATORS, "mean"]
        assert list(per_gen["biggan"].get_data()[1]) == pytest.approx([0.61, 0.71, 0.81])
    finally:
        report.pyplot().close(fig)


def _eval_of_run(path: Path, config: dict, tag: str) -> Path:
    fake_eval(path, shift=0.3)
    result = json.loads(path.read_text())
    result.update(config=config, checkpoint=f"/somewhere/runs/x/checkpoints/{tag}")
    path.write_text(json.dumps(result))
    return path


def test_runs_are_named_after_their_training_run_not_the_checkpoint(tmp_path):
    demo = {"name": "demo", "logging": {"run_dir": "runs/demo"}}
    assert report.load_eval(_eval_of_run(tmp_path / "a.json", demo, "epoch_6")).name == "demo"
    # Config.name left at its default says nothing: the run_dir's name does
    unnamed = {"name": "run", "logging": {"run_dir": "results/lora_r8"}}
    assert report.load_eval(_eval_of_run(tmp_path / "b.json", unnamed, "epoch_2")).name == "lora_r8"
    assert report.load_eval(_eval_of_run(tmp_path / "b.json", unnamed, "epoch_2"), "mine").name == "mine"

    # two checkpoints of one run: told apart by their tag, in the legends too
    early = report.load_eval(_eval_of_run(tmp_path / "c.json", demo, "epoch_3"))
    late = report.load_eval(_eval_of_run(tmp_path / "d.json", demo, "epoch_6"))
    report.write_report([early, late], tmp_path / "rep")
    assert (early.name, late.name) == ("demo@epoch_3", "demo@epoch_6")
    fig = report.roc_figure([early, late])
    try:
        labels = [line.get_label().split(" ")[0] for line in fig.axes[0].get_lines() if line.get_label()[0] != "_"]
        assert labels == ["demo@epoch_3", "demo@epoch_6"]
    finally:
        report.pyplot().close(fig)


def test_prediction_keys_round_trip_and_older_results_load_without_them(tmp_path):
    block = report.predictions_block(np.array([0.9, 0.1]), np.array([1, 0]), ["adm", "adm"], ["adm-val-1", "adm-val-2"])
    assert block["key"] == ["adm-val-1", "adm-val-2"]
    result = {"generators": {}, "predictions": block}
    (tmp_path / "new.json").write_text(json.dumps(result))
    assert report.load_eval(tmp_path / "new.json").keys.tolist() == ["adm-val-1", "adm-val-2"]
    # without keys (older results, or a loader that names none): no key list at all, and None back
    old = report.predictions_block(np.array([0.9, 0.1]), np.array([1, 0]), ["adm", "adm"])
    assert "key" not in old
    (tmp_path / "old.json").write_text(json.dumps({"generators": {}, "predictions": old}))
    assert report.load_eval(tmp_path / "old.json").keys is None
    (tmp_path / "bad.json").write_text(json.dumps({"predictions": {**block, "key": ["adm-val-1"]}}))
    with pytest.raises(DataError, match="1 keys for 2 scores"):
        report.load_eval(tmp_path / "bad.json")


def test_provenance_records_commit_and_versions_and_the_page_shows_them(tmp_path):
    from importlib import metadata

    from ds_trainer import __version__, provenance

    prov = provenance.provenance()
    head = subprocess.run(
        ["git", "-C", str(provenance.package_root()), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    assert prov["git_commit"] == (head or None) and isinstance(prov["git_dirty"], bool) == bool(head)
    assert prov["versions"] == {
        "ds_trainer": __version__,
        "torch": metadata.version("torch"),
        "deepspeed": metadata.version("deepspeed"),
        "transformers": metadata.version("transformers"),
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", prov["date"])
    # an installed package (no .git beside it) has no commit, even inside some other repository
    (tmp_path / "site-packages").mkdir()
    assert provenance.git_state(tmp_path / "site-packages") == (None, None)

    ev = fake_eval(tmp_path / "new.json", shift=0.3)
    result = json.loads(ev.read_text())
    result["provenance"] = {**prov, "git_commit": "0123456789abcdef0123", "git_dirty": True}
    ev.write_text(json.dumps(result))
    old = fake_eval(tmp_path / "old.json", shift=0.3, seed=3)
    page = report.write_report([report.load_eval(ev, "new"), report.load_eval(old, "old")], tmp_path / "rep").html
    table = re.search(r"<table id='provenance'>(.*?)</table>", page.read_text()).group(1)
    new_row, old_row = re.findall(r"<tr><td class='run'>(?:new|old)</td>.*?</tr>", table)
    assert prov["date"] in new_row and ">0123456789ab</code>" in new_row and "uncommitted changes" in new_row
    for version in prov["versions"].values():
        assert f"<td>{version}</td>" in new_row
    assert "not recorded" in old_row


@pytest.fixture(scope="module")
def val_shards(tmp_path_factory) -> Path:
    from ds_trainer.data import make_demo_shards

    out = tmp_path_factory.mktemp("shards") / "demo"
    make_demo_shards(out, train_per_class=2, val_per_class=6, max_count=5, progress=False)
    return out


def eval_on_shards(path: Path, shards: Path, wrong: dict[tuple[str, int], float]) -> tuple[Path, list[str]]:
    """An eval result over the val images of `shards`, each scored right (0.2 real, 0.8 AI) except
    the (generator, n-th image of it) in `wrong`, which get that score; returns their keys."""
    import tarfile

    keys, labels, gens, scores, wrong_keys = [], [], [], [], []
    for entry in json.loads((shards / "manifest.json").read_text())["shards"]:
        if entry["split"] != "val":
            continue
        with tarfile.open(shards / entry["path"]) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".cls"):
                    n = sum(g == entry["generator"] for g in gens)
                    keys.append(m.name[: -len(".cls")])
                    labels.append(int(tar.extractfile(m).read()))
                    gens.append(entry["generator"])
                    scores.append(wrong.get((entry["generator"], n), 0.8 if labels[-1] else 0.2))
                    if (entry["generator"], n) in wrong:
                        wrong_keys.append(keys[-1])
    scores_a, labels_a = np.asarray(scores), np.asarray(labels)
    result = {
        "checkpoint": "/x/runs/demo/checkpoints/epoch_6", "split": "val", "shards": str(shards),
        "generators": per_generator_metrics(scores_a, labels_a, gens),
        "predictions": report.predictions_block(scores_a, labels_a, gens, keys),
    }  # fmt: skip
    path.write_text(json.dumps(result))
    return path, wrong_keys


def test_most_confident_mistakes_are_listed_by_key_with_thumbnails_from_the_shards(tmp_path, val_shards):
    # per generator, two real images scored as AI and one AI image as real
    ev, _ = eval_on_shards(tmp_path / "probe.json", val_shards, {})
    run = report.load_eval(ev)
    wrong_score = {}
    for g in run.generator_names:
        idx = np.flatnonzero(run.generators == g)
        real = [i for i in idx if run.labels[i] == 0][:2]
        ai = [i for i in idx if run.labels[i] == 1][:1]
        n_of = {i: k for k, i in enumerate(idx)}
        wrong_score.update({(g, n_of[real[0]]): 0.95, (g, n_of[real[1]]): 0.7, (g, n_of[ai[0]]): 0.1})
    ev, wrong_keys = eval_on_shards(tmp_path / "eval.json", val_shards, wrong_score)
    run = report.load_eval(ev)
    found = report.confident_mistakes(run)
    for g, rows in found.by_generator.items():
        # the most confident first: 0.95 (0.45 from the threshold), then 0.1 (0.4), then 0.7
        assert [(m.label, m.score) for m in rows] == [(0, 0.95), (1, 0.1), (0, 0.7)], g
        assert found.totals[g] == 3
    assert sorted(m.key for rows in found.by_generator.values() for m in rows) == sorted(wrong_keys)

    page = report.write_report([run], tmp_path / "rep").html.read_text()
    table = re.search(r"<table class='mistakes' id='mistakes-0'>(.*?)</table>", page).group(1)
    shown = re.findall(r"<code>([^<]+)</code>", table)
    assert shown == [m.key for rows in found.by_generator.values() for m in rows]
    thumbs = re.findall(r"src='data:image/jpeg;base64,([^']+)'", table)
    assert len(thumbs) == len(wrong_keys)
    for data in thumbs:
        with Image.open(io.BytesIO(base64.b64decode(data))) as im:
            assert im.format == "JPEG" and max(im.size) <= 112
    # the image's source path (from the tar's .json member) beside its key
    assert len(re.findall(r"<br><span class='muted'>[^<]*val/[^<]+\.(?:png|jpe?g)</span>", table)) == len(wrong_keys)

    # shards not at hand (a report made on another machine): the table, no thumbnails, a note why
    moved = tmp_path / "elsewhere"
    shutil.copytree(val_shards, moved)
    ev_moved, _ = eval_on_shards(tmp_path / "moved.json", moved, wrong_score)
    shutil.rmtree(moved)
    page = report.write_report([report.load_eval(ev_moved)], tmp_path / "rep2").html.read_text()
    assert "data:image/jpeg" not in page and "cannot be read here" in page
    assert re.findall(r"<code>([^<]+)</code>", page.split("id='mistakes-0'")[1].split("</table>")[0]) == shown

    if chromium() is not None:  # the thumbnails decode in a browser as well
        dom = run_chromium(["--dump-dom", (tmp_path / "rep" / "report.html").as_uri()], tmp_path / "profile")
        attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', re.search(r"<body([^>]*)>", dom.stdout).group(1)))
        n = 6 + len(wrong_keys)  # figures (no training curves here) and thumbnails
        assert attrs.get("data-images") == str(n) and attrs.get("data-images-loaded") == str(n), attrs


def test_results_without_keys_still_list_their_mistakes(tmp_path):
    run = report.load_eval(fake_eval(tmp_path / "eval.json", shift=0.3))
    page = report.write_report([run], tmp_path / "rep").html.read_text()
    assert "no image keys" in page and "not recorded" in page
    rows = re.findall(r"<tr>(?:<td rowspan[^>]*>.*?</td>)?<td class='run'><span class='muted'>not recorded", page)
    assert len(rows) == sum(len(r) for r in report.confident_mistakes(run).by_generator.values()) > 0


def with_tracks(path: Path, shift: float, seed: int = 0) -> Path:
    """`fake_eval` plus the `robustness` and `debiased` blocks `ds-trainer eval --perturb jpeg:75,30
    --perturb blur:3,1 --align-jpeg 96 --size-matched` adds: each level a fresh draw with a smaller shift."""
    from ds_trainer.eval_tracks import SIZE_MATCHED, SIZE_RULE

    fake_eval(path, shift, seed)
    result = json.loads(path.read_text())

    def block(factor: float, k: int) -> dict:
        table = json.loads(fake_eval(path.with_suffix(f".{k}.tmp"), shift * factor, seed + k).read_text())
        return {"samples": table["samples"], "bad_samples": 0, "overall": {}, "generators": table["generators"]}

    result["robustness"] = {
        name: {"kind": name.split(":")[0], "level": int(name.split(":")[1]), "label": name, **block(f, k)}
        for k, (name, f) in enumerate([("jpeg:75", 0.8), ("jpeg:30", 0.4), ("blur:3", 0.5), ("blur:1", 0.9)], 1)
    }  # blur levels out of order on purpose: the figure and the tables sort them mild to severe
    kept = dict.fromkeys(GENERATORS, 40)
    result["debiased"] = {
        "align-jpeg:96:both": {"label": "both classes re-encoded as JPEG at quality 96", **block(0.7, 9)},
        SIZE_MATCHED: {"label": "reals size-matched to the fakes", "rule": SIZE_RULE, "reals_kept": kept,
                       "reals_total": dict.fromkeys(GENERATORS, 60), **block(0.6, 10)},
    }  # fmt: skip
    path.write_text(json.dumps(result))
    return path


def test_robustness_plot_and_debiased_tables_are_in_the_report(tmp_path):
    from ds_trainer.report_robustness import robustness_figure

    ev = with_tracks(tmp_path / "eval.json", shift=0.4)
    assert cli.main(["report", "--eval", str(ev), "--out", str(tmp_path / "rep")]) == 0
    w, h = png_size(tmp_path / "rep" / "robustness.png")
    assert w > 600 and h > 300
    text = (tmp_path / "rep" / "report.html").read_text()
    assert text.count("data:image/png;base64,") == 7 and "id='fig-robustness'" in text  # a plain report's 6, and this
    result = json.loads(ev.read_text())
    # per kind, accuracy per generator: the clean result, then the levels mild to severe
    for kind, names in (("jpeg", ["jpeg:75", "jpeg:30"]), ("blur", ["blur:1", "blur:3"])):
        table = re.search(rf"<table id='robustness-0-{kind}'>(.*?)</table>", text).group(1)
        assert re.findall(r"<th>([^<]*)</th>", table) == ["generator", "clean", *names]
        for g in (*GENERATORS, "mean"):
            cells = re.search(rf"<td>{g}</td>(.*?)</tr>", table).group(1)
            tables = [result["generators"], *(result["robustness"][n]["generators"] for n in names)]
            assert re.findall(r"<td>([^<]*)</td>", cells) == [f"{100 * t[g]['acc']:.1f}" for t in tables]
    # each debiased track as its own labelled table
    for name, block in result["debiased"].items():
        assert f"<h3>{name}</h3><p class='muted'>{block['label']}" in text
        table = re.search(rf"<table id='debiased-0-{name}'>(.*?)</table>", text).group(1)
        row = re.search(r"<tr class='mean'><td>mean</td>(.*?)</tr>", table).group(1)
        assert re.findall(r"<td>([^<]*)</td>", row)[:5] == [
            f"{100 * block['generators']['mean'][k]:.1f}" for k in ("acc", "real_acc", "fake_acc", "ap", "auc")
        ]
    assert "<td>40/60</td>" in text and "min..max" in text

    # the figure: accuracy and AUC rows, a column per kind; one run: a line per generator and the mean
    runs = [report.load_eval(ev)]
    fig = robustness_figure(runs)
    try:
        assert len(fig.axes) == 4 and [ax.get_title() for ax in fig.axes[:2]] == ["jpeg", "blur"]
        acc_blur, auc_jpeg = fig.axes[1], fig.axes[2]
        assert [t.get_text() for t in acc_blur.get_xticklabels()] == ["clean", "1", "3"]
        lines = _lines(auc_jpeg)
        assert set(lines) == {*GENERATORS, "mean"}
        want = [100 * t["mean"]["auc"] for t in (result["generators"], *(result["robustness"][n]["generators"]
                                                                          for n in ("jpeg:75", "jpeg:30")))]  # fmt: skip
        assert np.allclose(lines["mean"].get_ydata(), want)
    finally:
        report.pyplot().close(fig)
    # several runs: the mean of each
    other = with_tracks(tmp_path / "b.json", shift=0.2, seed=3)
    fig = robustness_figure([*runs, report.load_eval(other, "probe")])
    try:
        assert set(_lines(fig.axes[0])) == {runs[0].name, "probe"}
    finally:
        report.pyplot().close(fig)


@pytest.mark.skipif(chromium() is None, reason="no chromium: `.ci/run` installs Debian's chromium for this test")
def test_report_with_robustness_renders_in_headless_chromium(tmp_path):
    ev = with_tracks(tmp_path / "eval.json", shift=0.4)
    run_dir = write_metrics(tmp_path / "run")
    out = tmp_path / "rep"
    assert cli.main(["report", "--eval", str(ev), "--run", str(run_dir), "--out", str(out)]) == 0
    dom = run_chromium(["--dump-dom", (out / "report.html").as_uri()], tmp_path / "profile")
    assert dom.returncode == 0, dom.stderr[-2000:]
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', re.search(r"<body([^>]*)>", dom.stdout).group(1)))
    # the six figures of a plain report, the robustness plot and the training curves
    assert attrs.get("data-images") == "8" and attrs.get("data-images-loaded") == "8", attrs
    assert 'id="fig-robustness"' in dom.stdout
    for table in ("robustness-0-jpeg", "robustness-0-blur", "debiased-0-align-jpeg:96:both", "debiased-0-size-matched"):
        assert f'<table id="{table}">' in dom.stdout, table
    assert len(re.findall(r'<tr class="mean">', dom.stdout)) == 5  # metrics, 2 robustness, 2 debiased


def test_intervals_are_error_bars_and_the_unseen_mean_is_a_bar_and_a_row(tmp_path):
    from matplotlib.container import BarContainer

    ev = fake_eval(tmp_path / "eval.json", shift=0.3, trained=("adm",), resamples=300)
    run = report.load_eval(ev)
    table, ci = run.table(), run.intervals()
    rows = [*GENERATORS, "mean", "mean_unseen"]
    assert table["mean_unseen"]["auc"] == pytest.approx((table["biggan"]["auc"] + table["midjourney"]["auc"]) / 2)
    fig = report.accuracy_figure([run])
    try:
        for ax, key in zip(fig.axes, ("acc", "real_acc", "fake_acc")):
            (bars,) = [c for c in ax.containers if isinstance(c, BarContainer)]
            assert [b.get_height() for b in bars] == pytest.approx([100 * table[g][key] for g in rows])
            # each error bar runs from the interval's low end to its high end, in percent
            (segments,) = bars.errorbar.lines[2]
            ends = [y for seg in segments.get_segments() for y in sorted(seg[:, 1])]
            assert ends == pytest.approx([100 * v for g in rows for v in ci[g][key]])
    finally:
        report.pyplot().close(fig)
    html = report.metrics_table_html([run])
    row = re.search(r"<tr class='mean unseen'><td>mean_unseen</td>(.*?)</tr>", html).group(1)
    lo, hi = ci["mean_unseen"]["eer"]
    assert f"{100 * table['mean_unseen']['eer']:.1f}<br><small class='ci'>[{100 * lo:.1f}, {100 * hi:.1f}]" in row
    assert row.endswith(f"<td>{2 * 2 * 60}</td>")  # images of the two unseen generators
    assert "<th>TPR at FPR 1%</th>" in html and "<th>NLL</th>" in html


def test_the_reliability_diagram_plots_the_ece_bins_of_each_generator(tmp_path):
    run = report.load_eval(fake_eval(tmp_path / "eval.json", shift=0.3))
    fig = report.reliability_figure([run])
    try:
        (ax,) = fig.axes
        lines = _lines(ax)
        assert list(lines) == [f"{g} (ECE {100 * run.table()[g]['ece']:.1f}%)" for g in GENERATORS]
        for g, line in zip(GENERATORS, lines.values()):
            s, y = run.scores[run.generators == g], run.labels[run.generators == g]
            edges = np.linspace(0, 1, 16)
            want = [(s[(s >= lo) & (s < hi)].mean(), y[(s >= lo) & (s < hi)].mean())
                    for lo, hi in itertools.pairwise(edges) if ((s >= lo) & (s < hi)).any()]  # fmt: skip
            x, share = line.get_data()
            assert np.c_[x, share].ravel().tolist() == pytest.approx(np.ravel(want).tolist())
    finally:
        report.pyplot().close(fig)

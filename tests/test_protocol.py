"""The GenImage benchmark protocol: per-generator metrics, `ds-trainer eval`, holdout, bad samples."""

import io
import json
import math
import shutil
import tarfile

import numpy as np
import pytest
import torch
from conftest import run_cmd, write_config
from sklearn.metrics import average_precision_score, roc_auc_score

from ds_trainer import CLIPModel, Trainer
from ds_trainer.bootstrap import bootstrap_intervals
from ds_trainer.data import make_shard_loader
from ds_trainer.errors import DataError
from ds_trainer.metrics import ALL_METRICS, PROTOCOL_METRICS, format_protocol_table, per_generator_metrics


@pytest.mark.unit
def test_per_generator_metrics_and_unweighted_mean():
    rng = np.random.default_rng(0)
    gens = np.array(["adm"] * 40 + ["glide"] * 10)
    labels = np.tile([0, 1], 25)
    scores = np.clip(labels * 0.3 + rng.random(50) * 0.7, 0, 1)
    table = per_generator_metrics(scores, labels, gens.tolist())
    assert list(table) == ["adm", "glide", "mean"]
    for g in ("adm", "glide"):
        m = gens == g
        assert table[g]["auc"] == pytest.approx(roc_auc_score(labels[m], scores[m]))
        assert table[g]["ap"] == pytest.approx(average_precision_score(labels[m], scores[m]))
        assert table[g]["fake_acc"] == pytest.approx(
            ((scores[m] >= 0.5) & (labels[m] == 1)).sum() / (labels[m] == 1).sum()
        )
    for k in PROTOCOL_METRICS:  # unweighted over generators: glide's 10 samples count as much as adm's 40
        assert table["mean"][k] == pytest.approx((table["adm"][k] + table["glide"][k]) / 2)
    text = format_protocol_table(table)
    assert text.splitlines()[0].split() == ["generator", *PROTOCOL_METRICS]
    assert "mean" in text.splitlines()[-1]


@pytest.mark.unit
def test_one_class_generator_gives_nan_auc_and_the_mean_skips_it():
    table = per_generator_metrics([0.9, 0.2, 0.8], [1, 0, 1], ["a", "a", "b"])
    assert math.isnan(table["b"]["auc"]) and table["mean"]["auc"] == table["a"]["auc"]
    assert "n/a" in format_protocol_table(table)


def test_trainer_evaluation_reports_every_generator(tmp_path, tiny_shards):
    loader = make_shard_loader(tiny_shards, "val", batch_size=16, train=False, num_workers=1)
    trainer = Trainer(CLIPModel("tiny"), None, loader, device="cpu", run_dir=tmp_path, checkpoint_dir=str(tmp_path))
    row = trainer.evaluate()
    assert set(row["val_generators"]) == {*loader.generators, "mean"}
    assert row["val_mean_auc"] == pytest.approx(np.mean([row["val_generators"][g]["auc"] for g in loader.generators]))
    assert row["val_bad_samples"] == 0 and row["val_samples"] == 48


def shard_labels(root, split) -> dict[str, tuple[int, str]]:
    """key -> (label, generator) of every sample of `split`, read from the tars themselves."""
    out = {}
    for entry in json.loads((root / "manifest.json").read_text())["shards"]:
        if entry["split"] == split:
            with tarfile.open(root / entry["path"]) as tar:
                for m in tar.getmembers():
                    if m.name.endswith(".cls"):
                        out[m.name[: -len(".cls")]] = (int(tar.extractfile(m).read()), entry["generator"])
    return out


def test_predictions_name_each_image_by_its_key(tmp_path, tiny_shards):
    loader = make_shard_loader(tiny_shards, "val", batch_size=16, train=False, num_workers=1)
    trainer = Trainer(CLIPModel("tiny"), None, loader, device="cpu", run_dir=tmp_path, checkpoint_dir=str(tmp_path))
    trainer.evaluate()
    pred = trainer.last_predictions
    truth = shard_labels(tiny_shards, "val")
    assert sorted(pred["key"]) == sorted(truth)  # every image once
    # the i-th key is the i-th score's image: its label and generator are that image's
    assert [truth[k] for k in pred["key"]] == list(zip(pred["label"].tolist(), pred["generator"]))


class _PixelScore(torch.nn.Module):
    """A stand-in engine whose logit is a function of the image alone, so a score names its image."""

    device = torch.device("cpu")

    def forward(self, x):
        return x.float().mean(dim=(1, 2, 3)) * 7.0


def _rank_predictions(rank, world, port, shards, out):
    import torch.distributed as dist

    from ds_trainer.evaluation import evaluate

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        loader = make_shard_loader(
            shards,
            "val",
            batch_size=5,
            train=False,
            rank=rank,
            world_size=world,
            num_workers=0,
            image_size=32,
            pin_memory=False,
        )
        result = evaluate(
            _PixelScore(),
            loader,
            epoch=0,
            zero_stage=1,
            dtype=torch.float32,
            loss_fn=lambda o, t: o.sum() * 0,
            image_size=32,
            max_bad_fraction=0.0,
        )
        if rank == 0:
            p = result.predictions
            out.write_text(
                json.dumps(
                    {
                        "key": p["key"],
                        "label": p["label"].tolist(),
                        "score": p["score"].tolist(),
                        "generator": p["generator"],
                    }
                )
            )
    finally:
        dist.destroy_process_group()


def test_keys_gathered_from_every_rank_stay_with_their_scores(tmp_path, tiny_shards):
    import socket

    import torch.multiprocessing as mp

    results = {}
    for world in (1, 2):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        out = tmp_path / f"world{world}.json"
        mp.spawn(_rank_predictions, args=(world, port, tiny_shards, out), nprocs=world, join=True)
        results[world] = json.loads(out.read_text())
    truth = shard_labels(tiny_shards, "val")
    for world, pred in results.items():
        assert sorted(pred["key"]) == sorted(truth), world
        assert [truth[k] for k in pred["key"]] == list(zip(pred["label"], pred["generator"])), world
    # each image's score is the same whichever rank scored it
    one = dict(zip(results[1]["key"], results[1]["score"]))
    two = dict(zip(results[2]["key"], results[2]["score"]))
    assert two == pytest.approx(one)
    assert len(set(one.values())) > len(one) // 2  # the scores do tell images apart


def _corrupt(shards, tmp_path, split, n):
    root = tmp_path / "shards"
    shutil.copytree(shards, root)
    manifest = json.loads((root / "manifest.json").read_text())
    entry = next(s for s in manifest["shards"] if s["split"] == split)
    path = next(root.rglob(entry["url"].split("/")[-1])) if "url" in entry else root / entry["path"]
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    out, broken = io.BytesIO(), 0
    with tarfile.open(fileobj=out, mode="w") as tar:
        for m, data in members:
            if broken < n and m.name.rsplit(".", 1)[-1] in ("png", "jpg", "jpeg"):
                data, broken = b"\x89PNG broken", broken + 1
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    path.write_bytes(out.getvalue())
    return root


def test_too_many_undecodable_samples_stop_the_run_with_a_clear_error(tmp_path, tiny_shards):
    root = _corrupt(tiny_shards, tmp_path, "val", 3)
    loader = make_shard_loader(root, "val", batch_size=16, train=False, num_workers=1)
    trainer = Trainer(CLIPModel("tiny"), None, loader, device="cpu", run_dir=tmp_path, checkpoint_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"3 of 48 validation samples .* above data.max_bad_fraction 0.01"):
        trainer.evaluate()
    trainer.cfg.data.max_bad_fraction = 0.1
    assert trainer.evaluate()["val_bad_samples"] == 3


@pytest.mark.distributed
def test_holdout_training_then_ds_trainer_eval_prints_the_protocol_table(tmp_path, tiny_shards):
    cfg = write_config(
        tmp_path / "cfg.yaml",
        tiny_shards,
        data={"holdout_fraction": 0.25},
        training={"num_epochs": 1, "warmup_epochs": 0},
    )
    proc = run_cmd(["./launch.sh", "--config", str(cfg)], DS_TRAINER_CPU_RANKS="2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    # 1 of each generator's 4 train shards is held out for model selection: 2 x 20 images.
    assert row["val_samples"] == 40 and row["step"] == (128 - 40) // 16
    assert set(row["val_generators"]) == {"demo_bicubic", "demo_nearest", "mean"}
    assert row["train_bad_samples"] == 0
    # the means of every metric, from the cells; no intervals in validation rows (kept cheap), and no
    # unseen mean: the holdout comes from the generators it trains on
    for k in ALL_METRICS:
        cells = [row["val_generators"][g][k] for g in ("demo_bicubic", "demo_nearest")]
        assert row[f"val_mean_{k}"] == pytest.approx(np.nanmean([math.nan if c is None else c for c in cells])), k
    assert not [key for key in row if "unseen" in key or "ci" in key]

    out = tmp_path / "eval.json"
    proc = run_cmd(
        [
            str(__import__("sys").executable),
            "-m",
            "ds_trainer",
            "eval",
            "--config",
            str(cfg),
            "--load-dir",
            str(tmp_path / "ckpt"),
            "--out",
            str(out),
            "--report",
            str(tmp_path / "report"),
        ]
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["split"] == "val" and result["samples"] == 48 and result["epoch"] == 1
    assert set(result["generators"]) == {"demo_bicubic", "demo_nearest", "mean"}
    for g, metrics in result["generators"].items():
        assert set(metrics) == set(ALL_METRICS), g
    # trained on every generator of the train split (data.train_generators null): none unseen
    assert result["trained_generators"] == ["demo_bicubic", "demo_nearest"]
    assert result["bootstrap"]["resamples"] == 1000 and result["bootstrap"]["seed"] == 0
    assert set(result["ci"]) == {"demo_bicubic", "demo_nearest", "mean"}
    table = proc.stdout
    assert "generator" in table and "demo_nearest" in table and "mean" in table and "auc" in table
    assert "tpr@fpr5%" in table and "95 % percentile bootstrap interval, 1000 resamples" in proc.stdout + proc.stderr

    # Every image's score is in the result, and the table recomputed from them is the same.
    pred = result["predictions"]
    assert pred["generators"] == ["demo_bicubic", "demo_nearest"] and len(pred["score"]) == 48
    names = [pred["generators"][i] for i in pred["generator"]]
    again = per_generator_metrics(np.asarray(pred["score"]), np.asarray(pred["label"]), names)
    for g in ("demo_bicubic", "demo_nearest", "mean"):
        for k in ALL_METRICS:
            assert again[g][k] == pytest.approx(result["generators"][g][k], abs=1e-4, nan_ok=True), (g, k)
    redo = bootstrap_intervals(np.asarray(pred["score"]), np.asarray(pred["label"]), names, resamples=1000, seed=0)
    for g in ("demo_bicubic", "demo_nearest", "mean"):
        for k in ("auc", "acc", "eer"):  # from the 6-decimal scores of the JSON: nearly the same draws
            assert result["ci"][g][k] == pytest.approx(redo[g][k], abs=0.02, nan_ok=True), (g, k)
    assert result["config"]["model"]["model_name"] == "tiny"
    assert sorted(pred["key"]) == sorted(shard_labels(tiny_shards, "val"))
    assert result["shards"] == str(tiny_shards.resolve())
    prov = result["provenance"]
    assert set(prov) == {"date", "git_commit", "git_dirty", "versions"} and prov["versions"]["torch"]
    # The report, with the training curves of the run the checkpoint came from.
    for name in ("roc", "pr", "scores", "accuracy", "confusion", "calibration", "training", "report"):
        assert (tmp_path / "report" / (name + (".html" if name == "report" else ".png"))).stat().st_size > 1000
    assert "report: " in proc.stdout + proc.stderr

    # TensorBoard: PR curves per generator from the training run's evaluation and from eval.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"tensors": 0, "images": 0})
    acc.Reload()
    assert {"pr/all", "pr/demo_bicubic", "pr/demo_nearest"} <= set(acc.Tags()["tensors"])
    assert "report/roc" in acc.Tags()["images"]


def test_eval_help_says_which_tag_and_config_it_uses(capsys):
    from ds_trainer import cli

    with pytest.raises(SystemExit):
        cli.main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the newest complete one, e.g. best" not in text  # best is never the default
    assert "the tag the directory's `latest` file names" in text
    assert "(default: the config saved in the checkpoint)" in text and "The model always comes from" in text


def test_eval_without_config_scores_what_the_run_validated_on(tmp_path, tiny_shards, monkeypatch):
    from ds_trainer import cli

    monkeypatch.chdir(tmp_path)
    cfg = write_config(
        tmp_path / "cfg.yaml",
        tiny_shards,
        training={"num_epochs": 1, "warmup_epochs": 0},
        logging={"tensorboard": False},
        data={"train_generators": ["demo_bicubic"]},
    )
    assert cli.main(["train", "--config", str(cfg)]) == 0
    cfg.unlink()  # the checkpoint alone is enough
    record = {p.name: p.read_bytes() for p in (tmp_path / "run" / "config.yaml", tmp_path / "run" / "ds_config.json")}
    argv = ["eval", "--load-dir", str(tmp_path / "ckpt"), "--set", "data.num_workers=0", "--bootstrap", "200"]
    assert cli.main([*argv, "--bootstrap-seed", "3"]) == 0
    # The run's record is the training's, not the evaluation's (which changed data.num_workers).
    assert {name: (tmp_path / "run" / name).read_bytes() for name in record} == record
    result = json.loads((tmp_path / "run" / "eval_epoch_1.json").read_text())  # the saved run_dir
    assert result["split"] == "val" and result["samples"] == 48 and result["epoch"] == 1
    # trained on demo_bicubic only: demo_nearest is unseen, and its mean is that cell's values
    assert set(result["generators"]) == {"demo_bicubic", "demo_nearest", "mean", "mean_unseen"}
    assert result["trained_generators"] == ["demo_bicubic"]
    assert result["generators"]["mean_unseen"] == result["generators"]["demo_nearest"]
    assert result["bootstrap"] == {**result["bootstrap"], "resamples": 200, "seed": 3}
    assert result["ci"]["mean_unseen"] == result["ci"]["demo_nearest"]
    # the same seed, the same intervals; without intervals, none written
    assert cli.main([*argv, "--bootstrap-seed", "3", "--out", "again.json"]) == 0
    assert json.loads((tmp_path / "again.json").read_text())["ci"] == result["ci"]
    assert cli.main([*argv[:-2], "--bootstrap", "0", "--out", "none.json"]) == 0
    assert "ci" not in json.loads((tmp_path / "none.json").read_text())

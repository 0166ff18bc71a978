"""Export: DeepSpeed checkpoints (any ZeRO stage, LoRA, prompt tuning) → Hugging Face directory → predictions.

In-process runs are DeepSpeed worlds of one on the tiny model, like test_trainer.py; the last test
exports a checkpoint written by two real ranks.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from checkpoint_layouts import rewrite_as_v1
from conftest import REPO, launch_env, run_cmd, write_config
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from ds_trainer import cli, integrity
from ds_trainer.config import build_config
from ds_trainer.data.transforms import clip_preprocess
from ds_trainer.errors import CheckpointError, ConfigError
from ds_trainer.export import EXPORT_FILE, HEAD_FILE, export_checkpoint, load_exported, predict_tensors
from ds_trainer.models import build_model
from ds_trainer.trainer import Trainer

FINE_TUNE = {"model_name": "tiny"}
LORA = {"model_name": "tiny", "lora": {"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj", "fc1"]}}
PROMPT_TUNING = {"model_name": "tiny", "mode": "prompt-tuning", "prompt_length": 4}


def dataset(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 224, 224, generator=g)
    y = torch.arange(n) % 2
    x[y == 1] += 0.75
    return TensorDataset(x, y)


def probe_batch():
    return torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(123))


def train(tmp_path, model=FINE_TUNE, zero_stage=0, precision="fp32", lr=1e-3):
    """One epoch (2 steps) in this process; the saved config describes the model, as run_training's does."""
    cfg = build_config({
        "model": model,
        "training": {"num_epochs": 1, "batch_size": 8, "learning_rate": lr, "scheduler": "none",
                     "monitor": "train_loss", "checkpoint_dir": str(tmp_path / "ckpt")},
        "deepspeed": {"zero_stage": zero_stage, "precision": precision},
        "logging": {"run_dir": str(tmp_path / "run"), "tensorboard": False},
    })  # fmt: skip
    torch.manual_seed(0)
    trainer = Trainer(build_model(cfg.model), DataLoader(dataset(), batch_size=8), config=cfg, device="cpu")
    trainer.train()
    return trainer


@torch.no_grad()
def engine_logits(trainer, x):
    trainer.engine.eval()
    try:
        return trainer.engine(x.to(trainer.input_dtype)).float()
    finally:
        trainer.engine.train()


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory):
    """A ZeRO-0 fp32 fine-tune checkpoint, exported once; shared by the predict and error tests."""
    tmp = tmp_path_factory.mktemp("fine_tuned")
    trainer = train(tmp)
    out = export_checkpoint(tmp / "ckpt", tmp / "export")
    return trainer, tmp / "ckpt", out


# ------------------------------------------------------------------ weights round trip
def test_zero0_export_matches_engine_and_loads_in_plain_transformers(fine_tuned):
    trainer, _, out = fine_tuned
    x = probe_batch()
    expected = engine_logits(trainer, x)
    got = load_exported(out)(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)

    # No ds_trainer needed: transformers' tower + the head from safetensors give the same logits.
    from safetensors.torch import load_file
    from transformers import CLIPVisionModel

    tower = CLIPVisionModel.from_pretrained(out).eval()
    head = load_file(str(out / HEAD_FILE))
    with torch.no_grad():
        plain = tower(pixel_values=x).pooler_output @ head["weight"].t() + head["bias"]
    torch.testing.assert_close(plain, expected, atol=1e-5, rtol=0)

    info = json.loads((out / EXPORT_FILE).read_text())
    assert info["mode"] == "fine-tune" and info["num_classes"] == 2 and info["image_size"] == 224
    assert info["labels"]["1"].startswith("ai")
    assert info["source"]["tag"] == "epoch_1" and info["source"]["epoch"] == 1 and info["source"]["global_step"] == 2
    assert info["preprocessing"]["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_partitioned_export_matches_engine(tmp_path, stage):
    trainer = train(tmp_path, zero_stage=stage)
    assert list((tmp_path / "ckpt" / "epoch_1").glob("*zero_pp_rank_0_*optim_states.pt"))  # fp32 only there
    out = export_checkpoint(tmp_path / "ckpt", tmp_path / "export")
    x = probe_batch()
    torch.testing.assert_close(load_exported(out)(x), engine_logits(trainer, x), atol=1e-5, rtol=0)
    assert json.loads((out / EXPORT_FILE).read_text())["source"]["zero_stage"] == stage


def test_zero0_bf16_exports_the_fp32_master_weights(tmp_path):
    # ZeRO 0 + bf16 keeps bf16 weights in `module` and the fp32 masters as flat optimizer groups.
    trainer = train(tmp_path, precision="bf16")
    opt = trainer.engine.optimizer
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    masters = {}
    for params, flat in zip(opt.fp16_groups, opt.fp32_groups_flat):
        for p, chunk in zip(params, flat.split([q.numel() for q in params])):
            masters[names[id(p)]] = chunk.view(p.shape)
    exported = load_exported(export_checkpoint(tmp_path / "ckpt", tmp_path / "export")).state_dict()
    assert set(masters) == set(exported)
    for name, master in masters.items():
        assert torch.equal(exported[name], master), name
    x = probe_batch()
    torch.testing.assert_close(
        load_exported(tmp_path / "export")(x), engine_logits(trainer, x), atol=0.1, rtol=0.05
    )  # bf16 engine vs fp32 masters


def test_zero0_bf16_export_of_a_checkpoint_from_before_merged_groups(tmp_path):
    # Before the merge, backbone and head had groups of their own at any backbone_lr_scale, and the
    # state did not record them: the export must split the fp32 masters the old way.
    cfg = build_config({
        "training": {"num_epochs": 1, "batch_size": 8, "scheduler": "none", "monitor": "train_loss",
                     "checkpoint_dir": str(tmp_path / "ckpt")},
        "deepspeed": {"precision": "bf16"}, "logging": {"run_dir": str(tmp_path / "run"), "tensorboard": False},
    })  # fmt: skip
    torch.manual_seed(0)
    # Four groups, as the old code built at any scale; the record then says the scale was 1, as such a run's did.
    cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"backbone_lr_scale": 0.5})})
    trainer = Trainer(build_model(cfg.model), DataLoader(dataset(), batch_size=8), config=cfg, device="cpu")
    trainer.train()
    assert len(trainer.engine.optimizer.fp32_groups_flat) == 4
    rewrite_as_v1(tmp_path / "ckpt" / "epoch_1", merged_groups=False, training={"backbone_lr_scale": 1.0})
    opt, names = trainer.engine.optimizer, {id(p): n for n, p in trainer.model.named_parameters()}
    exported = load_exported(export_checkpoint(tmp_path / "ckpt", tmp_path / "export")).state_dict()
    for params, flat in zip(opt.fp16_groups, opt.fp32_groups_flat):
        for p, chunk in zip(params, flat.split([q.numel() for q in params])):
            assert torch.equal(exported[names[id(p)]], chunk.view(p.shape)), names[id(p)]


def test_lora_export_is_merged_and_matches_engine(tmp_path):
    trainer = train(tmp_path, model=LORA, zero_stage=2, lr=1e-2)
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert lora_b and any(bool(p.detach().abs().max() > 0) for p in lora_b)  # the adapters did learn something
    out = export_checkpoint(tmp_path / "ckpt", tmp_path / "export")
    from transformers import CLIPVisionModel

    tower = CLIPVisionModel.from_pretrained(out)
    assert not any("lora" in k for k in tower.state_dict())
    assert json.loads((out / EXPORT_FILE).read_text())["lora_merged"] is True
    x = probe_batch()
    torch.testing.assert_close(load_exported(out)(x), engine_logits(trainer, x), atol=1e-5, rtol=0)


def test_prompt_tuning_export_round_trip(tmp_path):
    trainer = train(tmp_path, model=PROMPT_TUNING, lr=1e-2)
    out = export_checkpoint(tmp_path / "ckpt", tmp_path / "export")
    model = load_exported(out)
    assert model.mode == "prompt-tuning" and model.prompt_length == 4
    assert torch.equal(model.prompt_ctx, trainer.model.prompt_ctx.detach())
    x = probe_batch()
    torch.testing.assert_close(model(x), engine_logits(trainer, x), atol=1e-5, rtol=0)
    from transformers import CLIPModel, CLIPTokenizer

    CLIPModel.from_pretrained(out)
    assert len(CLIPTokenizer.from_pretrained(out)) == len(trainer.model.model.tokenizer)
    info = json.loads((out / EXPORT_FILE).read_text())
    assert info["prompts"] == {"real": "a real photo", "ai": "an AI-generated image"}


def test_exported_model_loads_without_deepspeed(fine_tuned):
    _, _, out = fine_tuned
    code = (
        "import sys; sys.modules['deepspeed'] = None\n"  # any import of deepspeed now fails
        "import torch\nfrom ds_trainer.export import load_exported\n"
        f"print(float(load_exported({str(out)!r})(torch.zeros(1, 3, 224, 224)).sum()))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=launch_env(), capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]


# ------------------------------------------------------------------ predict
def write_images(tmp_path):
    rng = np.random.default_rng(0)
    png, jpg = tmp_path / "a.png", tmp_path / "b.jpg"
    Image.fromarray(rng.integers(0, 256, (180, 260, 4), dtype=np.uint8), mode="RGBA").save(png)
    Image.fromarray(rng.integers(0, 256, (300, 240, 3), dtype=np.uint8)).save(jpg, quality=90)
    return [png, jpg]


def reference_scores(out, paths):
    model = load_exported(out)
    batch = torch.stack([clip_preprocess(Image.open(p), 224, train=False) for p in paths])
    return predict_tensors(model, batch).tolist()


def test_predict_cli_prints_probabilities(fine_tuned, tmp_path, capsys):
    _, _, out = fine_tuned
    paths = write_images(tmp_path)
    expected = reference_scores(out, paths)

    assert cli.main(["predict", "--model", str(out), *map(str, paths), "--batch-size", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in paths]
    scores = [float(line.split("\t")[1]) for line in lines]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert scores == pytest.approx(expected, abs=1e-6)

    assert cli.main(["predict", "--model", str(out), *map(str, paths), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    assert [r["p_ai"] for r in rows] == pytest.approx(expected, abs=1e-6)
    assert all(r["error"] is None for r in rows)


def test_predict_unreadable_image_scores_the_rest_and_exits_3(fine_tuned, tmp_path, capsys):
    _, _, out = fine_tuned
    good = write_images(tmp_path)[0]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    code = cli.main(["predict", "--model", str(out), str(bad), str(good), str(tmp_path / "missing.jpg")])
    captured = capsys.readouterr()
    assert code == 3
    assert captured.out.splitlines()[0].startswith(f"{good}\t")
    assert len(captured.out.splitlines()) == 1
    assert "broken.png" in captured.err and "missing.jpg" in captured.err and "2 of 3" in captured.err


# ------------------------------------------------------------------ errors
def test_export_cli_and_errors(fine_tuned, tmp_path, capsys):
    _, ckpt, _ = fine_tuned
    out = tmp_path / "out"
    assert cli.main(["export", "--load-dir", str(ckpt), "--tag", "best", "--out", str(out)]) == 0
    assert json.loads((out / EXPORT_FILE).read_text())["source"]["tag"] == "best"

    # non-empty OUT: refused, then replaced with --force
    assert cli.main(["export", "--load-dir", str(ckpt), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert cli.main(["export", "--load-dir", str(ckpt), "--out", str(out), "--force", "--no-verify"]) == 0
    assert json.loads((out / EXPORT_FILE).read_text())["source"]["tag"] == "epoch_1"
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert cli.main(["export", "--load-dir", str(ckpt), "--out", str(other), "--force"]) == 2
    assert (other / "keep.txt").read_text() == "mine"

    # missing checkpoint / tag
    assert cli.main(["export", "--load-dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "o1")]) == 4
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["export", "--load-dir", str(ckpt), "--tag", "epoch_9", "--out", str(tmp_path / "o2")]) == 4
    err = capsys.readouterr().err
    assert "epoch_9" in err and "best, epoch_1" in err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()

    # a predict model directory that is not an export
    assert cli.main(["predict", "--model", str(tmp_path / "notes"), str(tmp_path / "x.png")]) == 4


@pytest.mark.parametrize("given", ["tag", "checkpoint_dir"])
def test_predict_on_a_checkpoint_suggests_an_export_that_works(fine_tuned, tmp_path, capsys, given):
    import shlex
    import shutil

    _, ckpt, _ = fine_tuned
    shutil.copytree(ckpt, tmp_path / "ckpt")
    (tmp_path / "exported" / "epoch_1").mkdir(parents=True)  # taken: the hint must not name it
    (tmp_path / "exported" / "epoch_1" / "other.txt").write_text("x")
    image = write_images(tmp_path)[0]
    model = tmp_path / "ckpt" / "epoch_1" if given == "tag" else tmp_path / "ckpt"
    assert cli.main(["predict", "--model", str(model), str(image)]) == 4
    err = capsys.readouterr().err
    assert "is a DeepSpeed checkpoint, not an exported model" in err
    export = shlex.split(err.split("export it first: ")[1].split(", then ")[0])
    predict = shlex.split(err.split(", then ")[1].rstrip(" .\n"))
    assert export[:2] == ["ds-trainer", "export"] and predict[:2] == ["ds-trainer", "predict"]
    assert cli.main(export[1:]) == 0  # the suggested command, as printed
    assert cli.main([*predict[1:], str(image)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"{image}\t")


def test_old_checkpoint_without_config_is_refused_with_a_hint(fine_tuned, tmp_path):
    import shutil

    _, ckpt, _ = fine_tuned
    old = tmp_path / "old"
    shutil.copytree(ckpt / "epoch_1", old / "epoch_1")
    marker = old / "epoch_1" / "ds_trainer.json"
    state = json.loads(marker.read_text())
    del state["config"]
    marker.write_text(integrity.seal(state))  # sealed again: what an older version wrote, not damage
    with pytest.raises(CheckpointError, match="no run config.*older.*train --load-dir"):
        export_checkpoint(old, tmp_path / "out")


def test_config_that_does_not_describe_the_model_is_a_checkpoint_error(fine_tuned, tmp_path):
    import shutil

    _, ckpt, _ = fine_tuned
    bad = tmp_path / "bad"
    shutil.copytree(ckpt / "epoch_1", bad / "epoch_1")
    marker = bad / "epoch_1" / "ds_trainer.json"
    state = json.loads(marker.read_text())
    state["config"]["model"]["lora"]["enabled"] = True
    marker.write_text(integrity.seal(state))
    with pytest.raises(CheckpointError, match="does not match the model"):
        export_checkpoint(bad, tmp_path / "out")


def test_out_that_is_a_file_is_refused(fine_tuned, tmp_path):
    _, ckpt, _ = fine_tuned
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        export_checkpoint(ckpt, tmp_path / "f")


# ------------------------------------------------------------------ two ranks
@pytest.mark.distributed
def test_export_from_two_rank_zero2_checkpoint(tmp_path, tiny_shards):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    cfg = write_config(tmp_path / "cfg.yaml", tiny_shards, training={"num_epochs": 1, "warmup_epochs": 0},
                       deepspeed={"zero_stage": 2})  # fmt: skip
    run = run_cmd(["./launch.sh", "--config", str(cfg)], DS_TRAINER_CPU_RANKS="2")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ckpt = tmp_path / "ckpt"
    assert len(list((ckpt / "epoch_1").glob("*zero_pp_rank_*_optim_states.pt"))) == 2

    out = export_checkpoint(ckpt, tmp_path / "export")  # one process, no process group
    info = json.loads((out / EXPORT_FILE).read_text())
    assert (info["source"]["world_size"], info["source"]["zero_stage"]) == (2, 2)

    # Reference: DeepSpeed's own consolidation loaded into a fresh model.
    from ds_trainer.config import ModelSection

    reference = build_model(ModelSection(model_name="tiny"))
    reference.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt), "epoch_1"))
    x = probe_batch()
    with torch.no_grad():
        expected = reference.eval()(x)
        first, second = load_exported(out)(x), load_exported(out)(x)
    assert torch.isfinite(first).all()
    assert torch.equal(first, second)
    torch.testing.assert_close(first, expected, atol=1e-5, rtol=0)

"""`sowa train` as Lightning + Hydra runs it: configs compose, overrides reach the built model, each logger's files
open in its own reader, EarlyStopping, the bundle from the best checkpoint, resume, DDP on gloo, and wrong
overrides as one line with exit status 2. Tiny random-weight model, 12 toy images, a few steps per run."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from model.bundle import read_manifest
from model.config import AdapterConfig, ModelConfig, PromptConfig
from sowa.cli import main
from tests.helpers import REPO, TINY_CLIP
from training.data_module import ClassIdSet
from training.run_config import CONFIG_DIR, RunConfigError, compose_config
from training.train import build_module, train
from training.train_data import TrainSet


def write_toy(root: Path) -> Path:
    """Two classes of 64x64 noise; anomalies are red squares with exact masks (MVTec layout), 6 test images each."""
    rng = np.random.default_rng(0)
    for cls in ("c1", "c2"):
        for i, kind in enumerate(["good"] * 2 + ["square"] * 4):
            img = (rng.normal(0.5, 0.05, (64, 64, 3)) * 255).clip(0, 255).astype(np.uint8)
            folder = root / cls / "test" / kind
            folder.mkdir(parents=True, exist_ok=True)
            if kind != "good":
                x, y = rng.integers(4, 44, 2)
                img[y:y + 14, x:x + 14] = [240, 30, 30]
                mask = np.zeros((64, 64), np.uint8)
                mask[y:y + 14, x:x + 14] = 255
                (root / cls / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(root / cls / "ground_truth" / kind / f"{i:03d}_mask.png")
            Image.fromarray(img).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lightning")
    (root / "tiny.json").write_text(json.dumps(TINY_CLIP))
    return {"root": root, "data": write_toy(root / "data"), "arch": root / "tiny.json"}


def base(toy: dict[str, Path], run_dir: Path, *more: str) -> list[str]:
    """The tiny model on the toy data, no progress bar or summary, no logger: each test adds what it checks."""
    return [f"model.backbone.arch={toy['arch']}", "model.backbone.weights=none", "model.taps=[0,1,2,3]",
            "model.adapter.window_size=4", f"data.root={toy['data']}", f"data.val_root={toy['data']}",
            "data.batch_size=4", "data.val_batch_size=12", "logger=none", "callbacks.rich_progress_bar=null",
            "callbacks.model_summary=null", "trainer.accelerator=cpu", f"run_dir={run_dir}", *more]


# -- configs ------------------------------------------------------------------------------------------------------
def test_each_config_group_composes() -> None:
    for group in ("data", "model", "prompt", "trainer", "logger", "callbacks"):
        for option in sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml")):
            cfg = compose_config("train", [f"{group}={option}"])
            assert cfg.task_name == "train", (group, option)
    for option in sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml")):
        assert compose_config("train", [f"+experiment={option}"]).task_name == "train"
    cfg = compose_config("train", ["data=visa", "model.adapter.depth=2", "prompt=template", "logger=[csv,tensorboard]",
                                   "+experiment=best"])
    assert cfg.data.val_root == "data/visa" and cfg.model.adapter.depth == 2 and cfg.model.prompt.scheme == "template"
    assert sorted(cfg.logger) == ["csv", "tensorboard"] and cfg.model.prompt.length == 24  # experiment's
    assert cfg.callbacks.model_checkpoint.dirpath == f"{cfg.run_dir}/checkpoints"
    # the model node is ModelConfig's dict form, every key of it: a new model knob is an override at once
    for option in ("sowa_hfwa", "vit_b16", "tiny"):
        m = compose_config("train", [f"model={option}"]).model
        assert set(m) == {f.name for f in fields(ModelConfig)}, option
        assert set(m.adapter) == {f.name for f in fields(AdapterConfig)}
        assert set(m.prompt) == {f.name for f in fields(PromptConfig)}
    ev = compose_config("eval", ["bundle=b", "out=r.json", "data=mvtec", "k=[0,1]"])
    assert ev.data.test_root == "data/mvtec" and list(ev.k) == [0, 1]


def test_overrides_reach_the_built_model(toy: dict[str, Path], tmp_path: Path) -> None:
    cfg = compose_config("train", base(toy, tmp_path, "model.adapter.depth=2", "model.prompt.length=5",
                                       "model.taps=[1,3]", "model.adapter.num_heads=4", "model.temperature=0.05"))
    model = build_module(cfg).model
    assert model.taps == (1, 3) and len(model.adapters) == 2
    assert all(len(a.blocks) == 2 for a in model.adapters)
    assert model.adapters[0].blocks[0].attn.num_heads == 4
    assert model.prompt_learner.ctx_pos.shape[-2] == 5 and model.cfg.temperature == 0.05
    # per-stage adapters: a list of dicts, each tap its own window and depth (the grid is 8x8)
    cfg = compose_config("train", base(toy, tmp_path, "model.adapters=[{window_size:2,depth:2},{},{},{window_size:4}]"))
    model = build_module(cfg).model
    assert [len(a.blocks) for a in model.adapters] == [2, 1, 1, 1]
    assert [a.blocks[0].attn.window for a in model.adapters] == [2, 8, 8, 4]


def test_wrong_overrides_exit_2_with_one_line(toy: dict[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    cases = {"model.adapter.dpth=2": "dpth", "data=nope": "data/nope", "trainer.max_epochs=[1": "parse",
             "model.adapter.window_size=3": "window_size", "trainer.precision=fp64": "precision",
             "experiment=best": "+experiment=best", "monitor.metric=val/typo": "monitor.metric"}
    for override, words in cases.items():
        assert main(["train", *base(toy, tmp_path / "bad"), override]) == 2, override
        err = capsys.readouterr().err
        assert err.startswith("sowa train: error: ") and err.count("\n") == 1 and words in err, (override, err)
        assert "Traceback" not in err
    assert main(["eval", "bundle=b", "k=[0"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_items_carry_their_class_prompt_context(toy: dict[str, Path]) -> None:
    cfg = compose_config("train", base(toy, toy["root"], "model.prompt.class_names=[object,c2]"))
    module = build_module(cfg)
    data = ClassIdSet(TrainSet(toy["data"], "test", 64), module.model.cfg.prompt)
    ids = {item.cls_name: data[i][3].item() for i, item in enumerate(data.data.items)}
    assert ids == {"c1": 0, "c2": 1}  # an unknown class takes the first context, as the research code does


def test_each_class_trains_its_own_prompt_context(toy: dict[str, Path], tmp_path: Path) -> None:
    """Classes c1 and 'unused': c1's images train context 0, c2's (an unknown name) context 0 too, as the research
    code maps them; context 1 gets no gradient, so only AdamW's decoupled weight decay moves it."""
    cfg = compose_config("train", base(toy, tmp_path / "run", "model.prompt.class_names=[c1,unused]",
                                       "~callbacks.model_checkpoint", "~callbacks.early_stopping",
                                       "validation.enabled=false", "monitor.metric=train/loss_epoch",
                                       "monitor.mode=min", "model.adapter.attn_drop=0"))
    init = build_module(cfg).model.prompt_learner.ctx_pos.detach().clone()
    info = train(cfg)
    trained = load_file(info.path / "sowa.safetensors")["prompt_learner.ctx_pos"]
    assert info.provenance["steps"] == 3 and info.provenance["checkpoint"]["path"] is None  # the last weights
    decay = (1 - 1e-3 * 0.2) ** 3
    assert torch.allclose(trained[1], init[1] * decay, atol=1e-7)
    assert (trained[0] - init[0] * decay).abs().max() > 1e-4


# -- one run with every logger, then its checkpoints ------------------------------------------------------------
@pytest.fixture(scope="module")
def logged_run(toy: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Three epochs of 3 steps with csv, tensorboard and W&B (offline). The monitor is the training loss in
    mode max, so the first epoch is the best and the bundle's weights must differ from the last ones."""
    run_dir = tmp_path_factory.mktemp("logged") / "run"
    old = os.environ.get("WANDB_MODE")
    os.environ["WANDB_MODE"] = "offline"
    try:
        cfg = compose_config("train", [*base(toy, run_dir, "logger=[csv,tensorboard,wandb]"),
                                       "logger.wandb.offline=true", "trainer.max_epochs=3",
                                       "trainer.log_every_n_steps=1",
                                       "monitor.metric=train/loss_epoch", "monitor.mode=max",
                                       "callbacks.model_checkpoint.save_top_k=1"])
        info = train(cfg)
    finally:
        if old is None:
            os.environ.pop("WANDB_MODE", None)
        else:
            os.environ["WANDB_MODE"] = old
    return {"cfg": cfg, "info": info, "run_dir": run_dir}


def test_each_logger_writes_files_its_reader_opens(logged_run: dict) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir: Path = logged_run["run_dir"]
    with (run_dir / "csv" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len([r for r in rows if r["train/loss"]]) == 9 and len([r for r in rows if r["val/pixel_auroc"]]) == 3
    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "val/pixel_auroc", "val/image_auroc", "val/image_accuracy", "lr-AdamW"} <= set(tags)
    assert len(events.Scalars("train/loss")) == 9 and len(events.Scalars("val/pixel_auroc")) == 3
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("run-*.wandb"))
    assert (offline[0] / "files" / "config.yaml").is_file() or (offline[0] / "files").is_dir()


def test_the_run_saves_its_resolved_config_in_run_dir_and_bundle(logged_run: dict) -> None:
    saved = yaml.safe_load((logged_run["run_dir"] / "config.yaml").read_text())
    info = logged_run["info"]
    assert saved["monitor"] == {"metric": "train/loss_epoch", "mode": "max"} and "${" not in json.dumps(saved)
    assert info.provenance["config"] == saved
    assert info.provenance["steps"] == 9 and info.provenance["epochs_completed"] == 3
    assert info.config.adapter.window_size == 4 and info.trained


def test_the_bundle_is_made_from_the_best_checkpoint(logged_run: dict) -> None:
    info, ckpts = logged_run["info"], logged_run["run_dir"] / "checkpoints"
    best = Path(info.provenance["checkpoint"]["path"])
    assert best.name == "epoch_000-step_000003.ckpt" and (ckpts / "last.ckpt").is_file()
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch_000-step_000003.ckpt", "last.ckpt"]  # best-1 + last
    bundle = load_file(info.path / "sowa.safetensors")
    best_sd = torch.load(best, weights_only=True)["state_dict"]
    last_sd = torch.load(ckpts / "last.ckpt", weights_only=True)["state_dict"]
    assert not any(k.startswith("model.clip.") for k in best_sd)  # checkpoints leave the frozen backbone out
    trained = [k for k in bundle if k.startswith(("adapters.", "prompt_learner.ctx", "fusion."))]
    assert trained and all(torch.equal(bundle[k], best_sd["model." + k]) for k in trained)
    assert any(not torch.equal(bundle[k], last_sd["model." + k]) for k in trained)
    with (logged_run["run_dir"] / "csv" / "metrics.csv").open() as f:
        losses = [float(r["train/loss_epoch"]) for r in csv.DictReader(f) if r["train/loss_epoch"]]
    assert len(losses) == 3 and losses[0] == max(losses)  # mode max on a falling loss: epoch 0 is the best
    assert info.provenance["checkpoint"]["score"] == pytest.approx(losses[0])


def test_eval_takes_overrides(logged_run: dict, toy: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    assert main(["eval", f"bundle={logged_run['info'].path}", f"data.test_root={toy['data']}", "k=[0]", "seeds=[0]",
                 f"out={out}", "metric_workers=0", "progress=false", "batch_size=12"]) == 0
    report = json.loads(out.read_text())
    assert report["results"]["0"]["mean"]["pixel_auroc"] > 0.5


def test_early_stopping_stops_a_run_whose_metric_stalls(toy: dict[str, Path], tmp_path: Path) -> None:
    # lr 0: the weights never move, so the validation metric repeats and patience 1 stops after the second epoch
    cfg = compose_config("train", base(toy, tmp_path / "run", "optimizer.lr=0", "optimizer.weight_decay=0",
                                       "trainer.max_epochs=20", "trainer.limit_train_batches=1",
                                       "callbacks.early_stopping.patience=1"))
    info = train(cfg)
    assert info.provenance["stopped_by"] == "early stopping"
    assert info.provenance["epochs_completed"] == 2 and info.provenance["steps"] == 2


def test_resume_continues_from_a_checkpoint(toy: dict[str, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    first = train(compose_config("train", base(toy, run, "trainer.max_epochs=1")))
    assert first.provenance["steps"] == 3 and first.provenance["resumed_from_step"] is None
    resumed = train(compose_config("train", base(toy, run, "trainer.max_epochs=2", "ckpt_path=last", "force=true")))
    assert resumed.provenance["resumed_from_step"] == 3
    assert resumed.provenance["steps"] == 6 and resumed.provenance["epochs_completed"] == 2
    assert (run / "checkpoints" / "epoch_001-step_000006.ckpt").is_file()
    # a checkpoint of another model config is refused in one line
    assert main(["train", *base(toy, run, "model.adapter.depth=2", "ckpt_path=last", "force=true")]) == 2
    assert "made with another model config" in capsys.readouterr().err


def test_earlier_flags_still_train(toy: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b"
    assert main(["train", "--data", str(toy["data"]), "--out", str(out), "--arch", str(toy["arch"]),
                 "--pretrained", "none", "--max-steps", "1", "--batch-size", "4", "--no-progress", "logger=none",
                 "callbacks.model_summary=null"]) == 0
    prov = read_manifest(out).provenance
    assert prov["steps"] == 1 and prov["batch_size"] == 4 and prov["config"]["validation"]["enabled"] is False
    assert prov["config"]["run_dir"] == f"{out}.checkpoints"
    assert (out.parent / "b.checkpoints" / "config.yaml").is_file()
    assert f"wrote {out} from" in capsys.readouterr().out


@pytest.mark.slow
def test_ddp_two_gloo_processes_complete_and_agree(toy: dict[str, Path], tmp_path: Path) -> None:
    """trainer=ddp_cpu: Lightning starts a second process; both ranks end with the same trainable weights."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "sowa", "train", *base(toy, tmp_path / "run"), "trainer=ddp_cpu",
           "trainer.accelerator=cpu", "trainer.max_epochs=1", f"out={tmp_path / 'ddp'}"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    prov = read_manifest(tmp_path / "ddp").provenance
    assert prov["world_size"] == 2 and prov["global_batch_size"] == 8 and prov["ranks_agree"] is True
    assert prov["steps"] == 2  # 12 images over 2 ranks of batch 4: 2 steps each
    assert prov["final_metrics"]["val/pixel_auroc"] > 0


def test_a_config_error_is_a_run_config_error() -> None:
    with pytest.raises(RunConfigError, match="dpth"):
        compose_config("train", ["model.adapter.dpth=1"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; CI and dev machines have none")
def test_cuda_bf16_training_tracks_fp32(toy: dict[str, Path], tmp_path: Path) -> None:
    """bf16-mixed on the GPU (precision auto): the bundle is written and its epoch losses follow the fp32 CPU run."""
    common = ["trainer.max_epochs=2", "model.adapter.attn_drop=0", "logger=csv"]
    cpu = train(compose_config("train", base(toy, tmp_path / "cpu", *common)))
    gpu = train(compose_config("train", [*base(toy, tmp_path / "gpu", *common), "trainer.accelerator=gpu"]))
    assert gpu.provenance["precision"] == "bf16-mixed" and gpu.provenance["device"].startswith("cuda")
    assert gpu.provenance["final_metrics"]["train/loss_epoch"] == pytest.approx(
        cpu.provenance["final_metrics"]["train/loss_epoch"], rel=0.03)

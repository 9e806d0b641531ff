"""--log tensorboard / wandb: the trackers get exactly metrics.jsonl's records (read back from their own
files), a --resume continues the same curves and the same W&B run, rank 0 alone logs, and neither package
is imported unless chosen (a missing one is the one-line error, before any data work)."""
import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from gpt.errors import ConfigError
from train.config import TrainConfig
from train.distributed import World
from train.loggers import RUN_ID_FILE, MetricsLogger, open_loggers, scalars
from train.loop import Trainer

from ..test_optional_packages import _one_line_error, finish, start_without

SMALL_MODEL = dict(n_layer=1, n_embd=32, n_head=2, n_kv_head=1, block_size=16)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("ROMEO:\nBut soft, what light through yonder window breaks?\n\n" * 40, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("data"))


def cfg_for(out: Path, corpus: Path, data_dir: str, **kw) -> TrainConfig:
    base = dict(model=dict(SMALL_MODEL), dataset=str(corpus), tokenizer="char", data_dir=data_dir, batch_size=4,
                max_iters=20, eval_interval=10, eval_iters=1, log_interval=1, out_dir=str(out), warmup_iters=2,
                lr=3e-3, min_lr=3e-4, device="cpu", dtype="float32", kernels="torch", progress=False)
    return TrainConfig(**{**base, **kw})


def expected_scalars(out: Path) -> dict[str, dict[int, float]]:
    """tag -> step -> value, from metrics.jsonl (the last record of an iter wins, as in its plot)."""
    want: dict[str, dict[int, float]] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        for tag, value in scalars(rec).items():
            want.setdefault(tag, {})[rec["iter"]] = value
    return want


def test_scalars_are_the_numeric_fields_of_a_record_by_kind():
    assert scalars({"iter": 3, "loss": 2.5, "lr": 1e-3, "tok_per_s": 10, "mfu": 0.1, "tokens": 96,
                    "elapsed": 1.5}) == {"train/loss": 2.5, "train/lr": 1e-3, "train/tok_per_s": 10.0,
                                         "train/mfu": 0.1, "train/tokens": 96.0, "train/elapsed": 1.5}
    assert scalars({"iter": 10, "train_loss": 2.0, "val_loss": 2.1, "tokens": 320, "elapsed": 2.0}) == {
        "eval/train_loss": 2.0, "eval/val_loss": 2.1, "eval/tokens": 320.0, "eval/elapsed": 2.0}


@pytest.mark.parametrize("log, ok", [("none", True), ("tensorboard", True), ("wandb", True),
                                     ("tensorboard,wandb", True), (" wandb , tensorboard ", True),
                                     (["tensorboard", "wandb"], True), ("tensorbord", False),
                                     ("none,wandb", False), ("wandb,wandb", False), ("", False)])
def test_the_log_setting_is_validated(log, ok):
    cfg = TrainConfig(log=log)
    if ok:
        cfg.validate()
        return
    with pytest.raises(ConfigError, match="choose one of: none, tensorboard, wandb"):
        cfg.validate()


def test_tensorboard_gets_metrics_jsonl_and_a_resume_replaces_what_followed_its_checkpoint(tmp_path, corpus,
                                                                                           data_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    run = lambda **kw: cfg_for(out, corpus, data_dir, log="tensorboard", **kw)
    Trainer(run()).train(stop_at=13)
    shutil.copy(out / "ckpt.pt", tmp_path / "ckpt13.pt")
    Trainer(run(resume=True)).train()
    # As if the process had died after iter 13's checkpoint: resume from it again. Iters 14..20 are logged
    # twice; TensorBoard must show them once (purge_step), like the plot of metrics.jsonl.
    shutil.copy(tmp_path / "ckpt13.pt", out / "ckpt.pt")
    Trainer(run(resume=True)).train()
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 3

    want = expected_scalars(out)
    assert set(want) == {"train/loss", "train/lr", "train/tok_per_s", "train/mfu", "train/tokens", "train/elapsed",
                         "eval/train_loss", "eval/val_loss", "eval/train_bpb", "eval/val_bpb", "eval/tokens",
                         "eval/elapsed"}
    assert sorted(want["train/loss"]) == list(range(1, 21)) and sorted(want["eval/val_loss"]) == [10, 20]
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == set(want)
    for tag, by_step in want.items():
        events = acc.Scalars(tag)
        assert [e.step for e in events] == sorted(by_step), tag  # each step once, in order
        got = {e.step: e.value for e in events}
        # TensorBoard stores float32. The losses of both resumed runs are the same (exact resume); their
        # timings differ, so those are compared with the final (last written) records.
        assert got == {s: np.float32(v) for s, v in by_step.items()}, tag


# --- W&B: read its offline run file back ---------------------------------------------------------
def wandb_records(path: Path):
    """The protobuf records of a .wandb file: W&B's header (":W&B", 0xBEE1, version) and then the LevelDB
    log format (32 KiB blocks of [crc32, length, type] chunks; types 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            yield record


def wandb_history(path: Path) -> tuple[dict, dict[int, dict]]:
    """(the run record, step -> the logged values, W&B's own "_" keys left out) of one .wandb file."""
    run, history = None, {}
    for r in wandb_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run = r.run
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            history[row["_step"]] = {k: v for k, v in row.items() if not k.startswith("_")}
    return run, history


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B offline and silent, its own directories under tmp (nothing is sent anywhere, nothing under ~)."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var, sub in (("WANDB_DIR", "wandb-dir"), ("WANDB_CACHE_DIR", "wandb-cache"),
                     ("WANDB_CONFIG_DIR", "wandb-config"), ("WANDB_DATA_DIR", "wandb-data")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.delenv("WANDB_RESUME", raising=False)


def test_wandb_gets_metrics_jsonl_and_a_resume_continues_the_same_run(tmp_path, corpus, data_dir, wandb_offline):
    out = tmp_path / "out"
    run = lambda **kw: cfg_for(out, corpus, data_dir, log="wandb", wandb_project="proj", **kw)
    Trainer(run()).train(stop_at=13)
    run_id = (out / RUN_ID_FILE).read_text().strip()
    assert run_id
    Trainer(run(resume=True)).train()
    assert (out / RUN_ID_FILE).read_text().strip() == run_id  # the same W&B run

    # One directory per process: offline-run-TIME-ID (and -ID-1 when two start within a second).
    files = sorted(out.glob(f"wandb/offline-run-*/run-{run_id}.wandb"))
    assert len(files) == 2, sorted(p.relative_to(out) for p in out.rglob("*.wandb"))
    logged: dict[int, dict] = {}
    for f in files:
        run_rec, history = wandb_history(f)
        assert (run_rec.run_id, run_rec.project, run_rec.display_name) == (run_id, "proj", "out")
        config = {item.key: json.loads(item.value_json) for item in run_rec.config.update}
        assert config["log"] == "wandb" and config["lr"] == 3e-3 and config["model"] == SMALL_MODEL
        assert not set(history) & set(logged)  # the resumed process went on from step 14
        logged.update(history)
    assert sorted(logged) == list(range(1, 21))
    want = expected_scalars(out)
    assert {s: row for s, row in logged.items()} == {
        s: {tag: by_step[s] for tag, by_step in want.items() if s in by_step} for s in range(1, 21)}

    # A fresh run in the same out dir is a new W&B run.
    Trainer(run(max_iters=2, eval_interval=2)).train()
    assert (out / RUN_ID_FILE).read_text().strip() != run_id


def test_only_rank_0_logs(tmp_path, corpus, data_dir, wandb_offline):
    out = tmp_path / "out"
    out.mkdir()
    cfg = cfg_for(out, corpus, data_dir, log="tensorboard,wandb")
    with open_loggers(cfg, out, World(rank=1, size=2, parallel="ddp")) as logger:
        assert type(logger) is MetricsLogger  # the no-op one
        logger.log({"iter": 1, "loss": 2.0, "lr": 1e-3}, step=1)
        logger.log({"iter": 1, "train_loss": 2.0, "val_loss": 2.1}, step=1)
    assert list(out.iterdir()) == []
    assert type(open_loggers(cfg_for(out, corpus, data_dir), out, World())) is MetricsLogger  # --log none


# --- the packages: imported only when chosen; missing, one line ----------------------------------
@pytest.mark.parametrize("module, log", [("tensorboard", "tensorboard"), ("wandb", "wandb"),
                                         ("wandb", "tensorboard,wandb")])
def test_a_missing_tracker_is_a_config_error_before_any_data_work(tmp_path, corpus, monkeypatch, module, log):
    monkeypatch.setitem(sys.modules, module, None)  # importing it raises ModuleNotFoundError
    data = tmp_path / "data"
    with pytest.raises(ConfigError) as e:
        Trainer(cfg_for(tmp_path / "out", corpus, str(data), log=log))
    msg = str(e.value)
    assert f"--log {module} needs the optional package '{module}'" in msg and f"pip install {module}" in msg, msg
    assert "--log none" in msg and "\n" not in msg, msg
    assert not data.exists() and not (tmp_path / "out").exists()


CHECK_IMPORTS = """
import sys
from train.config import TrainConfig
from train.loop import Trainer
corpus, tmp = sys.argv[1:3]
cfg = TrainConfig(model=dict(n_layer=1, n_embd=32, n_head=2, n_kv_head=1, block_size=16), dataset=corpus,
                  data_dir=tmp + "/data", out_dir=tmp + "/out", batch_size=2, max_iters=2, eval_interval=2,
                  eval_iters=1, log_interval=1, warmup_iters=1, device="cpu", dtype="float32", kernels="torch",
                  progress=False)
Trainer(cfg).train()
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorboard", "wandb") or "tensorboard" in m)
print("loaded:", loaded)
"""


def test_the_trackers_are_not_imported_unless_chosen_and_a_missing_one_is_one_line(tmp_path, corpus):
    """In fresh interpreters, side by side: a --log none run imports neither package; with both hidden
    (tests/test_optional_packages.py's blocker), `python -m train --log tensorboard` fails in one line."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    plain = start_without((), "-c", CHECK_IMPORTS, corpus, tmp_path / "a", cwd=tmp_path)
    cli = start_without(("tensorboard", "wandb"), "-m", "train", "--log", "tensorboard", "--dataset", corpus,
                        "--data-dir", tmp_path / "b" / "data", "--out-dir", tmp_path / "b" / "out",
                        "--device", "cpu", "--max-iters", "2", cwd=tmp_path)
    proc = finish(plain)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("loaded: []"), (proc.stdout[-2000:],
                                                                              proc.stderr[-3000:])
    _one_line_error(finish(cli), "tensorboard", "--log none")
    assert not (tmp_path / "b" / "data").exists() and not (tmp_path / "b" / "out").exists()

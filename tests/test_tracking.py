"""`--report-to tensorboard,wandb`: what each backend wrote, read back through its own reader (TensorBoard's
EventAccumulator; wandb's offline run file, its records parsed with wandb's own protobuf schema), equals the run's
own files; reporting changes no result; a failing backend is said once; a resumed run continues its curves; only
rank 0 reports."""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from ballad_cache.errors import BalladError
from ballad_cache.tracking import TensorBoardBackend, Tracker, check_reporters, curve_steps
from cli.main import app

runner = CliRunner()
pytest.importorskip("tensorboard")
pytest.importorskip("wandb")


@pytest.fixture(autouse=True)
def offline_wandb(monkeypatch, tmp_path):
    """wandb offline, its settings and caches inside the test's folder, nothing sent anywhere."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))


def tb_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the TensorBoard events in `folder` (not its subfolders): (step, value) in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tb_hparams(folder: Path) -> dict[str, Any]:
    """The HParams session a folder's events start (its hyperparameter values), as the HParams dashboard reads it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(folder))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    data = plugin_data_pb2.HParamsPluginData.FromString(content)
    values = {}
    for name, value in data.session_start_info.hparams.items():
        kind = value.WhichOneof("kind")
        values[name] = getattr(value, kind)
    return values


def wandb_records(run_dir: Path) -> list[Any]:
    """The records of an offline wandb run file (`run-ID.wandb`): LevelDB's log format (32 KiB blocks of
    checksum, length, type and payload; a record split across blocks is first/middle/last) after wandb's 7-byte
    header, each payload a `wandb_internal_pb2.Record`."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, payloads, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            payloads.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            payloads.append(pending + chunk)
    records = []
    for raw in payloads:
        record = pb.Record()
        record.ParseFromString(raw)
        records.append(record)
    return records


def wandb_history(folder: Path) -> dict[int, dict[str, Any]]:
    """Per logged step, the values a run's wandb history holds (every offline run folder under `folder/wandb`)."""
    rows: dict[int, dict[str, Any]] = {}
    for run_dir in sorted((folder / "wandb").glob("offline-run-*")):
        for record in wandb_records(run_dir):
            if record.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                step = int(items["_step"])
                assert step not in rows, f"step {step} logged twice"
                rows[step] = items
    return rows


def wandb_kind(folder: Path, kind: str) -> dict[str, Any]:
    """The last value of each key of the run's `config` or `summary` records."""
    values: dict[str, Any] = {}
    for run_dir in sorted((folder / "wandb").glob("offline-run-*")):
        for record in wandb_records(run_dir):
            found = record.WhichOneof("record_type")
            if kind == "config" and found == "run":  # the config wandb.init was given travels in the run record
                items = record.run.config.update
            elif found == kind:
                items = record.config.update if kind == "config" else record.summary.update
            else:
                continue
            for i in items:
                values[i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
    return values


FIT = ["--epochs", "3", "--batch-size", "64", "--device", "cpu"]


def fit(cache: Path, out: Path, *options: str) -> Any:
    """`ballad fit-adapter` on `cache` into `out` with FIT's settings and `options`."""
    return runner.invoke(app, ["fit-adapter", "--cache", str(cache), "--out", str(out), *FIT, *options])


def test_fit_adapter_reports_what_adapter_json_holds_to_both_viewers(lt_cache, tmp_path):
    out = tmp_path / "a"
    r = fit(lt_cache.path, out, "--report-to", "tensorboard,wandb", "--run-name", "fit-run")
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "adapter.json").read_text())
    scalars = tb_scalars(out / "tb")
    curve = meta["curve"]
    assert [s for s, _ in scalars["train/loss"]] == curve["step"] == [s + 1 for s in curve_steps(meta["steps"])]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx(curve["loss"], rel=1e-6)  # events hold float32
    assert [v for _, v in scalars["train/lr"]] == pytest.approx(curve["lr"], rel=1e-6)
    per_epoch = meta["val_top1_per_epoch"]
    steps_per_epoch = meta["steps"] // 3
    assert scalars["val/top1"] == [((e + 1) * steps_per_epoch, pytest.approx(v, rel=1e-6)) for e, v in
                                   enumerate(per_epoch)]  # fmt: skip
    for group in ("many", "medium", "few"):
        assert [v for _, v in scalars[f"val/{group}"]] == pytest.approx(meta["val_groups_per_epoch"][group], rel=1e-6)
    # the kept epoch's many/medium/few per epoch is the val report's (scored through the head: a float32 near-tie
    # may flip one of a class's 40 val images, 2.5 points of that class)
    kept = meta["best_epoch"] - 1
    assert kept >= 0
    for group in ("many", "medium", "few"):
        assert meta["val_groups_per_epoch"][group][kept] == pytest.approx(meta["val"][group], abs=2.5)
    assert scalars["val/top1"][-1][1] == pytest.approx(per_epoch[-1], rel=1e-6)
    history = wandb_history(out)
    assert sorted(s for s, row in history.items() if "train/loss" in row) == curve["step"]
    assert [history[s]["train/loss"] for s in curve["step"]] == pytest.approx(curve["loss"], rel=1e-12)
    assert [history[(e + 1) * steps_per_epoch]["val/top1"] for e in range(3)] == pytest.approx(per_epoch, rel=1e-12)
    config = wandb_kind(out, "config")
    assert config["lr"] == meta["config"]["lr"] and config["command"] == "fit-adapter"
    summary = wandb_kind(out, "summary")
    assert summary["val_kept/top1"] == pytest.approx(meta["val"]["top1"]) and summary["output"] == str(out)


def test_reporting_changes_no_result_and_a_failing_backend_is_said_once(lt_cache, tmp_path, monkeypatch):
    plain = tmp_path / "plain"
    r = fit(lt_cache.path, plain)
    assert r.exit_code == 0, r.output
    told = tmp_path / "told"
    r = fit(lt_cache.path, told, "--report-to", "tensorboard")
    assert r.exit_code == 0, r.output
    assert (told / "adapter.safetensors").read_bytes() == (plain / "adapter.safetensors").read_bytes()
    calls = []

    def full_disk(self, values, step):
        calls.append(step)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(TensorBoardBackend, "scalars", full_disk)
    broken = tmp_path / "broken"
    r = fit(lt_cache.path, broken, "--report-to", "tensorboard")
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())  # the console wraps long lines
    assert text.count("--report-to tensorboard failed") == 1
    assert "--report-to tensorboard failed ([Errno 28] No space left on device); the run goes on without it" in text
    assert len(calls) == 1  # dropped after its first failure
    assert (broken / "adapter.safetensors").read_bytes() == (plain / "adapter.safetensors").read_bytes()


def test_a_missing_backend_stops_before_any_work_naming_the_install(lt_cache, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(BalladError, match=r"--report-to wandb needs the wandb package: pip install 'ballad\[wandb\]'"):
        check_reporters(["tensorboard", "wandb"])
    out = tmp_path / "a"
    r = runner.invoke(app, ["fit-adapter", "--cache", str(lt_cache.path), "--out", str(out), "--report-to", "wandb"])
    assert r.exit_code == 1 and "pip install 'ballad[wandb]'" in r.output and not out.exists()
    r = runner.invoke(app, ["fit-adapter", "--cache", "c", "--out", str(out), "--report-to", "mlflow"])
    assert r.exit_code == 2 and "mlflow" in r.output


def test_a_sweep_reports_every_point_as_one_record_with_the_best_marked(lt_cache, tmp_path):
    out = tmp_path / "s"
    args = ["sweep", "--cache", str(lt_cache.path), "--out", str(out), "--ratio", "0.1,0.4", "--lr", "0.05,0.2"]
    r = runner.invoke(app, [*args, *FIT, "--report-to", "tensorboard,wandb"])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader((out / "results.csv").open()))  # ranked; metrics printed with 2 decimals
    results = json.loads((out / "results.json").read_text())
    points = {p["key"]: p for p in results["points"]}
    assert len(rows) == 4 == len(points)
    best_key = rows[0]["key"]
    trials = {tb_hparams(folder)["key"]: folder for folder in (out / "tb" / "points").iterdir()}
    assert set(trials) == set(points)
    for rank, row in enumerate(rows, start=1):
        folder = trials[row["key"]]
        assert folder.name == f"{rank:02d}_ratio={float(row['ratio'])}_lr={float(row['lr'])}"  # rank, then what varies
        hp = tb_hparams(folder)
        assert hp["ratio"] == pytest.approx(float(row["ratio"])) and hp["lr"] == pytest.approx(float(row["lr"]))
        assert hp["best"] == (row["key"] == best_key) and "sampler" not in hp  # a setting every point shares
        metrics = tb_scalars(folder)
        for m in ("top1", "few"):
            assert metrics[f"point/{m}"][0][1] == pytest.approx(points[row["key"]]["val"][m], rel=1e-6)  # float32
            assert metrics[f"point/{m}"][0][1] == pytest.approx(float(row[f"val_{m}"]), abs=0.005 + 1e-4)
    test = tb_scalars(out / "tb")
    assert test["test/top1"][0][1] == pytest.approx(results["best_test"]["top1"], rel=1e-6)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"), size_guidance={"images": 0})
    acc.Reload()
    assert "sweep/heatmap" in acc.Tags()["images"]
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    (table_file,) = (run_dir / "files" / "media" / "table" / "sweep").glob("points_*.table.json")
    table = json.loads(table_file.read_text())
    cols = table["columns"]
    by_key = {row[cols.index("key")]: dict(zip(cols, row, strict=True)) for row in table["data"]}
    assert set(by_key) == {row["key"] for row in rows}
    for row in rows:
        assert by_key[row["key"]]["top1"] == points[row["key"]]["val"]["top1"]
        assert by_key[row["key"]]["best"] == (row["key"] == best_key)
    assert wandb_kind(out, "summary")["best_point"] == best_key
    # the same sweep again: its TensorBoard events replaced, its table logged to the same wandb run
    r = runner.invoke(app, [*args, *FIT, "--report-to", "tensorboard,wandb"])
    assert r.exit_code == 0, r.output
    assert (
        len(list((out / "tb").glob("events.out.tfevents.*"))) == 1 and len(list((out / "tb" / "points").iterdir())) == 4
    )
    assert len({d.name.split("-")[3] for d in (out / "wandb").glob("offline-run-*")}) == 1
    assert "metric" in tb_text(out / "tb", "config")


def test_none_turns_reporting_off_and_a_viewer_named_twice_reports_once(lt_cache, tmp_path):
    out = tmp_path / "a"
    r = fit(lt_cache.path, out, "--report-to", "none")
    assert r.exit_code == 0, r.output
    assert not (out / "tb").exists() and not (out / "wandb").exists()
    out = tmp_path / "b"
    r = fit(lt_cache.path, out, "--report-to", "tensorboard,tensorboard")
    assert r.exit_code == 0, r.output
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1


def test_only_rank_zero_reports(tmp_path):
    with Tracker(["tensorboard", "wandb"], tmp_path / "r1", None, {"a": 1}, main=False) as tracker:
        tracker.scalars({"x": 1.0}, 0)
        assert tracker.backends == {}
    assert not (tmp_path / "r1").exists()


FINETUNE = ["finetune", "--data", "fmnist-lt", "--model", "ballad-micro", "--epochs", "2", "--batch-size", "64"]
FINETUNE += ["--lr", "0.05", "--workers", "0", "--device", "cpu", "--log-every", "2", "--schedule", "step"]


def test_a_resumed_phase_a_continues_its_curves_without_duplicates(ballad_data, tmp_path):
    """A run stopped at step 23, resumed to step 29, then resumed again from the step-23 checkpoint (as after a
    crash past a checkpoint): its curves hold each step once, the uninterrupted run's steps and values."""
    import shutil

    report = ["--report-to", "tensorboard,wandb"]
    whole = tmp_path / "whole"
    r = runner.invoke(app, [*FINETUNE, "--out", str(whole), *report])
    assert r.exit_code == 0, r.output
    part = tmp_path / "part"
    r = runner.invoke(app, [*FINETUNE, "--out", str(part), "--max-steps", "23", *report])
    assert r.exit_code == 0, r.output
    shutil.copy(part / "checkpoint.pt", tmp_path / "at23.pt")
    r = runner.invoke(app, [*FINETUNE, "--out", str(part), "--resume", "--max-steps", "29", *report])
    assert r.exit_code == 0, r.output
    shutil.copy(tmp_path / "at23.pt", part / "checkpoint.pt")  # steps 24-29 are logged and will run again
    r = runner.invoke(app, [*FINETUNE, "--out", str(part), "--resume", *report])
    assert r.exit_code == 0, r.output
    records = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    logged = [(r["step"], r["loss"]) for r in records if "loss" in r]
    assert 24 < logged[-1][0]
    val = [(r["step"], r["val"]["top1"]) for r in records if "val" in r and not r.get("stopped")]
    for run in (whole, part):
        scalars = tb_scalars(run / "tb")
        steps = [s for s, _ in scalars["train/loss"]]
        assert steps == sorted(set(steps)), "a step logged twice"
        # the same steps and values as the uninterrupted run's metrics.jsonl (float32 in the events)
        assert steps == [s for s, _ in logged]
        assert [v for _, v in scalars["train/loss"]] == pytest.approx([v for _, v in logged], rel=1e-5)
        assert [(s, v) for s, v in scalars["val/top1"]] == [(s, pytest.approx(v, rel=1e-6)) for s, v in val]
        history = wandb_history(run)  # raises on a step logged twice, across a resumed run's files
        assert sorted(s for s, row in history.items() if "train/loss" in row) == [s for s, _ in logged]
        assert [history[s]["train/loss"] for s, _ in logged] == pytest.approx([v for _, v in logged], rel=1e-12)
    best = tb_scalars(part / "tb")["val/best_top1"]  # the summary, once, at the last step, as the whole run's
    assert best == tb_scalars(whole / "tb")["val/best_top1"] and len(best) == 1
    runs = list((part / "wandb").glob("offline-run-*"))
    assert len(runs) == 3 and {d.name.split("-")[3] for d in runs} == {
        json.loads((part / "wandb-run.json").read_text())["id"]
    }  # the resumed runs reported to the same run id
    a = (whole / "model-last" / "open_clip_model.safetensors").read_bytes()
    assert a == (part / "model-last" / "open_clip_model.safetensors").read_bytes()
    plain = tmp_path / "plain"  # reporting changes no result: the same run without it ends with the same weights
    r = runner.invoke(app, [*FINETUNE, "--out", str(plain)])
    assert r.exit_code == 0, r.output
    assert a == (plain / "model-last" / "open_clip_model.safetensors").read_bytes() and not (plain / "tb").exists()


def test_curve_steps_are_bounded_and_end_at_the_last_step():
    assert curve_steps(0) == [] and curve_steps(3) == [0, 1, 2]
    steps = curve_steps(10_001, points=500)
    assert len(steps) <= 501 and steps[-1] == 10_000 and np.all(np.diff(steps) > 0)


@pytest.mark.slow
def test_reproduce_reports_each_stage_and_the_row(ballad_data, tmp_path):
    """`reproduce --report-to` reports each training stage in its folder (run name NAME/STAGE) and the row's
    achieved and expected numbers and stage times in OUT."""
    out = tmp_path / "r"
    args = ["reproduce", "demo", "--variant", "tiny", "--out", str(out), "--device", "cpu", "--run-name", "row"]
    r = runner.invoke(app, [*args, "--report-to", "tensorboard"])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    summary = tb_scalars(out / "tb")
    for m in report["metrics"]:
        assert summary[f"achieved/{m['metric']}"][0][1] == pytest.approx(m["achieved"], rel=1e-6)
        assert summary[f"expected/{m['metric']}"][0][1] == pytest.approx(m["expected"], rel=1e-6)
    for stage in report["stages"]:
        assert summary[f"seconds/{stage['name']}"][0][1] == pytest.approx(stage["seconds"], rel=1e-6)
    phase_a = [json.loads(line) for line in (out / "finetune" / "metrics.jsonl").read_text().splitlines()]
    assert [s for s, _ in tb_scalars(out / "finetune" / "tb")["train/loss"]] == [
        r["step"] for r in phase_a if "loss" in r
    ]
    adapter = json.loads((out / "adapter" / "adapter.json").read_text())
    assert [s for s, _ in tb_scalars(out / "adapter" / "tb")["train/loss"]] == adapter["curve"]["step"]
    points = json.loads((out / "sweep" / "results.json").read_text())["points"]
    assert {tb_hparams(f)["key"] for f in (out / "sweep" / "tb" / "points").iterdir()} == {p["key"] for p in points}
    config = tb_text(out / "adapter" / "tb", "config")
    assert '"run_name": "row/adapter"' in config


def tb_text(folder: Path, tag: str) -> str:
    """A text summary of the events in `folder`, as TensorBoard's text dashboard reads it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    acc.Reload()
    (event,) = acc.Tensors(f"{tag}/text_summary")
    return event.tensor_proto.string_val[0].decode()


@pytest.mark.slow
def test_under_torchrun_only_rank_zero_reports(ballad_data, tmp_path):
    import os

    from tests.conftest import run_ballad

    env = {**os.environ, "BALLAD_DATA": str(ballad_data), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    args = [*FINETUNE, "--max-steps", "3", "--out", str(tmp_path / "two"), "--report-to", "tensorboard,wandb"]
    two = run_ballad(args, env, ranks=2, port=29581)
    assert two.returncode == 0, two.stderr[-3000:]
    assert len(list((tmp_path / "two" / "tb").glob("events.out.tfevents.*"))) == 1
    assert len(list((tmp_path / "two" / "wandb").glob("offline-run-*"))) == 1
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s, _ in tb_scalars(tmp_path / "two" / "tb")["train/loss"]]
    assert steps == [r["step"] for r in records if "loss" in r]  # one point a step: rank 1 wrote none


def test_a_viewer_failing_mid_phase_a_is_said_once_and_the_run_ends_as_without_it(ballad_data, tmp_path, monkeypatch):
    plain = tmp_path / "plain"
    short = [*FINETUNE, "--max-steps", "9"]
    r = runner.invoke(app, [*short, "--out", str(plain)])
    assert r.exit_code == 0, r.output
    calls = []

    def network_down(self, values, step):
        calls.append(step)
        if len(calls) > 1:  # the first point goes through, then the connection drops
            raise ConnectionError("network is unreachable")
        return real(self, values, step)

    from ballad_cache.tracking import WandbBackend

    real = WandbBackend.scalars
    monkeypatch.setattr(WandbBackend, "scalars", network_down)
    told = tmp_path / "told"
    r = runner.invoke(app, [*short, "--out", str(told), "--report-to", "wandb,tensorboard"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert text.count("--report-to wandb failed (network is unreachable); the run goes on without it") == 1
    assert len(calls) == 2  # dropped after the failure; TensorBoard kept every point
    steps = [s for s, _ in tb_scalars(told / "tb")["train/loss"]]
    records = [json.loads(line) for line in (told / "metrics.jsonl").read_text().splitlines()]
    assert steps == [rec["step"] for rec in records if "loss" in rec]
    name = "model-last/open_clip_model.safetensors"
    assert (told / name).read_bytes() == (plain / name).read_bytes()

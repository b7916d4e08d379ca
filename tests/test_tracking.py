"""train.report_to: one training run's scalars reach tensorboard and an offline wandb run under the same
names and values; a backend the schema does not know, or one that is not installed, is one error line."""
import json
import sys

import pytest
from data_support import synthetic_corpus
from test_train_loop import overrides

from chatterbox.config import ConfigError, load_config

WANDB_LOG_BLOCK, WANDB_LOG_HEADER = 32768, 7  # LevelDB's log format, which wandb's .wandb file uses


def wandb_records(path) -> list:
    """The records (wandb's own protobuf ``Record``) of an offline run's ``.wandb`` file, as ``wandb sync``
    would upload them: after the 7-byte file header, LevelDB log chunks (4-byte CRC, 2-byte length, 1-byte
    type) in 32 KiB blocks; a record split over blocks comes as FIRST, MIDDLE..., LAST."""
    import wandb
    from wandb.proto.wandb_internal_pb2 import Record

    # wandb's service process writes a finished run's last records (its exit) in the background; teardown
    # waits for them, as the end of a training process does (under load the file was read too early).
    wandb.teardown()
    data, pos, pending, records = path.read_bytes(), WANDB_LOG_HEADER, b"", []
    assert data.startswith(b":W&B")
    while pos + WANDB_LOG_HEADER <= len(data):
        block_left = WANDB_LOG_BLOCK - pos % WANDB_LOG_BLOCK
        if block_left < WANDB_LOG_HEADER:  # too small for a chunk header: zero padding to the next block
            pos += block_left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + WANDB_LOG_HEADER:pos + WANDB_LOG_HEADER + length]
        pos += WANDB_LOG_HEADER + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


@pytest.fixture()
def offline_wandb(tmp_path, monkeypatch):
    """wandb writing only to disk, its settings, cache and staging folders in tmp_path (nothing under ~)."""
    for variable in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb_home" / variable))
    monkeypatch.setenv("WANDB_MODE", "offline")


def test_tensorboard_and_offline_wandb_get_the_same_scalars(tmp_path, offline_wandb):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from chatterbox.train.distributed import init_distributed
    from chatterbox.train.loop import Trainer
    from chatterbox.train.run import build_model, build_streams, seed_everything

    out = tmp_path / "run"
    cfg = load_config("tiny_stage1", overrides(synthetic_corpus().data_paths(), out, 2, extra=[
        "train.init_from=", "train.report_to=[tensorboard, wandb]"]))
    dist = init_distributed("cpu")
    seed_everything(0, 0)
    model = build_model(cfg)
    Trainer(cfg, dist, model, build_streams(cfg, model.tokenizer, dist)).fit()

    events = EventAccumulator(str(out / "runs" / "tiny_stage1"))
    events.Reload()
    tensorboard_steps = {}
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            tensorboard_steps.setdefault(event.step, {})[tag] = event.value

    run_file, = (out / "runs" / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    wandb_steps = {}
    for record in records:
        if record.HasField("history"):
            # wandb stores a name either as key or as nested_key (its parts; ours are one part)
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            # wandb's own columns (_step, _runtime, _timestamp) are not the loop's
            wandb_steps[row["_step"]] = {k: v for k, v in row.items() if not k.startswith("_")}

    assert sorted(tensorboard_steps) == sorted(wandb_steps) == [0, 1]
    assert {"train/loss", "train/lr", "streams/grounding/loss", "metrics/samples_per_sec"} <= set(wandb_steps[0])
    for step in (0, 1):
        assert set(tensorboard_steps[step]) == set(wandb_steps[step])
        # event files hold float32
        assert tensorboard_steps[step] == pytest.approx(wandb_steps[step], rel=1e-6, abs=1e-12)

    run, = (r.run for r in records if r.HasField("run"))
    assert (run.project, run.display_name) == ("chatterbox", "tiny_stage1")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["train"]["report_to"] == ["tensorboard", "wandb"]
    assert config["train"]["output_dir"] == str(out)
    exit_record, = (r.exit for r in records if r.HasField("exit"))
    assert exit_record.exit_code == 0


def test_a_failed_run_ends_its_wandb_run_as_failed(tmp_path, offline_wandb):
    from chatterbox.train.tracking import Tracker

    tracker = Tracker(load_config("tiny_stage1", [f"train.log_dir={tmp_path}", "train.report_to=[wandb]"]))
    tracker.log_scalars({"train/loss": 1.0}, step=0)
    tracker.close(failed=True)
    run_file, = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    exit_record, = (r.exit for r in wandb_records(run_file) if r.HasField("exit"))
    assert exit_record.exit_code == 1


@pytest.mark.parametrize("report_to, message", [
    ("[mlflow]", r"^train.report_to\[0\]: 'mlflow' is not one of \['tensorboard', 'wandb'\]"),
    ("[wandb, wandb]", r"^train.report_to names 'wandb' more than once"),
])
def test_an_unknown_or_repeated_backend_is_one_error_naming_train_report_to(report_to, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config("tiny_stage1", [f"train.report_to={report_to}"])
    assert "\n" not in str(err.value)


def test_a_selected_backend_that_is_not_installed_names_the_install_command(monkeypatch):
    from chatterbox.train.tracking import Tracker

    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` meets where it is not installed
    cfg = load_config("tiny_stage1", ["train.report_to=[tensorboard, wandb]"])
    with pytest.raises(ConfigError, match=r"^train.report_to names 'wandb', which is not installed: "
                                          r"pip install wandb ") as err:
        Tracker(cfg)
    assert "\n" not in str(err.value)
    Tracker(load_config("tiny_stage1", ["train.report_to=[]"]))  # nothing selected: nothing to install

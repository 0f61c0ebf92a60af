"""MetricsLog: JSON lines always; TensorBoard scalars readable back from the event file."""
import glob
import json
import struct

from jaxdiff.training.metrics_log import MetricsLog


def _read_events(path):
    """TFRecord framing (u64 length, u32 crc, data, u32 crc) of tensorboard Event protos."""
    from tensorboardX.proto import event_pb2
    out, data = [], open(path, "rb").read()
    i = 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        out.append(event_pb2.Event.FromString(data[i + 12:i + 12 + n]))
        i += 12 + n + 4
    return out


def test_jsonl_and_tensorboard_scalars(tmp_path):
    log = MetricsLog(str(tmp_path), "diffusion")
    log.write(10, {"loss": 0.5, "steps_per_s": 2.0})
    log.write(20, {"loss": 0.25, "steps_per_s": 2.5})
    log.close()
    lines = [json.loads(x) for x in open(tmp_path / "log.jsonl")]
    assert lines == [dict(stage="diffusion", step=10, loss=0.5, steps_per_s=2.0),
                     dict(stage="diffusion", step=20, loss=0.25, steps_per_s=2.5)]
    (events,) = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
    got = {(e.step, v.tag): v.simple_value for e in _read_events(events)
           for v in e.summary.value}
    assert got == {(10, "diffusion/loss"): 0.5, (10, "diffusion/steps_per_s"): 2.0,
                   (20, "diffusion/loss"): 0.25, (20, "diffusion/steps_per_s"): 2.5}


def test_disabled_on_other_processes_writes_nothing(tmp_path):
    log = MetricsLog(str(tmp_path), "x", enabled=False)
    log.write(1, {"loss": 1.0})
    log.close()
    assert list(tmp_path.iterdir()) == []

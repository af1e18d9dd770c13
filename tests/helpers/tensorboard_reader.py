"""Read scalars back from TensorBoard event files, for tests: tag → [(step, value)], in step order."""

from __future__ import annotations

from pathlib import Path


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(logdir).rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
            length = int.from_bytes(data[pos : pos + 8], "little")
            payload = data[pos + 12 : pos + 12 + length]
            pos += 12 + length + 4
            event = event_pb2.Event.FromString(payload)
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return {tag: sorted(points) for tag, points in out.items()}

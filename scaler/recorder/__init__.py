"""A flight recorder of task arrivals: per-queue counts over time, replayable by `scaler simulate`.

The app publishes a ``task-sent`` event for every task (``task_send_sent_event``); the recorder
listens for those with Celery's own event receiver, on a connection of the app (Redis or RabbitMQ
alike), in a daemon thread that reconnects with backoff when the broker drops. Arrivals are
counted in buckets of ``resolution_s`` (1 s) by the event's publish timestamp, and every few
seconds the closed buckets are appended to the file as trace rows ``t,queue,count``, t being
seconds since the epoch in the segment's header::

    # scaler flight recorder: started 2024-05-01T12:00:00+00:00, epoch 1714564800.0, resolution 1
    t,queue,count
    0,io_intensive,12
    1,io_intensive,3
    1,priority,1

Every start (and every rotation) begins a new segment with its own header, so one file may hold
several. When the file would pass ``max_bytes`` it becomes ``FILE.1`` (the previous ``FILE.1`` is
dropped) and a new ``FILE`` begins: at most about twice the cap on disk. ``export_trace`` merges
``FILE.1`` and ``FILE`` into one trace that starts at t=0, the format ``scaler simulate --trace``
reads. ``FILE.lock`` (flock) admits one writer per file: a second recorder (an HA standby) waits,
and takes over when the first one's process ends.

The recorder never stops the scaler: if events cannot be received it says so in ``status()`` and
the log (``state`` "disconnected", the error, since when) and keeps retrying.
"""

from __future__ import annotations

from scaler.recorder.cli import add_record_command, add_run_flags, settings_from_args
from scaler.recorder.receiver import FlightRecorder
from scaler.recorder.settings import RecorderError, RecorderSettings
from scaler.recorder.tracefile import TraceFile, export_trace, read_recording

__all__ = [
    "FlightRecorder",
    "RecorderError",
    "RecorderSettings",
    "TraceFile",
    "add_record_command",
    "add_run_flags",
    "export_trace",
    "read_recording",
    "settings_from_args",
]

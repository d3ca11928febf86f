"""The local engine of ``vtr caption``: decode in worker processes while the model captions batches.

Flow: a :class:`~vtr.video.caption_decode.DecodePool` decodes videos ahead of the model (up to
``2 * batch_size`` decoded clips wait, so memory stays bounded); the main process takes decoded clips as
they arrive, ``batch_size`` at a time, captions each batch with one ``generate`` call and hands every record
to ``emit`` as soon as its batch finishes. Decode failures are emitted at once, without waiting for a batch.
No Ray import anywhere on this path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from vtr.video.caption_decode import Decoded, DecodePool, make_decode_task
from vtr.video.caption_model import Captioner

if TYPE_CHECKING:
    from vtr.video.caption import CaptionConfig

__all__ = ["run_local"]


def run_local(
    config: CaptionConfig,
    paths: Sequence[str],
    emit: Callable[[dict[str, Any]], None],
    *,
    reader: Callable[..., Any],
) -> None:
    """Caption ``paths`` and call ``emit(record)`` once per video, in completion order."""
    task = make_decode_task(reader, config.read_kwargs(), config.max_duration)
    pool = DecodePool(task, workers=config.workers, prefetch=2 * config.batch_size, timeout=config.decode_timeout)
    with pool:
        results = pool.imap(paths)  # workers start (spawn) while the model loads below
        captioner = Captioner(
            config.model,
            recipe=config.recipe,
            keep=config.keep,
            prompt=config.prompt,
            max_new_tokens=config.max_new_tokens,
            dtype=config.dtype,
            device=config.resolved_device(),
        )
        batch: list[Decoded] = []
        for item in results:
            if item.clip is None:
                emit(captioner.caption([item])[0])  # a decode error: record it now
                continue
            batch.append(item)
            if len(batch) == config.batch_size:
                for record in captioner.caption(batch):
                    emit(record)
                batch = []
        if batch:
            for record in captioner.caption(batch):
                emit(record)

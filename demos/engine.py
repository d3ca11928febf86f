"""The model side of the demo: one loaded model answers both sides, streamed and measured (no Gradio here).

:class:`DemoEngine` owns the model and a lock. :meth:`DemoEngine.run` answers a :class:`DemoRequest` twice
with the SAME model instance: first as loaded (baseline), then inside ``vtr.reduced(model, recipe, ...)``,
which wraps the instance for that block only and restores it afterwards. Each side streams its text as it
is generated and records time to first token, total time and peak memory; the reduced side also yields
the report (tokens per stage, kept indices) and the image layouts the overlays are drawn from.

Requests reach it checked (:func:`vtr.demos.inputs.make_request`).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

import vtr
from vtr.demos.figures import SideResult
from vtr.demos.geometry import ViewInputs
from vtr.demos.inputs import DemoRequest
from vtr.report import Report
from vtr.tokens import ImageLayout

__all__ = ["DemoEngine", "PeakMemory", "Update"]


# ----------------------------------------------------------------------------------------------- measuring
def _proc_kib(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    """``malloc_trim(0)`` on glibc (no-op elsewhere)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name:
        trim = getattr(ctypes.CDLL(name), "malloc_trim", None)
        if trim is not None:
            trim(0)


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocations on a GPU, process RSS on the CPU (Linux).

    On the CPU the kernel's high-water mark (``VmHWM``) is reset through ``/proc/self/clear_refs``; where
    that is not possible :attr:`peak_bytes` stays ``None`` (shown as n/a, never a made-up figure).
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.peak_bytes: int | None = None
        self._start = 0
        self._ok = False

    @property
    def exact(self) -> bool:
        """CUDA figures count tensor memory exactly; CPU RSS also moves with the allocator and other threads."""
        return self.cuda

    @property
    def label(self) -> str:
        return "peak CUDA memory above start" if self.cuda else "peak process RSS growth, rough"

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start, self._ok = torch.cuda.memory_allocated(self.device), True
            return self
        _malloc_trim()  # hand freed heap back to the OS, so this side's growth is not hidden by the last one's
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            return self
        start = _proc_kib("VmRSS")
        self._start, self._ok = (start or 0) * 1024, start is not None
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._ok:
            return
        if self.cuda:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            hwm = _proc_kib("VmHWM")
            if hwm is None:
                return
            peak = hwm * 1024
        self.peak_bytes = max(0, int(peak) - self._start)


class _TokenStream:
    """A ``generate`` streamer: skips the prompt, queues new token ids, stamps the first one."""

    def __init__(self) -> None:
        self.queue: queue.Queue[list[int] | None] = queue.Queue()
        self.first: float | None = None
        self._prompt = True

    def put(self, value: torch.Tensor) -> None:
        if self._prompt:  # generate sends the prompt ids first
            self._prompt = False
            return
        if self.first is None:
            self.first = time.perf_counter()
        self.queue.put([int(v) for v in value.reshape(-1).tolist()])

    def end(self) -> None:
        self.queue.put(None)


class _Cancel(StoppingCriteria):
    """Stopping criterion that ends generation once ``event`` is set (the page went away)."""

    def __init__(self, event: threading.Event):
        super().__init__()
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


@dataclass
class Update:
    """One step of :meth:`DemoEngine.run`: texts so far and, once a side is done, its results.

    ``phase`` is ``"baseline"`` or ``"reduced"`` while streaming and ``"done"`` at the end, when ``report``,
    ``layouts``, ``family`` and ``views`` describe the reduced call.
    """

    phase: str
    base_text: str = ""
    red_text: str = ""
    base: SideResult | None = None
    red: SideResult | None = None
    report: Report | None = None
    layouts: list[ImageLayout] | None = None
    views: ViewInputs | None = None
    memory_label: str = ""
    memory_exact: bool = False
    recipe_text: str = ""


# ----------------------------------------------------------------------------------------------- the engine
class DemoEngine:
    """One loaded model and its processor, serving baseline and reduced answers in turn (thread-safe)."""

    def __init__(self, model: torch.nn.Module, processor: Any, *, name: str = "model"):
        from vtr.adapters import adapter_for

        adapter = adapter_for(model)  # a clear TypeError for unsupported models, before any request
        if vtr.is_wrapped(model):
            raise ValueError("DemoEngine needs the model unwrapped: its baseline side runs the model as loaded")
        self.model = model
        self.processor = processor
        self.name = name
        self.family = adapter.name
        self.picture = adapter.picture  # how the processor maps a picture onto the grids (drawing)
        self.supports_video = bool(adapter.supports_video) and getattr(processor, "video_processor", None) is not None
        self.device = next(model.parameters()).device
        self.bytes_per_value = next(model.parameters()).element_size()
        text = model.config.get_text_config()
        decoder = all(hasattr(text, a) for a in ("num_hidden_layers", "num_attention_heads", "hidden_size"))
        #: The LLM's config for analytic KV-cache figures (``None`` when it is not decoder-shaped).
        self.text_config = text if decoder else None
        gen = getattr(model.generation_config, "max_new_tokens", None)
        self.default_max_new_tokens = int(gen) if gen else 32
        self._lock = threading.Lock()
        # One long-lived generation thread: its stack and malloc arena are reused by every call, so the
        # CPU peak-memory figure measures the call, not a fresh thread's set-up.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vtr-demo-generate")

    @classmethod
    def load(cls, model: str | None = None, *, dtype: str = "float32", device: str = "cpu") -> DemoEngine:
        """Load ``model`` (a Hugging Face id or path; ``None``: the bundled tiny model) with ``load_model``."""
        from vtr.models import load_model

        try:
            m, p = load_model(model, dtype=dtype, device=device)
        except (OSError, ValueError) as exc:  # missing files, unknown hub id, no network, bad config
            text = " ".join(str(exc).split())  # Hugging Face messages span lines; the CLI prints one
            raise ValueError(f"cannot load model {model!r}: {text[:400]}") from exc
        return cls(m.eval(), p, name=model or "bundled tiny model")

    # ------------------------------------------------------------------ inputs
    def prepare(self, req: DemoRequest) -> tuple[Any, Any]:
        """Processor inputs on the model's device and the media they came from (picture or ``[T, H, W, 3]`` frames)."""
        if req.kind == "image":
            from vtr.media import load_image

            image = load_image(req.path)
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": req.prompt}]}]
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
            inputs = self.processor(images=[image], text=[text], return_tensors="pt")
            return inputs.to(self.device), image
        from vtr.video import read_video, usable_frames, video_inputs

        clip = read_video(req.path, num_frames=req.frames)
        n = usable_frames(self.processor, clip)
        inputs = video_inputs(self.processor, [clip], [req.prompt])
        return inputs.to(self.device), clip.frames[:n]

    def warmup(self) -> None:
        """One short generation on a grey picture, so the first request's baseline pays no first-call costs."""
        from PIL import Image

        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "warm up"}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        image = Image.new("RGB", (64, 64), (128, 128, 128))
        inputs = self.processor(images=[image], text=[text], return_tensors="pt").to(self.device)

        def work() -> None:
            with torch.inference_mode():
                self.model.generate(**inputs, max_new_tokens=1, do_sample=False)

        with self._lock:
            self._worker.submit(work).result()

    # ------------------------------------------------------------------ answering
    def _decode(self, ids: list[int]) -> str:
        tok = getattr(self.processor, "tokenizer", self.processor)
        return tok.decode(ids, skip_special_tokens=True).strip()

    def _stream(
        self, inputs: Any, max_new_tokens: int, cancel: threading.Event
    ) -> Iterator[tuple[str, SideResult | None, PeakMemory]]:
        """Generate in the worker thread; yield ``(text so far, None)`` per token, then ``(text, result)``.

        Closing the iterator early stops generation and waits for the worker, so the model is never left
        running when the caller unwraps it.
        """
        streamer = _TokenStream()
        stop = threading.Event()
        errors: list[BaseException] = []

        def work() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(
                        **inputs,
                        max_new_tokens=max_new_tokens,
                        do_sample=False,
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([_Cancel(stop)]),
                    )
            except BaseException as exc:  # re-raised in the caller's thread
                errors.append(exc)
            finally:
                streamer.end()

        ids: list[int] = []
        meter = PeakMemory(self.device)
        future: Future | None = None
        try:
            with meter:
                t0 = time.perf_counter()
                future = self._worker.submit(work)
                while True:
                    if cancel.is_set():
                        stop.set()
                    try:
                        item = streamer.queue.get(timeout=0.1)
                    except queue.Empty:
                        continue
                    if item is None:
                        break
                    ids += item
                    yield self._decode(ids), None, meter
                future.result()
                total = time.perf_counter() - t0
            if errors:
                raise errors[0]
            ttft = None if streamer.first is None else streamer.first - t0
            text = self._decode(ids)
            yield text, SideResult(text, len(ids), ttft, total, meter.peak_bytes), meter
        finally:
            stop.set()
            if future is not None:
                future.result()

    def run(self, req: DemoRequest, cancel: threading.Event | None = None) -> Iterator[Update]:
        """Answer ``req`` baseline then reduced with the one loaded model; yield an :class:`Update` per token.

        Holds the engine lock for the whole request: two requests never interleave on the model.
        """
        cancel = cancel or threading.Event()
        with self._lock:
            if vtr.is_wrapped(self.model):  # only this method wraps it, and always scoped
                raise RuntimeError("the demo model is wrapped outside a request; refusing to mix results")
            inputs, media = self.prepare(req)
            base: SideResult | None = None
            meter: PeakMemory | None = None
            yield Update("baseline")
            with closing(self._stream(inputs, req.max_new_tokens, cancel)) as stream:
                for text, result, side_meter in stream:
                    base, meter = result, side_meter
                    yield Update("baseline", base_text=text, base=base)
            assert base is not None
            with vtr.reduced(self.model, req.recipe, processor=self.processor, **req.overrides):
                recipe_text = ", ".join(repr(op) for op in self.model.vtr.recipe.ops)
                red: SideResult | None = None
                yield Update("reduced", base_text=base.answer, base=base, recipe_text=recipe_text)
                with closing(self._stream(inputs, req.max_new_tokens, cancel)) as stream:
                    for text, result, _ in stream:
                        red = result
                        yield Update(
                            "reduced", base_text=base.answer, red_text=text, base=base, recipe_text=recipe_text
                        )
                report = self.model.vtr.report
                layouts = _layouts(self.model, report)
            assert red is not None and report is not None
            yield Update(
                "done",
                base_text=base.answer,
                red_text=red.answer,
                base=base,
                red=red,
                report=report,
                layouts=layouts,
                views=ViewInputs(media=media, inputs=inputs, processor=self.processor),
                memory_label=meter.label if meter else "",
                memory_exact=bool(meter and meter.exact),
                recipe_text=recipe_text,
            )


def _layouts(model: torch.nn.Module, report: Report, sample: int = 0) -> list[ImageLayout] | None:
    """The image layouts of ``sample`` in the latest reduced call (from the report when it carries them)."""
    per_sample = getattr(report, "layouts", None)
    if per_sample:
        return list(per_sample[sample])
    last = getattr(model.vtr.adapter, "last", None)
    return list(last.spans[sample].layout) if last is not None else None

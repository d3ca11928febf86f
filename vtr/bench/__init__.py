"""Benchmarks behind ``vtr bench``: each module exposes ``add_arguments(parser)`` and ``run(args) -> int``.

* ``quality``    accuracy vs visual tokens kept on the synthetic visual QA test split
* ``kernels``    Triton kernels vs torch fallbacks vs an official-style loop
* ``efficiency`` prefill time and analytic FLOPs, baseline vs reduced, on a LLaVA-1.5-shaped model
* ``tome``       images/s of a timm ViT: no merging vs vtr's ToMe vs the official ToMe patch (from a checkout)
* ``video-speed`` decoding throughput of ``vtr.video``; prefill with ``storm`` / ``quota`` on a Qwen2-VL-shaped model
* ``caption-speed`` ``vtr caption`` videos/min: local engine (1, 2 decode workers), Ray (1, 2 actors), per recipe
"""

BENCHMARKS = ("quality", "kernels", "efficiency", "tome", "video-speed", "caption-speed")

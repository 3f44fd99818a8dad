"""The toy world: a CPU-sized text-to-image world in which protection can be measured.

It is an *instrument*, not part of the product: engines never special-case it, they only receive the path of
its diffusers-format model. See docs/toy_world.md.
"""

from apdm.toy.world import instruments_path, model_path  # noqa: F401

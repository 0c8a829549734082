"""The profile stage: trace one repeated layer of a user's model and describe its memory.

- ``loader.py``: import a model file and check its convention (all user-file errors).
- ``meta.py``: build the model with its parameters on the meta device; materialise the layer.
- ``layers.py``: find the repeated layer class; capture one real call of it.
- ``graph.py``: trace the layer's forward+backward with make_fx; run it once, recording values.
- ``classify.py``: token axes, token-wise vs mixing ops (probes), segments, saved tensors.
- ``requests.py``: malloc/free requests of a forward and a backward; live-bytes peaks.
- ``laws.py``: fit sizes and FLOPs as polynomials of the sequence length.
- ``profile.py``: the driver, ``profile_model(ProfileConfig) -> Profile``.
"""

from memoplan.trace.profile import ProfileConfig, profile_model

__all__ = ["ProfileConfig", "profile_model"]

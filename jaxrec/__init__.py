"""jaxrec: the JAX side of DEALRec (data, Flax surrogates, influence, selection).

Importing :mod:`jaxrec` or :mod:`jaxrec.data` pulls in NumPy only; the JAX modules
(`jaxrec.models`, `jaxrec.train`, `jaxrec.influence`) are imported where they are used, so the
PyTorch side can share the data layer and score files without importing JAX.
"""

__version__ = "0.1.0"

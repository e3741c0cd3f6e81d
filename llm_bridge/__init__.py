"""llm_bridge: the PyTorch side of DEALRec (BIGRec prompts, LoRA effort scores, fine-tune,
evaluation).

It never imports JAX; it meets the JAX side only through the NumPy data layer
(:mod:`jaxrec.data`) and score files.
"""

"""TIGER backend (Rajput et al., NeurIPS 2023): generative retrieval over semantic IDs.

Modules:
  content       item content embeddings (all-MiniLM-L6-v2, mean pooling, L2 norm; cached)
  semantic_ids  ``dealrec semantic-ids``: RQ-VAE or residual k-means codes, the collision code,
                and :func:`~llm_bridge.tiger.semantic_ids.load_semantic_ids`
  model         the encoder-decoder T5 over semantic-ID tokens
  generate      beam search constrained by a trie over all item IDs
  finetune      few-shot fine-tune on the selected users
  evaluate      Recall@K / NDCG@K of the generated IDs
  effort        DEALRec's effort score (Eq. 12) for the TIGER model
  backend       the object ``llm_bridge.backend.get_backend("tiger")`` returns
"""

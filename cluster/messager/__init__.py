"""The cache messager actor (one per prefill instance) and its bookkeeping."""

"""Ray instance actors: prefill (with its prepare pool), decode, and mixed (colocated)."""

"""The DVC stages: each module holds only what its stage does differently."""

"""Rules every layer shares (bottom layer: imports torch only, never another fusedpeft module)."""

"""torch.library custom ops, one family per file: schema, fake, autograd and backend dispatch."""

from fusedpeft.ops import cross_entropy, dora, lora, lora_grouped, mora  # noqa: F401  (registers the ops)

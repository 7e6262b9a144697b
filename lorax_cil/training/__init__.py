"""lorax_cil.training."""

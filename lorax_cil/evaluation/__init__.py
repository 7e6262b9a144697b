"""lorax_cil.evaluation."""

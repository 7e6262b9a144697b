"""lorax_cil.models."""

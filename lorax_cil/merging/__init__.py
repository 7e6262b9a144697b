"""lorax_cil.merging."""

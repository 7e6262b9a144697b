"""Subcommands of `lorax-cil`. Each module defines ``register(subparsers)``.

Heavy imports happen inside the command functions, never at module import.
"""

"""Subcommands of the `deepseek-model` console script (see deepseek_model.cli)."""

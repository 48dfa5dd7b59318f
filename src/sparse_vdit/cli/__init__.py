"""Command-line interface (`sparse-vdit ...`)."""

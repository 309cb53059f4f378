"""Reports and CLI subcommands (thin shells over the public API)."""

"""trio adapters only: listeners and the per-connection loop around the sans-IO core, DNS lookups."""

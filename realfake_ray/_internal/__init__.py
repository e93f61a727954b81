"""Ray wiring shared by the stages (internal: no stability promise)."""

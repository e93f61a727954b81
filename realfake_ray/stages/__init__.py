"""The pipeline's stages, one package each (driver = the Ray wiring; plan / step / workers = pure logic),
and ``pipeline`` (the whole job)."""

"""Other tools' formats: Arrow views, sources to import from, and the exporter (docs/interop.md)."""

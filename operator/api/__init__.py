"""The FineTuneJob API (pydantic): the single source of truth for the CRD."""

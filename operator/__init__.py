"""The kopf operator: API models, pure manifest builders, thin handlers."""

"""Device models and the device-model API (no trio, no wire format)."""

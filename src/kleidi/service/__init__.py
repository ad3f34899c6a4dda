"""The service layer: protocol rules, key_id, annotations and the envelope; no backend details."""

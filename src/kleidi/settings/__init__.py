"""kleidi's settings, by concern (the public entry point is :mod:`kleidi.config`)."""

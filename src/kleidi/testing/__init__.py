"""Test bases that ship with kleidi, for backends (and later plugins) to prove themselves against."""

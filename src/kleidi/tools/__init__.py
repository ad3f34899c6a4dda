"""Operator tools over a cluster's stored data (#14): one library module per ``kleidi`` command."""
